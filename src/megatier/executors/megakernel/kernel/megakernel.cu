// The megakernel: one persistent CTA per SM runs that SM's instruction queue for `steps` decode steps.
//
// Warp roles: NUM_CONSUMER_WARPS consumer warps execute instructions (wait for counters, stage
// activations, multiply, epilogue, signal); one loader warp streams every weight chunk of the queue
// into the shared-memory ring ahead of them, across step boundaries too. The last CTA to finish a step
// feeds the greedy token back, moves every sequence one position on and publishes the next epoch; the
// CTAs wait for that epoch before the next step, so many steps run in one launch with no host
// involvement and the next step's first weights stream in during the LM head's tail.
#include "attention.cuh"
#include "ops.cuh"

namespace mk {

// Last CTA out of a step: argmax -> next token, position + 1, then epoch + 1 published with a release
// store (counters never reset between steps; wait_step and the loader's KV gate acquire it).
__device__ void finalize_step(const Ctx& cx) {
    int* state = param<int>(cx, P_STATE);
    const int step = __ldcg(state + 1);
    unsigned long long* argmax = param<unsigned long long>(cx, P_ARGMAX);
    for (int b = 0; b < BATCH; ++b) {
        const unsigned long long key = __ldcg(reinterpret_cast<const unsigned long long*>(argmax + b));
        const int token = static_cast<int>(0xffffffffu - static_cast<uint32_t>(key));
        const int row = step % static_cast<int>(params_smem(cx)[P_OUT_CAP]);  // a ring in host memory
        param<long long>(cx, P_OUT_TOKENS)[(size_t)row * BATCH + b] = token;
        param<int>(cx, P_TOKENS)[b] = token;
        param<int>(cx, P_POS)[b] = __ldcg(param<int>(cx, P_POS) + b) + 1;
        argmax[b] = 0;
    }
    state[1] = step + 1;
    store_release(reinterpret_cast<uint32_t*>(state), cx.epoch + 1);
}

// Loader warp, before the first KV of step s > 0: that step attends to the position the previous step
// appended (written by other SMs' generic stores), so wait for the previous step's epoch, then fence
// the generic proxy against the bulk copies' async proxy.
__device__ bool gate_kv(const Ctx& cx, uint32_t epoch) {
    int ok = 1;
    if (cx.lane == 0) {
        const uint32_t* state = param<uint32_t>(cx, P_STATE);
        for (uint32_t iter = 1; static_cast<int32_t>(load_acquire(state) - epoch) < 0; ++iter) {
            if ((iter & 255) == 0 && (flags_smem(cx)[0] != 0 || aborted(cx))) {
                ok = 0;
                break;
            }
        }
    }
    __syncwarp();
    fence_proxy_async();
    return __shfl_sync(0xffffffffu, ok, 0) != 0;
}

// Loader warp: every weight chunk and every KV chunk of the queue, step after step, as far ahead as the
// ring allows. (L2 prefetching further ahead, as bulk or per-line requests, measured slower on an H200.)
// The loader reads its instruction's fields from shared memory, the words of the next one requested while
// it streams this one: the consumers' acquire polls invalidate L1, so a field read from the queue was an L2
// round trip per tile, and a signal's fence waits for every load the SM has outstanding (H200, run 46: 7 us
// a step faster; H100, run 50: 20 us slower at batch 8, not yet explained).
__device__ void run_loader(Ctx& cx, const int* queue, int n, unsigned long long* timeline, int steps) {
    const uint64_t policy = evict_first_policy();
    int* in = loader_insn_smem(cx);
    int word = cx.lane < WORDS && n > 0 ? __ldg(queue + cx.lane) : 0;
    for (int s = 0; s < steps; ++s) {
        bool gated = s == 0;
        for (int i = 0; i < n; ++i) {
            __syncwarp();
            if (cx.lane < WORDS) in[cx.lane] = word;
            __syncwarp();
            word = cx.lane < WORDS ? __ldg(queue + (i + 1 < n ? i + 1 : 0) * WORDS + cx.lane) : 0;
            if (TIMELINE && cx.lane == 0) timeline[i * STAMPS + 3] = global_timer();
            bool ok;
            if (field(in, F_OP) == OP_ATTN) {
                if (!gated && !gate_kv(cx, cx.epoch + s)) return;
                gated = true;
                ok = load_kv(cx, in, launch_pos(cx, field(in, F_A0)) + s, policy);
            } else {
                ok = load_weights(cx, in, policy);
            }
            if (!ok) return;
        }
    }
}

// Consumers, step s > 0 of the launch: wait until the previous step's last CTA published this epoch.
__device__ bool wait_step(Ctx& cx) {
    if (cx.tid == 0) flags_smem(cx)[0] = spin_until(cx, param<uint32_t>(cx, P_STATE), cx.epoch, -1) ? 0 : 1;
    consumer_bar();
    return flags_smem(cx)[0] == 0;
}

// Consumers, every step: the step table first, then the queue. Each opcode waits for its own counter,
// after issuing whatever loads do not depend on it. Instruction i is read from shared-memory slot i % 2;
// the words of instruction i + 1 are requested before i's wait and stored by wait_for after it.
// With TIMELINE, row `maxlen` of the CTA's stamps holds its step boundary: step start (after the epoch
// wait), exit add issued and returned, and, in the CTA that finalized, finalize start and end.
__device__ void run_consumers(Ctx& cx, const int* queue, int n, unsigned long long* timeline, int steps, int maxlen) {
    int* insn = insn_smem(cx);
    unsigned long long* bound = TIMELINE ? timeline + (size_t)maxlen * STAMPS : nullptr;
    for (int s = 0; s < steps; ++s, ++cx.epoch) {
        if (s > 0 && !wait_step(cx)) return;
        if (TIMELINE && cx.tid == 0) bound[0] = global_timer();
        if (cx.tid < WORDS && n > 0) insn[cx.tid] = __ldg(queue + cx.tid);
        if (cx.tid < BATCH) {
            const int p = __ldcg(param<int>(cx, P_POS) + cx.tid);
            int* st = step_smem(cx);
            st[cx.tid] = __ldcg(param<int>(cx, P_TOKENS) + cx.tid);
            st[BATCH + cx.tid] = p;
            st[2 * BATCH + cx.tid] = param<int>(cx, P_TABLE)[cx.tid * MAX_PAGES + p / PAGE_SIZE];
        }
        consumer_bar();
        for (int i = 0; i < n; ++i) {
            const int* in = insn + (i & 1) * WORDS;
            cx.next_slot = insn + ((i + 1) & 1) * WORDS;
            cx.next_word = cx.tid < WORDS && i + 1 < n ? __ldg(queue + (i + 1) * WORDS + cx.tid) : 0;
            cx.op = field(in, F_OP);
            cx.index = field(in, F_INDEX);
            if (cx.op == OP_NOOP) {
                if (cx.tid < WORDS) cx.next_slot[cx.tid] = cx.next_word;
                consumer_bar();
                continue;
            }
            cx.stamp = TIMELINE ? timeline + i * STAMPS : nullptr;
            if (TIMELINE && cx.tid == 0) cx.stamp[0] = global_timer();
            bool ok = true;
            switch (cx.op) {
                case OP_QKV: ok = op_qkv(cx, in); break;
                case OP_ATTN: ok = op_attn(cx, in); break;
                case OP_OPROJ: ok = op_oproj(cx, in); break;
                case OP_GATEUP: ok = op_gateup(cx, in); break;
                case OP_DOWN: ok = op_down(cx, in); break;
                case OP_LMHEAD: ok = op_lmhead(cx, in); break;
                default: break;
            }
            if (!ok) return;
            if (TIMELINE && cx.tid == 0) cx.stamp[2] = global_timer();
        }
        if (cx.tid == 0) {
            if (TIMELINE) bound[1] = global_timer();
            const uint32_t done = add_acq_rel(param<uint32_t>(cx, P_COUNTERS) + EXIT_CTR, 1) + 1;
            if (TIMELINE) bound[2] = global_timer();
            if (done == gridDim.x * (cx.epoch + 1) && !aborted(cx)) {
                if (TIMELINE) bound[3] = global_timer();
                finalize_step(cx);
                if (TIMELINE) bound[4] = global_timer();
            }
        }
    }
}

}  // namespace mk

extern "C" __global__ void __launch_bounds__((NUM_CONSUMER_WARPS + 1) * 32, 1)
    megakernel(const mk::uint64_t* __restrict__ prm, int steps) {
    using namespace mk;
    extern __shared__ __align__(1024) unsigned char smem[];
    Ctx cx;
    cx.smem = smem;
    cx.warp = threadIdx.x / 32;
    cx.lane = threadIdx.x % 32;
    cx.tid = threadIdx.x;
    cx.stage = 0;
    cx.phase = 0;
    cx.rbuf = 0;
    cx.held = 0;
    cx.index = -1;
    cx.op = 0;
    cx.stamp = nullptr;
    cx.next_word = 0;
    cx.next_slot = nullptr;
    if (threadIdx.x < NUM_PARAMS) reinterpret_cast<uint64_t*>(smem + SM_PARAMS)[threadIdx.x] = prm[threadIdx.x];
    if (threadIdx.x < BATCH)
        step_smem(cx)[3 * BATCH + threadIdx.x] = reinterpret_cast<const int*>(prm[P_POS])[threadIdx.x];
    if (threadIdx.x == 0) {
        for (int s = 0; s < NSTAGES; ++s) {
            mbar_init(full_bar(cx, s), 1);
            mbar_init(empty_bar(cx, s), NUM_CONSUMER_WARPS);
        }
        flags_smem(cx)[0] = 0;
        flags_smem(cx)[1] = 0;
        mbar_fence_init();
    }
    __syncthreads();
    cx.epoch = static_cast<uint32_t>(param<int>(cx, P_STATE)[0]);
    const int maxlen = static_cast<int>(params_smem(cx)[P_MAXLEN]);
    const int* queue = param<int>(cx, P_PROGRAM) + (size_t)blockIdx.x * maxlen * WORDS;
    const int n = param<int>(cx, P_QLEN)[blockIdx.x];
    unsigned long long* timeline = TIMELINE ? param<unsigned long long>(cx, P_TIMELINE) + (size_t)blockIdx.x * (maxlen + 1) * STAMPS
                                            : nullptr;
    if (cx.warp == NUM_CONSUMER_WARPS) {
        run_loader(cx, queue, n, timeline, steps);
    } else {
        run_consumers(cx, queue, n, timeline, steps, maxlen);
    }
}
