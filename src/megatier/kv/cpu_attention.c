/* Decode attention on the CPU over KV pages in host memory: the "DDR-PIM" tier of megatier.
 *
 * One query token per sequence. Sequence b attends to the listed pages pages[offsets[b]..offsets[b+1]),
 * using the first rows[i] rows of listed page i. The work is cut into tasks of (sequence, kv head,
 * run of at most chunk_pages pages); OpenMP threads take tasks dynamically, so they stay balanced
 * however the pages are spread. A task keeps an unnormalized online-softmax state for the query heads
 * of its GQA group (K and V are read once per group); a second pass merges the tasks of each
 * (sequence, kv head) exactly and writes the normalized output and the natural-log LSE.
 * Called through ctypes, which releases the GIL while it runs.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { BF16 = 0, F32 = 1 };
#define BLOCK 16 /* rows converted and scored at once */

/* n consecutive elements of a page (bf16 or fp32) as fp32. */
static void load_rows(const void *src, int dtype, int64_t n, float *dst) {
    if (dtype == F32) {
        memcpy(dst, src, sizeof(float) * n);
        return;
    }
    const uint16_t *s = src;
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = (uint32_t)s[i] << 16;
        float f;
        memcpy(&f, &u, sizeof f);
        dst[i] = f;
    }
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

/* Attend q (G heads, pre-scaled) to the pages of one task; state = acc[G][D] unnormalized, m[G], l[G]. */
static void run_task(const pool_t *p, const float *q, const task_t *t, float *state) {
    const int D = p->D, G = p->G;
    float *acc = state, *m = state + G * D, *l = m + G;
    float kf[BLOCK * D], vf[BLOCK * D], s[G * BLOCK];
    for (int g = 0; g < G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.f;
    }
    memset(acc, 0, sizeof(float) * G * D);
    for (int i = t->first; i < t->last; i++) {
        const char *k_page = p->kv + (p->pages[i] * p->page_stride + t->head * p->head_stride) * p->elem;
        const char *v_page = k_page + p->v_offset * p->elem;
        for (int r0 = 0; r0 < p->rows[i]; r0 += BLOCK) {
            int n = p->rows[i] - r0 < BLOCK ? p->rows[i] - r0 : BLOCK;
            load_rows(k_page + (int64_t)r0 * D * p->elem, p->dtype, (int64_t)n * D, kf);
            load_rows(v_page + (int64_t)r0 * D * p->elem, p->dtype, (int64_t)n * D, vf);
            for (int g = 0; g < G; g++) {
                const float *qg = q + g * D;
                float mx = m[g];
                for (int r = 0; r < n; r++) {
                    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                    for (int d = 0; d < D; d++) dot += qg[d] * kf[r * D + d];
                    s[g * BLOCK + r] = dot;
                    mx = dot > mx ? dot : mx;
                }
                float alpha = m[g] == -INFINITY ? 0.f : expf(m[g] - mx);
                float sum = 0.f;
                for (int r = 0; r < n; r++) {
                    float e = expf(s[g * BLOCK + r] - mx);
                    s[g * BLOCK + r] = e;
                    sum += e;
                }
                l[g] = l[g] * alpha + sum;
                m[g] = mx;
                float *a = acc + g * D;
                const float *sg = s + g * BLOCK;
#pragma omp simd
                for (int d = 0; d < D; d++) a[d] *= alpha;
                for (int r = 0; r < n; r++) {
                    const float pr = sg[r], *v = vf + r * D;
#pragma omp simd
                    for (int d = 0; d < D; d++) a[d] += pr * v[d];
                }
            }
        }
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
