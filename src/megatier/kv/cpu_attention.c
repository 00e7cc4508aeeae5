/* Decode attention on the CPU over KV pages in host memory: the "DDR-PIM" tier of megatier.
 *
 * One query token per sequence. Sequence b attends to the listed pages pages[offsets[b]..offsets[b+1]),
 * using the first rows[i] rows of listed page i; it gets the normalized output and the natural-log LSE
 * (no pages: out 0, lse -inf). Arithmetic is fp32 whatever the KV dtype (bf16 or fp32).
 *
 * The work is cut into tasks of (sequence, span of kv heads, run of at most 64 pages) that the threads
 * of a persistent pool take dynamically, so they stay balanced however the pages are spread. A task
 * reads each K and V row once for all query heads of its GQA group and keeps an online softmax (running
 * max, sum, unnormalized output) per kv head; the task that finishes a (sequence, span) last merges the
 * states of its tasks exactly. Memory-bound by design: the span is as wide as balance allows (all kv
 * heads of a page are one contiguous K block and one V block), and while a block (one page, one kv head)
 * is computed, the rows of the next one are prefetched, a few lines per row read: pages are scattered, so
 * the hardware cannot guess them, and a page's worth of prefetches issued at once was measured to do
 * nothing (the miss buffers drop what they cannot hold), where paced ones doubled a core's DRAM rate.
 *
 * SIMD: every variant (AVX-512 with BF16 dot products, AVX-512, AVX2+FMA, portable scalar) is compiled
 * into this one library with per-function target attributes and picked at run time, so a library built
 * on one machine is right on another. bf16 rows are widened exactly by shifts: a 32-bit lane holds an
 * even and an odd element, which become two fp32 vectors (q and the accumulators use the same split).
 * A head_dim the vector does not divide is read with masked loads (AVX-512) or through a small copy
 * (AVX2), never past the row.
 *
 * Threads (threadpool.h): created once (attend_pool_start, from Python, so that they inherit nothing from
 * a driver's thread), each pinned to a CPU of the process's affinity mask, woken per call. Calls are
 * serialized: one job runs at a time, from any thread. By default the calling thread works as one of
 * the job's threads (caller_works), so a CUDA host-callback thread is not left asleep on a core while
 * the pool works and need not be woken at the end; the job says how long the pool spins once idle
 * (spin_ns: across the short GPU gap between the layers of a decode step, so no layer pays for waking
 * sleeping threads). attend_job() has the signature of a CUDA host function (cudaHostFn_t). Called
 * through ctypes, which releases the GIL while it runs; call_on_native_thread() and thread_info() let
 * tests and scripts/gpu_host_partial.py reproduce and inspect the host-callback context.
 */
#define _GNU_SOURCE
#include <limits.h>
#include <linux/futex.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define X86 1
#else
#define X86 0
#endif

enum { BF16 = 0, F32 = 1 };
enum { ISA_SCALAR, ISA_AVX2, ISA_AVX512, ISA_AVX512BF16, NUM_ISAS };
enum { OK = 0, NO_MEMORY = -1, BAD_SHAPE = -2, NO_ISA = -3 };
#define BLOCK 16            /* rows scored at once */
#define MAX_NG 8            /* query heads per pass over a block: their accumulators stay in registers */
#define MAX_CHUNK_PAGES 64  /* pages per task: small enough to balance, large enough to stream */
#define MAX_GROUP_FLOATS (1 << 15) /* G x padded head_dim: bounds the per-task q copy on the stack */
#define INLINE static inline __attribute__((always_inline))

/* Everything one call needs; the arrays are read when the call runs, so a caller may rewrite them. */
typedef struct {
    const float *q;                             /* [num_seqs, num_kv_heads * G, D] fp32 */
    const void *kv;                             /* one layer of the pool, first element */
    const int64_t *offsets;                     /* [num_seqs + 1] into pages and rows */
    const int32_t *pages, *rows;                /* pool slot and valid rows of each listed page */
    float *out, *lse;                           /* [num_seqs, heads, D], [num_seqs, heads] */
    int64_t page_stride, v_offset, head_stride; /* in elements: slot to slot, K to V, head to head */
    float scale;
    int32_t dtype, D, num_kv_heads, G, num_seqs;
    int32_t threads;      /* <= 0: one per CPU of the affinity mask; the caller counts when it works */
    int32_t isa;          /* an ISA_* value, or -1 for the best this CPU runs */
    int32_t caller_works; /* 1: the calling thread is one of the threads; 0: it sleeps until they finish */
    int32_t status;       /* written: 0 ok, -1 no memory, -2 unsupported shape or dtype, -3 ISA not on this CPU */
    int64_t spin_ns;      /* how long the pool spins for the next job before it sleeps (<= 0: SPIN_NS) */
    int64_t elapsed_ns;   /* added to by every run: how long the host spent (a host node cannot tell Python) */
    int64_t wake_ns;      /* added to by every run: from posting the work to the last pool thread's start */
    int64_t runs;         /* added to by every run */
} attend_job_t;

int attend_job_size(void) { return sizeof(attend_job_t); }

/* ---- ISA detection ------------------------------------------------------------------------------ */

int isa_supported(int isa) {
#if X86
    __builtin_cpu_init();
    switch (isa) {
    case ISA_SCALAR: return 1;
    case ISA_AVX2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case ISA_AVX512: return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    case ISA_AVX512BF16: return isa_supported(ISA_AVX512) && __builtin_cpu_supports("avx512bf16");
    }
    return 0;
#else
    return isa == ISA_SCALAR;
#endif
}

/* The variant "auto" takes. AVX-512 before AVX-512-BF16: the exact dpbf16 product needs q split into
 * three bf16 parts, three dot instructions where widening K costs two shifts and two FMAs per head. */
int best_isa(void) {
    static const int order[] = {ISA_AVX512, ISA_AVX512BF16, ISA_AVX2};
    for (int i = 0; i < 3; i++)
        if (isa_supported(order[i])) return order[i];
    return ISA_SCALAR;
}

/* ---- what a variant computes -------------------------------------------------------------------- */

/* One block of n <= BLOCK rows of one kv head for ng <= MAX_NG query heads: scores, online softmax
 * update of (m, l), and acc = acc * alpha + p @ V. q and acc are in the variant's packed layout. */
typedef struct {
    const char *k, *v;
    int n, row_bytes, D, bf16, ng;
    const float *q;
    int q_stride;
    float *acc;
    int acc_stride;
    float *m, *l;
    const char *next_k, *next_v; /* the K and V rows computed next, prefetched row by row meanwhile (or NULL) */
} block_t;

/* Rows r and r + 1 of the next block's K, r of its V: issued as the current block reads its own rows, so
 * the requests keep pace with consumption instead of arriving as a burst the miss buffers drop. */
INLINE void prefetch_next_k(const block_t *b, int r) {
    if (b->next_k)
        for (int i = 0; i < 2 * b->row_bytes; i += 64) __builtin_prefetch(b->next_k + r * b->row_bytes + i, 0, 3);
}

INLINE void prefetch_next_v(const block_t *b, int r) {
    if (b->next_v)
        for (int i = 0; i < b->row_bytes; i += 64) __builtin_prefetch(b->next_v + r * b->row_bytes + i, 0, 3);
}

typedef struct {
    int chunk; /* row elements per vector step; rows are padded to a multiple of it */
    int split; /* bf16: each chunk holds the even elements, then the odd ones */
    int dp;    /* bf16: q is held as hi, mid, lo bf16 parts for dpbf16 (exact to fp32 rounding) */
    void (*block)(const block_t *);
} variant_t;

/* Call CALL(NG) with ng as a constant, so the per-head accumulators become registers. */
#define FOR_NG(ng, CALL)                                                                                   \
    switch (ng) {                                                                                          \
    case 1: CALL(1); break;                                                                                \
    case 2: CALL(2); break;                                                                                \
    case 3: CALL(3); break;                                                                                \
    case 4: CALL(4); break;                                                                                \
    case 5: CALL(5); break;                                                                                \
    case 6: CALL(6); break;                                                                                \
    case 7: CALL(7); break;                                                                                \
    default: CALL(8); break;                                                                               \
    }

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even; finite f */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

/* ---- scalar: the portable reference ------------------------------------------------------------- */

static inline float elem(const char *row, int d, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)row)[d]) : ((const float *)row)[d];
}

static void block_scalar(const block_t *b) {
    for (int g = 0; g < b->ng; g++) {
        const float *q = b->q + g * b->q_stride;
        float s[BLOCK], mx = b->m[g], sum = 0.0f;
        for (int r = 0; r < b->n; r++) {
            float dot = 0.0f;
            for (int d = 0; d < b->D; d++) dot += q[d] * elem(b->k + r * b->row_bytes, d, b->bf16);
            s[r] = dot;
            mx = fmaxf(mx, dot);
        }
        float alpha = expf(b->m[g] - mx);
        for (int r = 0; r < b->n; r++) {
            s[r] = expf(s[r] - mx);
            sum += s[r];
        }
        b->l[g] = b->l[g] * alpha + sum;
        b->m[g] = mx;
        float *acc = b->acc + g * b->acc_stride;
        for (int d = 0; d < b->D; d++) {
            float a = acc[d] * alpha;
            for (int r = 0; r < b->n; r++) a += s[r] * elem(b->v + r * b->row_bytes, d, b->bf16);
            acc[d] = a;
        }
    }
}

#if X86
/* ---- AVX-512 (F + BW): 16 lanes, chunks of 32 elements ----------------------------------------- */
#define T512 __attribute__((target("avx512f,avx512bw")))
#define T512BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))

static inline __mmask16 mask16(int n) { return n >= 16 ? 0xffff : n <= 0 ? 0 : (__mmask16)((1u << n) - 1); }

/* 32 bf16 elements of a row from p; past the row's end (left < 32) they read as 0, untouched. Whole
 * chunks take a plain load: masked 16-bit loads are slow on Zen 4. */
INLINE T512 __m512i load_bf16x32(const char *p, int left) {
    return left >= 32 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16((1u << left) - 1, p);
}

/* Elements [32c, 32c + 32) of a row as two fp32 vectors (bf16: even and odd elements; fp32: first and
 * second half); elements past D read as 0 and nothing past them is touched. */
INLINE T512 void load512(const char *row, int c, int D, const int bf16, __m512 *a, __m512 *b) {
    const int left = D - 32 * c;
    if (bf16) {
        __m512i x = load_bf16x32(row + 64 * c, left);
        *a = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
        *b = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32((int)0xffff0000)));
    } else {
        const float *f = (const float *)row + 32 * c;
        *a = left >= 16 ? _mm512_loadu_ps(f) : _mm512_maskz_loadu_ps(mask16(left), f);
        *b = left >= 32 ? _mm512_loadu_ps(f + 16) : _mm512_maskz_loadu_ps(mask16(left - 16), f + 16);
    }
}

/* Lane r of the result = the sum of the lanes of v[r] (a transposing tree: 3 ops per vector, not 8). */
INLINE T512 __m512 reduce16(const __m512 *v) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++) /* 256-bit halves: v[2i], v[2i+1] folded to 8 lanes */
        a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 4; i++) /* 128-bit lanes: rows 4i..4i+3 folded to 4 lanes */
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int i = 0; i < 2; i++) /* within 128-bit lane k: rows 8i+k and 8i+4+k, 2 lanes each */
        c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    __m512 f = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
    /* lane 4k + j holds row 4j + k */
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return _mm512_permutexvar_ps(order, f);
}

/* exp(x) for x <= 0: Cephes' expf polynomial (about 1 ulp); below -104 it gives 0 or a denormal. */
INLINE T512 __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
    f = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), f);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(f, f), _mm512_add_ps(f, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, k);
}

/* s[g] lane r = q_g . k_r, two rows at a time so that each q load feeds two FMAs (a row past n repeats
 * row n - 1, rows past that score 0: update512 masks them). */
INLINE T512 void scores512(const block_t *b, __m512 *s, const int NG, const int bf16) {
    const int C = (b->D + 31) / 32;
    __m512 dots[MAX_NG][BLOCK];
    for (int r = 0; r < BLOCK; r += 2) {
        prefetch_next_k(b, r);
        __m512 d0[NG], d1[NG];
        for (int g = 0; g < NG; g++) d0[g] = d1[g] = _mm512_setzero_ps();
        const char *k0 = b->k + r * b->row_bytes, *k1 = r + 1 < b->n ? k0 + b->row_bytes : k0;
        for (int c = 0; r < b->n && c < C; c++) {
            __m512 x0, y0, x1, y1;
            load512(k0, c, b->D, bf16, &x0, &y0);
            load512(k1, c, b->D, bf16, &x1, &y1);
            for (int g = 0; g < NG; g++) {
                const float *q = b->q + g * b->q_stride + 32 * c;
                const __m512 qa = _mm512_loadu_ps(q), qb = _mm512_loadu_ps(q + 16);
                d0[g] = _mm512_fmadd_ps(qb, y0, _mm512_fmadd_ps(qa, x0, d0[g]));
                d1[g] = _mm512_fmadd_ps(qb, y1, _mm512_fmadd_ps(qa, x1, d1[g]));
            }
        }
        for (int g = 0; g < NG; g++) {
            dots[g][r] = d0[g];
            dots[g][r + 1] = d1[g];
        }
    }
    for (int g = 0; g < NG; g++) s[g] = reduce16(dots[g]);
}

/* The same scores from bf16 K without widening: q = hi + mid + lo (each bf16), three dpbf16 per chunk. */
INLINE T512BF16 void scores512_dp(const block_t *b, __m512 *s, const int NG) {
    const int C = (b->D + 31) / 32;
    __m512 dots[MAX_NG][BLOCK];
    for (int r = 0; r < BLOCK; r += 2) { /* as scores512 */
        prefetch_next_k(b, r);
        __m512 h0[NG], l0[NG], h1[NG], l1[NG];
        for (int g = 0; g < NG; g++) h0[g] = l0[g] = h1[g] = l1[g] = _mm512_setzero_ps();
        const char *k0 = b->k + r * b->row_bytes, *k1 = r + 1 < b->n ? k0 + b->row_bytes : k0;
        for (int c = 0; r < b->n && c < C; c++) {
            const __m512bh x0 = (__m512bh)load_bf16x32(k0 + 64 * c, b->D - 32 * c);
            const __m512bh x1 = (__m512bh)load_bf16x32(k1 + 64 * c, b->D - 32 * c);
            for (int g = 0; g < NG; g++) {
                const __m512i *q = (const __m512i *)(b->q + g * b->q_stride + 48 * c);
                const __m512bh hi = (__m512bh)_mm512_loadu_si512(q), mid = (__m512bh)_mm512_loadu_si512(q + 1);
                const __m512bh lo = (__m512bh)_mm512_loadu_si512(q + 2);
                h0[g] = _mm512_dpbf16_ps(h0[g], hi, x0);
                h1[g] = _mm512_dpbf16_ps(h1[g], hi, x1);
                l0[g] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(l0[g], mid, x0), lo, x0);
                l1[g] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(l1[g], mid, x1), lo, x1);
            }
        }
        for (int g = 0; g < NG; g++) {
            dots[g][r] = _mm512_add_ps(h0[g], l0[g]);
            dots[g][r + 1] = _mm512_add_ps(h1[g], l1[g]);
        }
    }
    for (int g = 0; g < NG; g++) s[g] = reduce16(dots[g]);
}

INLINE T512 void update512(const block_t *b, const __m512 *s, const int NG, const int bf16) {
    const __mmask16 valid = mask16(b->n);
    float p[MAX_NG][BLOCK], alpha[MAX_NG];
    for (int g = 0; g < NG; g++) {
        __m512 sg = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), valid, s[g]);
        const float top = _mm512_reduce_max_ps(sg), mx = top > b->m[g] ? top : b->m[g];
        __m512 e = _mm512_maskz_mov_ps(valid, exp512(_mm512_sub_ps(sg, _mm512_set1_ps(mx))));
        alpha[g] = _mm512_cvtss_f32(exp512(_mm512_set1_ps(b->m[g] - mx)));
        b->l[g] = b->l[g] * alpha[g] + _mm512_reduce_add_ps(e);
        b->m[g] = mx;
        _mm512_storeu_ps(p[g], e);
    }
    for (int c = 0; c < (b->D + 31) / 32; c++) {
        __m512 aa[NG], ab[NG];
        for (int g = 0; g < NG; g++) {
            float *acc = b->acc + g * b->acc_stride + 32 * c;
            aa[g] = _mm512_mul_ps(_mm512_loadu_ps(acc), _mm512_set1_ps(alpha[g]));
            ab[g] = _mm512_mul_ps(_mm512_loadu_ps(acc + 16), _mm512_set1_ps(alpha[g]));
        }
        for (int r = 0; r < b->n; r++) {
            if (c == 0) prefetch_next_v(b, r);
            __m512 x, y;
            load512(b->v + r * b->row_bytes, c, b->D, bf16, &x, &y);
            for (int g = 0; g < NG; g++) {
                __m512 pr = _mm512_set1_ps(p[g][r]);
                aa[g] = _mm512_fmadd_ps(pr, x, aa[g]);
                ab[g] = _mm512_fmadd_ps(pr, y, ab[g]);
            }
        }
        for (int g = 0; g < NG; g++) {
            float *acc = b->acc + g * b->acc_stride + 32 * c;
            _mm512_storeu_ps(acc, aa[g]);
            _mm512_storeu_ps(acc + 16, ab[g]);
        }
    }
}

static T512 void block_avx512(const block_t *b) {
    __m512 s[MAX_NG];
#define CALL(NG)                                                                                           \
    if (b->bf16) {                                                                                         \
        scores512(b, s, NG, 1);                                                                            \
        update512(b, s, NG, 1);                                                                            \
    } else {                                                                                               \
        scores512(b, s, NG, 0);                                                                            \
        update512(b, s, NG, 0);                                                                            \
    }
    FOR_NG(b->ng, CALL)
#undef CALL
}

static T512BF16 void block_avx512bf16(const block_t *b) {
    if (!b->bf16) { /* fp32 KV: nothing for dpbf16 to do */
        block_avx512(b);
        return;
    }
    __m512 s[MAX_NG];
#define CALL(NG)                                                                                           \
    scores512_dp(b, s, NG);                                                                                \
    update512(b, s, NG, 1)
    FOR_NG(b->ng, CALL)
#undef CALL
}

/* ---- AVX2 + FMA: 8 lanes, chunks of 16 elements ------------------------------------------------ */
#define T256 __attribute__((target("avx2,fma")))

INLINE T256 __m256i mask8(int n) { /* lanes i < n all ones */
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* Elements [16c, 16c + 16) of a row as two fp32 vectors, as load512; a bf16 tail goes through a copy
 * (AVX2 has no 16-bit masked load). */
INLINE T256 void load256(const char *row, int c, int D, const int bf16, __m256 *a, __m256 *b) {
    const int left = D - 16 * c;
    if (bf16) {
        __m256i x;
        if (left >= 16) {
            x = _mm256_loadu_si256((const __m256i *)(row + 32 * c));
        } else {
            uint16_t t[16] = {0};
            memcpy(t, row + 32 * c, 2 * left);
            x = _mm256_loadu_si256((const __m256i *)t);
        }
        *a = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
        *b = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32((int)0xffff0000)));
    } else {
        const float *f = (const float *)row + 16 * c;
        *a = left >= 8 ? _mm256_loadu_ps(f) : _mm256_maskload_ps(f, mask8(left));
        *b = left >= 16 ? _mm256_loadu_ps(f + 8) : _mm256_maskload_ps(f + 8, mask8(left - 8));
    }
}

INLINE T256 __m256 reduce8(const __m256 *v) { /* lane r = the sum of the lanes of v[r] */
    __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
    __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
    __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

INLINE T256 float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

INLINE T256 float hsum8(__m256 v) {
    __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_add_ss(m, _mm_movehdup_ps(m)));
}

/* exp(x) for x <= 0, as exp512; clamped at -87 so 2^k stays a normal number (callers mask dead lanes). */
INLINE T256 __m256 exp256(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
    f = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), f);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(f, f), _mm256_add_ps(f, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

INLINE T256 void block256(const block_t *b, const int NG, const int bf16) {
    const int C = (b->D + 15) / 16;
    __m256 dots[MAX_NG][BLOCK], s[MAX_NG][2];
    for (int r = 0; r < BLOCK; r += 2) { /* as scores512 */
        prefetch_next_k(b, r);
        __m256 d0[NG], d1[NG];
        for (int g = 0; g < NG; g++) d0[g] = d1[g] = _mm256_setzero_ps();
        const char *k0 = b->k + r * b->row_bytes, *k1 = r + 1 < b->n ? k0 + b->row_bytes : k0;
        for (int c = 0; r < b->n && c < C; c++) {
            __m256 x0, y0, x1, y1;
            load256(k0, c, b->D, bf16, &x0, &y0);
            load256(k1, c, b->D, bf16, &x1, &y1);
            for (int g = 0; g < NG; g++) {
                const float *q = b->q + g * b->q_stride + 16 * c;
                const __m256 qa = _mm256_loadu_ps(q), qb = _mm256_loadu_ps(q + 8);
                d0[g] = _mm256_fmadd_ps(qb, y0, _mm256_fmadd_ps(qa, x0, d0[g]));
                d1[g] = _mm256_fmadd_ps(qb, y1, _mm256_fmadd_ps(qa, x1, d1[g]));
            }
        }
        for (int g = 0; g < NG; g++) {
            dots[g][r] = d0[g];
            dots[g][r + 1] = d1[g];
        }
    }
    const __m256 valid0 = _mm256_castsi256_ps(mask8(b->n)), valid1 = _mm256_castsi256_ps(mask8(b->n - 8));
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    float p[MAX_NG][BLOCK], alpha[MAX_NG];
    for (int g = 0; g < NG; g++) {
        s[g][0] = _mm256_blendv_ps(ninf, reduce8(dots[g]), valid0);
        s[g][1] = _mm256_blendv_ps(ninf, reduce8(dots[g] + 8), valid1);
        const float top = hmax8(_mm256_max_ps(s[g][0], s[g][1])), mx = top > b->m[g] ? top : b->m[g];
        __m256 e0 = _mm256_and_ps(valid0, exp256(_mm256_sub_ps(s[g][0], _mm256_set1_ps(mx))));
        __m256 e1 = _mm256_and_ps(valid1, exp256(_mm256_sub_ps(s[g][1], _mm256_set1_ps(mx))));
        alpha[g] = _mm256_cvtss_f32(exp256(_mm256_set1_ps(b->m[g] - mx)));
        b->l[g] = b->l[g] * alpha[g] + hsum8(_mm256_add_ps(e0, e1));
        b->m[g] = mx;
        _mm256_storeu_ps(p[g], e0);
        _mm256_storeu_ps(p[g] + 8, e1);
    }
    for (int c = 0; c < C; c++) {
        __m256 aa[NG], ab[NG];
        for (int g = 0; g < NG; g++) {
            float *acc = b->acc + g * b->acc_stride + 16 * c;
            aa[g] = _mm256_mul_ps(_mm256_loadu_ps(acc), _mm256_set1_ps(alpha[g]));
            ab[g] = _mm256_mul_ps(_mm256_loadu_ps(acc + 8), _mm256_set1_ps(alpha[g]));
        }
        for (int r = 0; r < b->n; r++) {
            if (c == 0) prefetch_next_v(b, r);
            __m256 x, y;
            load256(b->v + r * b->row_bytes, c, b->D, bf16, &x, &y);
            for (int g = 0; g < NG; g++) {
                __m256 pr = _mm256_set1_ps(p[g][r]);
                aa[g] = _mm256_fmadd_ps(pr, x, aa[g]);
                ab[g] = _mm256_fmadd_ps(pr, y, ab[g]);
            }
        }
        for (int g = 0; g < NG; g++) {
            float *acc = b->acc + g * b->acc_stride + 16 * c;
            _mm256_storeu_ps(acc, aa[g]);
            _mm256_storeu_ps(acc + 8, ab[g]);
        }
    }
}

static T256 void block_avx2(const block_t *b) {
#define CALL(NG)                                                                                           \
    if (b->bf16)                                                                                           \
        block256(b, NG, 1);                                                                                \
    else                                                                                                   \
        block256(b, NG, 0)
    FOR_NG(b->ng, CALL)
#undef CALL
}
#endif

static const variant_t variants[NUM_ISAS] = {
    [ISA_SCALAR] = {1, 0, 0, block_scalar},
#if X86
    [ISA_AVX2] = {16, 1, 0, block_avx2},
    [ISA_AVX512] = {32, 1, 0, block_avx512},
    [ISA_AVX512BF16] = {32, 1, 1, block_avx512bf16},
#endif
};

#include "threadpool.h"

static struct {
    void *ws; /* attend()'s work buffers, kept between calls (guarded by pool.lock) */
    size_t ws_size;
} work;


/* ---- attention: tasks, states, merge ------------------------------------------------------------ */

typedef struct {
    int32_t seq, head;   /* kv heads [head, head + span) of one sequence */
    int64_t first, last; /* listed pages [first, last) */
} task_t;

typedef struct {
    const attend_job_t *job;
    const variant_t *var;
    int elem, Dp, split, dp, q_stride;
    int span;                   /* kv heads per task: a page's K (and V) blocks of these heads are contiguous */
    int64_t num_tasks, pair_size; /* pair_size: floats of one kv head's state: acc [G][Dp] packed, m [G], l [G] */
    const task_t *tasks;
    const int64_t *first_task; /* per unit (sequence, head span): its tasks are [first_task[u], first_task[u+1]) */
    atomic_uint *left;         /* per unit: tasks not finished */
    float *states;             /* per task: span pair states */
    atomic_llong next;
} ctx_t;

/* Where element d of a head lives in the packed layout of q (not dp) and acc. */
static inline int packed(const ctx_t *x, int d) {
    if (!x->split) return d;
    const int c = x->var->chunk, j = d % c;
    return d - j + (j & 1) * (c / 2) + (j >> 1);
}

/* q of the G heads of one (sequence, kv head), scaled, as the variant reads it. */
static void prepare_q(const ctx_t *x, const float *q, float *dst) {
    const int D = x->job->D, G = x->job->G;
    memset(dst, 0, sizeof(float) * G * x->q_stride);
    for (int g = 0; g < G; g++)
        for (int d = 0; d < D; d++) {
            float v = q[g * D + d] * x->job->scale;
            if (x->dp) { /* per chunk of 32: hi, mid, lo parts; their sum is v to fp32 precision */
                uint16_t *h = (uint16_t *)(dst + g * x->q_stride) + d / 32 * 96 + d % 32;
                float r = v - bf16_to_f32(h[0] = f32_to_bf16(v));
                h[64] = f32_to_bf16(r - bf16_to_f32(h[32] = f32_to_bf16(r)));
            } else {
                dst[g * x->q_stride + packed(x, d)] = v;
            }
        }
}

/* Merge the task states of one kv head (pair) into its G normalized outputs and LSEs. */
static void merge_pair(const ctx_t *x, const float *st, int64_t num, int64_t stride, int64_t pair) {
    const attend_job_t *j = x->job;
    const int D = j->D, G = j->G, gd = G * x->Dp;
    for (int g = 0; g < G; g++) {
        float mx = -INFINITY, total = 0.0f, *o = j->out + (pair * G + g) * D;
        for (int64_t i = 0; i < num; i++) mx = fmaxf(mx, st[i * stride + gd + g]);
        memset(o, 0, sizeof(float) * D);
        if (mx == -INFINITY) {
            j->lse[pair * G + g] = -INFINITY;
            continue;
        }
        for (int64_t i = 0; i < num; i++) {
            const float *s = st + i * stride;
            if (s[gd + g] == -INFINITY) continue;
            float w = expf(s[gd + g] - mx);
            total += w * s[gd + G + g];
            for (int d = 0; d < D; d++) o[d] += w * s[g * x->Dp + packed(x, d)];
        }
        for (int d = 0; d < D; d++) o[d] /= total;
        j->lse[pair * G + g] = mx + logf(total);
    }
}

static void run_task(const ctx_t *x, int64_t i) {
    const attend_job_t *j = x->job;
    const task_t *t = &x->tasks[i];
    const int G = j->G, row_bytes = j->D * x->elem;
    const int64_t pair0 = (int64_t)t->seq * j->num_kv_heads + t->head;
    float *state = x->states + i * x->span * x->pair_size;
    float q[x->span * G * x->q_stride];
    for (int h = 0; h < x->span; h++) {
        float *acc = state + h * x->pair_size, *m = acc + G * x->Dp, *l = m + G;
        prepare_q(x, j->q + (pair0 + h) * G * j->D, q + h * G * x->q_stride);
        memset(acc, 0, sizeof(float) * G * x->Dp);
        for (int g = 0; g < G; g++) {
            m[g] = -INFINITY;
            l[g] = 0.0f;
        }
    }
    const char *kv = j->kv;
    for (int64_t p = t->first; p < t->last; p++) {
        for (int h = 0; h < x->span; h++) {
            const char *kb = kv + (j->pages[p] * j->page_stride + (t->head + h) * j->head_stride) * x->elem;
            const char *vb = kb + j->v_offset * x->elem;
            float *acc = state + h * x->pair_size, *m = acc + G * x->Dp, *l = m + G;
            /* the block after this head's: the next head of this page, else the first of the next page */
            const char *next_k = h + 1 < x->span ? kb + j->head_stride * x->elem
                                 : p + 1 < t->last ? kv + (j->pages[p + 1] * j->page_stride + t->head * j->head_stride) * x->elem
                                                   : NULL;
            for (int r0 = 0; r0 < j->rows[p]; r0 += BLOCK)
                for (int g0 = 0; g0 < G; g0 += MAX_NG) {
                    const int64_t off = (int64_t)r0 * row_bytes;
                    block_t b = {kb + off,
                                 vb + off,
                                 j->rows[p] - r0 < BLOCK ? j->rows[p] - r0 : BLOCK,
                                 row_bytes,
                                 j->D,
                                 j->dtype == BF16,
                                 G - g0 < MAX_NG ? G - g0 : MAX_NG,
                                 q + (h * G + g0) * x->q_stride,
                                 x->q_stride,
                                 acc + g0 * x->Dp,
                                 x->Dp,
                                 m + g0,
                                 l + g0,
                                 next_k,
                                 next_k ? next_k + j->v_offset * x->elem : NULL};
                    x->var->block(&b);
                }
        }
    }
    const int64_t unit = pair0 / x->span;
    if (atomic_fetch_sub(&x->left[unit], 1) == 1) { /* the unit's last task merges it */
        const int64_t first = x->first_task[unit], num = x->first_task[unit + 1] - first;
        for (int h = 0; h < x->span; h++)
            merge_pair(x, x->states + (first * x->span + h) * x->pair_size, num, x->span * x->pair_size, pair0 + h);
    }
}

static void attend_worker(void *arg, int worker, int workers) {
    (void)worker, (void)workers;
    ctx_t *x = arg;
    for (int64_t i; (i = atomic_fetch_add(&x->next, 1)) < x->num_tasks;) run_task(x, i);
}

static size_t round64(size_t n) { return (n + 63) & ~(size_t)63; }

/* The job; *wake_ns gets how long the pool took to start on it. */
static int attend(const attend_job_t *j, int64_t *wake_ns) {
    if ((j->dtype != BF16 && j->dtype != F32) || j->D < 1 || j->G < 1 || j->num_kv_heads < 1 || j->num_seqs < 0)
        return BAD_SHAPE;
    const int isa = j->isa < 0 ? best_isa() : j->isa;
    if (isa >= NUM_ISAS || !isa_supported(isa)) return NO_ISA;
    ctx_t x = {.job = j, .var = &variants[isa], .elem = j->dtype == F32 ? 4 : 2};
    x.Dp = (j->D + x.var->chunk - 1) / x.var->chunk * x.var->chunk;
    x.split = x.var->split && j->dtype == BF16;
    x.dp = x.var->dp && j->dtype == BF16;
    x.q_stride = x.dp ? x.Dp / 2 * 3 : x.Dp;
    if ((int64_t)j->G * x.Dp > MAX_GROUP_FLOATS) return BAD_SHAPE;
    pthread_mutex_lock(&pool.lock);
    const int threads = thread_count(j->threads);

    int64_t total = 0;
    for (int b = 0; b < j->num_seqs; b++) total += j->offsets[b + 1] - j->offsets[b];
    /* The widest head span that still leaves 4 tasks of 4+ pages per thread (long contiguous reads let
     * the L2 streamer fetch beyond the L1 miss buffers), and pages per task for about 4 tasks per thread. */
    x.span = j->num_kv_heads;
    while (x.span > 1 && ((int64_t)x.span * j->G * x.q_stride > 2 * MAX_GROUP_FLOATS ||
                          total * (j->num_kv_heads / x.span) < 16 * threads)) {
        x.span--;
        while (j->num_kv_heads % x.span) x.span--;
    }
    const int64_t spans = j->num_kv_heads / x.span, num_units = (int64_t)j->num_seqs * spans;
    int64_t chunk = total * spans / (4 * threads);
    chunk = chunk < 1 ? 1 : chunk > MAX_CHUNK_PAGES ? MAX_CHUNK_PAGES : chunk;
    for (int b = 0; b < j->num_seqs; b++) {
        int64_t n = j->offsets[b + 1] - j->offsets[b];
        x.num_tasks += spans * (n > 0 ? (n + chunk - 1) / chunk : 1);
    }
    x.pair_size = (int64_t)(round64(sizeof(float) * (j->G * x.Dp + 2 * j->G)) / sizeof(float));
    const size_t tasks_bytes = round64(sizeof(task_t) * x.num_tasks);
    const size_t first_bytes = round64(sizeof(int64_t) * (num_units + 1));
    const size_t left_bytes = round64(sizeof(atomic_uint) * num_units);
    const size_t need = tasks_bytes + first_bytes + left_bytes + sizeof(float) * x.span * x.pair_size * x.num_tasks;
    if (need > work.ws_size) {
        free(work.ws);
        work.ws = aligned_alloc(64, round64(need));
        work.ws_size = work.ws ? round64(need) : 0;
        if (!work.ws) {
            pthread_mutex_unlock(&pool.lock);
            return NO_MEMORY;
        }
    }
    char *ws = work.ws;
    task_t *tasks = (task_t *)ws;
    int64_t *first_task = (int64_t *)(ws + tasks_bytes);
    atomic_uint *left = (atomic_uint *)(ws + tasks_bytes + first_bytes);
    x.states = (float *)(ws + tasks_bytes + first_bytes + left_bytes);
    int64_t k = 0;
    for (int b = 0; b < j->num_seqs; b++)
        for (int64_t s = 0; s < spans; s++) {
            const int64_t unit = b * spans + s, end = j->offsets[b + 1];
            first_task[unit] = k;
            int64_t p = j->offsets[b];
            do { /* a sequence with no pages still gets one (empty) task: its merge writes 0 and -inf */
                const int64_t stop = p + chunk < end ? p + chunk : end;
                tasks[k++] = (task_t){b, (int32_t)(s * x.span), p, stop};
                p = stop;
            } while (p < end);
            atomic_init(&left[unit], (unsigned)(k - first_task[unit]));
        }
    first_task[num_units] = k;
    x.tasks = tasks;
    x.first_task = first_task;
    x.left = left;
    atomic_init(&x.next, 0);
    pool.spin_ns = j->spin_ns > 0 ? j->spin_ns : SPIN_NS;
    atomic_store(&pool.wake_ns, 0);
    if (total == 0) /* only empty sequences (a graph's host node on a step with no DRAM slices): their zero
                     * outputs are quicker written here than the pool is woken */
        attend_worker(&x, 0, 1);
    else if (j->caller_works)
        run_pool_with_caller(attend_worker, &x, threads);
    else
        run_pool(attend_worker, &x, threads);
    *wake_ns = atomic_load(&pool.wake_ns);
    pthread_mutex_unlock(&pool.lock);
    return OK;
}

void attend_job(void *job) { /* a cudaHostFn_t */
    attend_job_t *j = job;
    const int64_t t0 = now_ns();
    int64_t wake = 0;
    j->status = attend(j, &wake);
    j->elapsed_ns += now_ns() - t0;
    j->wake_ns += wake;
    j->runs++;
}

/* Start the pool's threads now, from the calling thread (`threads` as a job's, the caller not
 * counted); how many there are. */
int attend_pool_start(int threads) {
    pthread_mutex_lock(&pool.lock);
    const int started = pool_start(thread_count(threads));
    pthread_mutex_unlock(&pool.lock);
    return started;
}

/* How many CPUs the pool pins its threads to (the process's affinity mask, read once). */
int attend_pool_cpus(void) {
    pthread_mutex_lock(&pool.lock);
    pool_init();
    const int n = pool.ncpu;
    pthread_mutex_unlock(&pool.lock);
    return n;
}

/* ---- the host-callback context, reproduced and inspected ---------------------------------------- */

typedef struct {
    void (*fn)(void *);
    void *arg;
    int cpu;
} native_call_t;

static void *native_main(void *p) {
    const native_call_t *c = p;
    if (c->cpu >= 0) { /* pinned to one CPU, as a driver may pin its threads */
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(c->cpu, &set);
        pthread_setaffinity_np(pthread_self(), sizeof set, &set);
    }
    c->fn(c->arg);
    return NULL;
}

/* fn(arg) on a new native thread that Python knows nothing of (as CUDA calls a host function), pinned to
 * `cpu` if >= 0; waits for it. 0, or the pthread_create error. */
int call_on_native_thread(void (*fn)(void *), void *arg, int cpu) {
    native_call_t c = {fn, arg, cpu};
    pthread_t tid;
    const int err = pthread_create(&tid, NULL, native_main, &c);
    if (err) return err;
    pthread_join(tid, NULL);
    return 0;
}

typedef struct {
    int32_t mask_cpus, cpu, policy, nice; /* of the calling thread */
    int64_t tid;
} thread_info_t;

/* A cudaHostFn_t that records who runs it: its affinity mask's size, current CPU, scheduling policy and
 * nice value. */
void thread_info(void *p) {
    thread_info_t *t = p;
    cpu_set_t set;
    t->mask_cpus = pthread_getaffinity_np(pthread_self(), sizeof set, &set) == 0 ? CPU_COUNT(&set) : -1;
    t->cpu = sched_getcpu();
    t->policy = sched_getscheduler(0);
    t->nice = getpriority(PRIO_PROCESS, 0);
    t->tid = syscall(SYS_gettid);
}

/* ---- host read bandwidth (STREAM-like) ---------------------------------------------------------- */

typedef struct {
    const char *buf;
    int64_t bytes;
    int isa;
    uint64_t sink[MAX_THREADS]; /* keeps the sums, so the loads are not optimized away */
} probe_t;

#if X86
static T512 uint64_t sum512(const char *p, int64_t n) {
    __m512i a = _mm512_setzero_si512(), b = a, c = a, d = a;
    for (int64_t i = 0; i + 256 <= n; i += 256) {
        a = _mm512_add_epi64(a, _mm512_loadu_si512(p + i));
        b = _mm512_add_epi64(b, _mm512_loadu_si512(p + i + 64));
        c = _mm512_add_epi64(c, _mm512_loadu_si512(p + i + 128));
        d = _mm512_add_epi64(d, _mm512_loadu_si512(p + i + 192));
    }
    return (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a, b), _mm512_add_epi64(c, d)));
}

static T256 uint64_t sum256(const char *p, int64_t n) {
    __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
    for (int64_t i = 0; i + 128 <= n; i += 128) {
        a = _mm256_add_epi64(a, _mm256_loadu_si256((const __m256i *)(p + i)));
        b = _mm256_add_epi64(b, _mm256_loadu_si256((const __m256i *)(p + i + 32)));
        c = _mm256_add_epi64(c, _mm256_loadu_si256((const __m256i *)(p + i + 64)));
        d = _mm256_add_epi64(d, _mm256_loadu_si256((const __m256i *)(p + i + 96)));
    }
    uint64_t t[4];
    _mm256_storeu_si256((__m256i *)t, _mm256_add_epi64(_mm256_add_epi64(a, b), _mm256_add_epi64(c, d)));
    return t[0] + t[1] + t[2] + t[3];
}
#endif

static uint64_t sum_scalar(const char *p, int64_t n) {
    uint64_t a = 0, w;
    for (int64_t i = 0; i + 8 <= n; i += 8) {
        memcpy(&w, p + i, 8);
        a += w;
    }
    return a;
}

static void probe_worker(void *arg, int worker, int workers) {
    probe_t *pr = arg;
    const int64_t share = pr->bytes / workers / 4096 * 4096, lo = worker * share;
    const int64_t n = worker == workers - 1 ? pr->bytes - lo : share;
#if X86
    if (pr->isa >= ISA_AVX512) {
        pr->sink[worker] = sum512(pr->buf + lo, n);
        return;
    }
    if (pr->isa == ISA_AVX2) {
        pr->sink[worker] = sum256(pr->buf + lo, n);
        return;
    }
#endif
    pr->sink[worker] = sum_scalar(pr->buf + lo, n);
}

/* Bytes per second at which the pool's threads read buf, each its share with the widest loads this CPU
 * has; the best of reps timed passes, after one untimed pass. */
double read_bandwidth(const void *buf, int64_t bytes, int threads, int reps) {
    pthread_mutex_lock(&pool.lock);
    probe_t pr = {buf, bytes, best_isa(), {0}};
    threads = thread_count(threads);
    double best = 0.0;
    for (int r = -1; r < reps; r++) {
        const int64_t t0 = now_ns();
        run_pool(probe_worker, &pr, threads);
        const double rate = (double)bytes * 1e9 / (double)(now_ns() - t0);
        if (r >= 0 && rate > best) best = rate;
    }
    pthread_mutex_unlock(&pool.lock);
    return best;
}
