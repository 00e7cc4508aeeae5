// The matrix opcodes: what each does before its tiles (staging) and with each output (epilogue).
#pragma once
#include "gemv.cuh"

namespace mk {

// One q, k or v head: RMSNorm -> head_dim rows -> bias -> q/k RMSNorm (Qwen3) -> RoPE -> store q, or
// append K/V at each sequence's current position (pages from its page table).
__device__ void op_qkv(Ctx& cx, const int* in) {
    const int l = field(in, F_LAYER), j = field(in, F_A0);
    stage_norm(cx, l == 0, param<bf16>(cx, P_IN_NORM) + l * HIDDEN);
    float* y = head_smem(cx);  // [HEAD_DIM][BATCH]
    run_tiles(cx, in, [&](int k, const WTile&, int row, int b, float v) { y[(k * TILE + row) * BATCH + b] = v; });
    consumer_bar();
    const int kind = j < HEADS ? 0 : (j < HEADS + KV_HEADS ? 1 : 2);  // q, k, v
    if (QKV_BIAS) {
        const bf16* bias = param<bf16>(cx, P_QKV_BIAS) + (size_t)l * QKV_ROWS + j * HEAD_DIM;
        for (int idx = cx.tid; idx < HEAD_DIM * BATCH; idx += NCT) y[idx] += bf16_to_float(bias[idx / BATCH]);
        consumer_bar();
    }
    if (QK_NORM && kind < 2) {
        float* rn = stat_smem(cx);
        if (cx.tid < BATCH) {
            float ss = 0.f;
            for (int i = 0; i < HEAD_DIM; ++i) ss += y[i * BATCH + cx.tid] * y[i * BATCH + cx.tid];
            rn[cx.tid] = rsqrtf(ss / HEAD_DIM + EPS);
        }
        consumer_bar();
        const bf16* nw = param<bf16>(cx, kind == 0 ? P_Q_NORM : P_K_NORM) + l * HEAD_DIM;
        for (int idx = cx.tid; idx < HEAD_DIM * BATCH; idx += NCT)
            y[idx] *= rn[idx % BATCH] * bf16_to_float(nw[idx / BATCH]);
        consumer_bar();
    }
    const int* pos = param<int>(cx, P_POS);
    const int* table = param<int>(cx, P_TABLE);
    const int kvh = kind == 0 ? 0 : j - HEADS - (kind - 1) * KV_HEADS;
    auto store = [&](int b, int i, float v) {
        if (kind == 0) {
            param<float>(cx, P_Q)[b * Q_SIZE + j * HEAD_DIM + i] = v;
        } else {
            const int p = pos[b];
            const size_t page = table[b * MAX_PAGES + p / PAGE_SIZE];
            const size_t off = (((page * LAYERS + l) * 2 + (kind - 1)) * KV_HEADS + kvh) * PAGE_SIZE + p % PAGE_SIZE;
            param<bf16>(cx, P_KV)[off * HEAD_DIM + i] = __float2bfloat16(v);
        }
    };
    if (kind < 2) {
        const float* rope = param<float>(cx, P_ROPE);  // [position][HEAD_DIM/2][cos, sin]
        for (int idx = cx.tid; idx < (HEAD_DIM / 2) * BATCH; idx += NCT) {
            const int i = idx / BATCH, b = idx % BATCH;
            const float2 cs = __ldg(reinterpret_cast<const float2*>(rope) + (size_t)pos[b] * (HEAD_DIM / 2) + i);
            const float lo = y[i * BATCH + b], hi = y[(i + HEAD_DIM / 2) * BATCH + b];
            store(b, i, lo * cs.x - hi * cs.y);
            store(b, i + HEAD_DIM / 2, hi * cs.x + lo * cs.y);
        }
    } else {
        for (int idx = cx.tid; idx < HEAD_DIM * BATCH; idx += NCT) store(idx % BATCH, idx / BATCH, y[idx]);
    }
    signal(cx, field(in, F_SIG_CTR), field(in, F_SIG_AMOUNT));
}

// Merged attention (bf16) times O rows, plus the residual (the embedding row in layer 0).
__device__ void op_oproj(Ctx& cx, const int* in) {
    const int l = field(in, F_LAYER), t0 = field(in, F_A0);
    stage_copy(cx, param<bf16>(cx, P_ATTN_OUT), Q_SIZE);
    float* resid = param<float>(cx, P_RESID);
    run_tiles(cx, in, [&](int k, const WTile& t, int row, int b, float v) {
        if (row >= t.rows) return;
        const int r = (t0 + k) * TILE + row;
        if (O_BIAS) v += bf16_to_float(param<bf16>(cx, P_O_BIAS)[l * HIDDEN + r]);
        float base;
        if (l == 0) {
            const int tok = __ldg(param<int>(cx, P_TOKENS) + b);
            base = bf16_to_float(param<bf16>(cx, P_EMBED)[(size_t)tok * HIDDEN + r]);
        } else {
            base = ld_cg(resid + b * HIDDEN + r);
        }
        resid[b * HIDDEN + r] = base + v;
    });
    signal(cx, field(in, F_SIG_CTR), field(in, F_SIG_AMOUNT));
}

// RMSNorm -> gate and up rows (alternating tiles) -> SiLU(gate) * up, rounded to bf16.
__device__ void op_gateup(Ctx& cx, const int* in) {
    const int l = field(in, F_LAYER), t0 = field(in, F_A0);
    stage_norm(cx, false, param<bf16>(cx, P_POST_NORM) + l * HIDDEN);
    bf16* act = param<bf16>(cx, P_ACT);
    float gate = 0.f;  // kept by the thread that owns (row, b) from the gate tile to the up tile
    run_tiles(cx, in, [&](int k, const WTile& t, int row, int b, float v) {
        if (row >= t.rows) return;
        const int r = (t0 + k / 2) * TILE + row;
        if (MLP_BIAS) v += bf16_to_float(param<bf16>(cx, P_GATE_UP_BIAS)[(size_t)l * 2 * INTER + (k & 1) * INTER + r]);
        if ((k & 1) == 0) {
            gate = v;
        } else {
            act[b * INTER + r] = __float2bfloat16(gate / (1.f + expf(-gate)) * v);
        }
    });
    signal(cx, field(in, F_SIG_CTR), field(in, F_SIG_AMOUNT));
}

// SiLU output times down rows, added to the residual.
__device__ void op_down(Ctx& cx, const int* in) {
    const int l = field(in, F_LAYER), t0 = field(in, F_A0);
    stage_copy(cx, param<bf16>(cx, P_ACT), INTER);
    float* resid = param<float>(cx, P_RESID);
    run_tiles(cx, in, [&](int k, const WTile& t, int row, int b, float v) {
        if (row >= t.rows) return;
        const int r = (t0 + k) * TILE + row;
        if (MLP_BIAS) v += bf16_to_float(param<bf16>(cx, P_DOWN_BIAS)[l * HIDDEN + r]);
        resid[b * HIDDEN + r] = ld_cg(resid + b * HIDDEN + r) + v;
    });
    signal(cx, field(in, F_SIG_CTR), field(in, F_SIG_AMOUNT));
}

// (logit, index) packed so that the unsigned maximum is the largest logit, then the smallest index.
__device__ __forceinline__ unsigned long long argmax_key(float v, int idx) {
    const uint32_t bits = __float_as_uint(v);
    const uint32_t ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    return (static_cast<unsigned long long>(ordered) << 32) | (0xffffffffu - static_cast<uint32_t>(idx));
}

// Final RMSNorm -> LM head rows -> fp32 logits, and this instruction's argmax merged into the global one.
__device__ void op_lmhead(Ctx& cx, const int* in) {
    const int t0 = field(in, F_A0);
    stage_norm(cx, false, param<bf16>(cx, P_FINAL_NORM));
    float* logits = param<float>(cx, P_LOGITS);
    unsigned long long best = 0;
    run_tiles(cx, in, [&](int k, const WTile& t, int row, int b, float v) {
        if (row >= t.rows) return;
        const int r = (t0 + k) * TILE + row;
        logits[(size_t)b * VOCAB + r] = v;
        const unsigned long long key = argmax_key(v, r);
        best = key > best ? key : best;
    });
    unsigned long long* keys = key_smem(cx);
    if (cx.tid < TILE * BATCH) keys[cx.tid] = best;
    consumer_bar();
    if (cx.tid < BATCH) {
        unsigned long long m = 0;
        for (int row = 0; row < TILE; ++row) m = keys[row * BATCH + cx.tid] > m ? keys[row * BATCH + cx.tid] : m;
        atomicMax(param<unsigned long long>(cx, P_ARGMAX) + cx.tid, m);
    }
    signal(cx, field(in, F_SIG_CTR), field(in, F_SIG_AMOUNT));
}

}  // namespace mk
