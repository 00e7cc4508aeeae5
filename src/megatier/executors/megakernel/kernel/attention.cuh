// Split-KV decode attention for one (sequence, kv head, split), and the merge of all splits done by
// whichever split finishes last.
//
// The loader streams the split's K/V of earlier positions into ring stages like weights. Each query head
// of the kv head has its own warps (warp w serves head w % GROUP), so a warp's state is one head's
// online softmax and its merges are one head's. HEAD_DIM/8 lanes share one key (16 bytes of K and of V
// each) and score KEY_BLOCK keys before each softmax update; lane groups, then the head's warps, are
// merged in a fixed order, so results do not depend on timing. With several splits each writes
// (unnormalized output, max, sum) to global memory and the last one to arrive at the group's counter
// merges every split in split order into the bf16 attention output.
#pragma once
#include <cuda/std/limits>

#include "common.cuh"

namespace mk {

constexpr int LPK = HEAD_DIM / 8;  // lanes per key
constexpr int KPW = 32 / LPK;      // keys per warp per iteration
// Keys each lane group scores before one softmax update: independent dot products and shuffles, where
// one key per update was a dependent chain per key (~0.6 us per 32 keys on an H200, run 23's probe).
constexpr int KEY_BLOCK = 4;
static_assert(GROUP <= NUM_CONSUMER_WARPS, "every query head of a kv head needs a warp");
constexpr float LOG2E = 1.4426950408889634f;
constexpr float NEG_INF = -cuda::std::numeric_limits<float>::infinity();
static_assert(LPK >= 1 && LPK <= 32 && 32 % LPK == 0, "HEAD_DIM / 8 lanes must tile a warp");

// Merge (m2, l2, o2) into (m1, l1, o1); an empty side has m = -inf.
__device__ __forceinline__ void merge_into(float& m1, float& l1, float (&o1)[8], float m2, float l2,
                                           const float (&o2)[8]) {
    const float m = fmaxf(m1, m2);
    const float c1 = m1 == NEG_INF ? 0.f : exp2f(m1 - m);
    const float c2 = m2 == NEG_INF ? 0.f : exp2f(m2 - m);
    l1 = l1 * c1 + l2 * c2;
#pragma unroll
    for (int i = 0; i < 8; ++i) o1[i] = o1[i] * c1 + o2[i] * c2;
    m1 = m;
}

// Positions of one split: [lo, hi) attended, [lo, old_hi) streamed through the ring by the loader (KV
// written by earlier steps is immutable now); the current position, appended this step by a QKV
// instruction, is read from global memory after the counter wait.
struct Span {
    int b, kvh, lo, hi, old_hi, chunks;
};

constexpr int KV_ROW = HEAD_DIM * 2;                     // bytes of one position's K (or V)
constexpr int KVC = (STAGE_BYTES / (2 * KV_ROW)) / 8 * 8;  // positions per ring stage (K block, then V)
static_assert(KVC >= 8, "a ring stage holds K and V of at least 8 positions");

// `pos` is the sequence's current position (the loader reads it from global memory, consumers from the
// step table).
__device__ Span attn_span(const int* in, int pos) {
    Span sp;
    sp.b = field(in, F_A0);
    sp.kvh = field(in, F_A1);
    const int s = field(in, F_A2), nsplit = field(in, F_A3);
    const int ctx = pos + 1;
    const int per = ((ctx + nsplit - 1) / nsplit + PAGE_SIZE - 1) / PAGE_SIZE * PAGE_SIZE;  // = Dims.split_range
    sp.lo = min(ctx, s * per);
    sp.hi = min(ctx, (s + 1) * per);
    sp.old_hi = max(sp.lo, min(sp.hi, ctx - 1));
    sp.chunks = (sp.old_hi - sp.lo + KVC - 1) / KVC;
    return sp;
}

// Loader side: each chunk is copied page run by page run (K then V), lanes taking turns. `pos` is the
// sequence's position in this step.
__device__ bool load_kv(Ctx& cx, const int* in, int pos, uint64_t policy) {
    const Span sp = attn_span(in, pos);
    const size_t l = field(in, F_LAYER);
    const int* table = param<int>(cx, P_TABLE) + sp.b * MAX_PAGES;
    const bf16* kv = param<bf16>(cx, P_KV);
    for (int c = 0; c < sp.chunks; ++c) {
        const int c0 = sp.lo + c * KVC, c1 = min(sp.old_hi, c0 + KVC);
        if (!claim_stage(cx, in, 2 * (c1 - c0) * KV_ROW)) return false;
        unsigned char* stage = ring_stage(cx, cx.stage);
        int copy = 0;
        for (int p = c0; p < c1; copy += 2) {
            const int e = min(c1, (p / PAGE_SIZE + 1) * PAGE_SIZE);
            const size_t page = table[p / PAGE_SIZE];
            const bf16* k = kv + ((((page * LAYERS + l) * 2) * KV_HEADS + sp.kvh) * PAGE_SIZE + p % PAGE_SIZE) * HEAD_DIM;
            if (cx.lane == copy % 32)
                bulk_copy(stage + (p - c0) * KV_ROW, k, (e - p) * KV_ROW, full_bar(cx, cx.stage), policy);
            if (cx.lane == (copy + 1) % 32)
                bulk_copy(stage + (KVC + p - c0) * KV_ROW, k + KV_HEADS * PAGE_SIZE * HEAD_DIM, (e - p) * KV_ROW,
                          full_bar(cx, cx.stage), policy);
            p = e;
        }
        advance(cx);
    }
    return true;
}

// Element i (0..7, a compile-time constant after unrolling) of 8 packed bf16.
__device__ __forceinline__ float bf16_at(const uint4& raw, int i) {
    const uint32_t w = i < 2 ? raw.x : i < 4 ? raw.y : i < 6 ? raw.z : raw.w;
    return i % 2 ? bf16_hi(w) : bf16_lo(w);
}

__device__ bool op_attn(Ctx& cx, const int* in) {
    const int l = field(in, F_LAYER), s = field(in, F_A2), nsplit = field(in, F_A3);
    const Span sp = attn_span(in, pos_of(cx, field(in, F_A0)));
    const int b = sp.b, kvh = sp.kvh;
    const int sub = cx.lane / LPK, dl = cx.lane % LPK;
    // This warp's head, and its place among that head's warps (their key slots interleave).
    const int head = cx.warp % GROUP, slice = cx.warp / GROUP;
    const int slices = (NUM_CONSUMER_WARPS - 1 - head) / GROUP + 1;
    // The current position joins the last streamed chunk when its stage has room: warp 0 writes its K/V
    // there, so it is scored with the others instead of in one more pass (~0.7 us). Otherwise each head's
    // first warp scores it. Its K/V (written this step by another SM) are requested together with q right
    // after the wait, so their latency overlaps; the streamed chunks are processed after that.
    const int last_n = sp.chunks ? sp.old_hi - (sp.lo + (sp.chunks - 1) * KVC) : 0;
    const bool fold = sp.old_hi < sp.hi && sp.chunks > 0 && last_n < KVC;
    const bool current = sp.old_hi < sp.hi && (fold ? cx.warp == 0 : slice == 0);
    const bf16* kcur = param<bf16>(cx, P_KV) + current_kv_row(cx, l, 0, kvh, b) + dl * 8;
    const bf16* vcur = param<bf16>(cx, P_KV) + current_kv_row(cx, l, 1, kvh, b) + dl * 8;
    if (!wait_for(cx, in)) return false;

    float q[8], o[8], m = NEG_INF, lsum = 0.f;
    {
        const float* qsrc = param<float>(cx, P_Q) + b * Q_SIZE + (kvh * GROUP + head) * HEAD_DIM + dl * 8;
        const float scale = rsqrtf(static_cast<float>(HEAD_DIM)) * LOG2E;
        const float4 a = ld_cg(reinterpret_cast<const float4*>(qsrc));
        const float4 c = ld_cg(reinterpret_cast<const float4*>(qsrc + 4));
        q[0] = a.x * scale, q[1] = a.y * scale, q[2] = a.z * scale, q[3] = a.w * scale;
        q[4] = c.x * scale, q[5] = c.y * scale, q[6] = c.z * scale, q[7] = c.w * scale;
#pragma unroll
        for (int i = 0; i < 8; ++i) o[i] = 0.f;
    }
    auto consume = [&](const uint4 (&kr)[KEY_BLOCK], const uint4 (&vr)[KEY_BLOCK], const bool (&valid)[KEY_BLOCK]) {
        float sc[KEY_BLOCK];
#pragma unroll
        for (int r = 0; r < KEY_BLOCK; ++r) {
            sc[r] = 0.f;
#pragma unroll
            for (int i = 0; i < 8; ++i) sc[r] += q[i] * bf16_at(kr[r], i);
        }
#pragma unroll
        for (int off = LPK / 2; off > 0; off >>= 1)
#pragma unroll
            for (int r = 0; r < KEY_BLOCK; ++r) sc[r] += __shfl_xor_sync(0xffffffffu, sc[r], off);
        float mn = m;
#pragma unroll
        for (int r = 0; r < KEY_BLOCK; ++r) mn = valid[r] ? fmaxf(mn, sc[r]) : mn;
        if (mn == NEG_INF) return;  // nothing seen yet and no valid key in this block
        const float c = exp2f(m - mn);
        float p[KEY_BLOCK], psum = 0.f;
#pragma unroll
        for (int r = 0; r < KEY_BLOCK; ++r) {
            p[r] = valid[r] ? exp2f(sc[r] - mn) : 0.f;
            psum += p[r];
        }
        lsum = lsum * c + psum;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            float acc = o[i] * c;
#pragma unroll
            for (int r = 0; r < KEY_BLOCK; ++r) acc += p[r] * bf16_at(vr[r], i);
            o[i] = acc;
        }
        m = mn;
    };
    uint4 kcr = make_uint4(0, 0, 0, 0), vcr = kcr;
    if (current) {
        kcr = ld_cg(reinterpret_cast<const uint4*>(kcur));
        vcr = ld_cg(reinterpret_cast<const uint4*>(vcur));
    }
    const int stride = slices * KPW;  // keys between a lane group's block entries
    for (int c = 0; c < sp.chunks; ++c) {
        wait_full(cx);
        unsigned char* stage = ring_stage(cx, cx.stage);
        int n = min(sp.old_hi, sp.lo + (c + 1) * KVC) - (sp.lo + c * KVC);
        if (fold && c == sp.chunks - 1) {
            if (current && sub == 0) {
                *reinterpret_cast<uint4*>(stage + n * KV_ROW + dl * 16) = kcr;
                *reinterpret_cast<uint4*>(stage + (KVC + n) * KV_ROW + dl * 16) = vcr;
                fence_proxy_async_smem();  // the loader's next bulk copy into this stage comes after
            }
            consumer_bar();
            ++n;
        }
        for (int base = slice * KPW + sub; base - sub < n; base += stride * KEY_BLOCK) {
            uint4 kr[KEY_BLOCK], vr[KEY_BLOCK];
            bool valid[KEY_BLOCK];
#pragma unroll
            for (int r = 0; r < KEY_BLOCK; ++r) {
                const int key = base + r * stride;
                valid[r] = key < n;
                const int at = valid[r] ? key : 0;
                kr[r] = *reinterpret_cast<const uint4*>(stage + at * KV_ROW + dl * 16);
                vr[r] = *reinterpret_cast<const uint4*>(stage + (KVC + at) * KV_ROW + dl * 16);
            }
            consume(kr, vr, valid);
        }
        release_stage(cx);
    }
    if (current && !fold) {
        uint4 kr[KEY_BLOCK], vr[KEY_BLOCK];
        bool valid[KEY_BLOCK];
#pragma unroll
        for (int r = 0; r < KEY_BLOCK; ++r) kr[r] = kcr, vr[r] = vcr, valid[r] = r == 0 && sub == 0;
        consume(kr, vr, valid);
    }
    // Merge the key slots of the warp (lanes with the same dims), butterfly in a fixed order.
    for (int off = LPK; off < 32; off <<= 1) {
        float o2[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) o2[i] = __shfl_xor_sync(0xffffffffu, o[i], off);
        const float m2 = __shfl_xor_sync(0xffffffffu, m, off);
        const float l2 = __shfl_xor_sync(0xffffffffu, lsum, off);
        merge_into(m, lsum, o, m2, l2, o2);
    }
    // Then each head's warps, through shared memory: [warp][HEAD_DIM + 2].
    float* ws = attn_smem(cx);
    constexpr int WS = HEAD_DIM + 2;
    if (sub == 0) {
        float* dst = ws + cx.warp * WS;
#pragma unroll
        for (int i = 0; i < 8; ++i) dst[dl * 8 + i] = o[i];
        if (dl == 0) dst[HEAD_DIM] = m, dst[HEAD_DIM + 1] = lsum;
    }
    consumer_bar();
    const size_t part = ((size_t)(b * KV_HEADS + kvh) * nsplit + s) * GROUP;
    float* part_o = param<float>(cx, P_PART_O);
    float* part_ml = param<float>(cx, P_PART_ML);
    bf16* out = param<bf16>(cx, P_ATTN_OUT) + b * Q_SIZE + kvh * GROUP * HEAD_DIM;
    for (int idx = cx.tid; idx < GROUP * HEAD_DIM; idx += NCT) {
        const int g = idx / HEAD_DIM, d = idx % HEAD_DIM;
        float mm = NEG_INF;
        for (int w = g; w < NUM_CONSUMER_WARPS; w += GROUP) mm = fmaxf(mm, ws[w * WS + HEAD_DIM]);
        float acc = 0.f, tot = 0.f;
        for (int w = g; w < NUM_CONSUMER_WARPS; w += GROUP) {
            const float* src = ws + w * WS;
            const float c = src[HEAD_DIM] == NEG_INF ? 0.f : exp2f(src[HEAD_DIM] - mm);
            acc += src[d] * c;
            tot += src[HEAD_DIM + 1] * c;
        }
        if (nsplit == 1) {  // the only split is the last: no partials to merge
            out[idx] = __float2bfloat16(acc / tot);
        } else {
            part_o[(part + g) * HEAD_DIM + d] = acc;
            if (d == 0) part_ml[(part + g) * 2] = mm, part_ml[(part + g) * 2 + 1] = tot;
        }
    }
    if (nsplit == 1) {
        signal(cx, field(in, F_DONE_CTR), 1);
        return true;
    }
    consumer_bar();
    if (cx.tid == 0) {
        uint32_t* arrive = param<uint32_t>(cx, P_COUNTERS) + field(in, F_SIG_CTR);
        const uint32_t want = static_cast<uint32_t>(field(in, F_ARRIVE_TARGET)) * (cx.epoch + 1);
        flags_smem(cx)[1] = add_acq_rel(arrive, field(in, F_SIG_AMOUNT)) + field(in, F_SIG_AMOUNT) == want;
    }
    consumer_bar();
    if (!flags_smem(cx)[1]) return true;
    // Last split of the group: merge all splits in split order.
    const size_t first = (size_t)(b * KV_HEADS + kvh) * nsplit * GROUP;
    for (int idx = cx.tid; idx < GROUP * HEAD_DIM; idx += NCT) {
        const int g = idx / HEAD_DIM, d = idx % HEAD_DIM;
        float mm = NEG_INF;
        for (int sp2 = 0; sp2 < nsplit; ++sp2) mm = fmaxf(mm, ld_cg(part_ml + (first + sp2 * GROUP + g) * 2));
        float acc = 0.f, tot = 0.f;
        for (int sp2 = 0; sp2 < nsplit; ++sp2) {
            const size_t p = first + sp2 * GROUP + g;
            const float ms = ld_cg(part_ml + p * 2);
            const float c = ms == NEG_INF ? 0.f : exp2f(ms - mm);
            acc += ld_cg(part_o + p * HEAD_DIM + d) * c;
            tot += ld_cg(part_ml + p * 2 + 1) * c;
        }
        out[idx] = __float2bfloat16(acc / tot);
    }
    signal(cx, field(in, F_DONE_CTR), 1);
    return true;
}

}  // namespace mk
