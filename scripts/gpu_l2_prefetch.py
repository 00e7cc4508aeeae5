"""Does an L2 prefetch make a later bulk copy of the same bytes faster? (GPU machine, one process.)

    python scripts/gpu_l2_prefetch.py --out DIR

The megakernel's DRAM idles while each layer's QKV -> attention -> O-projection chain runs (~12 us of
37 on an H200), because the ring of shared-memory stages is full. Earlier look-ahead attempts (runs 2-3,
9-11) made every step slower, as if prefetched lines were read from DRAM twice. This probe measures the
mechanism alone: every SM (one CTA each) prefetches `pre` bytes of its own slice into L2, idles 20 us,
then (or at once) bulk-copies `pre + extra` bytes of that slice into shared memory (32 KiB copies, 2 in flight, the
loader's shape) with the copy policy under test. Without a prefetch the copy runs at the DRAM rate;
with one that works, its first `pre` bytes come from L2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

SOURCE = r"""
#include <cuda/std/cstdint>
using cuda::std::uint32_t;
using cuda::std::uint64_t;

__device__ __forceinline__ uint32_t sa(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ uint64_t now() { uint64_t t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t; }

// mode: 0 none, 1 bulk prefetch, 2 bulk prefetch evict_last, 3 per-line prefetch.global.L2,
// 4 ld.global.cg of one word per 128 B line. copy_hint: 0 evict_first policy, 1 no cache hint.
extern "C" __global__ void probe(const char* src, unsigned long long slice, unsigned int pre, unsigned int extra,
                                 int mode, int copy_hint, unsigned long long wait_ns, unsigned long long* out) {
    extern __shared__ __align__(128) unsigned char smem[];
    __shared__ __align__(8) uint64_t bars[2];
    const char* base = src + blockIdx.x * slice;
    const int lane = threadIdx.x;
    uint64_t first, last;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(first));
    asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(last));
    if (lane == 0) {
        for (int s = 0; s < 2; ++s) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(sa(&bars[s])));
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncwarp();
    const uint64_t t0 = now();
    unsigned int dummy = 0;
    if (mode == 1 || mode == 2) {
        if (lane == 0)
            for (unsigned int o = 0; o < pre; o += 65536) {
                const unsigned int n = pre - o < 65536 ? pre - o : 65536;
                if (mode == 1)
                    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(base + o), "r"(n) : "memory");
                else
                    asm volatile("cp.async.bulk.prefetch.L2.global.L2::cache_hint [%0], %1, %2;" ::"l"(base + o), "r"(n),
                                 "l"(last) : "memory");
            }
    } else if (mode == 3) {
        for (unsigned int o = lane * 128; o < pre; o += 32 * 128)
            asm volatile("prefetch.global.L2 [%0];" ::"l"(base + o));
    } else if (mode == 4) {
        for (unsigned int o = lane * 128; o < pre; o += 32 * 128) {
            unsigned int v;
            asm volatile("ld.global.cg.u32 %0, [%1];" : "=r"(v) : "l"(base + o));
            dummy += v;
        }
    }
    const uint64_t t1 = now();
    while (now() - t1 < wait_ns) {}
    __syncwarp();
    const uint64_t t2 = now();
    const unsigned int total = pre + extra, chunk = 32768;
    const unsigned int n = total / chunk;
    if (lane == 0) {
        for (unsigned int i = 0; i < n; ++i) {
            const int s = i & 1;
            if (i >= 2) {
                const uint32_t parity = ((i / 2) - 1) & 1;
                uint32_t ok = 0;
                while (!ok)
                    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                                 : "=r"(ok) : "r"(sa(&bars[s])), "r"(parity) : "memory");
            }
            asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(sa(&bars[s])), "r"(chunk) : "memory");
            if (copy_hint == 0)
                asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;"
                             ::"r"(sa(smem + s * chunk)), "l"(base + (size_t)i * chunk), "r"(chunk), "r"(sa(&bars[s])), "l"(first) : "memory");
            else
                asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                             ::"r"(sa(smem + s * chunk)), "l"(base + (size_t)i * chunk), "r"(chunk), "r"(sa(&bars[s])) : "memory");
        }
        for (unsigned int i = n > 2 ? n - 2 : 0; i < n; ++i) {
            const int s = i & 1;
            const uint32_t parity = (i / 2) & 1;
            uint32_t ok = 0;
            while (!ok)
                asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                             : "=r"(ok) : "r"(sa(&bars[s])), "r"(parity) : "memory");
        }
        const uint64_t t3 = now();
        out[blockIdx.x * 4 + 0] = t0;
        out[blockIdx.x * 4 + 1] = t1;
        out[blockIdx.x * 4 + 2] = t2;
        out[blockIdx.x * 4 + 3] = t3 + (dummy == 0xdeadbeef);
    }
}
"""

MODES = {
    0: "none",
    1: "bulk prefetch",
    2: "bulk prefetch evict_last",
    3: "prefetch.global.L2 per line",
    4: "ld.cg per line",
}


def main() -> None:
    from cuda.core import Device, LaunchConfig, Program, ProgramOptions, launch

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dev = Device(0)
    dev.set_current()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from megatier.bench.common import git_commit
    from megatier.executors.megakernel.build import _include_dirs

    prog = Program(
        SOURCE, code_type="c++", options=ProgramOptions(arch="sm_90a", std="c++17", include_path=_include_dirs())
    )
    kernel = prog.compile("cubin").get_kernel("probe")
    from cuda.bindings import driver

    smem = 2 * 32768
    attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    (err,) = driver.cuKernelSetAttribute(attr, smem, kernel.handle, 0)
    if err != driver.CUresult.CUDA_SUCCESS:
        raise SystemExit(f"cannot reserve {smem} B of shared memory for the probe: {err}")
    props = torch.cuda.get_device_properties(0)
    sms = props.multi_processor_count
    slice_bytes = 1 << 20
    buf = torch.empty(6 << 30, dtype=torch.uint8, device="cuda")
    flush = torch.empty(512 << 20, dtype=torch.uint8, device="cuda")
    out = torch.zeros(sms * 4, dtype=torch.int64, device="cuda")
    stream = dev.create_stream()
    region = [0]

    def run(pre: int, extra: int, mode: int, hint: int, wait_ns: int = 20000) -> dict:
        flush.zero_()
        torch.cuda.synchronize()
        offset = region[0] % (buf.numel() - sms * slice_bytes)
        region[0] += sms * slice_bytes
        ptr = buf.data_ptr() + offset
        cfg = LaunchConfig(grid=sms, block=32, shmem_size=smem)
        launch(stream, cfg, kernel, np.uint64(ptr), np.uint64(slice_bytes), np.uint32(pre), np.uint32(extra),
               np.int32(mode), np.int32(hint), np.uint64(wait_ns), np.uint64(out.data_ptr()))  # fmt: skip
        stream.sync()
        t = out.view(sms, 4).cpu().numpy().astype(np.int64)
        copy = t[:, 3] - t[:, 2]
        return {
            "copy_us_median": float(np.median(copy)) / 1e3,
            "copy_us_max": float(copy.max()) / 1e3,
            "copy_span_us": float(t[:, 3].max() - t[:, 2].min()) / 1e3,
            "issue_us_median": float(np.median(t[:, 1] - t[:, 0])) / 1e3,
            "GBps": sms * (pre + extra) / (float(t[:, 3].max() - t[:, 2].min())),
        }

    res: dict = {"device": props.name, "sms": sms, "l2_bytes": props.L2_cache_size, "commit": git_commit(),
                 "date": time.strftime("%F %T"), "command": " ".join(sys.argv), "runs": []}  # fmt: skip
    for _ in range(3):
        run(65536, 65536, 0, 0)  # warm-up
    combos = [
        (pre, extra, mode, hint, 20000)
        for pre in (65536, 131072, 196608, 262144)
        for extra in (0, 262144)
        for mode in MODES
        for hint in (0, 1)
    ]
    combos += [(pre, 262144, mode, 0, 0) for pre in (65536, 131072) for mode in (0, 1, 2)]  # copy right after
    for pre, extra, mode, hint, wait_ns in combos:
        reps = [run(pre, extra, mode, hint, wait_ns) for _ in range(5)]
        row = {"pre_KiB": pre // 1024, "extra_KiB": extra // 1024, "mode": MODES[mode],
               "copy_hint": ["evict_first", "none"][hint], "wait_ns": wait_ns}  # fmt: skip
        for key in reps[0]:
            row[key] = statistics.median(r[key] for r in reps)
        res["runs"].append(row)
        print(json.dumps(row), flush=True)
    (args.out / "l2_prefetch.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
