"""MegakernelExecutor: decode steps in cooperative launches that loop over steps, captured as CUDA graphs.

Construct as `MegakernelExecutor(cfg, weights, cache=cache)`. `forward(batch)` queues one decode step
(a replayed CUDA graph of one launch; tokens the previous step sampled are copied in on the device) and
returns its fp32 logits without waiting, so the engine samples behind it and schedules the next step
meanwhile; an abort the kernel reported (its diagnostics are host memory) raises at the next call.
Prefill (any batch with more than one new token per sequence) and decode batches larger than MAX_BATCH
go to a GraphExecutor that shares the KV cache and the packed weights (quantized weights are dequantized
for both: the kernel reads plain ones only). `decode_greedy(batch, num_steps)`
(kernel tests and benchmarks) runs num_steps steps on the device with the greedy token fed back by the
kernel itself, replaying a CUDA graph of one launch of `check_every` steps.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, replace

import numpy as np
import torch

from megatier.config import ModelConfig
from megatier.errors import MegatierError
from megatier.executors.base import StepBatch
from megatier.executors.graph import GraphExecutor
from megatier.executors.megakernel.build import MAX_BATCH, PARAMS, KernelConfig, check_supported, compile_cubin
from megatier.executors.megakernel.isa import STAMPS
from megatier.executors.megakernel.layout import MAX_SPLITS, Dims, StepBuffers, choose_splits, rope_table
from megatier.executors.megakernel.schedule import Program, build_program, validate
from megatier.kv.pages import KVCache
from megatier.weights import ModelWeights

DIAG_KINDS = {1: "a counter wait timed out", 2: "a weight chunk never arrived", 3: "the ring never drained"}


class _TorchStream:
    """torch's current stream in the __cuda_stream__ protocol cuda.core understands."""

    def __init__(self, stream: torch.cuda.Stream):
        self.stream = stream

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.stream.cuda_stream)


@dataclass
class _Variant:
    """What one batch size needs: the compiled kernel, persistent buffers, and the parameter block."""

    kc: KernelConfig
    kernel: object
    bufs: StepBuffers
    params: torch.Tensor  # int64 [len(PARAMS)] on the device
    timeline: torch.Tensor | None
    program: Program | None = None
    words: torch.Tensor | None = None
    lengths: torch.Tensor | None = None


class MegakernelExecutor:
    name = "megakernel"

    def __init__(
        self,
        cfg: ModelConfig,
        weights: ModelWeights,
        *,
        cache: KVCache,
        num_sms: int | None = None,
        strategy: str = "round_robin",
        seed: int = 0,
        timeline: bool = False,
        validate_programs: bool = True,
        chunk_columns: int = 1024,
    ):
        self.cfg, self.cache = cfg, cache
        self.device = cache.kv.device
        self.page_size, self.num_pages = cache.page_size, cache.num_pages
        check_device(cfg, cache.kv.dtype, self.device)
        available = torch.cuda.get_device_properties(self.device).multi_processor_count
        self.num_sms = num_sms or available
        if not 1 <= self.num_sms <= available:
            raise MegatierError(f"megakernel: num_sms must be 1..{available}, got {num_sms}")
        self.strategy, self.seed, self.timeline, self.validate_programs = strategy, seed, timeline, validate_programs
        self.chunk_columns = chunk_columns
        # The kernel streams plain weights only: quantized ones are dequantized here, for its graph executor too.
        self.fallback = GraphExecutor(cfg, weights.dequantized(self.device, cache.kv.dtype), cache=cache)
        self.weight_bytes = self.fallback.weight_bytes
        perm = torch.tensor(Dims.of(cfg, 1, 1, self.page_size, self.num_pages).qkv_permutation(), device=self.device)
        shared = self.fallback.w  # every weight but qkv is shared; qkv rows are reordered so that
        self.w = replace(  # each 16-row tile holds whole RoPE pairs
            shared,
            qkv=shared.qkv[:, perm].contiguous(),
            qkv_bias=None if shared.qkv_bias is None else shared.qkv_bias[:, perm].contiguous(),
        )
        self.rope = rope_table(cfg, self.num_pages * self.page_size, self.device)
        self.diag = torch.zeros(16, dtype=torch.int32, pin_memory=True)  # host memory the kernel can write
        self._variants: dict[int, _Variant] = {}
        self._programs: dict[tuple[int, int], tuple[Program, torch.Tensor, torch.Tensor]] = {}  # (batch, splits)
        self._graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph | None] = {}
        self.graph_error: str | None = None

    # -- public API --------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, batch: StepBatch) -> torch.Tensor:
        self._raise_if_aborted()
        if not batch.is_decode() or batch.num_seqs > MAX_BATCH:
            return self.fallback.forward(batch)
        v = self._prepare(batch, steps=1)
        self._queue(v, 1)
        return v.bufs.logits.clone()  # the next step overwrites the buffer

    @torch.inference_mode()
    def decode_greedy(
        self, batch: StepBatch, num_steps: int, stop_ids: tuple[int, ...] = (), check_every: int = 16
    ) -> torch.Tensor:
        """[steps, B] int64 greedy tokens; stops early (at a multiple of check_every) once every sequence
        has produced one of `stop_ids`. The page tables must already hold num_steps more positions."""
        if not batch.is_decode():
            raise MegatierError("decode_greedy needs a decode batch (one new token per sequence)")
        if batch.num_seqs > MAX_BATCH:
            return self.fallback.decode_greedy(batch, num_steps)
        if num_steps < 1:
            raise MegatierError(f"num_steps must be >= 1, got {num_steps}")
        v = self._prepare(batch, steps=num_steps)
        k = min(check_every, num_steps)
        done = 0
        while done < num_steps:
            n = min(k, num_steps - done)
            self._queue(v, n, k)
            done += n
            if stop_ids and done < num_steps:
                self._check(v)
                if bool(torch.isin(v.bufs.out_tokens[:done], torch.tensor(stop_ids)).any(0).all()):
                    break
        self._check(v)
        return v.bufs.out_tokens[:done].to(self.device)

    def set_schedule(self, strategy: str, seed: int = 0, num_sms: int | None = None) -> None:
        """Assign instructions to SMs differently from the next step on (results must not change)."""
        available = torch.cuda.get_device_properties(self.device).multi_processor_count
        self.strategy, self.seed, self.num_sms = strategy, seed, num_sms or available
        self._programs.clear()
        for v in self._variants.values():
            v.program = None

    def buffers(self, batch: StepBatch) -> StepBuffers:
        """The step buffers of `batch`'s size, loaded with its inputs (tests poke inputs in directly)."""
        return self._prepare(batch, steps=1).bufs

    def run_program(self, program: Program) -> None:
        """Launch an arbitrary program (say, one opcode with its waits removed) once on the current
        buffers. For per-opcode tests; the regular program is rebuilt on the next step."""
        v = self._variants[program.dims.batch]
        self._install(v, program, *self._encode(program))
        self._launch(v, program.num_sms)
        self._check(v)
        v.program = None

    def timeline_data(self, batch_size: int = 1) -> tuple[Program, torch.Tensor]:
        """The last step's program and its [num_sms, max_len + 1, STAMPS] globaltimer stamps (ns): per
        instruction consumer start, dependency satisfied, end, loader's first weight request, signal
        start, release-add start; then per SM its step boundary: step start (after the epoch wait), exit
        add issued and returned, finalize start and end (only in the SM that finalized). 0 where not
        recorded."""
        v = self._variants[batch_size]
        if v.timeline is None:
            raise MegatierError("construct the executor with timeline=True to record a timeline")
        return v.program, v.timeline.cpu()

    # -- internals -----------------------------------------------------------------------------------

    def _queue(self, v: _Variant, num_steps: int, per_launch: int = 16) -> None:
        """Launch num_steps steps: replays of a CUDA graph of one launch of `per_launch` steps (the kernel
        loops over steps itself), then one launch of the rest."""
        k = min(per_launch, num_steps)
        graph = self._graph(v, k)
        for _ in range(num_steps // k):
            if graph is not None:
                graph.replay()
            else:
                self._launch(v, steps=k)
        if num_steps % k:
            self._launch(v, steps=num_steps % k)

    def _raise_if_aborted(self) -> None:
        d = self.diag.tolist()
        if d[0]:
            self.diag.zero_()
            raise MegatierError(
                f"megakernel aborted: {DIAG_KINDS.get(d[0], d[0])} on SM {d[1]} at instruction #{d[2]} "
                f"(opcode {d[3]}), counter/stage {d[4]} = {d[5]}, wanted {d[6]}, epoch {d[7]}"
            )

    def _check_room(self, batch: StepBatch, steps: int) -> list[int]:
        """Each sequence's end after `steps` steps, checked against its page table."""
        ends = [s + steps for s in batch.starts]
        for b, (end, table) in enumerate(zip(ends, batch.page_tables, strict=True)):
            if end > len(table) * self.page_size:
                raise MegatierError(
                    f"sequence {b}: its page table holds {len(table) * self.page_size} positions, "
                    f"{end} needed for {steps} step(s) from position {batch.starts[b]}"
                )
        return ends

    def _prepare(self, batch: StepBatch, steps: int) -> _Variant:
        ends = self._check_room(batch, steps)
        v = self._variant(batch.num_seqs, steps)
        self._program(v, choose_splits(max(ends)))
        v.bufs.load(batch.token_ids, batch.starts, batch.page_tables)
        batch.feed_into(v.bufs.tokens)
        return v

    def _variant(self, b: int, steps: int) -> _Variant:
        check_supported(self.cfg, b)
        v = self._variants.get(b)
        if v is not None and v.bufs.out_tokens.shape[0] < steps:
            torch.cuda.synchronize(self.device)  # no launch may still write the old ring once it is freed
            v.bufs.out_tokens = torch.zeros((steps, b), dtype=torch.int64, pin_memory=True)
            self._write_params(v)
            self._graphs = {key: g for key, g in self._graphs.items() if key[0] != b}
        if v is None:
            kc = KernelConfig(self.cfg, b, self.page_size, self.num_pages, self.timeline, self.chunk_columns)
            kernel = _load_kernel(compile_cubin(kc), kc, self.device)
            dims = Dims.of(self.cfg, b, MAX_SPLITS, self.page_size, self.num_pages)
            bufs = StepBuffers.allocate(dims, torch.bfloat16, self.device, max_steps=steps)
            params = torch.zeros(len(PARAMS), dtype=torch.int64, device=self.device)
            v = _Variant(kc, kernel, bufs, params, None)
            self._variants[b] = v
        return v

    def _program(self, v: _Variant, splits: int) -> None:
        """Switch v to the program for `splits`, built and validated once per (batch, splits): a Python
        build and validation take over a second for Llama-3.2-1B, too long to repeat whenever a context
        crosses a split boundary."""
        if v.program is not None and v.program.dims.splits == splits and v.program.num_sms == self.num_sms:
            return
        key = (v.kc.batch, splits)
        if key not in self._programs:
            dims = Dims.of(self.cfg, v.kc.batch, splits, self.page_size, self.num_pages)
            program = build_program(dims, self.num_sms, self.strategy, self.seed)
            if self.validate_programs:
                validate(program)
            self._programs[key] = (program, *self._encode(program))
        self._install(v, *self._programs[key])

    def _encode(self, program: Program) -> tuple[torch.Tensor, torch.Tensor]:
        words, lengths = program.encode()
        return words.to(self.device), lengths.to(self.device)

    def _install(self, v: _Variant, program: Program, words: torch.Tensor, lengths: torch.Tensor) -> None:
        v.program, v.words, v.lengths = program, words, lengths
        if self.timeline:
            shape = (program.num_sms, words.shape[1] + 1, STAMPS)  # + the step-boundary row
            v.timeline = torch.zeros(shape, dtype=torch.int64, device=self.device)
        self._write_params(v)
        self._graphs = {key: g for key, g in self._graphs.items() if key[0] != v.kc.batch}

    def _write_params(self, v: _Variant) -> None:
        w, bufs = self.w, v.bufs

        def ptr(t: torch.Tensor | None) -> int:
            return 0 if t is None else t.data_ptr()

        values = {
            "embed": ptr(w.embed), "qkv": ptr(w.qkv), "o": ptr(w.o), "gate_up": ptr(w.gate_up),
            "down": ptr(w.down), "in_norm": ptr(w.input_norm), "post_norm": ptr(w.post_norm),
            "final_norm": ptr(w.final_norm), "lm_head": ptr(w.lm_head), "qkv_bias": ptr(w.qkv_bias),
            "o_bias": ptr(w.o_bias), "gate_up_bias": ptr(w.gate_up_bias), "down_bias": ptr(w.down_bias),
            "q_norm": ptr(w.q_norm), "k_norm": ptr(w.k_norm), "kv": ptr(self.cache.kv), "rope": ptr(self.rope),
            "out_cap": bufs.out_tokens.shape[0], "program": ptr(v.words), "qlen": ptr(v.lengths),
            "maxlen": 0 if v.words is None else v.words.shape[1], "timeline": ptr(v.timeline),
            "diag": self.diag.data_ptr(),
        }  # fmt: skip
        for name in ("resid", "q", "part_o", "part_ml", "attn_out", "act", "logits", "argmax", "counters", "state"):
            values[name] = ptr(getattr(bufs, name))
        for name in ("tokens", "pos", "table", "out_tokens"):
            values[name] = ptr(getattr(bufs, name))
        host = torch.tensor([ctypes.c_int64(values[p]).value for p in PARAMS], dtype=torch.int64)
        v.params.copy_(host.pin_memory(), non_blocking=True)  # pageable would wait for the stream

    def _launch(self, v: _Variant, grid: int | None = None, steps: int = 1) -> None:
        from cuda.core import Device, LaunchConfig, launch

        stream = Device(self.device.index).create_stream(_TorchStream(torch.cuda.current_stream(self.device)))
        config = LaunchConfig(
            grid=grid or self.num_sms, block=v.kc.threads, shmem_size=v.kc.layout["SMEM_BYTES"], is_cooperative=True
        )
        launch(stream, config, v.kernel, np.uint64(v.params.data_ptr()), np.int32(steps))

    def _graph(self, v: _Variant, k: int) -> torch.cuda.CUDAGraph | None:
        key = (v.kc.batch, v.program.dims.splits, k)
        if key not in self._graphs:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self._launch(v, steps=k)
            except Exception as e:  # capture unsupported here: plain launches still work
                self.graph_error = f"{type(e).__name__}: {e}"
                graph = None
            self._graphs[key] = graph
        return self._graphs[key]

    def _check(self, v: _Variant) -> None:
        torch.cuda.synchronize(self.device)
        if int(v.bufs.state[2]):
            self._raise_if_aborted()
            raise MegatierError("megakernel aborted (no diagnostics were recorded)")


def check_device(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
    """Raise MegatierError naming why the megakernel cannot run this model here (None raised: it can)."""
    if device.type != "cuda":
        raise MegatierError(f"megakernel: needs a CUDA device, got {device.type}")
    if dtype != torch.bfloat16:
        raise MegatierError(f"megakernel: needs bfloat16, got {str(dtype).removeprefix('torch.')}")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) != (9, 0):
        raise MegatierError(f"megakernel: needs a Hopper GPU (sm_90), got sm_{major}{minor}")
    check_supported(cfg, 1)


def _load_kernel(cubin: bytes, kc: KernelConfig, device: torch.device):
    from cuda.bindings import driver
    from cuda.core import Device, ObjectCode

    Device(device.index).set_current()
    kernel = ObjectCode.from_cubin(cubin).get_kernel("megakernel")
    attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    (err,) = driver.cuKernelSetAttribute(attr, kc.layout["SMEM_BYTES"], kernel.handle, device.index)
    if err != driver.CUresult.CUDA_SUCCESS:
        raise MegatierError(f"megakernel: cannot reserve {kc.layout['SMEM_BYTES']} B of shared memory ({err})")
    return kernel
