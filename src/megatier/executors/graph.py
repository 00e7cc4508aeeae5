"""The GPU fast path: packed weights, cuBLAS matmuls, fused Triton kernels, CUDA graphs for decode.

Per layer: fused residual-add + RMSNorm, the stacked qkv matmul, RoPE fused with the KV-page append,
paged attention, the o matmul, residual-add + RMSNorm, the stacked gate|up matmul, SiLU*up, the down
matmul. The residual stream stays in fp32.

A decode batch of at most `gemv_max_batch` rows (measured: only single-row decode wins so far, see
docs/PERF.md) takes the fused GEMV path instead (kernels/gemv.py,
gemv_qkv.py): per layer one kernel for norm + qkv + RoPE + KV append, attention, one for o + residual
add, one for norm + gate|up + SiLU*up, one for down + residual add; then norm + LM head, whose argmax
partials one small kernel reduces and feeds back (argmax.py). Larger decode batches keep cuBLAS.

Quantized matrices (FP8, GGUF Q8_0/Q4_0/Q4_1/Q4_K) stay in their blocks: the fused GEMVs decode them in
registers (and take decode buckets up to `quant_gemv_max_batch`, since at a few rows they stream half or
less of bf16's bytes), other batches multiply through `_linear` (quant_gemm.py).

Batches that are not pure decode (prefill chunks, mixed) run eagerly, split into passes of at most
`max_prefill_tokens` tokens so long prompts need bounded activation memory. A decode batch is padded to
a bucket size (padding rows have length 0: they read no KV and write none) and replayed as a CUDA graph
captured on first use of its (bucket, attention splits). Every per-step input lives in persistent
device buffers filled before the replay (tokens sampled by the step before, still on the device, are
copied in behind it), and positions and KV slots are derived on the device from seq_lens and the block
tables; nothing waits for the device, so the engine queues the next step while this one runs.
`decode_greedy` (kernel tests and benchmarks) replays a graph that also takes the argmax and feeds it
back, so many steps need one host sync. Without CUDA (tests, TRITON_INTERPRET=1) the same code runs
eagerly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton

from megatier.config import ModelConfig, rope_inv_freq
from megatier.errors import MegatierError
from megatier.executors.base import StepBatch, upload
from megatier.kernels import add_rms_norm, paged_decode_attention, paged_prefill_attention, rope_append, silu_mul
from megatier.kernels.argmax import greedy_feedback
from megatier.kernels.embed import embed_rows
from megatier.kernels.gemv import gemv_norm_logits, gemv_norm_silu, gemv_residual_add
from megatier.kernels.gemv_qkv import gemv_qkv_rope
from megatier.kernels.quant_gemm import dequantize_matrix, quant_matmul
from megatier.kernels.rope import rope_cos_sin_table
from megatier.kv.pages import block_table_tensor, pages_for
from megatier.kv.store import KVStore, LayerKV, StepPlan
from megatier.quant.blocks import QuantWeight
from megatier.quant.cpu import embedding
from megatier.weights import Matrix, ModelWeights, at_layer, pack_weights

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# attend(q [T, H, D], layer) -> attention output [T, H, D]
Attend = Callable[[torch.Tensor, int], torch.Tensor]


class GraphExecutor:
    name = "graph"
    max_prefill_tokens = 4096  # tokens per eager pass; longer batches are chunked
    split_tokens = 256  # a decode-attention split covers at least this many KV tokens
    gemv_max_batch = 1  # decode buckets up to this size use the fused GEMV kernels, larger ones cuBLAS
    quant_gemv_max_batch = 16  # gemv_max_batch with quantized weights (not measured yet)
    quant_gemm_max_rows = 64  # quantized matmuls of up to this many rows stream the blocks, longer ones
    # dequantize the matrix and run cuBLAS (compute bound there)

    def __init__(self, cfg: ModelConfig, weights: ModelWeights, *, cache: KVStore):
        self.cfg = cfg
        self.cache = cache
        self.device = cache.device
        self.dtype = cache.dtype
        self.page_size = cache.page_size
        self.num_pages = cache.num_pages
        self.w = pack_weights(weights, self.device, self.dtype)
        self.weight_bytes = self.w.nbytes()
        if weights.is_quantized():
            self.gemv_max_batch = self.quant_gemv_max_batch
        self.max_context = min(cfg.max_position_embeddings, self.num_pages * self.page_size)
        inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim).to(self.device)
        self.cos_sin = rope_cos_sin_table(inv_freq, self.max_context)
        self.scale = cfg.head_dim**-0.5
        self.use_graphs = self.device.type == "cuda"
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count if self.use_graphs else 8

        # Persistent decode inputs: rows [0, bucket) of these feed the captured graphs.
        max_batch = BATCH_BUCKETS[-1]
        self.max_table = pages_for(self.max_context, self.page_size)
        self.tokens = torch.zeros(max_batch, dtype=torch.int32, device=self.device)
        self.seq_lens = torch.zeros(max_batch, dtype=torch.int32, device=self.device)  # 0 marks a padding row
        self.block_tables = torch.zeros((max_batch, self.max_table), dtype=torch.int32, device=self.device)
        self.seq_ids = torch.arange(max_batch, dtype=torch.int32, device=self.device)
        self.history = torch.zeros((0, max_batch), dtype=torch.int64, device=self.device)  # greedy tokens by step
        self.step = torch.zeros(1, dtype=torch.int64, device=self.device)  # next row of `history`
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor | None]] = {}
        self.graph_pool = None

    # ---- the model -------------------------------------------------------------------------------

    def _layers(
        self, tokens: torch.Tensor, positions: torch.Tensor, seq_ids: torch.Tensor, plan: StepPlan, attend: Attend
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run every layer over tokens [T]; returns (last layer's output x, fp32 residual before x)."""
        cfg, w, eps = self.cfg, self.w, self.cfg.rms_norm_eps
        num_tokens = tokens.shape[0]
        residual = torch.empty((num_tokens, cfg.hidden_size), dtype=torch.float32, device=self.device)
        x = embedding(tokens, w.embed, self.dtype)
        for layer in range(cfg.num_layers):
            h = add_rms_norm(x, residual, w.input_norm[layer], eps, add=layer > 0)
            qkv = self._linear(h, w.qkv[layer], at_layer(w.qkv_bias, layer))
            q_norm, k_norm = at_layer(w.q_norm, layer), at_layer(w.k_norm, layer)
            where = self.cache.layer_kv(plan, layer)
            q = rope_append(
                qkv, positions, seq_ids, where.tables, where.pool, where.layer, self.cos_sin, cfg.num_heads,
                q_norm, k_norm, eps,
            )  # fmt: skip
            attn = attend(q, layer).view(num_tokens, cfg.q_size)
            o = self._linear(attn, w.o[layer], at_layer(w.o_bias, layer))
            h = add_rms_norm(o, residual, w.post_norm[layer], eps)
            gate_up = self._linear(h, w.gate_up[layer], at_layer(w.gate_up_bias, layer))
            x = self._linear(silu_mul(gate_up), w.down[layer], at_layer(w.down_bias, layer))
        return x, residual

    def _logits(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Final residual add, norm and LM head, in the compute dtype."""
        h = add_rms_norm(x, residual, self.w.final_norm, self.cfg.rms_norm_eps)
        return self._linear(h, self.w.lm_head, None)

    def _linear(self, x: torch.Tensor, w: Matrix, bias: torch.Tensor | None) -> torch.Tensor:
        """x [T, K] @ w^T + bias in x's dtype: cuBLAS for a plain matrix; a quantized one's blocks decoded in
        registers for up to quant_gemm_max_rows rows, else dequantized (one pass) for cuBLAS."""
        if not isinstance(w, QuantWeight):
            return F.linear(x, w, bias)
        if x.shape[0] <= self.quant_gemm_max_rows:
            out = quant_matmul(x, w)
            return out if bias is None else out + bias
        return F.linear(x, dequantize_matrix(w, x.dtype), bias)

    # ---- prefill and mixed batches (eager) -------------------------------------------------------

    @torch.inference_mode()
    def forward(self, batch: StepBatch) -> torch.Tensor:
        self._check(batch)
        if batch.is_decode() and batch.num_seqs <= BATCH_BUCKETS[-1]:
            return self._decode_logits(batch)
        counts = batch.logit_counts()
        logits = torch.empty((sum(counts), self.cfg.vocab_size), dtype=torch.float32, device=self.device)
        offsets, out_rows = [0], [0]  # where each sequence's tokens start in the batch, its rows in `logits`
        for n, c in zip(batch.query_lens, counts, strict=True):
            offsets.append(offsets[-1] + n)
            out_rows.append(out_rows[-1] + c)
        done = [0] * batch.num_seqs
        tokens = batch.token_tensor(self.device, torch.int32)
        while True:
            # One pass: the next chunk of each unfinished sequence, up to the token budget.
            chunks, budget = [], self.max_prefill_tokens
            for i, n in enumerate(batch.query_lens):
                take = min(n - done[i], budget)
                if take > 0:
                    chunks.append((i, done[i], take))
                    budget -= take
            if not chunks:
                return logits
            rows, dest = self._wanted_rows(batch, chunks, out_rows)
            logits[dest] = self._prefill_pass(batch, tokens, offsets, chunks, rows)
            for i, _, take in chunks:
                done[i] += take

    @staticmethod
    def _wanted_rows(
        batch: StepBatch, chunks: list[tuple[int, int, int]], out_rows: list[int]
    ) -> tuple[list[int], list[int]]:
        """The tokens of a pass whose logits `forward` returns (indices into the pass: every token of a
        sequence in batch.all_logits, else the last of a sequence's last chunk) and their rows in its output."""
        rows, dest, pos = [], [], 0
        for i, first, take in chunks:
            if i in batch.all_logits:
                rows += range(pos, pos + take)
                dest += range(out_rows[i] + first, out_rows[i] + first + take)
            elif first + take == batch.query_lens[i]:
                rows.append(pos + take - 1)
                dest.append(out_rows[i])
            pos += take
        return rows, dest

    def _prefill_pass(
        self,
        batch: StepBatch,
        batch_tokens: torch.Tensor,
        offsets: list[int],
        chunks: list[tuple[int, int, int]],
        rows: list[int],
    ) -> torch.Tensor:
        """Run chunks (sequence, first new token, count) of the batch's tokens (on the device); return fp32
        logits of the pass's tokens `rows`."""
        token_ids, index, positions, seq_ids = [], [], [], []
        for j, (i, first, take) in enumerate(chunks):
            start = batch.starts[i] + first
            token_ids += batch.token_ids[offsets[i] + first : offsets[i] + first + take]
            index += range(offsets[i] + first, offsets[i] + first + take)
            positions += range(start, start + take)
            seq_ids += [j] * take
        ints = upload(torch.tensor([index, positions, seq_ids], dtype=torch.int32), self.device)
        page_tables = [batch.page_tables[i][: self.max_table] for i, _, _ in chunks]
        tables = upload(block_table_tensor(page_tables, torch.device("cpu")), self.device)
        starts = [batch.starts[i] + first for i, first, _ in chunks]
        query_lens = [take for _, _, take in chunks]
        step = StepBatch(token_ids, starts, query_lens, page_tables)
        lens = upload(torch.tensor(step.context_lens, dtype=torch.int32), self.device)
        plan = self.cache.begin_step(step, tables, lens)

        def attend(q: torch.Tensor, layer: int) -> torch.Tensor:
            where = self.cache.context(plan, layer)
            return paged_prefill_attention(q, where.pool, where.layer, where.tables, starts, query_lens, self.scale)

        x, residual = self._layers(batch_tokens[ints[0]], ints[1], ints[2], plan, attend)
        self.cache.end_step(plan)
        wanted = upload(torch.tensor(rows, dtype=torch.long), self.device)
        return self._logits(x[wanted], residual[wanted]).float()

    # ---- decode (CUDA graphs) ----------------------------------------------------------------------

    def _decode_step(self, plan: StepPlan, bucket: int, num_splits: int, greedy: bool = False) -> torch.Tensor | None:
        """One decode step over the persistent buffers' first `bucket` rows: writes KV; returns logits, or
        with `greedy` feeds the argmax back as the next step's input (all on the device) and returns None."""
        seq_lens = self.seq_lens[:bucket]

        def hbm_attention(q: torch.Tensor, where: LayerKV) -> tuple[torch.Tensor, torch.Tensor]:
            return paged_decode_attention(q, where.pool, where.layer, where.tables, where.lens, num_splits, self.scale)

        def attend(q: torch.Tensor, layer: int) -> torch.Tensor:
            return self.cache.attend(plan, layer, q, hbm_attention)

        if bucket <= self.gemv_max_batch:
            residual = self._gemv_layers(plan, bucket, attend)
            logits, parts = gemv_norm_logits(
                residual, self.w.final_norm, self.w.lm_head, self.cfg.rms_norm_eps, logits=not greedy, argmax=greedy
            )
            if greedy:
                greedy_feedback(*parts, self.tokens[:bucket], seq_lens, self.history, self.step, self.cfg.vocab_size)
            return logits
        positions = seq_lens - 1  # padding rows get -1: no KV write
        logits = self._logits(*self._layers(self.tokens[:bucket], positions, self.seq_ids[:bucket], plan, attend))
        if greedy:
            next_tokens = logits.argmax(dim=-1)
            self.tokens[:bucket].copy_(next_tokens)
            self.history[:, :bucket].index_copy_(0, self.step, next_tokens[None])
            self.step.add_(1)
            seq_lens.add_((seq_lens > 0).to(torch.int32))
            return None
        return logits

    def _gemv_layers(self, plan: StepPlan, bucket: int, attend: Attend) -> torch.Tensor:
        """Every layer of a decode step through the fused GEMV kernels; returns the final fp32 residual."""
        cfg, w, eps = self.cfg, self.w, self.cfg.rms_norm_eps
        seq_lens = self.seq_lens[:bucket]
        tokens = self.tokens[:bucket]
        if isinstance(w.embed, QuantWeight):
            residual = embedding(tokens, w.embed, self.dtype).float()
        else:
            residual = embed_rows(tokens, w.embed)
        for layer in range(cfg.num_layers):
            where = self.cache.layer_kv(plan, layer)
            q = gemv_qkv_rope(
                residual, w.input_norm[layer], w.qkv[layer], at_layer(w.qkv_bias, layer), seq_lens, where.tables,
                where.pool, where.layer, self.cos_sin, cfg.num_heads, at_layer(w.q_norm, layer), at_layer(w.k_norm, layer), eps,
            )  # fmt: skip
            gemv_residual_add(
                attend(q, layer).view(bucket, cfg.q_size), w.o[layer], at_layer(w.o_bias, layer), residual
            )
            act = gemv_norm_silu(residual, w.post_norm[layer], w.gate_up[layer], at_layer(w.gate_up_bias, layer), eps)
            gemv_residual_add(act, w.down[layer], at_layer(w.down_bias, layer), residual)
        return residual

    def _decode_logits(self, batch: StepBatch) -> torch.Tensor:
        bucket = self._load_decode_batch(batch)
        splits = self._num_splits(bucket, max(batch.context_lens))
        plan = self.cache.begin_step(batch, self.block_tables[:bucket], self.seq_lens[:bucket])
        key = None if plan.graph_key is None else ("logits", bucket, splits, *plan.graph_key)
        logits = self._run(key, lambda: self._decode_step(plan, bucket, splits))
        self.cache.end_step(plan)
        return logits[: batch.num_seqs].to(torch.float32, copy=True)  # the next replay overwrites `logits`

    @torch.inference_mode()
    def decode_greedy(self, batch: StepBatch, num_steps: int) -> torch.Tensor:
        """Run `num_steps` greedy decode steps on the device: step 0 feeds the batch's tokens, each later
        step feeds the previous argmax. The page tables must have room for num_steps tokens from each
        sequence's start. Returns the chosen tokens [num_steps, B] int64 on the device, without a sync."""
        return self._queue_greedy(batch, num_steps).clone()

    def _queue_greedy(self, batch: StepBatch, num_steps: int) -> torch.Tensor:
        """Queue the greedy steps; return the history rows they fill (overwritten by the next chunk)."""
        if not batch.is_decode() or batch.num_seqs > BATCH_BUCKETS[-1]:
            raise ValueError(f"decode_greedy needs 1..{BATCH_BUCKETS[-1]} sequences of one new token each")
        if num_steps < 1:
            raise MegatierError(f"decode_greedy needs num_steps >= 1, got {num_steps}")
        if self.cache.tiered:
            raise MegatierError("decode_greedy: a tiered KV cache plans every step on the host; use forward()")
        self._check(batch, num_steps)
        bucket = self._load_decode_batch(batch)
        if self.history.shape[0] < num_steps:
            rows = triton.next_power_of_2(num_steps)
            self.history = torch.zeros((rows, BATCH_BUCKETS[-1]), dtype=torch.int64, device=self.device)
            self.graphs = {k: v for k, v in self.graphs.items() if k[0] != "greedy"}  # they wrote the old buffer
        self.step.zero_()
        splits = self._num_splits(bucket, max(batch.context_lens) + num_steps - 1)
        plan = self.cache.begin_step(batch, self.block_tables[:bucket], self.seq_lens[:bucket])
        for _ in range(num_steps):
            self._run(("greedy", bucket, splits), lambda: self._decode_step(plan, bucket, splits, greedy=True))
        return self.history[:num_steps, : batch.num_seqs]

    def _load_decode_batch(self, batch: StepBatch) -> int:
        """Copy a decode batch (fed tokens too) into the persistent buffers; return its bucket (padding rows
        get length 0)."""
        num_seqs = batch.num_seqs
        bucket = next(b for b in BATCH_BUCKETS if b >= num_seqs)
        ints = torch.zeros((2, bucket), dtype=torch.int32)
        ints[0, :num_seqs] = torch.tensor(batch.token_ids, dtype=torch.int32)
        ints[1, :num_seqs] = torch.tensor(batch.context_lens, dtype=torch.int32)
        tables = block_table_tensor([t[: self.max_table] for t in batch.page_tables], torch.device("cpu"))
        self._upload(self.tokens[:bucket], ints[0])
        self._upload(self.seq_lens[:bucket], ints[1])
        self._upload(self.block_tables[:num_seqs, : tables.shape[1]], tables)
        batch.feed_into(self.tokens[:bucket])
        return bucket

    def _upload(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Host -> device copy that never waits for queued work: from pageable memory the driver may
        wait for the stream before it stages the copy, which would stall the host behind a chunk."""
        if self.use_graphs:
            src = src.pin_memory()
        dst.copy_(src, non_blocking=True)

    def _num_splits(self, batch_size: int, max_context: int) -> int:
        """Attention splits per sequence: about 8 programs per SM (each walks its pages with dependent
        loads, so it takes many in flight to cover memory latency), but no split shorter than
        `split_tokens`; a power of two so few graphs are captured. 1 at short contexts (no merge pass)."""
        by_length = triton.cdiv(max_context, self.split_tokens)
        by_occupancy = triton.cdiv(8 * self.num_sms, batch_size * self.cfg.num_kv_heads)
        return triton.next_power_of_2(max(1, min(by_length, by_occupancy)))

    def _run(self, key: tuple | None, step: Callable[[], torch.Tensor | None]):
        """Run `step` eagerly without CUDA (or without a key: a step that cannot be captured); else replay
        its graph, captured on first use."""
        if not self.use_graphs or key is None:
            return step()
        if key not in self.graphs:
            # Warm up outside capture (Triton compiles, cuBLAS plans) with the step itself, then restore
            # the inputs it advanced: it wrote the same KV the captured step will write.
            state = [buf.clone() for buf in (self.tokens, self.seq_lens, self.step)]
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            for buf, saved in zip((self.tokens, self.seq_lens, self.step), state, strict=True):
                buf.copy_(saved)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.graph_pool):
                out = step()
            self.graph_pool = graph.pool()
            self.graphs[key] = (graph, out)
        graph, out = self.graphs[key]
        graph.replay()
        return out

    def _check(self, batch: StepBatch, num_steps: int = 1) -> None:
        """`batch` must fit, run for `num_steps` greedy steps."""
        if min(batch.query_lens, default=1) < 1 or len(batch.token_ids) != sum(batch.query_lens):
            raise ValueError("StepBatch: every sequence needs >= 1 new token and token_ids must hold all of them")
        for i, (context, table) in enumerate(zip(batch.context_lens, batch.page_tables, strict=True)):
            end = context + num_steps - 1
            if end > self.max_context:
                raise ValueError(f"sequence {i}: context {end} exceeds this executor's limit {self.max_context}")
            if len(table) * self.page_size < end:
                raise ValueError(f"sequence {i}: {len(table)} pages cannot hold {end} tokens")
