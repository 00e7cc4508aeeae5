"""LLM: the public Python API, in the style vLLM users know.

from megatier import LLM, SamplingParams
llm = LLM()                                   # the embedded SmolLM2-135M-Instruct, offline
print(llm.generate("The capital of France is", SamplingParams(temperature=0))[0].text)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from megatier.args import EngineArgs
from megatier.config import ModelConfig, load_config, parse_dtype
from megatier.engine import CompletionOutput, Engine, RequestOutput, SequenceUpdate
from megatier.errors import MegatierError
from megatier.executors import create_executor, resolve_backend
from megatier.executors.base import Executor
from megatier.kv.pages import KVCache
from megatier.kv.store import KVStore
from megatier.kv.tiered import TieredKV
from megatier.loader import (
    LOAD_FORMATS,
    load_generation_defaults,
    load_weights,
    resolve_model,
)
from megatier.parallel import check_tensor_parallel, shard_config
from megatier.quant.schemes import QUANTIZATIONS
from megatier.sampling import SamplingParams
from megatier.tokenizer import Message, Tokenizer
from megatier.weights import ModelWeights

log = logging.getLogger(__name__)

Prompt = str | list[int]


@dataclass
class LoadStats:
    load_seconds: float
    weight_bytes: int  # as the executor holds them (quantized matrices in their blocks): a decode step's floor
    kv_pages: int
    kv_bytes: int


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise MegatierError(f"unknown device {device!r}: expected auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MegatierError(f"device {device!r} requested but no CUDA GPU is available; use device='cpu'")
    return torch.device(device)


def resolve_dtype(dtype: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """auto: float32 on CPU (exact and fast enough there); on GPU the checkpoint's 16-bit type, else bfloat16."""
    if dtype != "auto":
        return parse_dtype(dtype)
    if device.type == "cpu":
        return torch.float32
    return cfg.dtype if cfg.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def default_kv_bytes(device: torch.device, weight_bytes: int) -> int:
    """KV budget: 2 GiB on the host. On a GPU: what is free now, less 10% of the card, the packed
    weights the executor is about to build (plus 10% for an executor's own reordered copies; dummy
    weights already on the GPU are counted as used), and 1 GiB for activations and graphs."""
    if device.type == "cpu":
        return 2 << 30
    free, total = torch.cuda.mem_get_info(device)
    return max(free - total // 10 - int(1.1 * weight_bytes) - (1 << 30), 256 << 20)


class LLM:
    def __init__(self, model: str | Path | None = None, **options):
        """Options are EngineArgs' fields (megatier/args.py), e.g. backend="graph", max_model_len=4096.
        kv_hbm / kv_dram / kv_disk (GiB) turn on the tiered KV cache (kv/tiers.py): pages beyond the
        GPU budget live in pinned host memory, then in files under kv_disk_dir (default: a temporary
        directory). kv_mode "dense" attends to every page (lossless); "sparse" to the sinks, the recent
        window and the best-scored pages, kv_sparse_budget of the context, preferring pages already in HBM
        by kv_sparse_residency_bonus logits."""
        try:
            args = EngineArgs(model, **options)
        except TypeError as e:
            raise MegatierError(f"LLM: {e}") from None
        self._build(args)

    @classmethod
    def from_args(cls, args: EngineArgs) -> LLM:
        llm = cls.__new__(cls)
        llm._build(args)
        return llm

    def _build(self, args: EngineArgs) -> None:
        """resolve -> load -> KV -> engine."""
        t0 = time.perf_counter()
        self.args = args
        self._resolve(args)
        weights = self._load(args)
        # KV budget: room for every matrix in the compute dtype (the megakernel dequantizes quantized ones)
        cache, max_num_seqs, max_num_batched_tokens = self._kv_cache(args, weights.numel() * self.dtype.itemsize)
        executor = self._executor(args, weights, cache)
        self.max_model_len = min(
            args.max_model_len or self.config.max_position_embeddings, cache.num_pages * cache.page_size
        )
        eos = self.generation_defaults.eos_token_ids or self.config.eos_token_ids
        if not eos and self.tokenizer and self.tokenizer.eos_token_id is not None:
            eos = (self.tokenizer.eos_token_id,)
        self.engine = Engine(
            executor,
            self.tokenizer,
            eos_token_ids=tuple(eos),
            max_model_len=self.max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            overlap=args.overlap,
            seed=args.seed,
        )
        self.backend = executor.name
        self.quant_kinds = weights.quant_kinds()
        num_pages = cache.num_pages
        self.stats = LoadStats(
            time.perf_counter() - t0, executor.weight_bytes, num_pages, num_pages * cache.page_bytes()
        )
        log.info(
            "loaded %s on %s (%s, backend %s) in %.2fs",
            self.model_path,
            self.device,
            self.dtype,
            self.backend,
            self.stats.load_seconds,
        )

    def _resolve(self, args: EngineArgs) -> None:
        """Check the options; find the device, the model and its config, the dtype."""
        if args.load_format not in LOAD_FORMATS:
            raise MegatierError(f"unknown load_format {args.load_format!r}: expected one of {', '.join(LOAD_FORMATS)}")
        if args.quantization not in QUANTIZATIONS:
            raise MegatierError(
                f"unknown quantization {args.quantization!r}: expected one of {', '.join(QUANTIZATIONS)}"
            )
        if (
            min(args.page_size, args.max_num_seqs, args.max_num_batched_tokens or 1) < 1
            or args.max_num_batched_tokens == 0
        ):
            raise MegatierError("page_size, max_num_seqs and max_num_batched_tokens must be >= 1")
        self.seed = args.seed
        self.device = resolve_device(args.device)
        resolve_backend(args.backend, self.device)
        self.model_path = resolve_model(args.model)
        self.config = load_config(self.model_path)
        self.dtype = resolve_dtype(args.dtype, self.config, self.device)
        check_tensor_parallel(
            args.tensor_parallel_size, self.config, backend=args.backend, device=self.device, tiered=args.tiered
        )

    def _load(self, args: EngineArgs) -> ModelWeights:
        """Weights, tokenizer and generation defaults."""
        weights = load_weights(
            self.model_path,
            self.config,
            load_format=args.load_format,
            quantization=args.quantization,
            seed=args.seed,
            dtype=self.dtype,
            device=self.device,
        )
        has_tokenizer = self.model_path.is_dir() and (self.model_path / "tokenizer.json").is_file()
        self.tokenizer = Tokenizer(self.model_path) if has_tokenizer else None
        self.generation_defaults = load_generation_defaults(self.model_path, self.config)
        return weights

    def _kv_cache(self, args: EngineArgs, weight_bytes: int) -> tuple[KVStore, int, int]:
        """The KV store, and the batch limits it allows (max_num_seqs, max_num_batched_tokens)."""
        page_size, max_num_seqs = args.page_size, args.max_num_seqs
        # A step's token budget bounds how long running streams wait for a prompt chunk: on a CPU a
        # 2048-token chunk takes seconds, so use a small one there.
        max_num_batched_tokens = args.max_num_batched_tokens or (2048 if self.device.type == "cuda" else 256)
        kv_bytes = (
            int(args.kv_cache_gb * (1 << 30))
            if args.kv_cache_gb is not None
            else default_kv_bytes(self.device, weight_bytes)
        )
        if args.tiered:
            cache = TieredKV(
                self.config,
                page_size=page_size,
                dtype=self.dtype,
                device=self.device,
                hbm_bytes=_gib(args.kv_hbm) if args.kv_hbm is not None else kv_bytes,
                dram_bytes=_gib(args.kv_dram or 0),
                disk_bytes=_gib(args.kv_disk or 0),
                disk_dir=args.kv_disk_dir,
                mode=args.kv_mode,
                sparse_budget=args.kv_sparse_budget,
                residency_bonus=args.kv_sparse_residency_bonus,
            )
            # A step's new KV lands in HBM, every layer of every page it writes: bound what one step writes
            # (a prompt chunk of T tokens touches T / page_size + 1 pages) so any prompt streams through.
            room = cache.writable_pages()
            max_num_seqs = max(1, min(max_num_seqs, room // 2))
            max_num_batched_tokens = max(1, min(max_num_batched_tokens, (room - max_num_seqs) * page_size))
            return cache, max_num_seqs, max_num_batched_tokens
        limit = args.max_model_len or self.config.max_position_embeddings
        kv_config = shard_config(self.config, args.tensor_parallel_size)  # with TP, each rank's KV heads
        token_bytes = kv_config.kv_bytes_per_token(self.dtype)
        num_pages = min(kv_bytes // (token_bytes * page_size), -(-limit // page_size) * max_num_seqs)
        if num_pages < 2:
            raise MegatierError(f"kv_cache_gb={args.kv_cache_gb} holds fewer than 2 pages of {page_size} tokens")
        cache = KVCache.allocate(kv_config, num_pages, page_size, self.dtype, self.device)
        return cache, max_num_seqs, max_num_batched_tokens

    def _executor(self, args: EngineArgs, weights: ModelWeights, cache: KVStore) -> Executor:
        """The backend's executor; with tensor_parallel_size > 1 the reference over that many processes
        (executors/tensor_parallel.py), which `close` stops."""
        self._tensor_parallel = None
        if args.tensor_parallel_size == 1:
            return create_executor(args.backend, self.config, weights, cache)
        from megatier.executors.tensor_parallel import TensorParallelExecutor, WorkerSpec

        spec = WorkerSpec(
            self.model_path,
            self.config,
            args.load_format,
            args.quantization,
            args.seed,
            self.dtype,
            self.device,
            cache.num_pages,
            cache.page_size,
            args.tensor_parallel_size,
        )
        self._tensor_parallel = TensorParallelExecutor(spec, weights, cache)
        return self._tensor_parallel

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (also done at exit); a tensor-parallel LLM is done then."""
        if self._tensor_parallel is not None:
            self._tensor_parallel.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- inputs --------------------------------------------------------------------------------------------

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the model's generation_config.json defaults (temperature, top_p, ...)."""
        return replace(SamplingParams(), **self.generation_defaults.sampling)

    def _tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise MegatierError(f"{self.model_path}: no tokenizer.json, so prompts must be token id lists")
            return self.tokenizer.encode(prompt)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise MegatierError("a prompt must be a string or a list of integer token ids")
        return list(prompt)

    def _chat_ids(self, messages: list[Message]) -> list[int]:
        if self.tokenizer is None:
            raise MegatierError(f"{self.model_path}: chat needs a tokenizer, and this model has none")
        return self.tokenizer.encode_chat(messages)

    # -- generation ----------------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Complete every prompt (strings or token id lists); outputs come back in prompt order."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        batch = [prompts] if single else list(prompts)
        return self._run([(p if isinstance(p, str) else None, self._tokenize(p)) for p in batch], params)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Answer one conversation (a list of {"role", "content"} dicts) or a list of conversations."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        return self._run([(None, self._chat_ids(c)) for c in conversations], params)

    def generate_stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the completion's text as it is produced (n must be 1)."""
        yield from self._stream(self._tokenize(prompt), params)

    def chat_stream(self, messages: list[Message], params: SamplingParams | None = None) -> Iterator[str]:
        yield from self._stream(self._chat_ids(messages), params)

    def _params_list(self, params: SamplingParams | list[SamplingParams] | None, n: int) -> list[SamplingParams]:
        if isinstance(params, list):
            if len(params) != n:
                raise MegatierError(f"{len(params)} SamplingParams for {n} prompts")
            return params
        return [params or self.default_sampling_params()] * n

    def _run(self, prompts: list[tuple[str | None, list[int]]], params) -> list[RequestOutput]:
        plist = self._params_list(params, len(prompts))
        outputs: dict[str, RequestOutput] = {}
        order = []
        try:
            for (text, ids), p in zip(prompts, plist, strict=True):
                rid = self.engine.add_request(ids, p)
                order.append(rid)
                outputs[rid] = RequestOutput(
                    rid,
                    text,
                    ids,
                    [CompletionOutput(i, "", [], logprobs=[] if p.logprobs is not None else None) for i in range(p.n)],
                )
            while any(not o.finished for o in outputs.values()):
                for update in self.engine.step():
                    _merge(outputs[update.request_id], update)
        except BaseException:
            for rid in order:
                self.engine.abort_request(rid)
            raise
        return [outputs[r] for r in order]

    def _stream(self, ids: list[int], params: SamplingParams | None) -> Iterator[str]:
        params = params or self.default_sampling_params()
        if params.n != 1:
            raise MegatierError("streaming supports n=1 only")
        rid = self.engine.add_request(ids, params)
        try:
            finished = False
            while not finished:
                for update in self.engine.step():
                    if update.request_id == rid:
                        finished = update.finished
                        if update.delta_text:
                            yield update.delta_text
        finally:
            self.engine.abort_request(rid)


def _gib(gib: float) -> int:
    return int(gib * (1 << 30))


def _merge(out: RequestOutput, update: SequenceUpdate) -> None:
    c = out.outputs[update.index]
    if update.prompt_logprobs is not None and update.index == 0:
        out.prompt_logprobs = update.prompt_logprobs
    c.text += update.delta_text
    c.token_ids.extend(update.new_token_ids)
    if c.logprobs is not None:
        c.logprobs.extend(update.new_logprobs)
    if update.finished:
        c.finish_reason, c.stop_reason = update.finish_reason, update.stop_reason
        out.finished = all(o.finish_reason is not None for o in out.outputs)
