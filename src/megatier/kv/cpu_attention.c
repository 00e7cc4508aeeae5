/* Decode attention on the CPU over KV pages in host memory: the "DDR-PIM" tier of megatier.
 *
 * One query token per sequence. Sequence b attends to the listed pages pages[offsets[b]..offsets[b+1]),
 * using the first rows[i] rows of listed page i. The work is cut into tasks of (sequence, kv head,
 * run of at most chunk_pages pages); OpenMP threads take tasks dynamically, so they stay balanced
 * however the pages are spread. A task keeps an unnormalized online-softmax state for the query heads
 * of its GQA group, so K and V are read once per group; a second pass merges the tasks of each
 * (sequence, kv head) exactly and writes the normalized output and the natural-log LSE.
 *
 * Speed: the inner loops use 8- or 16-wide vectors (GCC vector extensions: no intrinsics, any target):
 * bf16 is widened on the fly, every loaded K or V vector feeds all heads of the group, the
 * accumulators stay in registers across the rows of a block, and exp is a vectorized polynomial.
 * Needs head_dim % vector_width() == 0 (returns -2 otherwise: the caller falls back to torch).
 * Called through ctypes, which releases the GIL while it runs.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { BF16 = 0, F32 = 1 };
#define BLOCK 16 /* rows scored at once */
#define MAX_G 16 /* query heads per kv head handled in one pass */

/* The vector width: 16 lanes where AVX-512 is there, else 8 (AVX2 and most other targets). */
#ifndef W
#if defined(__AVX512F__)
#define W 16
#else
#define W 8
#endif
#endif
typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));
typedef uint16_t vh __attribute__((vector_size(W * 2)));
typedef uint32_t vu __attribute__((vector_size(W * 4)));

int vector_width(void) { return W; }

/* W elements at p (bf16 or fp32) as fp32. */
static inline vf loadv(const void *p, int dtype) {
    vf out;
    if (dtype == F32) {
        memcpy(&out, p, sizeof out);
    } else {
        vh h;
        memcpy(&h, p, sizeof h);
        vu u = __builtin_convertvector(h, vu) << 16;
        memcpy(&out, &u, sizeof out);
    }
    return out;
}

static inline float hsum(vf v) {
#if W == 16
    return (((v[0] + v[8]) + (v[1] + v[9])) + ((v[2] + v[10]) + (v[3] + v[11]))) +
           (((v[4] + v[12]) + (v[5] + v[13])) + ((v[6] + v[14]) + (v[7] + v[15])));
#else
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
#endif
}

static inline vf splat(float x) {
#if W == 16
    return (vf){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
#else
    return (vf){x, x, x, x, x, x, x, x};
#endif
}

/* mask ? a : b, lane by lane (mask lanes are all ones or all zeros, as comparisons give). */
static inline vf selectv(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }

/* exp(x) for x <= 0 (Cephes' expf polynomial, about 1 ulp; x < -87 gives 0). */
static inline vf vexp(vf x) {
    vf lo = splat(-87.0f);
    vi under = x <= lo;
    x = selectv(under, lo, x);
    vf t = x * splat(1.44269504088896341f) - splat(0.5f);
    vi k = __builtin_convertvector(t, vi); /* t < 0: truncation rounds x/ln2 to nearest */
    vf kf = __builtin_convertvector(k, vf);
    vf f = x - kf * splat(0.693359375f) - kf * splat(-2.12194440e-4f);
    vf p = splat(1.9875691500e-4f);
    p = p * f + splat(1.3981999507e-3f);
    p = p * f + splat(8.3334519073e-3f);
    p = p * f + splat(4.1665795894e-2f);
    p = p * f + splat(1.6666665459e-1f);
    p = p * f + splat(5.0000001201e-1f);
    p = p * f * f + f + splat(1.0f);
    vi bits = (k + 127) << 23;
    vf scale;
    memcpy(&scale, &bits, sizeof scale);
    vf out = p * scale;
    return selectv(under, splat(0.0f), out);
}

typedef struct {
    const char *kv; /* the pool at this layer, as bytes */
    int64_t page_stride, v_offset, head_stride; /* in elements */
    int dtype, elem, D, G;
    const int32_t *pages, *rows;
} pool_t;

typedef struct {
    int32_t seq, head, first, last; /* listed pages [first, last) */
} task_t;

/* One block of n <= BLOCK rows for ng heads: scores, online softmax, V accumulation. Inlined per
 * common ng (below) so the per-head accumulators live in registers; two rows (scores) and two
 * vector chunks (V) advance together, giving the FMA units independent chains. */
static inline __attribute__((always_inline)) void block_impl(const pool_t *p, const char *kb, const char *vb, int n,
                                                           const vf *q, vf *acc, float *m, float *l,
                                                           const int ng) {
    const int C = p->D / W, row = p->D * p->elem;
    float s[MAX_G][BLOCK];
    for (int r = 0; r < n; r += 2) {
        const int two = r + 1 < n;
        vf d0[MAX_G], d1[MAX_G];
        for (int g = 0; g < ng; g++) d0[g] = d1[g] = splat(0.0f);
        const char *k0 = kb + (int64_t)r * row, *k1 = two ? k0 + row : k0;
        for (int c = 0; c < C; c++) {
            vf x0 = loadv(k0 + c * W * p->elem, p->dtype), x1 = loadv(k1 + c * W * p->elem, p->dtype);
            for (int g = 0; g < ng; g++) {
                d0[g] += q[g * C + c] * x0;
                d1[g] += q[g * C + c] * x1;
            }
        }
        for (int g = 0; g < ng; g++) {
            s[g][r] = hsum(d0[g]);
            if (two) s[g][r + 1] = hsum(d1[g]);
        }
    }
    for (int g = 0; g < ng; g++) {
        float mx = m[g];
        for (int r = 0; r < n; r++) mx = s[g][r] > mx ? s[g][r] : mx;
        float alpha = m[g] == -INFINITY ? 0.0f : expf(m[g] - mx);
        for (int r = n; r < BLOCK; r++) s[g][r] = -INFINITY;
        vf sum = splat(0.0f);
        for (int r = 0; r < BLOCK; r += W) {
            vf x;
            memcpy(&x, s[g] + r, sizeof x);
            x = vexp(x - splat(mx));
            memcpy(s[g] + r, &x, sizeof x);
            sum += x;
        }
        l[g] = l[g] * alpha + hsum(sum);
        m[g] = mx;
        for (int c = 0; c < C; c++) acc[g * C + c] *= splat(alpha);
    }
    for (int c = 0; c < C; c += 2) {
        const int two = c + 1 < C;
        vf a0[MAX_G], a1[MAX_G];
        for (int g = 0; g < ng; g++) {
            a0[g] = acc[g * C + c];
            a1[g] = two ? acc[g * C + c + 1] : splat(0.0f);
        }
        for (int r = 0; r < n; r++) {
            const char *v = vb + (int64_t)r * row + c * W * p->elem;
            vf y0 = loadv(v, p->dtype), y1 = two ? loadv(v + W * p->elem, p->dtype) : splat(0.0f);
            for (int g = 0; g < ng; g++) {
                a0[g] += splat(s[g][r]) * y0;
                a1[g] += splat(s[g][r]) * y1;
            }
        }
        for (int g = 0; g < ng; g++) {
            acc[g * C + c] = a0[g];
            if (two) acc[g * C + c + 1] = a1[g];
        }
    }
}

#define BLOCK_FOR(G)                                                                                             \
    static void block_g##G(const pool_t *p, const char *kb, const char *vb, int n, const vf *q, vf *acc,     \
                           float *m, float *l) {                                                               \
        block_impl(p, kb, vb, n, q, acc, m, l, G);                                                             \
    }
BLOCK_FOR(1)
BLOCK_FOR(2)
BLOCK_FOR(3)
BLOCK_FOR(4)
BLOCK_FOR(8)

static void attend_block(const pool_t *p, const char *kb, const char *vb, int n, const vf *q, int ng, vf *acc,
                         float *m, float *l) {
    switch (ng) {
    case 1: block_g1(p, kb, vb, n, q, acc, m, l); break;
    case 2: block_g2(p, kb, vb, n, q, acc, m, l); break;
    case 3: block_g3(p, kb, vb, n, q, acc, m, l); break;
    case 4: block_g4(p, kb, vb, n, q, acc, m, l); break;
    case 8: block_g8(p, kb, vb, n, q, acc, m, l); break;
    default: block_impl(p, kb, vb, n, q, acc, m, l, ng);
    }
}

/* Attend q (G heads, pre-scaled) to the pages of one task; state = acc[G][D] unnormalized, m[G], l[G]. */
static void run_task(const pool_t *p, const float *q, const task_t *t, float *state) {
    const int D = p->D, G = p->G;
    float *acc = state, *m = state + G * D, *l = m + G;
    vf qv[MAX_G * (512 / W)], av[MAX_G * (512 / W)];
    for (int g0 = 0; g0 < G; g0 += MAX_G) {
        int ng = G - g0 < MAX_G ? G - g0 : MAX_G;
        memcpy(qv, q + g0 * D, sizeof(float) * ng * D);
        memset(av, 0, sizeof(float) * ng * D);
        for (int g = 0; g < ng; g++) {
            m[g0 + g] = -INFINITY;
            l[g0 + g] = 0.0f;
        }
        for (int i = t->first; i < t->last; i++) {
            const char *kb = p->kv + (p->pages[i] * p->page_stride + t->head * p->head_stride) * p->elem;
            const char *vb = kb + p->v_offset * p->elem;
            for (int r0 = 0; r0 < p->rows[i]; r0 += BLOCK) {
                int n = p->rows[i] - r0 < BLOCK ? p->rows[i] - r0 : BLOCK;
                int64_t off = (int64_t)r0 * D * p->elem;
                attend_block(p, kb + off, vb + off, n, qv, ng, av, m + g0, l + g0);
            }
        }
        memcpy(acc + g0 * D, av, sizeof(float) * ng * D);
    }
}

/* Merge the task states of one (sequence, kv head) into normalized outputs and LSEs for its G heads. */
static void merge_states(const float *states, int64_t num, int64_t state_size, int D, int G, float *out,
                         float *lse) {
    for (int g = 0; g < G; g++) {
        float mx = -INFINITY, total = 0.f;
        for (int64_t i = 0; i < num; i++) {
            float mi = states[i * state_size + G * D + g];
            mx = mi > mx ? mi : mx;
        }
        float *o = out + g * D;
        memset(o, 0, sizeof(float) * D);
        if (mx == -INFINITY) {
            lse[g] = -INFINITY;
            continue;
        }
        for (int64_t i = 0; i < num; i++) {
            const float *st = states + i * state_size;
            if (st[G * D + g] == -INFINITY) continue;
            float w = expf(st[G * D + g] - mx);
            total += w * st[G * D + G + g];
            for (int d = 0; d < D; d++) o[d] += w * st[g * D + d];
        }
        for (int d = 0; d < D; d++) o[d] /= total;
        lse[g] = mx + logf(total);
    }
}

int attend(const float *q, const void *kv, int dtype, int64_t page_stride, int64_t v_offset, int64_t head_stride,
           int D, int num_kv_heads, int G, int num_seqs, const int64_t *offsets, const int32_t *pages,
           const int32_t *rows, float scale, float *out, float *lse, int chunk_pages, int num_threads) {
    if (D % W != 0 || D > 512) return -2;
    pool_t pool = {kv, page_stride, v_offset, head_stride, dtype, dtype == F32 ? 4 : 2, D, G, pages, rows};
    int64_t num_pairs = (int64_t)num_seqs * num_kv_heads, num_tasks = 0;
    for (int b = 0; b < num_seqs; b++) {
        int64_t n = offsets[b + 1] - offsets[b];
        num_tasks += num_kv_heads * (n > 0 ? (n + chunk_pages - 1) / chunk_pages : 1);
    }
    int64_t state_size = (int64_t)G * (D + 2);
    task_t *tasks = malloc(sizeof(task_t) * num_tasks);
    int64_t *first_task = malloc(sizeof(int64_t) * (num_pairs + 1));
    float *states = malloc(sizeof(float) * state_size * num_tasks);
    float *qs = malloc(sizeof(float) * num_pairs * G * D);
    if (!tasks || !first_task || !states || !qs) {
        free(tasks);
        free(first_task);
        free(states);
        free(qs);
        return -1;
    }
    int64_t k = 0;
    for (int b = 0; b < num_seqs; b++)
        for (int h = 0; h < num_kv_heads; h++) {
            first_task[(int64_t)b * num_kv_heads + h] = k;
            int64_t i = offsets[b];
            do {
                int64_t end = i + chunk_pages < offsets[b + 1] ? i + chunk_pages : offsets[b + 1];
                tasks[k++] = (task_t){b, h, (int32_t)i, (int32_t)end};
                i = end;
            } while (i < offsets[b + 1]);
        }
    first_task[num_pairs] = k;
    for (int64_t i = 0; i < num_pairs * G * D; i++) qs[i] = q[i] * scale;

#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t i = 0; i < num_tasks; i++) {
        int64_t pair = (int64_t)tasks[i].seq * num_kv_heads + tasks[i].head;
        run_task(&pool, qs + pair * G * D, &tasks[i], states + i * state_size);
    }
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t pair = 0; pair < num_pairs; pair++)
        merge_states(states + first_task[pair] * state_size, first_task[pair + 1] - first_task[pair], state_size, D,
                     G, out + pair * G * D, lse + pair * G);

    free(tasks);
    free(first_task);
    free(states);
    free(qs);
    return 0;
}
