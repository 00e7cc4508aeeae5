"""The C CPU decode-attention kernel against a float64 reference: every SIMD variant this CPU runs, bf16
and fp32 KV, any head_dim and GQA group, partial and empty page lists, work split over threads; the
AttendJob entry point a CUDA host function calls; and what it refuses."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from megatier import MegatierError
from megatier.kv import cpu_attention as ca

pytestmark = pytest.mark.skipif(ca.load_library() is None, reason="no C compiler")
PAGE = 16


def reference(q, pool, offsets, pages, rows, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain float64 attention of each sequence over the concatenated valid rows of its pages."""
    num_seqs, heads, d = q.shape
    kv_heads = pool.shape[2]
    out = torch.zeros(num_seqs, heads, d, dtype=torch.float64)
    lse = torch.full((num_seqs, heads), float("-inf"), dtype=torch.float64)
    for b in range(num_seqs):
        listed = range(int(offsets[b]), int(offsets[b + 1]))
        if not listed:
            continue
        k = torch.cat([pool[pages[i], 0, :, : rows[i]] for i in listed], dim=1).double()  # [Hkv, T, D]
        v = torch.cat([pool[pages[i], 1, :, : rows[i]] for i in listed], dim=1).double()
        scores = torch.einsum("hgd,htd->hgt", q[b].double().view(kv_heads, -1, d), k) * scale
        out[b] = torch.einsum("hgt,htd->hgd", scores.softmax(-1), v).reshape(heads, d)
        lse[b] = scores.logsumexp(-1).reshape(heads)
    return out, lse


def attend(q, pool, offsets, pages, rows, scale, *, isa=None, threads=2) -> tuple[torch.Tensor, torch.Tensor]:
    """The C kernel through an AttendJob, into outputs poisoned with NaN."""
    out = torch.full(q.shape, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"))
    ca.run_job(ca.make_job(q, pool, offsets, pages, rows, scale, out, lse, threads=threads, isa=isa))
    return out, lse


def check(got, want, offsets) -> None:
    """Within 1e-5 of the reference: relative per head on out, absolute on lse; empty sequences exact."""
    (out, lse), (ref_out, ref_lse) = got, want
    full = torch.from_numpy(np.diff(offsets) > 0)
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.all(out[~full] == 0) and torch.all(lse[~full] == float("-inf"))
    rel = (out[full].double() - ref_out[full]).norm(dim=-1) / ref_out[full].norm(dim=-1)
    assert rel.max() < 1e-5, rel.max()
    torch.testing.assert_close(lse[full].double(), ref_lse[full], rtol=0, atol=1e-5)


def random_case(rng, gen, seqs_pages, heads, kv_heads, d, dtype, slots=None):
    """Pages in random slots, every page with 1..PAGE valid rows (so partial pages anywhere)."""
    total = sum(seqs_pages)
    slots = slots or total + 3
    pool = torch.randn(slots, 2, kv_heads, PAGE, d, generator=gen).to(dtype)
    q = torch.randn(len(seqs_pages), heads, d, generator=gen)
    offsets = np.concatenate(([0], np.cumsum(seqs_pages))).astype(np.int64)
    pages = rng.permutation(slots)[:total].astype(np.int32)
    rows = rng.integers(1, PAGE + 1, total).astype(np.int32)
    return q, pool, offsets, pages, rows


def need(isa: str) -> None:
    if isa not in ca.supported_isas():
        pytest.skip(f"this CPU lacks {isa}")


@pytest.mark.parametrize("isa", ca.ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128, 24, 80, 72])
@pytest.mark.parametrize("heads, kv_heads", [(2, 2), (6, 2), (8, 2), (16, 2), (8, 1)])
def test_every_variant_matches_float64(isa, dtype, head_dim, heads, kv_heads):
    """GQA groups 1, 3, 4, 8 and a single kv head; a one-page sequence, an empty one, longer ones."""
    need(isa)
    rng = np.random.default_rng([head_dim, heads, kv_heads])
    gen = torch.Generator().manual_seed(head_dim * 100 + heads)
    q, pool, offsets, pages, rows = random_case(rng, gen, [1, 0, 5, 3], heads, kv_heads, head_dim, dtype)
    rows[0] = PAGE  # the single page full, the others partial at random
    check(
        attend(q, pool, offsets, pages, rows, head_dim**-0.5, isa=isa),
        reference(q, pool, offsets, pages, rows, head_dim**-0.5),
        offsets,
    )


@pytest.mark.parametrize("isa", ["auto", "scalar"])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("pages_per_seq", [40, 3])
def test_many_sequences_split_over_threads(isa, threads, pages_per_seq):
    """Many pages: tasks cut sequences into page runs and kv-head spans whose states merge exactly;
    few pages: one task per sequence and head."""
    rng = np.random.default_rng(threads * 7 + pages_per_seq)
    gen = torch.Generator().manual_seed(threads)
    seqs = [pages_per_seq + int(rng.integers(0, 5)) for _ in range(9)]
    seqs[4] = 0
    q, pool, offsets, pages, rows = random_case(rng, gen, seqs, 16, 4, 80, torch.bfloat16)
    got = attend(q, pool, offsets, pages, rows, 0.1, isa=isa, threads=threads)
    check(got, reference(q, pool, offsets, pages, rows, 0.1), offsets)


@pytest.mark.parametrize("heads, kv_heads", [(2, 1), (4, 1), (2, 2), (4, 2)])
def test_tier_property_test_shapes_take_the_c_kernel(heads, kv_heads):
    """test_tiers.py's hypothesis sizes (head_dim 8, pages of 4 rows, fp32) used to fall back to torch."""
    rng, gen = np.random.default_rng(heads), torch.Generator().manual_seed(kv_heads)
    lens = [1, 7, 20]
    pool = torch.randn(12, 2, kv_heads, 4, 8, generator=gen)
    counts = [-(-n // 4) for n in lens]
    offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    pages = rng.permutation(12)[: sum(counts)].astype(np.int32)
    rows = np.concatenate([[4] * (c - 1) + [n - 4 * (c - 1)] for n, c in zip(lens, counts, strict=True)])
    q = torch.randn(len(lens), heads, 8, generator=gen)
    before = ca.CALLS.copy()
    got = ca.cpu_attention(q, pool, offsets, pages, rows.astype(np.int32), 8**-0.5)
    assert ca.CALLS[ca.auto_isa()] == before[ca.auto_isa()] + 1 and ca.CALLS["torch"] == before["torch"]
    check(got, reference(q, pool, offsets, pages, rows, 8**-0.5), offsets)


def test_attend_job_reads_its_arrays_at_call_time():
    """One AttendJob run twice: q, offsets, pages and rows rewritten in place in between."""
    rng, gen = np.random.default_rng(5), torch.Generator().manual_seed(5)
    q, pool, offsets, pages, rows = random_case(rng, gen, [4, 2, 6], 8, 2, 64, torch.bfloat16, slots=20)
    out, lse = torch.empty(q.shape), torch.empty(q.shape[:2])
    job = ca.make_job(q, pool, offsets, pages, rows, 0.125, out, lse, threads=2)
    for _ in range(2):
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        ca.run_job(job)
        check((out, lse), reference(q, pool, offsets, pages, rows, 0.125), offsets)
        q.copy_(torch.randn(q.shape, generator=gen))
        offsets[:] = [0, 0, 5, 12]
        pages[:] = rng.permutation(20)[:12]
        rows[:] = rng.integers(1, PAGE + 1, 12)


def test_host_function_from_other_threads_at_once():
    """attend_job called through its raw address (as cudaLaunchHostFunc would) from several non-main
    threads at the same time: the calls are serialized and each is right."""
    host_fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(ca.host_fn())
    errors = []

    def worker(seed: int) -> None:
        rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
        q, pool, offsets, pages, rows = random_case(rng, gen, [3, 5], 8, 2, 72, torch.float32)
        want = reference(q, pool, offsets, pages, rows, 0.1)
        for _ in range(10):
            out, lse = torch.full(q.shape, float("nan")), torch.full(q.shape[:2], float("nan"))
            job = ca.make_job(q, pool, offsets, pages, rows, 0.1, out, lse, threads=3)
            host_fn(ctypes.addressof(job))
            try:
                assert job.status == 0
                check((out, lse), want, offsets)
            except AssertionError as err:
                errors.append(err)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize("caller_works, spin_us", [(True, 0.0), (True, 3000.0), (False, 0.0), (False, 3000.0)])
def test_job_on_a_native_thread_as_cuda_runs_a_host_function(threads, caller_works, spin_us):
    """The host-callback context: attend_job on a native thread Python never saw, a new one per call,
    five times with inputs rewritten in between (the pool's threads stay, spinning or asleep), with the
    caller working or sleeping: each result within fp32 rounding of torch's and float64's."""
    rng, gen = np.random.default_rng(threads), torch.Generator().manual_seed(threads)
    q, pool, offsets, pages, rows = random_case(rng, gen, [9, 0, 4, 30], 8, 2, 64, torch.bfloat16, slots=60)
    out, lse = torch.empty(q.shape), torch.empty(q.shape[:2])
    job = ca.make_job(
        q, pool, offsets, pages, rows, 0.125, out, lse, threads=threads, caller_works=caller_works, spin_us=spin_us
    )
    for run in range(5):
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        ca.call_on_native_thread(ca.host_fn(), ctypes.addressof(job))
        assert job.status == 0 and job.runs == run + 1
        want = ca.cpu_attention(q, pool, offsets, pages, rows, 0.125, impl="torch")
        torch.testing.assert_close(out, want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, want[1], rtol=0, atol=1e-5)
        check((out, lse), reference(q, pool, offsets, pages, rows, 0.125), offsets)
        q.copy_(torch.randn(q.shape, generator=gen))
        pages[:] = rng.permutation(60)[: len(pages)]
        rows[:] = rng.integers(1, PAGE + 1, len(rows))
    assert job.elapsed_ns > 0 and 0 <= job.wake_ns <= job.elapsed_ns
    if threads == 1 and caller_works:
        assert job.wake_ns == 0  # the caller alone: no pool thread took part


def test_a_job_with_no_pages_does_not_wake_the_pool():
    """A host node of a step with no DRAM slices (the offload baseline's) writes its empty outputs on the
    calling thread: no pool thread is woken, and every row is 0 / -inf."""
    gen = torch.Generator().manual_seed(1)
    q, pool = torch.randn(4, 8, 64, generator=gen), torch.randn(6, 2, 2, PAGE, 64, generator=gen)
    offsets, pages, rows = np.zeros(5, dtype=np.int64), np.zeros(1, dtype=np.int32), np.full(1, PAGE, dtype=np.int32)
    out, lse = torch.full(q.shape, float("nan")), torch.full(q.shape[:2], float("nan"))
    job = ca.make_job(q, pool, offsets, pages, rows, 0.125, out, lse, threads=3, caller_works=False)
    ca.run_job(job)
    assert job.runs == 1 and job.wake_ns == 0
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


def test_thread_info_describes_the_thread_that_runs_it():
    """What scripts/gpu_host_partial.py asks of CUDA's callback thread, checked on a native thread pinned
    to one CPU."""
    cpu = min(os.sched_getaffinity(0))
    info = ca.ThreadInfo()
    ca.call_on_native_thread(ca.thread_info_fn(), ctypes.addressof(info), cpu)
    assert (info.mask_cpus, info.cpu, info.policy) == (1, cpu, os.SCHED_OTHER)
    assert info.tid not in (0, threading.get_native_id())
    ca.call_on_native_thread(ca.thread_info_fn(), ctypes.addressof(info))
    assert info.mask_cpus == len(os.sched_getaffinity(0))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_pool_pins_to_the_process_cpus_when_a_pinned_thread_uses_it_first():
    """In a fresh process the pool is first used from a thread pinned to one CPU (as a driver's callback
    thread may be): its threads still spread over every CPU of the process, and the result is right."""
    script = """
import os, threading
import numpy as np, torch
from megatier.kv import cpu_attention as ca
q, pool = torch.randn(2, 4, 64), torch.randn(8, 2, 2, 16, 64)
offsets, pages, rows = np.array([0, 3, 8]), np.arange(8, dtype=np.int32), np.full(8, 16, dtype=np.int32)
got = []
def first_use():
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # this thread only
    got.append(ca.cpu_attention(q, pool, offsets, pages, rows, 0.125, impl="c", threads=2))
t = threading.Thread(target=first_use)
t.start()
t.join()
want = ca.cpu_attention(q, pool, offsets, pages, rows, 0.125, impl="torch")
torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-5)
print(ca.pool_cpus(), len(os.sched_getaffinity(0)))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    pool_cpus, process_cpus = map(int, done.stdout.split())
    assert pool_cpus == process_cpus


def test_refusals():
    rng, gen = np.random.default_rng(9), torch.Generator().manual_seed(9)
    q, pool, offsets, pages, rows = random_case(rng, gen, [2, 3], 4, 2, 64, torch.float32)
    half = pool.half()
    # float16 KV: auto serves it with torch, impl="c" says why not.
    before = ca.CALLS["torch"]
    out, lse = ca.cpu_attention(q, half, offsets, pages, rows, 0.125)
    assert ca.CALLS["torch"] == before + 1
    check((out, lse), reference(q, half, offsets, pages, rows, 0.125), offsets)
    with pytest.raises(MegatierError, match="bf16 or fp32"):
        ca.cpu_attention(q, half, offsets, pages, rows, 0.125, impl="c")
    for kwargs, match in (
        (dict(isa="sse9"), "unknown CPU attention isa"),
        (dict(impl="fast"), "unknown CPU attention impl"),
    ):
        with pytest.raises(MegatierError, match=match):
            ca.cpu_attention(q, pool, offsets, pages, rows, 0.125, **kwargs)
    # The C side checks too: a dtype or ISA it does not know.
    job = ca.make_job(q, pool, offsets, pages, rows, 0.125, torch.empty(q.shape), torch.empty(q.shape[:2]))
    for field, value, status in (("dtype", 7, -2), ("isa", len(ca.ISAS), -3)):
        setattr(job, field, value)
        ca.load_library().attend_job(ctypes.byref(job))
        assert job.status == status
        setattr(job, field, 1 if field == "dtype" else 0)


def test_an_isa_this_cpu_lacks_is_refused_in_one_line(monkeypatch):
    lib = ca.load_library()
    monkeypatch.setattr(lib, "isa_supported", lambda isa: int(isa == 0))  # a CPU with no SIMD
    gen = torch.Generator().manual_seed(0)
    q, pool, offsets, pages, rows = random_case(np.random.default_rng(0), gen, [2], 4, 2, 64, torch.float32)
    with pytest.raises(MegatierError) as err:
        ca.cpu_attention(q, pool, offsets, pages, rows, 0.125, impl="c", isa="avx2")
    assert "avx2" in str(err.value) and "\n" not in str(err.value)


def test_read_bandwidth_probe():
    assert ca.host_read_bandwidth(32 << 20, threads=2, reps=2) > 1e8  # bytes/s
