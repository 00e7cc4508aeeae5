"""Where a GPU-only decode error comes from: the fused decode kernels at the Llama-3.2-1B shape.

Part 1 checks each fused kernel alone, at full size, against fp64 PyTorch on the same inputs. Part 2
runs teacher-forced decode steps through the executor in variants that differ only in what exists on
a GPU (PDL, CUDA graphs, the software-pipelining depth) and in the decode path (fused or cuBLAS), and
reports each variant's logits error versus an fp32 reference, prompt rows and decode rows apart, next
to a plain bf16 run's. Used by gpu_graph_check.py before timing, which times the first correct variant.
"""

from __future__ import annotations

import contextlib

import torch

from megatier.executors.base import StepBatch
from megatier.executors.graph import GraphExecutor
from megatier.executors.reference import ReferenceExecutor, rms_norm
from megatier.kernels import gemv, pdl
from megatier.kernels.gemv import gemv_norm_logits, gemv_norm_silu, gemv_residual_add
from megatier.kernels.gemv_qkv import gemv_qkv_rope
from megatier.kv.pages import KVCache

VARIANTS = ["fused", "fused pdl=off", "fused prefetch=off", "fused eager", "fused stages=1", "cublas"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@contextlib.contextmanager
def variant_settings(name: str):
    """PDL, L2 prefetch and pipelining depth for one variant, restored afterwards."""
    default_config, prefetch_bytes = gemv.default_config, gemv.PREFETCH_BYTES
    if "stages=1" in name:
        gemv.default_config = lambda *a: default_config(*a)._replace(num_stages=1)
    if "prefetch=off" in name:
        gemv.PREFETCH_BYTES = 0
    pdl.enabled = "pdl=off" not in name
    try:
        yield
    finally:
        gemv.default_config, gemv.PREFETCH_BYTES = default_config, prefetch_bytes
        pdl.enabled = True


def kernel_checks(cfg, weights) -> dict[str, float]:
    """Each fused kernel once at full size (layer 3's weights, random fp32 residual), eager, vs fp64."""
    ex = GraphExecutor(cfg, weights, cache=KVCache.allocate(cfg, 32, 16, torch.bfloat16, torch.device("cuda")))
    w, eps, out = ex.w, cfg.rms_norm_eps, {}
    layer, gen = 3, torch.Generator(device="cuda").manual_seed(9)
    for rows in (1, 8):
        residual = torch.randn(rows, cfg.hidden_size, device="cuda", generator=gen)
        h = rms_norm(residual.double(), w.input_norm[layer].double(), eps)
        seq_lens = torch.full((rows,), 21, dtype=torch.int32, device="cuda")
        tables = torch.arange(2 * rows, dtype=torch.int32, device="cuda").view(rows, 2)
        q = gemv_qkv_rope(
            residual, w.input_norm[layer], w.qkv[layer], None, seq_lens, tables, ex.cache.kv, layer, ex.cos_sin,
            cfg.num_heads, None, None, eps,
        )  # fmt: skip
        v_ref = (h @ w.qkv[layer].double().T)[:, cfg.q_size + cfg.kv_size :].view(rows, cfg.num_kv_heads, -1)
        v = ex.cache.kv[tables[:, 1].long(), layer, 1, :, 4]  # position 20: the second page, row 4
        out[f"qkv rows={rows} (V written)"] = rel_err(v, v_ref)
        out[f"qkv rows={rows} (q finite)"] = float(torch.isfinite(q).all())
        x = torch.randn(rows, cfg.intermediate_size, device="cuda", generator=gen).to(w.down.dtype)
        before = residual.double().clone()
        gemv_residual_add(x, w.down[layer], None, residual)
        out[f"down rows={rows}"] = rel_err(residual - before, x.double() @ w.down[layer].double().T)
        h2 = rms_norm(residual.double(), w.post_norm[layer].double(), eps)
        gate, up = (h2 @ w.gate_up[layer].double().T).chunk(2, dim=-1)
        act = gemv_norm_silu(residual, w.post_norm[layer], w.gate_up[layer], None, eps)
        out[f"silu rows={rows}"] = rel_err(act, torch.nn.functional.silu(gate) * up)
        logits, _ = gemv_norm_logits(residual, w.final_norm, w.lm_head, eps, logits=True, argmax=False)
        ref = rms_norm(residual.double(), w.final_norm.double(), eps) @ w.lm_head.double().T
        out[f"logits rows={rows}"] = rel_err(logits, ref)
    return out


def decode_errors(cfg, weights, num_seqs: int, num_steps: int = 4) -> dict[str, tuple[float, float]]:
    """Teacher-forced prompt + decode steps; (prompt rows error, decode rows error) vs fp32 per variant."""
    gen = torch.Generator().manual_seed(21 + num_seqs)
    lens = [40 - 3 * i for i in range(num_seqs)]
    tables = [list(range(8 * i, 8 * i + 8)) for i in range(num_seqs)]
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in lens]
    feeds = torch.randint(0, cfg.vocab_size, (num_steps, num_seqs), generator=gen).tolist()
    steps = [StepBatch([t for p in prompts for t in p], [0] * num_seqs, lens, tables)]
    steps += [StepBatch(f, [n + i for n in lens], [1] * num_seqs, tables) for i, f in enumerate(feeds)]

    def run(cls, dtype, name: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        with variant_settings(name):
            cache = KVCache.allocate(cfg, 8 * num_seqs, 16, dtype, torch.device("cuda"))
            cache.kv.fill_(float("nan"))
            ex = cls(cfg, weights, cache=cache)
            if cls is GraphExecutor:
                ex.gemv_max_batch = 0 if name == "cublas" else 16
                ex.use_graphs = "eager" not in name
            prompt = ex.forward(steps[0])
            return prompt, torch.cat([ex.forward(s) for s in steps[1:]])

    exact = run(ReferenceExecutor, torch.float32)
    results = {
        "plain bf16": tuple(rel_err(a, b) for a, b in zip(run(ReferenceExecutor, torch.bfloat16), exact, strict=True))
    }
    for name in VARIANTS:
        try:
            results[name] = tuple(
                rel_err(a, b) for a, b in zip(run(GraphExecutor, torch.bfloat16, name), exact, strict=True)
            )
        except Exception as e:  # report and go on
            print(f"  {name}: FAILED {type(e).__name__}: {e}", flush=True)
    return results


def diagnose(cfg, weights) -> tuple[dict, str | None]:
    """Print and return the checks; the first fused variant whose decode error is within the plain bf16
    run's (None if none is)."""
    record: dict = {"kernels": {}, "decode": {}}
    try:
        record["kernels"] = kernel_checks(cfg, weights)
    except Exception as e:
        record["kernels"] = {"error": f"{type(e).__name__}: {e}"}
    for key, value in record["kernels"].items():
        print(f"  kernel check {key}: {value:.3g}" if isinstance(value, float) else f"  {key}: {value}", flush=True)
    good = [n for n in VARIANTS if n.startswith("fused")]
    for num_seqs in (1, 2):
        errors = decode_errors(cfg, weights, num_seqs)
        record["decode"][num_seqs] = errors
        plain = errors["plain bf16"][1]
        for name, (prompt_err, decode_err) in errors.items():
            print(
                f"  {num_seqs} seq(s) {name:16s} prompt rows {prompt_err:.2e}  decode rows {decode_err:.2e}", flush=True
            )
        good = [n for n in good if n in errors and errors[n][1] <= plain]
    record["chosen"] = next(iter(good), None)
    return record, record["chosen"]
