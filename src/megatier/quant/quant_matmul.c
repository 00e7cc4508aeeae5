/* y[M, N] = x[M, K] @ W^T for a quantized W kept in megatier's QuantWeight planes (quant/blocks.py):
 * GGUF Q8_0, Q4_0, Q4_1, Q4_K and FP8 e4m3 with one fp32 scale per output feature. x and y are fp32,
 * products accumulate in fp32. For small M (decode): the weights are read once from memory, unpacked in
 * registers and never written out.
 *
 * Every format is a run of sub-blocks of 32 weights w_i = s * v_i + o (v_i the stored integer, or the FP8
 * value; s, o per sub-block: Q8_0 s = d, o = 0; Q4_0 s = d, v = q - 8, o = 0; Q4_1 s = d, o = m; Q4_K
 * s = d * sc_j, o = -dmin * mn_j; FP8 s = the row's scale, o = 0), so
 *
 *     y[m, n] = sum_j s_j * (sum_i x[m, 32 j + i] v_i) + sum_j o_j * xsum[m, j]
 *
 * with xsum the sums of x over each sub-block (made once per call): the dequantized-fp32 product's math,
 * summed in another order, so equal to it up to fp32 rounding.
 *
 * Work: the output features are taken ROW_GROUP at a time by the threads (threadpool.h; the caller is
 * worker 0), dynamically. For each row group a thread walks every tile of up to
 * MT rows of x (4 for AVX2, 8 for AVX-512): one tile's accumulators stay in registers, and the row
 * group's weights stay in L1 between tiles.
 *
 * SIMD: AVX-512F, AVX2+FMA and portable scalar variants, compiled into this one library with
 * per-function target attributes and picked at run time. Nibbles and bytes are widened to fp32 with
 * zero/sign extensions; FP8 by moving its sign and seven exponent/mantissa bits into fp32's places (the
 * same number times 2^-120, subnormals included), then one multiply by 2^120.
 */
#define _GNU_SOURCE
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__)
#include <immintrin.h>
#define X86 1
#else
#define X86 0
#endif

/* Without OpenMP: spin briefly, the cores are shared with torch's threads between calls. */
#define SPIN_NS 5000
#include "threadpool.h"

enum { Q8_0, Q4_0, Q4_1, Q4_K, FP8, NUM_KINDS };
enum { ISA_SCALAR, ISA_AVX2, ISA_AVX512, NUM_ISAS };
enum { OK = 0, NO_MEMORY = -1, BAD_SHAPE = -2, NO_ISA = -3 };
#define ROW_GROUP 8 /* output features per group: their weights stay in L1 while every x tile passes */
#define MIN_WORK (1 << 16) /* weights (x rows of x tiles) per thread below which fewer threads are woken */
#define INLINE static inline __attribute__((always_inline))

/* One call. Planes as QuantWeight holds them, each C-contiguous with one row per output feature:
 * Q8_0 d [N, K/32] fp16, q [N, K] int8; Q4_0 d, Q4_1 d and m [N, K/32] fp16, q [N, K/32, 16];
 * Q4_K d, m (dmin) [N, K/256] fp16, sc, mn [N, K/256, 8] uint8, q [N, K/256, 4, 32]; FP8 q [N, K],
 * d: the scales [N] fp32. */
typedef struct {
    const float *x; /* [M, K] */
    float *y;       /* [M, N] */
    const void *d, *m, *q, *sc, *mn;
    int64_t M, N, K;
    int32_t kind;
    int32_t threads; /* <= 0: one per CPU of the affinity mask */
    int32_t isa;     /* an ISA_* value, or -1 for the best this CPU runs */
    int32_t status;  /* written: 0 ok, -1 no memory, -2 unsupported kind or shape, -3 ISA not on this CPU */
} qjob_t;

int qjob_size(void) { return sizeof(qjob_t); }

int isa_supported(int isa) {
#if X86
    __builtin_cpu_init();
    switch (isa) {
    case ISA_SCALAR: return 1;
    case ISA_AVX2:
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case ISA_AVX512: return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("f16c");
    }
    return 0;
#else
    return isa == ISA_SCALAR;
#endif
}

int best_isa(void) {
    if (isa_supported(ISA_AVX512)) return ISA_AVX512;
    if (isa_supported(ISA_AVX2)) return ISA_AVX2;
    return ISA_SCALAR;
}

/* ---- sub-block parameters, shared by every variant ---------------------------------------------- */

static inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, mant = h & 1023;
    if (e == 0) { /* zero or subnormal: mant * 2^-24, exact */
        const float f = (float)mant * 0x1p-24f;
        return sign ? -f : f;
    }
    const uint32_t bits = sign | (e == 31 ? 0x7f800000u | (mant << 13) : ((e + 112) << 23) | (mant << 13));
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float fp8_to_f32(uint8_t b) {
    const uint32_t bits = ((uint32_t)(int32_t)(int8_t)b << 20) & 0x87f00000u;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f * 0x1p120f;
}

/* Sub-block j of row n: its scale s and offset o, and where its 32 stored values are: `p` and, for the
 * nibble formats, which nibble (`shift` 0 or 4). Q4_0 / Q4_1: value i < 16 in the low nibble of byte i,
 * 16 + i in its high nibble (`split` set); Q4_K: the 32 bytes of group j / 2, nibble j % 2. */
typedef struct {
    const uint8_t *p;
    int shift;
    float s, o;
} sub_t;

#define SUB_BLOCK(NAME, TARGET, H2F)                                                                       \
INLINE TARGET sub_t NAME(const qjob_t *J, const int kind, int64_t n, int64_t j) {                          \
    const int64_t K = J->K, S = K / 32;                                                                    \
    const uint16_t *d = J->d, *m = J->m;                                                                   \
    sub_t r = {0};                                                                                         \
    switch (kind) {                                                                                        \
    case Q8_0:                                                                                             \
        r.p = (const uint8_t *)J->q + n * K + j * 32;                                                      \
        r.s = H2F(d[n * S + j]);                                                                           \
        break;                                                                                             \
    case Q4_0:                                                                                             \
    case Q4_1:                                                                                             \
        r.p = (const uint8_t *)J->q + (n * S + j) * 16;                                                    \
        r.s = H2F(d[n * S + j]);                                                                           \
        r.o = kind == Q4_1 ? H2F(m[n * S + j]) : 0.0f;                                                     \
        break;                                                                                             \
    case Q4_K: {                                                                                           \
        const int64_t blocks = K / 256, b = n * blocks + j / 8;                                            \
        const int sub = (int)(j % 8);                                                                      \
        r.p = (const uint8_t *)J->q + b * 128 + (sub / 2) * 32;                                            \
        r.shift = 4 * (sub & 1);                                                                           \
        r.s = H2F(d[b]) * (float)((const uint8_t *)J->sc)[b * 8 + sub];                                    \
        r.o = -(H2F(m[b]) * (float)((const uint8_t *)J->mn)[b * 8 + sub]);                                 \
        break;                                                                                             \
    }                                                                                                      \
    default: /* FP8 */                                                                                     \
        r.p = (const uint8_t *)J->q + n * K + j * 32;                                                      \
        r.s = ((const float *)J->d)[n];                                                                    \
        break;                                                                                             \
    }                                                                                                      \
    return r;                                                                                              \
}
SUB_BLOCK(sub_block, , f16_to_f32)

INLINE int has_offset(const int kind) { return kind == Q4_1 || kind == Q4_K; }

/* ---- scalar: the portable reference ------------------------------------------------------------- */

INLINE float value(const int kind, const sub_t *b, int i) {
    switch (kind) {
    case Q8_0: return (float)(int8_t)b->p[i];
    case Q4_0: return (float)((i < 16 ? b->p[i] & 15 : b->p[i - 16] >> 4) - 8);
    case Q4_1: return (float)(i < 16 ? b->p[i] & 15 : b->p[i - 16] >> 4);
    case Q4_K: return (float)((b->p[i] >> b->shift) & 15);
    default: return fp8_to_f32(b->p[i]);
    }
}

INLINE void rows_scalar_kind(const qjob_t *J, const float *xsum, int64_t n0, int64_t n1, int64_t m0, int mt,
                             const int kind) {
    const int64_t K = J->K, S = K / 32;
    for (int64_t n = n0; n < n1; n++)
        for (int64_t t = m0; t < m0 + mt; t++) {
            const float *x = J->x + t * K;
            float acc = 0.0f, off = 0.0f;
            for (int64_t j = 0; j < S; j++) {
                const sub_t b = sub_block(J, kind, n, j);
                float dot = 0.0f;
                for (int i = 0; i < 32; i++) dot += x[j * 32 + i] * value(kind, &b, i);
                acc += b.s * dot;
                if (has_offset(kind)) off += b.o * xsum[t * S + j];
            }
            J->y[t * J->N + n] = acc + off;
        }
}

static void rows_scalar(const qjob_t *J, const float *xsum, int64_t n0, int64_t n1, int64_t m0, int mt) {
    switch (J->kind) {
    case Q8_0: rows_scalar_kind(J, xsum, n0, n1, m0, mt, Q8_0); break;
    case Q4_0: rows_scalar_kind(J, xsum, n0, n1, m0, mt, Q4_0); break;
    case Q4_1: rows_scalar_kind(J, xsum, n0, n1, m0, mt, Q4_1); break;
    case Q4_K: rows_scalar_kind(J, xsum, n0, n1, m0, mt, Q4_K); break;
    default: rows_scalar_kind(J, xsum, n0, n1, m0, mt, FP8); break;
    }
}

#if X86
/* Call CALL(kind, MT) with both as constants, so the tile's accumulators become registers. */
#define FOR_KIND(kind, MT, CALL)                                                                           \
    switch (kind) {                                                                                        \
    case Q8_0: CALL(Q8_0, MT); break;                                                                      \
    case Q4_0: CALL(Q4_0, MT); break;                                                                      \
    case Q4_1: CALL(Q4_1, MT); break;                                                                      \
    case Q4_K: CALL(Q4_K, MT); break;                                                                      \
    default: CALL(FP8, MT); break;                                                                         \
    }

/* ---- AVX2 + FMA: 8 lanes, tiles of up to 4 rows of x -------------------------------------------- */
#define T256 __attribute__((target("avx2,fma,f16c")))
SUB_BLOCK(sub_block256, T256, _cvtsh_ss)

/* The 32 stored bytes of a sub-block as (values 0-15, values 16-31), each a byte vector the widening (SSE2,
 * which every x86-64 has: both variants use it) reads. Q4_0 values are made signed (q - 8) here. */
INLINE void bytes128(const int kind, const sub_t *b, __m128i *lo, __m128i *hi) {
    const __m128i m15 = _mm_set1_epi8(15);
    if (kind == Q4_0 || kind == Q4_1) {
        const __m128i v = _mm_loadu_si128((const __m128i *)b->p);
        *lo = _mm_and_si128(v, m15);
        *hi = _mm_and_si128(_mm_srli_epi16(v, 4), m15);
        if (kind == Q4_0) {
            *lo = _mm_sub_epi8(*lo, _mm_set1_epi8(8));
            *hi = _mm_sub_epi8(*hi, _mm_set1_epi8(8));
        }
        return;
    }
    *lo = _mm_loadu_si128((const __m128i *)b->p);
    *hi = _mm_loadu_si128((const __m128i *)(b->p + 16));
    if (kind == Q4_K) {
        const __m128i sh = _mm_cvtsi32_si128(b->shift);
        *lo = _mm_and_si128(_mm_srl_epi16(*lo, sh), m15);
        *hi = _mm_and_si128(_mm_srl_epi16(*hi, sh), m15);
    }
}

/* The low 8 bytes of v as 8 fp32 values. */
INLINE T256 __m256 widen256(const int kind, __m128i v) {
    if (kind == Q4_1 || kind == Q4_K) return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
    if (kind == FP8) {
        const __m256i bits = _mm256_and_si256(_mm256_slli_epi32(_mm256_cvtepi8_epi32(v), 20),
                                              _mm256_set1_epi32((int)0x87f00000u));
        return _mm256_mul_ps(_mm256_castsi256_ps(bits), _mm256_set1_ps(0x1p120f));
    }
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
}

INLINE T256 float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

INLINE T256 void rows256(const qjob_t *J, const float *xsum, int64_t n0, int64_t n1, int64_t m0, const int kind,
                         const int MT) {
    const int64_t K = J->K, S = K / 32;
    const float *x = J->x + m0 * K;
    for (int64_t n = n0; n < n1; n++) {
        __m256 acc[MT];
        float off[MT];
        for (int t = 0; t < MT; t++) {
            acc[t] = _mm256_setzero_ps();
            off[t] = 0.0f;
        }
        for (int64_t j = 0; j < S; j++) {
            const sub_t b = sub_block256(J, kind, n, j);
            __m128i lo, hi;
            bytes128(kind, &b, &lo, &hi);
            const __m256 w0 = widen256(kind, lo), w1 = widen256(kind, _mm_unpackhi_epi64(lo, lo));
            const __m256 w2 = widen256(kind, hi), w3 = widen256(kind, _mm_unpackhi_epi64(hi, hi));
            const __m256 s = _mm256_set1_ps(b.s);
            for (int t = 0; t < MT; t++) {
                const float *xj = x + t * K + j * 32;
                __m256 p = _mm256_mul_ps(_mm256_loadu_ps(xj), w0);
                __m256 q = _mm256_mul_ps(_mm256_loadu_ps(xj + 16), w2);
                p = _mm256_fmadd_ps(_mm256_loadu_ps(xj + 8), w1, p);
                q = _mm256_fmadd_ps(_mm256_loadu_ps(xj + 24), w3, q);
                acc[t] = _mm256_fmadd_ps(_mm256_add_ps(p, q), s, acc[t]);
                if (has_offset(kind)) off[t] += b.o * xsum[(m0 + t) * S + j];
            }
        }
        for (int t = 0; t < MT; t++) J->y[(m0 + t) * J->N + n] = hsum256(acc[t]) + off[t];
    }
}

static T256 void rows_avx2(const qjob_t *J, const float *xsum, int64_t n0, int64_t n1, int64_t m0, int mt) {
#define CALL(KIND, MT) rows256(J, xsum, n0, n1, m0, KIND, MT)
    switch (mt) {
    case 1: FOR_KIND(J->kind, 1, CALL); break;
    case 2: FOR_KIND(J->kind, 2, CALL); break;
    case 3: FOR_KIND(J->kind, 3, CALL); break;
    default: FOR_KIND(J->kind, 4, CALL); break;
    }
#undef CALL
}

/* ---- AVX-512F: 16 lanes, tiles of up to 8 rows of x --------------------------------------------- */
#define T512 __attribute__((target("avx512f,f16c")))
SUB_BLOCK(sub_block512, T512, _cvtsh_ss)

INLINE T512 __m512 widen512(const int kind, __m128i v) {
    if (kind == Q4_1 || kind == Q4_K) return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v));
    if (kind == FP8) {
        const __m512i bits = _mm512_and_si512(_mm512_slli_epi32(_mm512_cvtepi8_epi32(v), 20),
                                              _mm512_set1_epi32((int)0x87f00000u));
        return _mm512_mul_ps(_mm512_castsi512_ps(bits), _mm512_set1_ps(0x1p120f));
    }
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v));
}

INLINE T512 void rows512(const qjob_t *J, const float *xsum, int64_t n0, int64_t n1, int64_t m0, const int kind,
                         const int MT) {
    const int64_t K = J->K, S = K / 32;
    const float *x = J->x + m0 * K;
    for (int64_t n = n0; n < n1; n++) {
        __m512 acc[MT];
        float off[MT];
        for (int t = 0; t < MT; t++) {
            acc[t] = _mm512_setzero_ps();
            off[t] = 0.0f;
        }
        for (int64_t j = 0; j < S; j++) {
            const sub_t b = sub_block512(J, kind, n, j);
            __m128i lo, hi;
            bytes128(kind, &b, &lo, &hi);
            const __m512 w0 = widen512(kind, lo), w1 = widen512(kind, hi);
            const __m512 s = _mm512_set1_ps(b.s);
            for (int t = 0; t < MT; t++) {
                const float *xj = x + t * K + j * 32;
                const __m512 p = _mm512_fmadd_ps(_mm512_loadu_ps(xj + 16), w1, _mm512_mul_ps(_mm512_loadu_ps(xj), w0));
                acc[t] = _mm512_fmadd_ps(p, s, acc[t]);
                if (has_offset(kind)) off[t] += b.o * xsum[(m0 + t) * S + j];
            }
        }
        for (int t = 0; t < MT; t++) J->y[(m0 + t) * J->N + n] = _mm512_reduce_add_ps(acc[t]) + off[t];
    }
}

static T512 void rows_avx512(const qjob_t *J, const float *xsum, int64_t n0, int64_t n1, int64_t m0, int mt) {
#define CALL(KIND, MT) rows512(J, xsum, n0, n1, m0, KIND, MT)
    switch (mt) {
    case 1: FOR_KIND(J->kind, 1, CALL); break;
    case 2: FOR_KIND(J->kind, 2, CALL); break;
    case 3: FOR_KIND(J->kind, 3, CALL); break;
    case 4: FOR_KIND(J->kind, 4, CALL); break;
    case 5: FOR_KIND(J->kind, 5, CALL); break;
    case 6: FOR_KIND(J->kind, 6, CALL); break;
    case 7: FOR_KIND(J->kind, 7, CALL); break;
    default: FOR_KIND(J->kind, 8, CALL); break;
    }
#undef CALL
}
#endif

typedef void (*rows_fn)(const qjob_t *, const float *, int64_t, int64_t, int64_t, int);

typedef struct {
    rows_fn rows;
    int tile; /* rows of x per tile */
} variant_t;

static const variant_t variants[NUM_ISAS] = {
    {rows_scalar, 1},
#if X86
    {rows_avx2, 4},
    {rows_avx512, 8},
#else
    {rows_scalar, 1},
    {rows_scalar, 1},
#endif
};

/* ---- the call ----------------------------------------------------------------------------------- */

typedef struct {
    const qjob_t *job;
    const variant_t *var;
    const float *xsum;
    atomic_llong next; /* the next row group to take */
} ctx_t;

static void matmul_worker(void *arg, int worker, int workers) {
    (void)worker, (void)workers;
    ctx_t *c = arg;
    const qjob_t *J = c->job;
    /* Row groups taken dynamically: a worker the OS runs late (the cores are shared with torch's own
     * threads) takes fewer, instead of making every other thread wait for its half. */
    for (int64_t g; (g = atomic_fetch_add(&c->next, ROW_GROUP)) < J->N;) {
        const int64_t g1 = g + ROW_GROUP < J->N ? g + ROW_GROUP : J->N;
        for (int64_t m0 = 0; m0 < J->M; m0 += c->var->tile) {
            const int64_t mt = J->M - m0 < c->var->tile ? J->M - m0 : c->var->tile;
            c->var->rows(J, c->xsum, g, g1, m0, (int)mt);
        }
    }
}

static struct {
    float *xsum; /* per call, kept between calls (guarded by pool.lock) */
    size_t floats;
} work;

static int matmul(const qjob_t *J) {
    if (J->kind < 0 || J->kind >= NUM_KINDS || J->M < 0 || J->N < 0 || J->K <= 0 ||
        J->K % (J->kind == Q4_K ? 256 : 32))
        return BAD_SHAPE;
    const int isa = J->isa < 0 ? best_isa() : J->isa;
    if (isa >= NUM_ISAS || !isa_supported(isa)) return NO_ISA;
    if (J->M == 0 || J->N == 0) return OK;
    ctx_t c = {.job = J, .var = &variants[isa]};
    atomic_init(&c.next, 0);
    const int64_t S = J->K / 32;
    pthread_mutex_lock(&pool.lock);
    if (has_offset(J->kind)) {
        const size_t need = (size_t)(J->M * S);
        if (need > work.floats) {
            free(work.xsum);
            work.xsum = malloc(sizeof(float) * need);
            work.floats = work.xsum ? need : 0;
            if (!work.xsum) {
                pthread_mutex_unlock(&pool.lock);
                return NO_MEMORY;
            }
        }
        for (int64_t i = 0; i < J->M * S; i++) {
            float s = 0.0f;
            for (int k = 0; k < 32; k++) s += J->x[i * 32 + k];
            work.xsum[i] = s;
        }
        c.xsum = work.xsum;
    }
    int threads = thread_count(J->threads);
    const int64_t tiles = (J->M + c.var->tile - 1) / c.var->tile;
    const int64_t enough = J->N * J->K * tiles / MIN_WORK; /* threads the work is worth */
    if (threads > enough) threads = enough < 1 ? 1 : (int)enough;
    if (threads > J->N) threads = (int)J->N;
#ifdef _OPENMP
    if (threads > 1) {
#pragma omp parallel num_threads(threads)
        matmul_worker(&c, omp_get_thread_num(), omp_get_num_threads());
    } else {
        matmul_worker(&c, 0, 1);
    }
#else
    run_pool_with_caller(matmul_worker, &c, threads);
#endif
    pthread_mutex_unlock(&pool.lock);
    return OK;
}

void qmatmul(void *job) {
    qjob_t *J = job;
    J->status = matmul(J);
}
