"""The megakernel on a Hopper GPU: each opcode alone, whole steps against the reference, determinism.

Opcodes run alone (a program of one opcode, waits removed) on fresh random inputs with NaN-poisoned
outputs, and are compared with the CPU interpreter executing the same instructions on the same inputs.
Whole steps use dummy Llama-3.2-1B weights (bf16) with KV beyond every sequence filled with garbage.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megakernel_helpers import (
    decode_batch,
    dummy_weights,
    garbage_kv,
    llama_1b_config,
    page_tables,
    prefill,
    random_prompts,
    toy_config,
)
from megatier.executors.base import StepBatch
from megatier.executors.megakernel.interp import Interpreter, unpack_index
from megatier.executors.megakernel.isa import Op
from megatier.executors.megakernel.layout import Dims, StepBuffers, choose_splits
from megatier.executors.megakernel.runner import MegakernelExecutor
from megatier.executors.megakernel.schedule import Program, build_program
from megatier.executors.reference import ReferenceExecutor
from megatier.kv.pages import KVCache
from megatier.weights import pack_weights

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
PAGE = 16


def _small(case: str):
    """Real head dims on small widths, so every opcode runs quickly but with the 1B's tiling."""
    shapes = {
        "llama": dict(hidden_size=512, intermediate_size=1024, num_heads=8, num_kv_heads=2, head_dim=64),
        "qwen2": dict(hidden_size=256, intermediate_size=768, num_heads=4, num_kv_heads=2, head_dim=64),
        "qwen3": dict(hidden_size=512, intermediate_size=768, num_heads=4, num_kv_heads=2, head_dim=128),
        # Qwen2-7B's 7 query heads per kv head: attention's head 0 gets two of the 8 warps
        "group7": dict(hidden_size=448, intermediate_size=768, num_heads=14, num_kv_heads=2, head_dim=64),
    }[case]
    base = toy_config(
        {"llama": "llama-tied-bias", "qwen2": "qwen2", "qwen3": "qwen3", "group7": "qwen2"}[case], vocab=1000
    )
    return dataclasses.replace(base, **shapes)


def _only(program: Program, op: Op, layer: int) -> Program:
    """The instructions of one opcode and layer, waits removed (their inputs are set up directly)."""
    keep = [dataclasses.replace(i, wait=None) for i in program.instrs if i.op == op and i.layer == layer]
    by_index = {i.index: i for i in keep}
    queues = [[by_index[i.index] for i in q if i.index in by_index] for q in program.queues]
    return Program(program.dims, program.num_sms, keep, queues)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("case", ["llama", "qwen2", "qwen3", "group7"])
@pytest.mark.parametrize("lengths", [[37], [5, 70, 1]])
@pytest.mark.parametrize("op", [Op.QKV, Op.ATTN, Op.OPROJ, Op.GATEUP, Op.DOWN, Op.LMHEAD])
def test_single_opcode_matches_interpreter(case, lengths, op):
    cfg = _small(case)
    weights = dummy_weights(cfg, 0, torch.bfloat16, CUDA)
    cache = KVCache.allocate(cfg, 32, PAGE, torch.bfloat16, CUDA)
    garbage_kv(cache)
    tables = page_tables([n + 1 for n in lengths], PAGE, 32)
    batch = StepBatch([7 + b for b in range(len(lengths))], [n - 1 for n in lengths], [1] * len(lengths), tables)
    ex = MegakernelExecutor(cfg, weights, cache=cache)
    layer = 0 if op in (Op.QKV, Op.OPROJ) and case == "qwen2" else 1  # layer 0 reads the embedding
    splits = 2 if op == Op.ATTN and len(lengths) > 1 else 1
    bufs = ex.buffers(batch)
    dims = Dims.of(cfg, len(lengths), splits, PAGE, 32)
    program = _only(build_program(dims, ex.num_sms), op, layer)
    gen = torch.Generator(device=CUDA).manual_seed(hash((case, op, len(lengths))) % 2**31)
    bufs.poison()
    for name in ("resid", "q", "attn_out", "act"):
        t = getattr(bufs, name)
        t.copy_(torch.randn(t.shape, generator=gen, device=CUDA) * (0.01 if name == "q" else 1.0))  # K ~ 100
    cpu = StepBuffers(**{k: v.cpu().clone() for k, v in bufs.tensors().items()})
    cpu_cache = KVCache(cache.kv.cpu().clone())
    written = {Op.QKV: ["q"], Op.ATTN: ["attn_out"], Op.OPROJ: ["resid"], Op.GATEUP: ["act"], Op.DOWN: ["resid"]}
    read_too = op == Op.DOWN or (op == Op.OPROJ and layer > 0)  # resid += ...: it is an input as well
    for name in [] if read_too else written.get(op, ["logits"]):
        getattr(bufs, name).fill_(float("nan"))
        getattr(cpu, name).fill_(float("nan"))

    ex.run_program(program)

    interp = Interpreter(cfg, pack_weights(weights, "cpu", torch.bfloat16), cpu_cache, ex.rope.cpu())
    for instr in program.instrs:
        interp.execute(instr, program, cpu, epoch=0)
    for name in written.get(op, ["logits"]):
        got, want = getattr(bufs, name), getattr(cpu, name)
        assert not got.isnan().any(), f"{name}: unwritten elements"
        assert _rel(got, want) < 5e-3, f"{name}: relative error {_rel(got, want)}"
    if op == Op.QKV:  # the K/V rows appended at each sequence's position
        for b, n in enumerate(lengths):
            page, row = tables[b][(n - 1) // PAGE], (n - 1) % PAGE
            got, want = cache.kv[page, layer, :, :, row], cpu_cache.kv[page, layer, :, :, row]
            assert _rel(got, want) < 5e-3, f"K/V of sequence {b}: relative error {_rel(got, want)}"
        assert torch.equal(cache.kv[:, 1 - layer].cpu(), cpu_cache.kv[:, 1 - layer])  # other layer untouched
    if op == Op.LMHEAD:
        want = [unpack_index(int(k)) for k in cpu.argmax]
        assert bufs.out_tokens[0].tolist() == want
        assert want == cpu.logits.argmax(-1).tolist()


# ---- whole steps on dummy Llama-3.2-1B ------------------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    cfg = llama_1b_config()
    weights = dummy_weights(cfg, 0, torch.bfloat16, CUDA)
    return cfg, weights


def _caches(cfg, weights, lengths: list[int], steps: int, num_pages: int = 160):
    """bf16 and fp32 caches prefilled with the same prompts; garbage beyond every sequence."""
    prompts = random_prompts(lengths, cfg.vocab_size, seed=len(lengths))
    tables = page_tables([n + steps for n in lengths], PAGE, num_pages)
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        cache = KVCache.allocate(cfg, num_pages, PAGE, dtype, CUDA)
        garbage_kv(cache)
        prefill(cfg, weights, cache, prompts, tables)
        out[dtype] = cache
    return prompts, tables, out


def _teacher_forced(ref: ReferenceExecutor, batch: StepBatch, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Reference logits at every step, fed the megakernel's own tokens."""
    logits, ids, starts = [], list(batch.token_ids), list(batch.starts)
    for step in range(tokens.shape[0]):
        logits.append(ref.forward(StepBatch(ids, starts, [1] * len(ids), batch.page_tables)))
        ids, starts = tokens[step].tolist(), [s + 1 for s in starts]
    return logits


@pytest.mark.parametrize("lengths", [[32], [32, 5, 200, 77, 1, 128, 64, 9]])
def test_llama1b_greedy_and_logits_match_reference(llama, lengths):
    """Greedy tokens over many steps agree with the fp32 reference fed the same tokens (any step where
    they differ must be a near tie), and logits err less than a plain bf16 PyTorch step does."""
    cfg, weights = llama
    steps = 128 if len(lengths) == 1 else 24
    prompts, tables, caches = _caches(cfg, weights, lengths, steps)
    batch = decode_batch(prompts, tables)
    ref32 = ReferenceExecutor(cfg, weights.to(CUDA, torch.float32), cache=caches[torch.float32])
    bf16_cache = KVCache(caches[torch.bfloat16].kv.clone())
    ref16 = ReferenceExecutor(cfg, weights, cache=bf16_cache)
    ex = MegakernelExecutor(cfg, weights, cache=caches[torch.bfloat16])

    logits = ex.forward(batch)
    want = ref32.forward(batch)
    plain = ref16.forward(batch)
    assert _rel(logits, want) <= _rel(plain, want), (_rel(logits, want), _rel(plain, want))
    kl = lambda a: float(torch.nn.functional.kl_div(a.log_softmax(-1), want.log_softmax(-1), log_target=True))  # noqa: E731
    assert kl(logits) <= kl(plain)

    tokens = ex.decode_greedy(batch, steps)
    assert tokens.shape == (steps, len(lengths))
    assert tokens[0].tolist() == logits.argmax(-1).tolist()
    tol = 3 * float((plain - want).abs().max())
    forced = _teacher_forced(ref32, batch, tokens)
    exact = 0
    for step, ref_logits in enumerate(forced):
        best = ref_logits.argmax(-1)
        exact += int((best == tokens[step]).sum())
        gap = ref_logits.gather(1, best[:, None]) - ref_logits.gather(1, tokens[step][:, None])
        assert float(gap.max()) <= tol, f"step {step}: token off the reference's argmax by {float(gap.max())}"
    assert exact >= 0.95 * tokens.numel()


def test_llama1b_logits_bitwise_identical_across_assignments(llama):
    cfg, weights = llama
    prompts, tables, caches = _caches(cfg, weights, [40, 3, 90], 1)
    batch = decode_batch(prompts, tables)
    ex = MegakernelExecutor(cfg, weights, cache=caches[torch.bfloat16])
    sms = ex.num_sms
    results = []
    for strategy, seed, num_sms in [("balanced", 0, sms), ("round_robin", 0, sms), ("random", 1, sms), ("random", 2, sms - 17)]:  # fmt: skip
        ex.set_schedule(strategy, seed, num_sms)
        results.append(ex.forward(batch))
    for r in results[1:]:
        assert torch.equal(r, results[0])


def test_llama1b_long_context_splits(llama):
    """2,000 positions of context: several attention splits per kv head, still equal to the reference."""
    cfg, weights = llama
    assert choose_splits(2000) > 1
    prompts, tables, caches = _caches(cfg, weights, [2000], 1, num_pages=130)
    batch = decode_batch(prompts, tables)
    ex = MegakernelExecutor(cfg, weights, cache=caches[torch.bfloat16])
    want = ReferenceExecutor(cfg, weights.to(CUDA, torch.float32), cache=caches[torch.float32]).forward(batch)
    assert _rel(ex.forward(batch), want) < 2e-2


@pytest.mark.parametrize("lengths", [[32], [40, 3, 90]])
def test_llama1b_steps_fed_from_the_device_equal_one_call(llama, lengths):
    """Decode steps queued as the engine queues them, each forward fed the previous argmax from the
    device with page tables that grow in between, give exactly the tokens of one decode_greedy call, and
    none of them waits for the device."""
    cfg, weights = llama
    steps = 46
    prompts, tables, caches = _caches(cfg, weights, lengths, steps)
    cache = caches[torch.bfloat16]
    saved = cache.kv.clone()
    batch = decode_batch(prompts, tables)
    want = MegakernelExecutor(cfg, weights, cache=cache).decode_greedy(batch, steps).cpu()
    cache.kv.copy_(saved)
    ex = MegakernelExecutor(cfg, weights, cache=cache)
    n, feed, got = batch.num_seqs, torch.tensor(batch.token_ids, device=CUDA), []
    ex.forward(batch)  # compiled, graph captured
    cache.kv.copy_(saved)
    torch.cuda._sleep(2_000_000_000)  # about a second of spinning on the stream, ahead of the steps
    slept = torch.cuda.Event()
    slept.record()
    for step in range(steps):
        held = [t[: -(-(s + step + 1) // PAGE)] for t, s in zip(tables, batch.starts, strict=True)]
        starts = [s + step for s in batch.starts]
        feed = ex.forward(StepBatch([0] * n, starts, [1] * n, held, fed=feed, fed_at=list(range(n)))).argmax(-1)
        got.append(feed)
    assert not slept.query()  # no step waited for the device (it would have waited for the spin)
    assert torch.equal(torch.stack(got).cpu(), want)


def test_llama1b_steps_looped_in_one_launch_equal_one_launch_per_step(llama):
    """The kernel runs many steps per launch (each waits for the epoch the previous step's last CTA
    publishes, the loader gates KV reads on it): the tokens equal those of one launch per step."""
    cfg, weights = llama
    prompts, tables, caches = _caches(cfg, weights, [32, 77], 40)
    cache = caches[torch.bfloat16]
    saved = cache.kv.clone()
    batch = decode_batch(prompts, tables)
    ex = MegakernelExecutor(cfg, weights, cache=cache)
    looped = ex.decode_greedy(batch, 40, check_every=40)
    cache.kv.copy_(saved)
    stepped = ex.decode_greedy(batch, 40, check_every=1)
    assert torch.equal(looped, stepped)
