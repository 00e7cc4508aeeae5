// Weight streaming: the loader warp and the consumer warps walk the same sequence of weight chunks.
//
// An instruction's weights are a list of 16-row tiles of row-major [M, K] bf16 matrices; a tile is
// cut into K/kc chunks of 16 x kc, and each chunk fills one ring stage (one bulk copy per row). The
// loader runs ahead across instruction boundaries: it never waits for activations, only for a free
// stage. Consumers multiply each chunk by the staged activations with tensor cores (each warp owns
// every NUM_CONSUMER_WARPS-th k-step), then reduce the warps' partial sums in a fixed order.
#pragma once
#include "common.cuh"

namespace mk {

struct WTile {
    const bf16* w;  // first row of the tile
    int rows;       // valid rows (the last tile of a matrix may be short)
    int K;
};

// Weight tiles of an instruction of opcode OP (a template argument in the consumers, so their hot path
// has no switch: its jump table is a constant-memory load that, measured in run 25's probe, left ~0.7 us
// between an instruction's staging and its first product).
template <int OP>
__device__ __forceinline__ int num_tiles_of(const int* in) {
    const int n = field(in, F_A1) - field(in, F_A0);
    return OP == OP_GATEUP ? 2 * n : n;
}

__device__ __forceinline__ int min_rows(int m, int row0) { return m - row0 < TILE ? m - row0 : TILE; }

// Tile k of an instruction. GATEUP alternates gate tile t and up tile t, so SiLU(gate) * up is local.
// QKV rows are packed so that each 16-row tile holds whole RoPE pairs (see layout.Dims.qkv_tile).
template <int OP>
__device__ __forceinline__ WTile tile_of(const Ctx& cx, const int* in, int k) {
    const size_t l = field(in, F_LAYER);
    const int t0 = field(in, F_A0);
    if constexpr (OP == OP_QKV) {
        const size_t row = (size_t)(t0 + k) * TILE;
        return {param<bf16>(cx, P_QKV) + (l * QKV_ROWS + row) * HIDDEN, TILE, HIDDEN};
    } else if constexpr (OP == OP_OPROJ) {
        const int row = (t0 + k) * TILE;
        return {param<bf16>(cx, P_O) + (l * HIDDEN + row) * Q_SIZE, min_rows(HIDDEN, row), Q_SIZE};
    } else if constexpr (OP == OP_GATEUP) {
        const int row = (t0 + k / 2) * TILE;
        const size_t full_row = l * 2 * INTER + (k & 1) * INTER + row;
        return {param<bf16>(cx, P_GATE_UP) + full_row * HIDDEN, min_rows(INTER, row), HIDDEN};
    } else if constexpr (OP == OP_DOWN) {
        const int row = (t0 + k) * TILE;
        return {param<bf16>(cx, P_DOWN) + (l * HIDDEN + row) * INTER, min_rows(HIDDEN, row), INTER};
    } else {
        const int row = (t0 + k) * TILE;
        return {param<bf16>(cx, P_LM_HEAD) + (size_t)row * HIDDEN, min_rows(VOCAB, row), HIDDEN};
    }
}

// The loader's view: the same, dispatched on the instruction's opcode at run time.
__device__ int num_tiles(const int* in) {
    switch (field(in, F_OP)) {
        case OP_GATEUP: return num_tiles_of<OP_GATEUP>(in);
        case OP_QKV:
        case OP_OPROJ:
        case OP_DOWN:
        case OP_LMHEAD: return num_tiles_of<OP_QKV>(in);
        default: return 0;
    }
}

__device__ WTile tile_at(const Ctx& cx, const int* in, int k) {
    switch (field(in, F_OP)) {
        case OP_QKV: return tile_of<OP_QKV>(cx, in, k);
        case OP_OPROJ: return tile_of<OP_OPROJ>(cx, in, k);
        case OP_GATEUP: return tile_of<OP_GATEUP>(cx, in, k);
        case OP_DOWN: return tile_of<OP_DOWN>(cx, in, k);
        default: return tile_of<OP_LMHEAD>(cx, in, k);
    }
}

// Loader side: every chunk of every weight tile of one instruction, in order.
__device__ bool load_weights(Ctx& cx, const int* in, uint64_t policy) {
    const int tiles = num_tiles(in);
    for (int k = 0; k < tiles; ++k) {
        const WTile t = tile_at(cx, in, k);
        const int kc = kc_for(t.K);
        for (int c = 0; c < t.K / kc; ++c) {
            if (!claim_stage(cx, in, t.rows * kc * 2)) return false;
            if (cx.lane < t.rows)
                bulk_copy(ring_stage(cx, cx.stage) + cx.lane * ROW_STRIDE, t.w + (size_t)cx.lane * t.K + c * kc, kc * 2,
                          full_bar(cx, cx.stage), policy);
            advance(cx);
        }
    }
    return true;
}

constexpr int KSW = KC_MAX / 16 / NUM_CONSUMER_WARPS;  // k-steps per warp in a full-width chunk

// Consumers: y[row][b] = sum_k W[row][k] * act[b][k] for each tile of the instruction. On thread
// row * BATCH + b (rows < 16): pre(k, tile, row, b) before the tile's products (to prefetch epilogue
// inputs), then epi(k, tile, row, b, y, pre's value). Then every consumer thread calls after(k).
// Activations are staged in act_smem beforehand, or with STREAM read from `src` [BATCH][K] chunk by
// chunk into two alternating buffers, the next chunk's loads in flight while this one is multiplied.
template <bool STREAM, int OP, class Pre, class Epilogue, class After>
__device__ void run_tiles(Ctx& cx, const int* in, Pre&& pre, Epilogue&& epi, After&& after, const bf16* src = nullptr) {
    constexpr int STRIDE = STREAM ? STREAM_STRIDE : ACT_STRIDE;
    constexpr int SK = kc_for(INTER);                                     // streamed chunk width
    constexpr int PER = (BATCH * SK / 8 + NCT - 1) / NCT;                 // 16-byte pieces per thread
    const int tiles = num_tiles_of<OP>(in);
    const int g = cx.lane >> 2, t4 = cx.lane & 3;
    const int lrow = (cx.lane & 7) + ((cx.lane >> 3) & 1) * 8;  // ldmatrix: row this lane addresses
    const int lcol = (cx.lane >> 4) * 8;
    bf16* act = act_smem(cx);
    const bool owner = cx.tid < TILE * BATCH;
    const int row = cx.tid / BATCH, b = cx.tid % BATCH;
    uint4 pend[STREAM ? PER : 1];
    auto fetch = [&](int c) {
#pragma unroll
        for (int v = 0; v < PER; ++v) {
            const int idx = cx.tid + v * NCT;
            if (idx < BATCH * SK / 8)
                pend[v] = ld_cg(reinterpret_cast<const uint4*>(src + (idx / (SK / 8)) * INTER + c * SK + idx % (SK / 8) * 8));
        }
    };
    const int hold_from = [&] {  // chunks from here on are held until the signal (hold_stage)
        const int K = tiles ? tile_of<OP>(cx, in, 0).K : 0;
        return tiles * (K ? K / kc_for(K) : 0) - HOLD_STAGES;
    }();
    if (STREAM && tiles) fetch(0);
    int n = 0;  // chunks multiplied so far: picks the streamed buffer
    for (int k = 0; k < tiles; ++k) {
        const WTile t = tile_of<OP>(cx, in, k);
        const float early = owner ? pre(k, t, row, b) : 0.f;
        const int kc = kc_for(t.K), chunks = t.K / kc;
        float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};  // even / odd k-steps of the warp
        for (int c = 0; c < chunks; ++c, ++n) {
            const bf16* a_col = act + c * kc + 2 * t4;
            if (STREAM) {
                bf16* buf = act + (n & 1) * BATCH * STRIDE;
#pragma unroll
                for (int v = 0; v < PER; ++v) {
                    const int idx = cx.tid + v * NCT;
                    if (idx < BATCH * SK / 8) *reinterpret_cast<uint4*>(buf + (idx / (SK / 8)) * STRIDE + idx % (SK / 8) * 8) = pend[v];
                }
                consumer_bar();
                if (c + 1 < chunks) fetch(c + 1);
                else if (k + 1 < tiles) fetch(0);
                a_col = buf + 2 * t4;
            }
            wait_full(cx);
            const unsigned char* stage = ring_stage(cx, cx.stage);
            // The warp's k-steps of this chunk: all fragments loaded first, then the products into two
            // accumulators, so the tensor-core latency is not one chain of dependent mma.
            auto kstep = [&](int ks, uint32_t (&a)[4], uint32_t& b0, uint32_t& b1) {
                ldmatrix_x4(a, stage + lrow * ROW_STRIDE + (ks * 16 + lcol) * 2);
                b0 = b1 = 0;
                if (g < BATCH) {
                    const uint32_t* ap = reinterpret_cast<const uint32_t*>(a_col + g * STRIDE + ks * 16);
                    b0 = ap[0];
                    b1 = ap[4];
                }
            };
            if (kc == KC_MAX && KSW * NUM_CONSUMER_WARPS * 16 == KC_MAX) {
                uint32_t a[KSW][4], b0[KSW], b1[KSW];
#pragma unroll
                for (int j = 0; j < KSW; ++j) kstep(cx.warp + j * NUM_CONSUMER_WARPS, a[j], b0[j], b1[j]);
#pragma unroll
                for (int j = 0; j < KSW; ++j) mma_bf16(acc[j & 1], a[j], b0[j], b1[j]);
            } else {
                for (int ks = cx.warp; ks < kc / 16; ks += 2 * NUM_CONSUMER_WARPS) {
                    uint32_t a[4], b0, b1;
                    kstep(ks, a, b0, b1);
                    mma_bf16(acc[0], a, b0, b1);
                    if (ks + NUM_CONSUMER_WARPS < kc / 16) {
                        kstep(ks + NUM_CONSUMER_WARPS, a, b0, b1);
                        mma_bf16(acc[1], a, b0, b1);
                    }
                }
            }
            if (n >= hold_from) hold_stage(cx);
            else release_stage(cx);
        }
        float* red = red_smem(cx, cx.rbuf);
        red[(cx.warp * TILE + g) * 8 + 2 * t4] = acc[0][0] + acc[1][0];
        red[(cx.warp * TILE + g) * 8 + 2 * t4 + 1] = acc[0][1] + acc[1][1];
        red[(cx.warp * TILE + g + 8) * 8 + 2 * t4] = acc[0][2] + acc[1][2];
        red[(cx.warp * TILE + g + 8) * 8 + 2 * t4 + 1] = acc[0][3] + acc[1][3];
        consumer_bar();
        if (owner) {
            float y = 0.f;
            for (int w = 0; w < NUM_CONSUMER_WARPS; ++w) y += red[(w * TILE + row) * 8 + b];
            epi(k, t, row, b, y, early);
        }
        after(k);
        cx.rbuf ^= 1;
    }
}

struct NoPrefetch {
    __device__ float operator()(int, const WTile&, int, int) const { return 0.f; }
};
struct NothingAfter {
    __device__ void operator()(int) const {}
};

}  // namespace mk
