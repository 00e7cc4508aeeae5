"""Compile the megakernel for one (model, batch size) with NVRTC, caching the cubin on disk.

Every size is a compile-time constant (#defines prepended to kernel/megakernel.cu), so loops unroll and
shared memory is laid out statically; this module picks the weight-chunk width and the number of ring
stages that fit the 227 KiB a Hopper CTA may use. The cache key hashes the sources, the defines, the
compiler options, the architecture and the NVRTC version. Compiling needs no GPU.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from megatier.cache import cache_root
from megatier.config import ModelConfig
from megatier.errors import MegatierError
from megatier.executors.megakernel.isa import TILE, WORDS, Counters, c_defines

KERNEL_DIR = Path(__file__).parent / "kernel"
ARCH = "sm_90a"
SMEM_LIMIT = 227 * 1024
CONSUMER_WARPS = 8
MIN_STAGES = 4
MAX_BATCH = 8
MAX_GROUP = 8

# Slots of the uint64 parameter array the kernel receives (pointers, except out_cap and maxlen).
PARAMS = (
    "embed", "qkv", "o", "gate_up", "down", "in_norm", "post_norm", "final_norm", "lm_head", "qkv_bias", "o_bias",
    "gate_up_bias", "down_bias", "q_norm", "k_norm", "kv", "rope", "resid", "q", "part_o", "part_ml", "attn_out",
    "act", "logits", "argmax", "counters", "state", "tokens", "pos", "table", "out_tokens", "out_cap", "program",
    "qlen", "maxlen", "timeline", "diag",
)  # fmt: skip


def check_supported(cfg: ModelConfig, batch: int) -> None:
    """Raise MegatierError naming the first thing this kernel cannot run."""
    group = cfg.num_heads // cfg.num_kv_heads
    problems = [
        (cfg.head_dim % 16 or not 16 <= cfg.head_dim <= 256 or 32 % (cfg.head_dim // 8), "head_dim must be 16, 32, 64, 128 or 256"),
        (cfg.hidden_size % 16, "hidden_size must be a multiple of 16"),
        (cfg.intermediate_size % 16, "intermediate_size must be a multiple of 16"),
        (group > MAX_GROUP, f"at most {MAX_GROUP} query heads per kv head"),
        (not 1 <= batch <= MAX_BATCH, f"batch must be 1..{MAX_BATCH} sequences"),
    ]  # fmt: skip
    for bad, what in problems:
        if bad:
            raise MegatierError(f"megakernel: unsupported model or batch ({what}; got {_shape(cfg)}, batch {batch})")


def _shape(cfg: ModelConfig) -> str:
    return (
        f"hidden {cfg.hidden_size}, heads {cfg.num_heads}/{cfg.num_kv_heads}, head_dim {cfg.head_dim}, "
        f"intermediate {cfg.intermediate_size}"
    )


def _align(x: int, a: int) -> int:
    return -(-x // a) * a


def kc_for(k: int, kc_max: int) -> int:
    """Columns per weight chunk: the widest multiple of 16 that divides k, at most kc_max (as in C++)."""
    kc = min(k, kc_max)
    kc -= kc % 16
    while k % kc:
        kc -= 16
    return kc


@dataclass(frozen=True)
class KernelConfig:
    """One compiled variant: model shapes, batch, KV paging, and whether to record a timeline."""

    cfg: ModelConfig
    batch: int
    page_size: int
    max_pages: int
    timeline: bool = False
    chunk_columns: int = 1024  # widest weight chunk (16 rows of it fill one ring stage)
    in_flight: int = 2  # most weight/KV chunks a loader has in flight (0: as many as the ring holds)
    hold: int = 4  # an instruction's last chunks whose stages are handed back only after its signal

    @cached_property
    def layout(self) -> dict[str, int]:
        """Shared-memory offsets and the ring geometry: the widest chunks that still leave MIN_STAGES, and
        whether DOWN streams its activations by k-chunk (when that frees room for more stages)."""
        c, b = self.cfg, self.batch
        attn = CONSUMER_WARPS * (c.head_dim + 2) * 4  # attention's per-warp partials
        for kc_max in (k for k in (1024, 512, 256, 128) if k <= self.chunk_columns):
            stage = TILE * (2 * kc_max + 16)
            options = []
            for stream in (False, True):
                kmax = max(c.hidden_size, c.q_size, 0 if stream else c.intermediate_size)
                stream_stride = kc_for(c.intermediate_size, kc_max) + 8
                act = max(b * (kmax + 8) * 2, 2 * b * stream_stride * 2 if stream else 0, attn)
                rest = [
                    ("SM_ACT", act),
                    ("SM_RED", 2 * CONSUMER_WARPS * TILE * 8 * 4),
                    ("SM_HEAD", c.head_dim * b * 4),
                    ("SM_STAT", max(CONSUMER_WARPS * b, 8) * 4),
                    ("SM_KEYS", TILE * b * 8),
                    ("SM_STEP", 4 * b * 4),
                    ("SM_PARAMS", len(PARAMS) * 8),
                    ("SM_INSN", 2 * WORDS * 4),
                    ("SM_LOADER_INSN", WORDS * 4),
                ]
                fixed = sum(_align(n, 16) for _, n in rest) + 64
                stages = (SMEM_LIMIT - fixed - 256) // (stage + 16)
                options.append((stages, not stream, stream, kmax + 8, stream_stride, rest))
            stages, _, stream, act_stride, stream_stride, rest = max(options)
            if stages >= MIN_STAGES:
                break
        out = {
            "KC_MAX": kc_max,
            "NSTAGES": stages,
            "ACT_STRIDE": act_stride,
            "STREAM_DOWN_ACT": int(stream),
            "STREAM_STRIDE": stream_stride,
            "SM_RING": 0,
        }
        at = stages * stage
        for name, n in rest:
            out[name] = at
            at += _align(n, 16)
        out["SM_BARS"] = at
        at += 2 * stages * 8
        out["SM_FLAGS"] = at
        out["SMEM_BYTES"] = _align(at + 16, 128)
        if out["SMEM_BYTES"] > SMEM_LIMIT:
            raise MegatierError(f"megakernel: shapes need {out['SMEM_BYTES']} B of shared memory ({_shape(c)})")
        return out

    def defines(self) -> dict[str, str]:
        c = self.cfg
        counters = Counters(c.num_layers, self.batch, c.num_kv_heads)
        d: dict[str, object] = {
            "HIDDEN": c.hidden_size,
            "HEADS": c.num_heads,
            "KV_HEADS": c.num_kv_heads,
            "HEAD_DIM": c.head_dim,
            "INTER": c.intermediate_size,
            "VOCAB": c.vocab_size,
            "LAYERS": c.num_layers,
            "BATCH": self.batch,
            "PAGE_SIZE": self.page_size,
            "MAX_PAGES": self.max_pages,
            "EPS": f"{c.rms_norm_eps!r}f",
            "QKV_BIAS": int(c.qkv_bias),
            "O_BIAS": int(c.o_bias),
            "MLP_BIAS": int(c.mlp_bias),
            "QK_NORM": int(c.qk_norm),
            "NUM_CONSUMER_WARPS": CONSUMER_WARPS,
            "TIMELINE": int(self.timeline),
            "IN_FLIGHT": self.in_flight,
            "HOLD_STAGES": min(self.hold, self.layout["NSTAGES"] - 1),
            "EXIT_CTR": counters.exit,
            "NUM_PARAMS": len(PARAMS),
            **self.layout,
            **c_defines(),
            **{f"P_{name.upper()}": i for i, name in enumerate(PARAMS)},
        }
        return {k: str(v) for k, v in d.items()}

    @property
    def threads(self) -> int:
        return (CONSUMER_WARPS + 1) * 32


def _include_dirs() -> list[str]:
    """The kernel folder, the toolkit's include folder and its cccl/ (libcu++) subfolder."""
    from cuda.pathfinder import find_nvidia_header_directory

    found = find_nvidia_header_directory("cudart"), find_nvidia_header_directory("cccl")
    if None not in found:
        return [str(KERNEL_DIR), *found]
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for root in filter(None, roots):
        inc = Path(root) / "include"
        if (inc / "cuda_bf16.h").is_file() and (inc / "cccl" / "cuda" / "std" / "cstdint").is_file():
            return [str(KERNEL_DIR), str(inc), str(inc / "cccl")]
    raise MegatierError("megakernel: CUDA headers (cuda_bf16.h, cccl/) not found; install the CUDA toolkit")


def _nvrtc_version() -> str:
    from cuda.bindings import nvrtc

    _, major, minor = nvrtc.nvrtcVersion()
    return f"{major}.{minor}"


def source(kc: KernelConfig) -> str:
    defines = "".join(f"#define {k} {v}\n" for k, v in kc.defines().items())
    return defines + '#include "megakernel.cu"\n'


def compile_cubin(kc: KernelConfig, log: io.StringIO | None = None) -> bytes:
    """The cubin for `kc`, from the disk cache or freshly compiled (then `log` receives ptxas -v)."""
    from cuda.core import Program, ProgramOptions

    src = source(kc)
    includes = _include_dirs()
    options = {"arch": ARCH, "std": "c++17", "ptxas_options": "-v", "lineinfo": True, "max_register_count": 224}
    files = sorted(KERNEL_DIR.glob("*.cu*"))
    key = hashlib.sha256()
    for part in (src, repr(sorted(options.items())), ARCH, _nvrtc_version(), *(f.read_text() for f in files)):
        key.update(part.encode())
    path = cache_root() / "cubin" / f"megakernel-{key.hexdigest()[:32]}.cubin"
    if path.is_file():
        return path.read_bytes()
    program = Program(src, code_type="c++", options=ProgramOptions(include_path=includes, **options))
    try:
        cubin = bytes(program.compile("cubin", logs=log).code)
    except Exception as e:
        raise MegatierError(f"megakernel: NVRTC failed for {ARCH}: {e}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(cubin)
    tmp.replace(path)
    return cubin
