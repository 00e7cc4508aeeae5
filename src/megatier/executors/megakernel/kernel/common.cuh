// Per-CTA context, shared-memory layout, cross-SM synchronization and activation staging.
//
// Every size comes from #defines that build.py emits for one (model, batch size): HIDDEN, HEADS, ...,
// the shared-memory offsets SM_*, the parameter slots P_* and the instruction fields F_* / OP_*.
#pragma once
#include "ptx.cuh"

namespace mk {

using bf16 = __nv_bfloat16;

constexpr int NCT = NUM_CONSUMER_WARPS * 32;  // consumer threads
constexpr int GROUP = HEADS / KV_HEADS;
constexpr int Q_SIZE = HEADS * HEAD_DIM;
constexpr int QKV_ROWS = (HEADS + 2 * KV_HEADS) * HEAD_DIM;
constexpr int ROW_STRIDE = 2 * KC_MAX + 16;  // bytes per weight row in a ring stage: 16 B of padding
constexpr int STAGE_BYTES = TILE * ROW_STRIDE;
constexpr uint64_t TIMEOUT_NS = 500ull * 1000 * 1000;
constexpr int LOADS_IN_FLIGHT = IN_FLIGHT > 0 ? IN_FLIGHT : NSTAGES;

static_assert(TILE == 16, "a weight tile is one 16-row tensor-core fragment");
static_assert(BATCH >= 1 && BATCH <= 8, "batch columns live in one n=8 mma fragment");
static_assert(HEAD_DIM % 16 == 0 && HIDDEN % 16 == 0 && INTER % 16 == 0, "k-steps of 16");
static_assert(SM_RING % 128 == 0 && STAGE_BYTES % 128 == 0, "bulk-copy destinations stay aligned");
static_assert(SM_ACT % 16 == 0 && (ACT_STRIDE * 2) % 16 == 0, "16-byte activation stores");
static_assert(SMEM_BYTES <= 232448, "Hopper gives a CTA at most 227 KiB of shared memory");
static_assert(NUM_PARAMS <= (NUM_CONSUMER_WARPS + 1) * 32, "one thread copies each parameter slot");
static_assert(HOLD_STAGES >= 0 && HOLD_STAGES < NSTAGES, "an instruction's remaining chunks need a free stage");

// A weight matrix is cut into k-chunks of kc columns; kc divides K and fits a ring stage.
__host__ __device__ constexpr int kc_for(int K) {
    int kc = K < KC_MAX ? K : KC_MAX;
    kc -= kc % 16;
    while (K % kc != 0) kc -= 16;
    return kc;
}

struct Ctx {
    unsigned char* smem;
    uint32_t epoch;
    int tid, warp, lane;  // consumer thread id (0..NCT-1) and its warp/lane
    int stage;            // ring position, identical in every consumer thread and in the loader
    uint32_t phase;
    int rbuf;             // which half of the double-buffered reduction scratch is next
    int held;             // ring stages consumed but handed back only after the signal (hold_stage)
    int index;            // global index of the current instruction (diagnostics)
    int op;
    unsigned long long* stamp;  // this instruction's timeline stamps, or nullptr
    int next_word;              // consumer threads < WORDS: their word of the next instruction,
    int* next_slot;             // stored here by wait_for (see run_consumers)
};

// The parameter block (pointers and sizes) is copied to shared memory at kernel start, and consumers
// read their instructions from shared memory too: every poll's acquire load invalidates L1 (CCTL.IVALL
// in the SASS), so a pointer or field read through L1 after a counter wait would add a serial L2 round
// trip (~0.5-1.5 us under load) to the critical path.
__device__ __forceinline__ const uint64_t* params_smem(const Ctx& cx) {
    return reinterpret_cast<const uint64_t*>(cx.smem + SM_PARAMS);
}

template <class T>
__device__ __forceinline__ T* param(const Ctx& cx, int slot) {
    return reinterpret_cast<T*>(params_smem(cx)[slot]);
}

// A field of an instruction, in shared memory (consumers) or global memory (the loader's queue walk).
__device__ __forceinline__ int field(const int* in, int f) { return in[f]; }

// ---- shared memory ----------------------------------------------------------------------------------
__device__ __forceinline__ unsigned char* ring_stage(const Ctx& cx, int s) { return cx.smem + SM_RING + s * STAGE_BYTES; }
__device__ __forceinline__ bf16* act_smem(const Ctx& cx) { return reinterpret_cast<bf16*>(cx.smem + SM_ACT); }
__device__ __forceinline__ float* attn_smem(const Ctx& cx) { return reinterpret_cast<float*>(cx.smem + SM_ACT); }
__device__ __forceinline__ float* red_smem(const Ctx& cx, int buf) {
    return reinterpret_cast<float*>(cx.smem + SM_RED) + buf * (NUM_CONSUMER_WARPS * TILE * 8);
}
__device__ __forceinline__ float* head_smem(const Ctx& cx) { return reinterpret_cast<float*>(cx.smem + SM_HEAD); }
__device__ __forceinline__ float* stat_smem(const Ctx& cx) { return reinterpret_cast<float*>(cx.smem + SM_STAT); }
__device__ __forceinline__ unsigned long long* key_smem(const Ctx& cx) {
    return reinterpret_cast<unsigned long long*>(cx.smem + SM_KEYS);
}
__device__ __forceinline__ uint64_t* full_bar(const Ctx& cx, int s) {
    return reinterpret_cast<uint64_t*>(cx.smem + SM_BARS) + s;
}
__device__ __forceinline__ uint64_t* empty_bar(const Ctx& cx, int s) {
    return reinterpret_cast<uint64_t*>(cx.smem + SM_BARS) + NSTAGES + s;
}
__device__ __forceinline__ volatile int* flags_smem(const Ctx& cx) {
    return reinterpret_cast<volatile int*>(cx.smem + SM_FLAGS);
}

// The launch's step table: token, position and the page holding that position, per sequence. Loaded
// once at kernel start, so no epilogue walks pos -> page table -> cache with dependent global loads.
__device__ __forceinline__ int* step_smem(const Ctx& cx) { return reinterpret_cast<int*>(cx.smem + SM_STEP); }
__device__ __forceinline__ int* insn_smem(const Ctx& cx) { return reinterpret_cast<int*>(cx.smem + SM_INSN); }  // [2][WORDS]
// The loader's copy of its current instruction (see run_loader).
__device__ __forceinline__ int* loader_insn_smem(const Ctx& cx) { return reinterpret_cast<int*>(cx.smem + SM_LOADER_INSN); }
__device__ __forceinline__ int token_of(const Ctx& cx, int b) { return step_smem(cx)[b]; }
__device__ __forceinline__ int pos_of(const Ctx& cx, int b) { return step_smem(cx)[BATCH + b]; }
__device__ __forceinline__ int page_of(const Ctx& cx, int b) { return step_smem(cx)[2 * BATCH + b]; }
// The loader's copy of each position at launch start (step s of the launch attends up to pos0 + s).
__device__ __forceinline__ int launch_pos(const Ctx& cx, int b) { return step_smem(cx)[3 * BATCH + b]; }

// Element (kind 0 K / 1 V, kv head, dim 0) of layer l at sequence b's current position in the cache.
__device__ __forceinline__ size_t current_kv_row(const Ctx& cx, int l, int kind, int kvh, int b) {
    const size_t page = page_of(cx, b);
    return ((((page * LAYERS + l) * 2 + kind) * KV_HEADS + kvh) * PAGE_SIZE + pos_of(cx, b) % PAGE_SIZE) * HEAD_DIM;
}

__device__ __forceinline__ void advance(Ctx& cx) {
    if (++cx.stage == NSTAGES) {
        cx.stage = 0;
        cx.phase ^= 1;
    }
}

// Named barrier 1: the consumer warps only (the loader warp never joins it).
__device__ __forceinline__ void consumer_bar() { asm volatile("bar.sync 1, %0;" ::"n"(NCT) : "memory"); }

// ---- diagnostics -----------------------------------------------------------------------------------
enum { DIAG_COUNTER = 1, DIAG_FULL = 2, DIAG_EMPTY = 3 };

// The first failure claims the abort flag and writes its story to host-mapped memory.
__device__ void report(const Ctx& cx, int kind, int ctr, uint32_t value, uint32_t target) {
    int* state = param<int>(cx, P_STATE);
    if (atomicCAS(state + 2, 0, kind) == 0) {
        volatile int* diag = param<int>(cx, P_DIAG);
        diag[1] = blockIdx.x;
        diag[2] = cx.index;
        diag[3] = cx.op;
        diag[4] = ctr;
        diag[5] = static_cast<int>(value);
        diag[6] = static_cast<int>(target);
        diag[7] = static_cast<int>(cx.epoch);
        __threadfence_system();
        diag[0] = kind;
        __threadfence_system();
    }
}

__device__ __forceinline__ bool aborted(const Ctx& cx) {
    return *reinterpret_cast<volatile int*>(param<int>(cx, P_STATE) + 2) != 0;
}

// ---- cross-SM counters ---------------------------------------------------------------------------
// One thread spins with acquire loads until *c reaches `want` (wrapping compare). False if the step was
// aborted meanwhile (timeout here or anywhere); a timeout reports `ctr` (-1: the step epoch).
__device__ bool spin_until(const Ctx& cx, const uint32_t* c, uint32_t want, int ctr) {
    const uint64_t t0 = global_timer();
    uint32_t v;
    for (uint32_t iter = 1; static_cast<int32_t>((v = load_acquire(c)) - want) < 0; ++iter) {
        if ((iter & 255) == 0) {
            if (aborted(cx)) return false;
            if (global_timer() - t0 > TIMEOUT_NS) {
                report(cx, DIAG_COUNTER, ctr, v, want);
                return false;
            }
        }
    }
    return true;
}

// Wait until counter `ctr` reaches target * (epoch + 1). Thread 0 spins, then the consumer barrier
// releases the others, whose later reads go through L2 (ld.cg). Returns false if the step was aborted:
// the caller then leaves the instruction loop.
__device__ bool wait_counter(Ctx& cx, int ctr, uint32_t target) {
    if (cx.tid == 0) {
        const bool ok = spin_until(cx, param<uint32_t>(cx, P_COUNTERS) + ctr, target * (cx.epoch + 1), ctr);
        flags_smem(cx)[0] = ok ? 0 : 1;
    }
    consumer_bar();
    return flags_smem(cx)[0] == 0;
}

// An instruction's dependency: its counter wait (if any), always ending in a consumer barrier so that
// whatever the instruction prepared before it is visible to every consumer thread. Then the next
// instruction's words go to its shared-memory slot: every thread is past the previous instruction, and
// every opcode passes another consumer barrier before it ends.
__device__ bool wait_for(Ctx& cx, const int* in) {
    const int ctr = field(in, F_WAIT_CTR);
    if (ctr >= 0) {
        if (!wait_counter(cx, ctr, field(in, F_WAIT_TARGET))) return false;
    } else {
        consumer_bar();
    }
    if (TIMELINE && cx.tid == 0) cx.stamp[1] = global_timer();
    if (cx.tid < WORDS) cx.next_slot[cx.tid] = cx.next_word;
    return true;
}

// Consumers: done reading the current stage, but keep it from the loader until the instruction's signal.
// The release add's GPU-scope fence waits behind whatever the memory system is busy with; refills issued
// just before it (the stages of the instruction's last chunks) made it take 1-2 us instead of ~0.4.
__device__ __forceinline__ void hold_stage(Ctx& cx) {
    __syncwarp();
    ++cx.held;
    advance(cx);
}

__device__ void release_held(Ctx& cx) {
    __syncwarp();
    if (cx.lane == 0)
        for (int j = cx.held; j > 0; --j) mbar_arrive(empty_bar(cx, (cx.stage - j + NSTAGES) % NSTAGES));
    cx.held = 0;
}

// After every consumer thread has stored its outputs: make them visible at GPU scope, then add to the
// counter (a release add after the barrier; no sequentially consistent fence needed). Then the stages
// held back for it go to the loader.
__device__ void signal(Ctx& cx, int ctr, uint32_t amount) {
    if (TIMELINE && cx.tid == 0) cx.stamp[4] = global_timer();
    consumer_bar();
    if (cx.tid == 0 && ctr >= 0) {
        if (TIMELINE) cx.stamp[5] = global_timer();
        add_release(param<uint32_t>(cx, P_COUNTERS) + ctr, amount);
    }
    release_held(cx);
}

// Loader lane 0: wait until the chunk issued `k` stages before the current one has landed. Capping the
// copies in flight keeps the memory system's queues short: with every stage of every SM in flight
// (6 x 32 KiB x 132 SMs) the latency of the consumers' small critical loads (activations, counters)
// grows to microseconds, while a couple of chunks per SM already cover the DRAM latency.
__device__ bool wait_landed(const Ctx& cx, const int* in, int k) {
    const bool wrapped = cx.stage < k;
    uint64_t* bar = full_bar(cx, wrapped ? cx.stage - k + NSTAGES : cx.stage - k);
    const uint32_t parity = wrapped ? cx.phase ^ 1 : cx.phase;
    const uint64_t t0 = global_timer();
    while (!mbar_try_wait(bar, parity)) {
        if (flags_smem(cx)[0] != 0) return false;
        if (global_timer() - t0 > 4 * TIMEOUT_NS) {
            report(cx, DIAG_FULL, cx.stage, cx.phase, field(in, F_INDEX));
            __trap();
        }
    }
    return true;
}

// Loader warp: claim the next ring stage for a chunk of `bytes` (lane 0 waits for the consumers to free
// it, then arms its full barrier). False when the consumers gave up on a counter: leave quietly.
__device__ bool claim_stage(Ctx& cx, const int* in, uint32_t bytes) {
    int ok = 1;
    if (cx.lane == 0) {
        uint64_t* bar = empty_bar(cx, cx.stage);
        const uint64_t t0 = global_timer();
        while (!mbar_try_wait(bar, cx.phase ^ 1)) {
            if (flags_smem(cx)[0] != 0) {
                ok = 0;
                break;
            }
            if (global_timer() - t0 > 4 * TIMEOUT_NS) {
                cx.index = field(in, F_INDEX);
                report(cx, DIAG_EMPTY, cx.stage, cx.phase, 0);
                __trap();
            }
        }
        if (ok && LOADS_IN_FLIGHT < NSTAGES) ok = wait_landed(cx, in, LOADS_IN_FLIGHT);
        if (ok) mbar_arrive_expect_tx(full_bar(cx, cx.stage), bytes);
    }
    return __shfl_sync(0xffffffffu, ok, 0) != 0;
}

// Consumers: done reading the current stage; hand it back to the loader.
__device__ __forceinline__ void release_stage(Ctx& cx) {
    __syncwarp();
    if (cx.lane == 0) mbar_arrive(empty_bar(cx, cx.stage));
    advance(cx);
}

__device__ void wait_full(const Ctx& cx) {
    uint64_t* bar = full_bar(cx, cx.stage);
    if (mbar_try_wait(bar, cx.phase)) return;
    const uint64_t t0 = global_timer();
    while (!mbar_try_wait(bar, cx.phase)) {
        if (global_timer() - t0 > TIMEOUT_NS) {
            report(cx, DIAG_FULL, cx.stage, cx.phase, 0);
            __trap();
        }
    }
}

// ---- activation staging --------------------------------------------------------------------------
// RMSNorm of the fp32 residual (or, in layer 0, of the token's embedding row), times the norm weight,
// rounded to bf16 into act_smem [BATCH][ACT_STRIDE]. Sums run in a fixed order: deterministic.
constexpr int NORM_NV = (HIDDEN / 4 + NCT - 1) / NCT;  // float4s per thread and sequence

// The norm weight this thread multiplies by, loaded before the instruction's counter wait.
struct NormWeights {
    uint2 w[NORM_NV];
};

__device__ __forceinline__ NormWeights load_norm_weights(const Ctx& cx, const bf16* norm_w) {
    NormWeights nw;
#pragma unroll
    for (int v = 0; v < NORM_NV; ++v) {
        const int e = (cx.tid + v * NCT) * 4;
        nw.w[v] = e < HIDDEN ? __ldg(reinterpret_cast<const uint2*>(norm_w + e)) : make_uint2(0, 0);
    }
    return nw;
}

// Sequences whose inputs one pass of stage_norm holds in registers (at most 16 float4s a thread): their
// loads are all issued before any is used, so a pass costs one L2 round trip whatever the batch.
constexpr int NORM_GROUP = BATCH * NORM_NV <= 16 ? BATCH : (16 / NORM_NV > 0 ? 16 / NORM_NV : 1);

template <bool EMBED>
__device__ __forceinline__ float4 load_input4(const Ctx& cx, int b, int e) {
    if (EMBED) {
        const uint2 raw = __ldg(reinterpret_cast<const uint2*>(param<bf16>(cx, P_EMBED) + (size_t)token_of(cx, b) * HIDDEN + e));
        return make_float4(bf16_lo(raw.x), bf16_hi(raw.x), bf16_lo(raw.y), bf16_hi(raw.y));
    }
    return ld_cg(reinterpret_cast<const float4*>(param<float>(cx, P_RESID) + b * HIDDEN + e));
}

template <bool EMBED>
__device__ __forceinline__ void load_inputs(const Ctx& cx, int b0, float4 (&x)[NORM_GROUP][NORM_NV]) {
#pragma unroll
    for (int g = 0; g < NORM_GROUP; ++g)
#pragma unroll
        for (int v = 0; v < NORM_NV; ++v) {
            const int e = (cx.tid + v * NCT) * 4;
            x[g][v] = b0 + g < BATCH && e < HIDDEN ? load_input4<EMBED>(cx, b0 + g, e) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
}

__device__ void stage_norm(const Ctx& cx, bool from_embed, const NormWeights& nw) {
    float* stat = stat_smem(cx);
    bf16* act = act_smem(cx);
    for (int b0 = 0; b0 < BATCH; b0 += NORM_GROUP) {
        float4 x[NORM_GROUP][NORM_NV];
        if (from_embed) load_inputs<true>(cx, b0, x);
        else load_inputs<false>(cx, b0, x);
#pragma unroll
        for (int g = 0; g < NORM_GROUP; ++g) {
            float ss = 0.f;
#pragma unroll
            for (int v = 0; v < NORM_NV; ++v) ss += x[g][v].x * x[g][v].x + x[g][v].y * x[g][v].y + x[g][v].z * x[g][v].z + x[g][v].w * x[g][v].w;
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
            if (cx.lane == 0 && b0 + g < BATCH) stat[cx.warp * BATCH + b0 + g] = ss;
        }
        consumer_bar();
#pragma unroll
        for (int g = 0; g < NORM_GROUP; ++g) {
            const int b = b0 + g;
            if (b >= BATCH) break;
            float total = 0.f;
            for (int w = 0; w < NUM_CONSUMER_WARPS; ++w) total += stat[w * BATCH + b];
            const float r = rsqrtf(total / HIDDEN + EPS);
#pragma unroll
            for (int v = 0; v < NORM_NV; ++v) {
                const int e = (cx.tid + v * NCT) * 4;
                if (e >= HIDDEN) continue;
                const float4 xi = x[g][v];
                const uint2 wr = nw.w[v];
                bf16* dst = act + b * ACT_STRIDE + e;
                dst[0] = __float2bfloat16(xi.x * r * bf16_lo(wr.x));
                dst[1] = __float2bfloat16(xi.y * r * bf16_hi(wr.x));
                dst[2] = __float2bfloat16(xi.z * r * bf16_lo(wr.y));
                dst[3] = __float2bfloat16(xi.w * r * bf16_hi(wr.y));
            }
        }
    }
    consumer_bar();
}

// A bf16 activation [BATCH][K] written by other SMs this step, copied as is: up to 4 loads a thread in
// flight before any is stored, so a batch of 8 costs two L2 round trips, not one per sequence.
template <int K>
__device__ void stage_copy(const Ctx& cx, const bf16* src) {
    constexpr int PIECES = BATCH * K / 8, PER = (PIECES + NCT - 1) / NCT, ROUND = PER < 4 ? PER : 4;
    bf16* act = act_smem(cx);
    for (int j0 = 0; j0 < PER; j0 += ROUND) {
        uint4 v[ROUND];
#pragma unroll
        for (int j = 0; j < ROUND; ++j) {
            const int idx = cx.tid + (j0 + j) * NCT;
            if (idx < PIECES) v[j] = ld_cg(reinterpret_cast<const uint4*>(src) + idx);
        }
#pragma unroll
        for (int j = 0; j < ROUND; ++j) {
            const int idx = cx.tid + (j0 + j) * NCT;
            if (idx < PIECES) *reinterpret_cast<uint4*>(act + idx / (K / 8) * ACT_STRIDE + idx % (K / 8) * 8) = v[j];
        }
    }
    consumer_bar();
}

}  // namespace mk
