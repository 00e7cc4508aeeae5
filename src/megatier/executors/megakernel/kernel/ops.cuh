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
    param<bf16>(cx, P_KV)[current_kv_row(cx, l, kind - 1, kvh, b) + d] = __float2bfloat16(v);
}

// The first few entries of a per-tile value computed before an instruction's counter wait (step-invariant
// inputs, or loads issued together right after it), so that no epilogue waits on a global load.
// Later tiles (very small grids; QKV's second tile at batch > 2, see op_qkv) compute theirs in the epilogue.
constexpr int PREP = 4;

template <class T, int N>
__device__ __forceinline__ T pick(const T (&vals)[N], int k) {
    T out = vals[0];
#pragma unroll
    for (int i = 1; i < N; ++i)
        if (k == i) out = vals[i];
    return out;
}

// Finish QKV head j of a model with q/k RMSNorm, buffered in head_smem in packed order: bias, q/k
// RMSNorm, RoPE on the pairs (r, r + 8) of each tile, then store q or append K/V at each sequence's
// position. Packed row r of a q/k head is dim 8 * (r / 16) + r % 16, plus head_dim/2 if r % 16 >= 8; v
// heads are in natural order.
__device__ void finish_head(Ctx& cx, int l, int j) {
    float* y = head_smem(cx);  // [HEAD_DIM][BATCH]
    consumer_bar();
    const int kind = j < HEADS ? 0 : (j < HEADS + KV_HEADS ? 1 : 2);  // q, k, v
    auto dim = [&](int r) { return kind == 2 ? r : 8 * (r / 16) + (r % 16) % 8 + (r % 16 >= 8 ? HEAD_DIM / 2 : 0); };
    if (QKV_BIAS) {
        const bf16* bias = param<bf16>(cx, P_QKV_BIAS) + (size_t)l * QKV_ROWS + j * HEAD_DIM;
        for (int idx = cx.tid; idx < HEAD_DIM * BATCH; idx += NCT) {
            const int r = idx / BATCH;
            y[r * BATCH + idx % BATCH] += bf16_to_float(bias[r]);
        }
        consumer_bar();
    }
    if (kind < 2) {
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
    auto store = [&](int b, int d, float v) { store_qkv(cx, l, j, kind, b, d, v); };
    if (kind < 2) {
        const float2* rope = reinterpret_cast<const float2*>(param<float>(cx, P_ROPE));  // [position][HEAD_DIM/2]
        for (int idx = cx.tid; idx < (HEAD_DIM / 2) * BATCH; idx += NCT) {
            const int p = idx / BATCH, b = idx % BATCH;
            const int r = (p / 8) * 16 + p % 8, i = dim(r);
            const float2 cs = __ldg(rope + (size_t)pos_of(cx, b) * (HEAD_DIM / 2) + i);
            const float lo = y[r * BATCH + b], hi = y[(r + 8) * BATCH + b];
            store(b, i, lo * cs.x - hi * cs.y);
            store(b, i + HEAD_DIM / 2, hi * cs.x + lo * cs.y);
        }
    } else {
        for (int idx = cx.tid; idx < HEAD_DIM * BATCH; idx += NCT) {
            const int r = idx / BATCH;
            store(idx % BATCH, r, y[r * BATCH + idx % BATCH]);
        }
    }
    consumer_bar();
}

// Where the DIRECT QKV epilogue puts output (tile, row, b), with its RoPE rotation and the biases of its
// row and of its RoPE partner (row ^ 8): all step-invariant, so computed before the counter wait.
struct QkvOut {
    void* dst;  // float* into q, or bf16* into the KV cache
    float2 cs;  // (cos, sin) of the element's RoPE pair; (1, 0) for v
    float bias, partner_bias;
};

__device__ QkvOut qkv_out(const Ctx& cx, int l, int tile, int row, int b) {
    constexpr int TPH = HEAD_DIM / TILE;
    const int lt = tile % TPH, j = tile / TPH, kind = j < HEADS ? 0 : (j < HEADS + KV_HEADS ? 1 : 2);
    const bool first = row < 8;
    const int i = 8 * lt + (first ? row : row - 8);  // RoPE pair index, < HEAD_DIM / 2
    int d = lt * TILE + row;                          // v rows are in natural order
    QkvOut o{nullptr, make_float2(1.f, 0.f), 0.f, 0.f};
    if (kind < 2) {
        o.cs = __ldg(reinterpret_cast<const float2*>(param<float>(cx, P_ROPE)) + (size_t)pos_of(cx, b) * (HEAD_DIM / 2) + i);
        d = first ? i : i + HEAD_DIM / 2;
    }
    if (QKV_BIAS) {
        const bf16* bias = param<bf16>(cx, P_QKV_BIAS) + (size_t)l * QKV_ROWS + tile * TILE;
        o.bias = bf16_to_float(bias[row]);
        o.partner_bias = bf16_to_float(bias[row ^ 8]);
    }
    if (kind == 0) {
        o.dst = param<float>(cx, P_Q) + b * Q_SIZE + j * HEAD_DIM + d;
    } else {
        const int kvh = j - HEADS - (kind - 1) * KV_HEADS;
        o.dst = param<bf16>(cx, P_KV) + current_kv_row(cx, l, kind - 1, kvh, b) + d;
    }
    return o;
}

// 16-row tiles of the packed q|k|v matrix after one RMSNorm. Without q/k norms the 16 * BATCH epilogue
// threads finish each RoPE pair (rows r, r ^ 8) right there: the partner's value comes by a shuffle when
// it is a lane of the same warp (at most two sequences), otherwise it is summed again from the warps'
// partials in the same order its owner sums them. With q/k norms, heads are finished through shared
// memory, whole heads (which the schedule guarantees to be in one instruction).
__device__ bool op_qkv(Ctx& cx, const int* in) {
    constexpr int TPH = HEAD_DIM / TILE;
    constexpr bool DIRECT = !QK_NORM, SHUFFLE = BATCH <= 2;
    // One entry at batch > 2: a second one spilled registers (Qwen2.5, batch 8), so a two-tile SM computes
    // its second tile's entry in the epilogue.
    constexpr int NPREP = SHUFFLE ? PREP : 1;
    const int l = field(in, F_LAYER), t0 = field(in, F_A0), tiles = field(in, F_A1) - t0;
    const int row = cx.tid / BATCH, b = cx.tid % BATCH;
    QkvOut prep[NPREP];
    if (DIRECT && cx.tid < TILE * BATCH) {
#pragma unroll
        for (int k = 0; k < NPREP; ++k)
            if (k < tiles) prep[k] = qkv_out(cx, l, t0 + k, row, b);
    }
    const NormWeights nw = load_norm_weights(cx, param<bf16>(cx, P_IN_NORM) + l * HIDDEN);
    if (!wait_for(cx, in)) return false;
    stage_norm(cx, l == 0, nw);
    float* y = head_smem(cx);
    run_tiles<false, OP_QKV>(
        cx, in, NoPrefetch{},
        [&](int k, const WTile&, int row, int b, float v, float) {
            const int tile = t0 + k, lt = tile % TPH;
            if (!DIRECT) {
                y[(lt * TILE + row) * BATCH + b] = v;
                return;
            }
            const QkvOut o = k < NPREP ? pick(prep, k) : qkv_out(cx, l, tile, row, b);
            v += o.bias;
            float partner;
            if constexpr (SHUFFLE) {
                partner = __shfl_xor_sync(BATCH == 1 ? 0xffffu : 0xffffffffu, v, 8 * BATCH);
            } else {
                const float* red = red_smem(cx, cx.rbuf);
                partner = 0.f;
                for (int w = 0; w < NUM_CONSUMER_WARPS; ++w) partner += red[(w * TILE + (row ^ 8)) * 8 + b];
                partner += o.partner_bias;
            }
            const int j = tile / TPH;
            if (j < HEADS + KV_HEADS) {  // q or k: rotate the pair (row, row ^ 8)
                const bool first = row < 8;
                const float lo = first ? v : partner, hi = first ? partner : v;
                v = first ? lo * o.cs.x - hi * o.cs.y : hi * o.cs.x + lo * o.cs.y;
            }
            if (j < HEADS) *static_cast<float*>(o.dst) = v;
            else *static_cast<bf16*>(o.dst) = __float2bfloat16(v);
        },
        [&](int k) {
            const int tile = t0 + k, lt = tile % TPH;
            if (!DIRECT && lt == TPH - 1) finish_head(cx, l, tile / TPH);
        });
    signal(cx, field(in, F_SIG_CTR), field(in, F_SIG_AMOUNT));
    return true;
}

// The residual rows (row, b) of an OPROJ or DOWN tile plus the layer's bias; in layer 0 OPROJ adds to
// the token's embedding row instead of the residual.
__device__ __forceinline__ float residual_base(const Ctx& cx, bool embed, const bf16* bias, int r, int b) {
    float base = embed ? bf16_to_float(param<bf16>(cx, P_EMBED)[(size_t)token_of(cx, b) * HIDDEN + r])
                       : ld_cg(param<float>(cx, P_RESID) + b * HIDDEN + r);
    return bias != nullptr ? base + bf16_to_float(bias[r]) : base;
}

// OPROJ and DOWN: staged activations (attention output, or SiLU output) times weight rows, added to the
// residual. The residual rows are loaded right after the wait, alongside the activations.
template <bool STREAM, int OP, int K>
__device__ bool residual_matmul(Ctx& cx, const int* in, bool embed, const bf16* bias, const bf16* src) {
    const int t0 = field(in, F_A0), tiles = field(in, F_A1) - t0;
    const int row = cx.tid / BATCH, b = cx.tid % BATCH;
    const bool owner = cx.tid < TILE * BATCH;
    float base[PREP];
    if (!wait_for(cx, in)) return false;
    if (owner) {
#pragma unroll
        for (int k = 0; k < PREP; ++k)
            if (k < tiles) base[k] = residual_base(cx, embed, bias, (t0 + k) * TILE + row, b);
    }
    if (!STREAM) stage_copy<K>(cx, src);
    float* resid = param<float>(cx, P_RESID);
    run_tiles<STREAM, OP>(
        cx, in, NoPrefetch{},
        [&](int k, const WTile&, int row, int b, float v, float) {
            const int r = (t0 + k) * TILE + row;
            resid[b * HIDDEN + r] = (k < PREP ? pick(base, k) : residual_base(cx, embed, bias, r, b)) + v;
        },
        NothingAfter{}, src);
    signal(cx, field(in, F_SIG_CTR), field(in, F_SIG_AMOUNT));
    return true;
}

// Merged attention (bf16) times O rows, plus the residual (the embedding row in layer 0) and bias.
__device__ bool op_oproj(Ctx& cx, const int* in) {
    const int l = field(in, F_LAYER);
    const bf16* bias = O_BIAS ? param<bf16>(cx, P_O_BIAS) + l * HIDDEN : nullptr;
    return residual_matmul<false, OP_OPROJ, Q_SIZE>(cx, in, l == 0, bias, param<bf16>(cx, P_ATTN_OUT));
}

// RMSNorm -> gate and up rows (alternating tiles) -> SiLU(gate) * up, rounded to bf16.
__device__ bool op_gateup(Ctx& cx, const int* in) {
    const int l = field(in, F_LAYER), t0 = field(in, F_A0);
    const NormWeights nw = load_norm_weights(cx, param<bf16>(cx, P_POST_NORM) + l * HIDDEN);
    if (!wait_for(cx, in)) return false;
    stage_norm(cx, false, nw);
    bf16* act = param<bf16>(cx, P_ACT);
    float gate = 0.f;  // kept by the thread that owns (row, b) from the gate tile to the up tile
    run_tiles<false, OP_GATEUP>(
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
    return true;
}

// SiLU output times down rows, added to the residual. The SiLU output is staged whole, or streamed by
// k-chunk when that leaves room for more ring stages (large batches).
__device__ bool op_down(Ctx& cx, const int* in) {
    const int l = field(in, F_LAYER);
    const bf16* bias = MLP_BIAS ? param<bf16>(cx, P_DOWN_BIAS) + l * HIDDEN : nullptr;
    return residual_matmul<STREAM_DOWN_ACT != 0, OP_DOWN, INTER>(cx, in, false, bias, param<bf16>(cx, P_ACT));
}

// (logit, index) packed so that the unsigned maximum is the largest logit, then the smallest index.
__device__ __forceinline__ unsigned long long argmax_key(float v, int idx) {
    const uint32_t bits = __float_as_uint(v);
    const uint32_t ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    return (static_cast<unsigned long long>(ordered) << 32) | (0xffffffffu - static_cast<uint32_t>(idx));
}

// Final RMSNorm -> LM head rows -> fp32 logits, and this instruction's argmax merged into the global one.
__device__ bool op_lmhead(Ctx& cx, const int* in) {
    const int t0 = field(in, F_A0);
    const NormWeights nw = load_norm_weights(cx, param<bf16>(cx, P_FINAL_NORM));
    if (!wait_for(cx, in)) return false;
    stage_norm(cx, false, nw);
    float* logits = param<float>(cx, P_LOGITS);
    unsigned long long best = 0;
    run_tiles<false, OP_LMHEAD>(
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
    return true;
}

}  // namespace mk
