/* One decode step of every decoder layer on the host, in one call (the CPU backend's fast path).
 *
 * A small model's decode step on a few cores is dominated by what runs between the matmuls when Python
 * drives each layer (dozens of torch ops, several ctypes calls). Here Python prepares the step once (the
 * embedded tokens in x, rotary cos/sin of each row, where each row's new K/V go, the attention page
 * lists) and this loop runs the layers: RMSNorm, the stacked q|k|v matmul, rotary, the K/V write into the
 * fp32 page pool, attention, the o matmul, the residual, RMSNorm, the stacked gate|up matmul, SiLU * up,
 * the down matmul, the residual. The matmuls and the attention are the existing kernels
 * (quant/quant_matmul.c and kv/cpu_attention.c), called through the function pointers and job structs
 * Python built for them (job pointers per layer); the rest is small and runs on the calling thread.
 *
 * The arithmetic follows the reference executor's fp32 path (executors/reference.py) up to summation
 * order: rms_norm = w * (x / sqrt(mean(x^2) + eps)), rotate-half rotary with cos/sin [M, D].
 */
#include <math.h>
#include <stdint.h>

typedef void (*job_fn)(void *);

typedef struct {
    int32_t layers, M, hidden, heads, kv_heads, D, inter;
    float eps;
    float *x;   /* [M, hidden]: the residual stream, in and out */
    float *h;   /* [M, hidden]: a norm's output (the q|k|v and gate|up matmuls read it) */
    float *qkv; /* [M, heads*D + 2*kv_heads*D]: written by the q|k|v matmul job */
    float *q;   /* [M, heads, D]: rotated queries (the attention jobs read it) */
    float *attn; /* [M, heads*D]: written by the attention jobs, read by the o matmul job */
    float *tmp;  /* [M, hidden]: written by the o and down matmul jobs */
    float *gu;   /* [M, 2*inter]: written by the gate|up matmul job */
    float *act;  /* [M, inter]: silu(gate) * up, read by the down matmul job */
    const float *cos, *sin;                          /* [M, D] */
    const float *const *input_norm, *const *post_norm; /* [layers] of [hidden] */
    const float *const *qkv_bias, *const *o_bias, *const *gu_bias, *const *down_bias; /* [layers], NULL: none */
    float *kv;            /* the pool's first element */
    const int64_t *kv_row; /* [M]: element offset of (page, layer 0, K, head 0, row) of each row's new token */
    int64_t layer_stride, v_stride, head_stride;
    void *const *matmul_jobs; /* [layers][4]: q|k|v, o, gate|up, down */
    void *const *attend_jobs; /* [layers] */
    job_fn matmul, attend;
} step_t;

int step_size(void) { return sizeof(step_t); }

static void rms_norm(const float *x, const float *w, float *out, int n, float eps) {
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    const float r = 1.0f / sqrtf((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
}

static void add_bias(float *y, const float *b, int n) {
    if (b)
        for (int i = 0; i < n; i++) y[i] += b[i];
}

/* Rotate-half rotary of one head: pairs (i, i + D/2), cos/sin of the row's position. */
static void rope(const float *x, const float *c, const float *s, float *out, int D) {
    const int half = D / 2;
    for (int i = 0; i < half; i++) {
        out[i] = x[i] * c[i] - x[i + half] * s[i];
        out[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
    }
}

void decode_layers(step_t *S) {
    const int M = S->M, H = S->hidden, D = S->D, qs = S->heads * D, ks = S->kv_heads * D;
    const int width = qs + 2 * ks;
    for (int l = 0; l < S->layers; l++) {
        void *const *jobs = S->matmul_jobs + 4 * l;
        for (int r = 0; r < M; r++) rms_norm(S->x + (int64_t)r * H, S->input_norm[l], S->h + (int64_t)r * H, H, S->eps);
        S->matmul(jobs[0]);
        for (int r = 0; r < M; r++) {
            float *row = S->qkv + (int64_t)r * width;
            add_bias(row, S->qkv_bias[l], width);
            const float *c = S->cos + (int64_t)r * D, *s = S->sin + (int64_t)r * D;
            for (int hd = 0; hd < S->heads; hd++) rope(row + hd * D, c, s, S->q + (int64_t)r * qs + hd * D, D);
            float *base = S->kv + S->kv_row[r] + l * S->layer_stride;
            for (int hd = 0; hd < S->kv_heads; hd++) {
                rope(row + qs + hd * D, c, s, base + hd * S->head_stride, D);
                const float *v = row + qs + ks + hd * D;
                float *dst = base + S->v_stride + hd * S->head_stride;
                for (int i = 0; i < D; i++) dst[i] = v[i];
            }
        }
        S->attend(S->attend_jobs[l]);
        S->matmul(jobs[1]);
        for (int r = 0; r < M; r++) {
            float *x = S->x + (int64_t)r * H, *t = S->tmp + (int64_t)r * H;
            add_bias(t, S->o_bias[l], H);
            for (int i = 0; i < H; i++) x[i] += t[i];
            rms_norm(x, S->post_norm[l], S->h + (int64_t)r * H, H, S->eps);
        }
        S->matmul(jobs[2]);
        for (int r = 0; r < M; r++) {
            float *gu = S->gu + (int64_t)r * 2 * S->inter, *a = S->act + (int64_t)r * S->inter;
            add_bias(gu, S->gu_bias[l], 2 * S->inter);
            for (int i = 0; i < S->inter; i++) {
                const float g = gu[i];
                a[i] = g / (1.0f + expf(-g)) * gu[S->inter + i];
            }
        }
        S->matmul(jobs[3]);
        for (int r = 0; r < M; r++) {
            float *x = S->x + (int64_t)r * H, *t = S->tmp + (int64_t)r * H;
            add_bias(t, S->down_bias[l], H);
            for (int i = 0; i < H; i++) x[i] += t[i];
        }
    }
}
