// The matrix opcodes: what each does before its tiles (staging) and with each output (epilogue).
#pragma once
#include "gemv.cuh"

namespace mk {

// Element d of head j (kind 0 q, 1 k, 2 v) for sequence b: into q, or appended to the KV cache at the
// sequence's position.
__device__ __forceinline__ void store_qkv(const Ctx& cx, int l, int j, int kind, int b, int d, float v) {
    if (kind == 0) {
        param<float>(cx, P_Q)[b * Q_SIZE + j * HEAD_DIM + d] = v;
        return;
    }
    const int kvh = j - HEADS - (kind - 1) * KV_HEADS;
    const int p = param<int>(cx, P_POS)[b];
    const size_t page = param<int>(cx, P_TABLE)[b * MAX_PAGES + p / PAGE_SIZE];
    const size_t off = (((page * LAYERS + l) * 2 + (kind - 1)) * KV_HEADS + kvh) * PAGE_SIZE + p % PAGE_SIZE;
    param<bf16>(cx, P_KV)[off * HEAD_DIM + d] = __float2bfloat16(v);
}

// Finish rows [r0, r0 + nrows) of QKV head j, buffered in head_smem in packed order: bias, q/k RMSNorm
// (whole heads only), RoPE on the pairs (r, r + 8) of each tile, then store q or append K/V at each
// sequence's position. Packed row r of a q/k head is dim 8 * (r / 16) + r % 16, plus head_dim/2 if r % 16
// >= 8; v heads are in natural order.
__device__ void finish_head(Ctx& cx, int l, int j, int r0, int nrows) {
    float* y = head_smem(cx);  // [HEAD_DIM][BATCH]
    consumer_bar();
    const int kind = j < HEADS ? 0 : (j < HEADS + KV_HEADS ? 1 : 2);  // q, k, v
    auto dim = [&](int r) { return kind == 2 ? r : 8 * (r / 16) + (r % 16) % 8 + (r % 16 >= 8 ? HEAD_DIM / 2 : 0); };
    if (QKV_BIAS) {
        const bf16* bias = param<bf16>(cx, P_QKV_BIAS) + (size_t)l * QKV_ROWS + j * HEAD_DIM;
        for (int idx = cx.tid; idx < nrows * BATCH; idx += NCT) {
            const int r = r0 + idx / BATCH;
            y[r * BATCH + idx % BATCH] += bf16_to_float(bias[r]);
        }
        consumer_bar();
    }
    if (QK_NORM && kind < 2) {
        float* rn = stat_smem(cx);
        if (cx.tid < BATCH) {
            float ss = 0.f;
            for (int r = 0; r < HEAD_DIM; ++r) ss += y[r * BATCH + cx.tid] * y[r * BATCH + cx.tid];
            rn[cx.tid] = rsqrtf(ss / HEAD_DIM + EPS);
        }
        consumer_bar();
        const bf16* nw = param<bf16>(cx, kind == 0 ? P_Q_NORM : P_K_NORM) + l * HEAD_DIM;
        for (int idx = cx.tid; idx < HEAD_DIM * BATCH; idx += NCT)
            y[idx] *= rn[idx % BATCH] * bf16_to_float(nw[dim(idx / BATCH)]);
        consumer_bar();
    }
    const int* pos = param<int>(cx, P_POS);
    auto store = [&](int b, int d, float v) { store_qkv(cx, l, j, kind, b, d, v); };
    if (kind < 2) {
        const float2* rope = reinterpret_cast<const float2*>(param<float>(cx, P_ROPE));  // [position][HEAD_DIM/2]
        for (int idx = cx.tid; idx < (nrows / 2) * BATCH; idx += NCT) {
            const int p = idx / BATCH, b = idx % BATCH;
            const int r = r0 + (p / 8) * 16 + p % 8, i = dim(r);
            const float2 cs = __ldg(rope + (size_t)pos[b] * (HEAD_DIM / 2) + i);
            const float lo = y[r * BATCH + b], hi = y[(r + 8) * BATCH + b];
            store(b, i, lo * cs.x - hi * cs.y);
            store(b, i + HEAD_DIM / 2, hi * cs.x + lo * cs.y);
        }
    } else {
        for (int idx = cx.tid; idx < nrows * BATCH; idx += NCT) {
            const int r = r0 + idx / BATCH;
            store(idx % BATCH, r, y[r * BATCH + idx % BATCH]);
        }
    }
    consumer_bar();
}

// 16-row tiles of the packed q|k|v matrix after one RMSNorm. Without q/k norms and with at most two
// sequences, the 16 * BATCH epilogue threads are lanes of warp 0 and each RoPE pair (rows r, r ^ 8) is
// finished right there with a shuffle; otherwise heads are finished through shared memory, tile by tile
// (whole heads when q/k are normed, which the schedule guarantees to be in one instruction).
__device__ void op_qkv(Ctx& cx, const int* in) {
    constexpr int TPH = HEAD_DIM / TILE;
    constexpr bool DIRECT = !QK_NORM && BATCH <= 2;
    const int l = field(in, F_LAYER), t0 = field(in, F_A0);
    stage_norm(cx, l == 0, param<bf16>(cx, P_IN_NORM) + l * HIDDEN);
    float* y = head_smem(cx);
    const int* pos = param<int>(cx, P_POS);
    run_tiles<false>(
        cx, in,
        [&](int k, const WTile&, int row, int) {
            if (!DIRECT || !QKV_BIAS) return 0.f;
            return bf16_to_float(param<bf16>(cx, P_QKV_BIAS)[(size_t)l * QKV_ROWS + (t0 + k) * TILE + row]);
        },
        [&](int k, const WTile&, int row, int b, float v, float bias) {
            const int tile = t0 + k, lt = tile % TPH;
            if (!DIRECT) {
                y[(lt * TILE + row) * BATCH + b] = v;
                return;
            }
            v += bias;
            const float partner = __shfl_xor_sync(BATCH == 1 ? 0xffffu : 0xffffffffu, v, 8 * BATCH);
            const int j = tile / TPH, kind = j < HEADS ? 0 : (j < HEADS + KV_HEADS ? 1 : 2);
            const bool first = row < 8;
            const int i = 8 * lt + (first ? row : row - 8);  // RoPE pair index, < HEAD_DIM / 2
            int d = lt * TILE + row;                          // v rows are in natural order
            if (kind < 2) {
                const float2 cs = __ldg(reinterpret_cast<const float2*>(param<float>(cx, P_ROPE)) +
                                        (size_t)pos[b] * (HEAD_DIM / 2) + i);
                const float lo = first ? v : partner, hi = first ? partner : v;
                v = first ? lo * cs.x - hi * cs.y : hi * cs.x + lo * cs.y;
                d = first ? i : i + HEAD_DIM / 2;
            }
            store_qkv(cx, l, j, kind, b, d, v);
        },
        [&](int k) {
            const int tile = t0 + k, lt = tile % TPH;
            if (DIRECT) return;
            if (!QK_NORM) finish_head(cx, l, tile / TPH, lt * TILE, TILE);
            else if (lt == TPH - 1) finish_head(cx, l, tile / TPH, 0, HEAD_DIM);
        });
    signal(cx, field(in, F_SIG_CTR), field(in, F_SIG_AMOUNT));
}

// Merged attention (bf16) times O rows, plus the residual (the embedding row in layer 0) and bias.
__device__ void op_oproj(Ctx& cx, const int* in) {
    const int l = field(in, F_LAYER), t0 = field(in, F_A0);
    stage_copy(cx, param<bf16>(cx, P_ATTN_OUT), Q_SIZE);
    float* resid = param<float>(cx, P_RESID);
    run_tiles<false>(
        cx, in,
        [&](int k, const WTile& t, int row, int b) {  // the residual and bias, loaded during the products
            if (row >= t.rows) return 0.f;
            const int r = (t0 + k) * TILE + row;
            float base;
            if (l == 0) {
                const int tok = __ldg(param<int>(cx, P_TOKENS) + b);
                base = bf16_to_float(param<bf16>(cx, P_EMBED)[(size_t)tok * HIDDEN + r]);
            } else {
                base = ld_cg(resid + b * HIDDEN + r);
            }
            return O_BIAS ? base + bf16_to_float(param<bf16>(cx, P_O_BIAS)[l * HIDDEN + r]) : base;
        },
        [&](int k, const WTile& t, int row, int b, float v, float base) {
            if (row < t.rows) resid[b * HIDDEN + (t0 + k) * TILE + row] = base + v;
        },
        NothingAfter{});
    signal(cx, field(in, F_SIG_CTR), field(in, F_SIG_AMOUNT));
}

// RMSNorm -> gate and up rows (alternating tiles) -> SiLU(gate) * up, rounded to bf16.
__device__ void op_gateup(Ctx& cx, const int* in) {
    const int l = field(in, F_LAYER), t0 = field(in, F_A0);
    stage_norm(cx, false, param<bf16>(cx, P_POST_NORM) + l * HIDDEN);
    bf16* act = param<bf16>(cx, P_ACT);
    float gate = 0.f;  // kept by the thread that owns (row, b) from the gate tile to the up tile
    run_tiles<false>(
        cx, in,
        [&](int k, const WTile& t, int row, int) {
            const int r = (t0 + k / 2) * TILE + row;
            if (!MLP_BIAS || row >= t.rows) return 0.f;
            return bf16_to_float(param<bf16>(cx, P_GATE_UP_BIAS)[(size_t)l * 2 * INTER + (k & 1) * INTER + r]);
        },
        [&](int k, const WTile& t, int row, int b, float v, float bias) {
            if (row >= t.rows) return;
            if ((k & 1) == 0) {
                gate = v + bias;
            } else {
                act[b * INTER + (t0 + k / 2) * TILE + row] = __float2bfloat16(gate / (1.f + expf(-gate)) * (v + bias));
            }
        },
        NothingAfter{});
    signal(cx, field(in, F_SIG_CTR), field(in, F_SIG_AMOUNT));
}

// SiLU output times down rows, added to the residual. The SiLU output is staged whole, or streamed by
// k-chunk when that leaves room for more ring stages (large batches).
__device__ void op_down(Ctx& cx, const int* in) {
    const int l = field(in, F_LAYER), t0 = field(in, F_A0);
    if (!STREAM_DOWN_ACT) stage_copy(cx, param<bf16>(cx, P_ACT), INTER);
    float* resid = param<float>(cx, P_RESID);
    run_tiles<STREAM_DOWN_ACT != 0>(
        cx, in,
        [&](int k, const WTile& t, int row, int b) {
            if (row >= t.rows) return 0.f;
            const int r = (t0 + k) * TILE + row;
            const float base = ld_cg(resid + b * HIDDEN + r);
            return MLP_BIAS ? base + bf16_to_float(param<bf16>(cx, P_DOWN_BIAS)[l * HIDDEN + r]) : base;
        },
        [&](int k, const WTile& t, int row, int b, float v, float base) {
            if (row < t.rows) resid[b * HIDDEN + (t0 + k) * TILE + row] = base + v;
        },
        NothingAfter{}, param<bf16>(cx, P_ACT));
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
    run_tiles<false>(
        cx, in, NoPrefetch{},
        [&](int k, const WTile& t, int row, int b, float v, float) {
            if (row >= t.rows) return;
            const int r = (t0 + k) * TILE + row;
            logits[(size_t)b * VOCAB + r] = v;
            const unsigned long long key = argmax_key(v, r);
            best = key > best ? key : best;
        },
        NothingAfter{});
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
