"""Fused sampling: a step's fp32 logits -> one token per row, in a fixed, short sequence of launches.

Each row is split into programs of CHUNK vocabulary entries (a fixed size, so no row's arithmetic
depends on the batch it is in); every launch runs all of them, and in every launch the last program of
a row to finish (an arrival counter per row) combines the row's partials, so no launch only reduces.

1. prepare: penalties from the device counts, logit_bias and bans (a per-row list), temperature (greedy
   rows: 1, so their values are exactly the penalized logits); scaled logits `y` to scratch; the row's
   max with its first index, sum of exp(y - max) and smallest value. Greedy rows end here: the token
   is the first maximum, as torch.argmax picks it.
2. search passes (top-k, then top-p): each narrows a row's threshold 16-fold on the 32-bit orderable
   key of `y`, from the count (top-k) or probability mass (top-p) at or above 16 candidate keys; eight
   passes pin any 32-bit interval to one key. A row whose stage is off, or already pinned, skips it.
   Thresholds are on values, so ties are kept or dropped together: top-k keeps every token at least
   as large as the k-th largest (k of them without ties), top-p keeps a token when the mass of the
   tokens strictly above it (within the top-k set) is below top_p, so the token that crosses stays.
3. draw: among kept tokens (key >= threshold, and exp(y - max) >= min_p), the largest y + Gumbel noise
   wins (Gumbel-max: exactly softmax(y) over the kept set). The noise of token t is a counter-based
   hash of (seed, output position, t): a sequence's tokens depend only on its logits and seed.

No launch depends on data for its shape or count, and nothing is read back to the host, so the whole
sequence can be captured in a CUDA graph. Without CUDA it runs under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import enum

import torch
import triton
import triton.language as tl

from megatier.kernels.pdl import use_pdl

CHUNK = 2048  # vocabulary entries per program (fewer for a smaller vocabulary: never the batch's choice)
SUB = 256  # entries per inner step of a search pass ([CANDIDATES, SUB] comparisons)
CANDIDATES = 16
SEARCH_PASSES = 8  # 16 candidates cut a key interval 16-fold: 8 passes pin 32 bits


class Param(enum.IntEnum):
    """Columns of a row's parameters (int32; floats as their bits)."""

    FLAGS, TEMPERATURE, TOP_K, TOP_P, MIN_P, REPETITION, PRESENCE, FREQUENCY = range(8)
    SLOT, SEED, POSITION, ENTRY_START, ENTRY_COUNT = range(8, 13)


class Flag(enum.IntFlag):
    GREEDY, PENALTIES, USE_TOP_K, USE_TOP_P, USE_MIN_P = (1 << i for i in range(5))


NUM_PARAMS = tl.constexpr(16)
FLAGS, TEMPERATURE, TOP_K, TOP_P, MIN_P, REPETITION, PRESENCE, FREQUENCY, SLOT, SEED, POSITION = (
    tl.constexpr(int(c)) for c in list(Param)[:11]
)
ENTRY_START, ENTRY_COUNT = tl.constexpr(int(Param.ENTRY_START)), tl.constexpr(int(Param.ENTRY_COUNT))
GREEDY, PENALTIES, USE_TOP_K, USE_TOP_P, USE_MIN_P = (tl.constexpr(int(f)) for f in Flag)

# Per-row state, written by a launch's last program of the row for the launches after it: int64
# columns (argmax token, top-k interval, top-p interval, the key top-p's mass counts from, the max's
# key), fp32 columns (max of y, sum of exp(y - max)).
STATE = tl.constexpr(8)
S_TOKEN, S_KLO, S_KHI, S_PLO, S_PHI, S_BASE, S_KMAX = (tl.constexpr(i) for i in range(7))
S_MAX, S_SUM = tl.constexpr(0), tl.constexpr(1)
PART = tl.constexpr(2 * CANDIDATES)  # partials per (row, program): room for a pass's sums and its base


@triton.jit
def _key(y):
    """fp32 -> int64 that orders as the floats do (-0.0 is taken as +0.0)."""
    y = tl.where(y == 0.0, 0.0, y)
    b = y.to(tl.int32, bitcast=True)
    return (b ^ ((b >> 31) & 0x7FFFFFFF)).to(tl.int64)


@triton.jit
def _mix32(x):
    """Wellons' lowbias32 on uint32 (megatier.sampling._mix32)."""
    x ^= x >> 16
    x *= tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x ^= x >> 15
    x *= tl.full(x.shape, 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _gumbel(row_hash, tokens):
    """Gumbel noise -log(E), E = -log(1 - q), q uniform from a hash of (row_hash, token). E comes from q
    by its series when q is small, so E keeps its resolution near 0 (the noise's upper tail)."""
    h = _mix32(_mix32(row_hash ^ tokens.to(tl.uint32)) ^ tl.full(tokens.shape, 0x9E3779B9, tl.uint32))
    q = (h.to(tl.float32) + 0.5) * 2.3283064365386963e-10  # 2**-32
    one_minus_q = ((tl.full(h.shape, 0xFFFFFFFF, tl.uint32) - h).to(tl.float32) + 0.5) * 2.3283064365386963e-10
    series = q * (1.0 + q * (0.5 + q * (0.3333333333 + q * (0.25 + q * 0.2))))
    return -tl.log(tl.where(q < 0.015625, series, -tl.log(one_minus_q)))


@triton.jit
def _arrive(arrivals_ptr, row, num_parts):
    """True in the last program of `row` to get here, after every program of the row has written its
    partials (it resets the counter for the next launch)."""
    tl.debug_barrier()  # every thread's partials are written before the release below
    last = tl.atomic_add(arrivals_ptr + row, 1, sem="acq_rel") == num_parts - 1
    if last:
        tl.store(arrivals_ptr + row, 0)
    return last


@triton.jit
def _pdl(USE_PDL: tl.constexpr):
    """Under PDL: wait for the kernel before (its writes), then let the next one start launching."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _param_f(prm, column):
    return tl.load(prm + column).to(tl.float32, bitcast=True)


@triton.jit
def _prepare_kernel(
    logits_ptr, stride_logits, params_ptr, counts_ptr, prompt_ptr, stride_counts, entries_ptr,
    ys_ptr, part_f_ptr, part_i_ptr, arrivals_ptr, state_i_ptr, state_f_ptr, tokens_ptr, vocab, num_parts,
    SAMPLE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    _pdl(USE_PDL)
    row = tl.program_id(0)
    part = tl.program_id(1)
    prm = params_ptr + row * NUM_PARAMS
    flags = tl.load(prm + FLAGS)
    offs = part * CHUNK + tl.arange(0, CHUNK)
    inside = offs < vocab
    x = tl.load(logits_ptr + row.to(tl.int64) * stride_logits + offs, mask=inside, other=float("-inf"))
    slot_at = tl.load(prm + SLOT).to(tl.int64) * stride_counts
    counts_row = counts_ptr + slot_at
    if (flags & PENALTIES) != 0:
        counts = tl.load(counts_row + offs, mask=inside, other=0)
        in_prompt = tl.load(prompt_ptr + slot_at + offs, mask=inside, other=0) != 0
        rep = _param_f(prm, REPETITION)
        seen = counts > 0
        x = tl.where(seen | in_prompt, tl.where(x > 0, tl.math.div_rn(x, rep), x * rep), x)
        x = x - (seen.to(tl.float32) * _param_f(prm, PRESENCE) + counts.to(tl.float32) * _param_f(prm, FREQUENCY))
    start = tl.load(prm + ENTRY_START)
    for e in range(tl.load(prm + ENTRY_COUNT)):  # logit_bias (added), then bans (-inf)
        token = tl.load(entries_ptr + 2 * (start + e))
        value = tl.load(entries_ptr + 2 * (start + e) + 1).to(tl.float32, bitcast=True)
        x = tl.where(offs == token, tl.where(value == float("-inf"), value, x + value), x)
    x = tl.where(x != x, float("inf"), x)  # NaN ranks first, as in torch.argmax
    greedy = (flags & GREEDY) != 0
    if greedy or not SAMPLE:
        y = x
    else:
        y = tl.math.div_rn(x, _param_f(prm, TEMPERATURE))
        tl.store(ys_ptr + row.to(tl.int64) * vocab + offs, y, mask=inside)
    y = tl.where(inside, y, float("-inf"))
    local_max = tl.max(y, axis=0)
    first = tl.min(tl.where((y == local_max) & inside, offs, vocab), axis=0)
    total = tl.sum(tl.where(y > float("-inf"), tl.exp(y - local_max), 0.0), axis=0)
    smallest = tl.min(tl.where(inside, _key(y), 0x7FFFFFFF), axis=0)
    part_at = (row * num_parts + part) * PART
    tl.store(part_f_ptr + part_at, local_max)
    tl.store(part_f_ptr + part_at + 1, total)
    tl.store(part_i_ptr + part_at, first.to(tl.int64))
    tl.store(part_i_ptr + part_at + 1, smallest)
    if _arrive(arrivals_ptr, row, num_parts):
        p = tl.arange(0, BLOCK_P)
        at = (row * num_parts + p) * PART
        valid = p < num_parts
        maxes = tl.load(part_f_ptr + at, mask=valid, other=float("-inf"), cache_modifier=".cg")
        sums = tl.load(part_f_ptr + at + 1, mask=valid, other=0.0, cache_modifier=".cg")
        firsts = tl.load(part_i_ptr + at, mask=valid, other=vocab, cache_modifier=".cg")
        smallests = tl.load(part_i_ptr + at + 1, mask=valid, other=0x7FFFFFFF, cache_modifier=".cg")
        row_max = tl.max(maxes, axis=0)
        token = tl.minimum(tl.min(tl.where(maxes == row_max, firsts, vocab), axis=0), vocab - 1)
        state_i = state_i_ptr + row * STATE
        state_f = state_f_ptr + row * STATE
        tl.store(state_i + S_TOKEN, token)
        if greedy or not SAMPLE:
            tl.store(tokens_ptr + row, token)
            if (flags & PENALTIES) != 0:
                tl.store(counts_row + token, tl.load(counts_row + token) + 1)
            lowest = tl.zeros((), dtype=tl.int64)  # empty intervals: the search passes skip the row
            highest = lowest
            flags = 0
        else:
            scale = tl.where(maxes > float("-inf"), tl.exp(maxes - row_max), 0.0)
            tl.store(state_f + S_MAX, row_max)
            tl.store(state_f + S_SUM, tl.sum(sums * scale, axis=0))
            lowest = tl.min(smallests, axis=0)
            highest = _key(row_max)
        tl.store(state_i + S_KLO, lowest)
        tl.store(state_i + S_KHI, tl.where((flags & USE_TOP_K) != 0, highest, lowest))
        tl.store(state_i + S_PLO, lowest)
        tl.store(state_i + S_PHI, tl.where((flags & USE_TOP_P) != 0, highest, lowest))
        tl.store(state_i + S_BASE, lowest)
        tl.store(state_i + S_KMAX, highest)


@triton.jit
def _search_kernel(
    ys_ptr, params_ptr, part_f_ptr, arrivals_ptr, state_i_ptr, state_f_ptr, vocab, num_parts,
    STAGE_P: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr, C: tl.constexpr, BLOCK_P: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    _pdl(USE_PDL)
    row = tl.program_id(0)
    part = tl.program_id(1)
    state_i = state_i_ptr + row * STATE
    lo_at = S_PLO if STAGE_P else S_KLO
    lo = tl.load(state_i + lo_at)
    hi = tl.load(state_i + lo_at + 1)
    if lo < hi:  # the stage is on for this row and its threshold not pinned yet
        step = (hi - lo) // C + 1
        c = tl.arange(0, C)
        candidates = lo + c.to(tl.int64) * step
        base = tl.load(state_i + S_BASE)
        row_max = tl.load(state_f_ptr + row * STATE + S_MAX)
        acc = tl.zeros((C,), dtype=tl.float32)
        acc_base = 0.0
        for s in range(0, CHUNK, SUB):
            offs = part * CHUNK + s + tl.arange(0, SUB)
            inside = offs < vocab
            y = tl.load(ys_ptr + row.to(tl.int64) * vocab + offs, mask=inside, other=float("-inf"))
            key = _key(y)
            above = (key[None, :] >= candidates[:, None]) & inside[None, :]
            if STAGE_P:
                w = tl.where(y > float("-inf"), tl.exp(y - row_max), 0.0)
                acc += tl.sum(tl.where(above, w[None, :], 0.0), axis=1)
                acc_base += tl.sum(tl.where(key >= base, w, 0.0), axis=0)
            else:
                acc += tl.sum(above.to(tl.float32), axis=1)  # exact: at most CHUNK per program
        part_at = (row * num_parts + part) * PART
        tl.store(part_f_ptr + part_at + c, acc)
        tl.store(part_f_ptr + part_at + C, acc_base)
        if _arrive(arrivals_ptr, row, num_parts):
            p = tl.arange(0, BLOCK_P)
            at = (row * num_parts + p) * PART
            valid = p < num_parts
            parts = tl.load(part_f_ptr + at[:, None] + c[None, :], mask=valid[:, None], other=0.0, cache_modifier=".cg")
            prm = params_ptr + row * NUM_PARAMS
            if STAGE_P:
                bases = tl.load(part_f_ptr + at + C, mask=valid, other=0.0, cache_modifier=".cg")
                reached = tl.sum(parts, axis=0) >= _param_f(prm, TOP_P) * tl.sum(bases, axis=0)
            else:  # counts are integers: sum them exactly
                reached = tl.sum(parts.to(tl.int64), axis=0) >= tl.load(prm + TOP_K).to(tl.int64)
            # The largest candidate whose count or mass reaches the target (candidate 0, the interval's
            # low end, always does, up to rounding): the threshold is at least it and below the next.
            best = tl.max(tl.where(reached & (candidates <= hi), c, 0), axis=0)
            new_lo = lo + best.to(tl.int64) * step
            new_hi = tl.minimum(new_lo + step - 1, hi)
            tl.store(state_i + lo_at, new_lo)
            tl.store(state_i + lo_at + 1, new_hi)
            if not STAGE_P:  # once top-k is settled, top-p searches the tokens it keeps
                settled = new_lo == new_hi
                use_top_p = (tl.load(prm + FLAGS) & USE_TOP_P) != 0
                p_hi = tl.where(use_top_p, tl.load(state_i + S_KMAX), new_lo)
                tl.store(state_i + S_PLO, tl.where(settled, new_lo, tl.load(state_i + S_PLO)))
                tl.store(state_i + S_PHI, tl.where(settled, p_hi, tl.load(state_i + S_PHI)))
                tl.store(state_i + S_BASE, tl.where(settled, new_lo, tl.load(state_i + S_BASE)))


@triton.jit
def _draw_kernel(
    ys_ptr, params_ptr, counts_ptr, stride_counts, part_f_ptr, part_i_ptr, arrivals_ptr, state_i_ptr,
    state_f_ptr, tokens_ptr, vocab, num_parts, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    _pdl(USE_PDL)
    row = tl.program_id(0)
    part = tl.program_id(1)
    prm = params_ptr + row * NUM_PARAMS
    flags = tl.load(prm + FLAGS)
    if (flags & GREEDY) == 0:  # greedy rows were settled by the prepare kernel
        state_i = state_i_ptr + row * STATE
        threshold = tl.load(state_i + S_PLO)
        row_max = tl.load(state_f_ptr + row * STATE + S_MAX)
        min_p = tl.where((flags & USE_MIN_P) != 0, _param_f(prm, MIN_P), 0.0)
        seed_hash = tl.load(prm + SEED).to(tl.uint32)
        position = tl.load(prm + POSITION).to(tl.uint32)
        row_hash = _mix32(tl.full((1,), 0, tl.uint32) + (seed_hash ^ position))
        offs = part * CHUNK + tl.arange(0, CHUNK)
        inside = offs < vocab
        y = tl.load(ys_ptr + row.to(tl.int64) * vocab + offs, mask=inside, other=float("-inf"))
        kept = inside & (y > float("-inf")) & (_key(y) >= threshold) & (tl.exp(y - row_max) >= min_p)
        score = tl.where(kept, y + _gumbel(row_hash, offs), float("-inf"))
        best = tl.max(score, axis=0)
        first = tl.min(tl.where((score == best) & kept, offs, vocab), axis=0)
        part_at = (row * num_parts + part) * PART
        tl.store(part_f_ptr + part_at, best)
        tl.store(part_i_ptr + part_at, first.to(tl.int64))
        if _arrive(arrivals_ptr, row, num_parts):
            p = tl.arange(0, BLOCK_P)
            at = (row * num_parts + p) * PART
            valid = p < num_parts
            bests = tl.load(part_f_ptr + at, mask=valid, other=float("-inf"), cache_modifier=".cg")
            firsts = tl.load(part_i_ptr + at, mask=valid, other=vocab, cache_modifier=".cg")
            winner = tl.min(tl.where(bests == tl.max(bests, axis=0), firsts, vocab), axis=0)
            token = tl.where(winner < vocab, winner, tl.load(state_i + S_TOKEN))  # nothing kept: the argmax
            tl.store(tokens_ptr + row, token)
            if (flags & PENALTIES) != 0:
                counted = counts_ptr + tl.load(prm + SLOT).to(tl.int64) * stride_counts + token
                tl.store(counted, tl.load(counted) + 1)


class SampleBuffers:
    """Everything the fused sampler reads and writes for up to `rows` rows of `vocab` logits but the
    penalty tables, reused by every call (fixed addresses, so a CUDA graph can capture the launches).
    `logits` is an input buffer for captured calls (None: the caller passes its own tensor)."""

    def __init__(self, rows: int, vocab: int, entries: int, device: torch.device, logits: bool = False):
        self.rows, self.vocab = rows, vocab
        self.chunk = min(CHUNK, triton.next_power_of_2(vocab))
        self.num_parts = triton.cdiv(vocab, self.chunk)
        self.params = torch.zeros((rows, NUM_PARAMS.value), dtype=torch.int32, device=device)
        self.entries = torch.zeros((entries, 2), dtype=torch.int32, device=device)  # (token, bias bits)
        self.tokens = torch.zeros(rows, dtype=torch.int64, device=device)
        self.logits = torch.zeros((rows, vocab), dtype=torch.float32, device=device) if logits else None
        self.ys = torch.empty((rows, vocab), dtype=torch.float32, device=device)
        self.part_f = torch.empty((rows, self.num_parts, PART.value), dtype=torch.float32, device=device)
        self.part_i = torch.empty((rows, self.num_parts, PART.value), dtype=torch.int64, device=device)
        self.arrivals = torch.zeros(rows, dtype=torch.int32, device=device)
        self.state_i = torch.zeros((rows, STATE.value), dtype=torch.int64, device=device)
        self.state_f = torch.zeros((rows, STATE.value), dtype=torch.float32, device=device)


def fused_sample(
    logits: torch.Tensor,
    buffers: SampleBuffers,
    counts: torch.Tensor,
    in_prompt: torch.Tensor,
    top_k: bool,
    top_p: bool,
    sample: bool = True,
) -> None:
    """Write one token per row of fp32 `logits` [R, vocab] into buffers.tokens[:R] (int64).

    Reads buffers.params[:R] (the Param columns) and buffers.entries [E, 2] (token, bias bits; a bias of
    -inf bans), which rows index by ENTRY_START/ENTRY_COUNT; rows with PENALTIES read their SLOT of the
    penalty tables counts [S, vocab] int32 and in_prompt [S, vocab] bool, and their token is counted.
    `top_k` / `top_p`: run that stage's search passes (some row uses it); `sample` False: every row is
    greedy (one launch)."""
    rows, vocab = logits.shape
    b, parts = buffers, buffers.num_parts
    if logits.dtype != torch.float32 or logits.stride(1) != 1 or rows > b.rows or vocab != b.vocab:
        raise ValueError(f"fused_sample: logits {tuple(logits.shape)} do not fit buffers for {b.rows} rows")
    grid, chunk, sub = (rows, parts), b.chunk, min(SUB, b.chunk)
    block_p = max(16, triton.next_power_of_2(parts))
    pdl = use_pdl(logits.device)
    _prepare_kernel[grid](
        logits, logits.stride(0), b.params, counts, in_prompt, counts.stride(0), b.entries, b.ys, b.part_f,
        b.part_i, b.arrivals, b.state_i, b.state_f, b.tokens, vocab, parts, SAMPLE=sample, CHUNK=chunk,
        BLOCK_P=block_p, USE_PDL=pdl, num_warps=8, launch_pdl=pdl,
    )  # fmt: skip
    if not sample:
        return
    for stage, on in ((False, top_k), (True, top_p)):
        for _ in range(SEARCH_PASSES if on else 0):
            _search_kernel[grid](
                b.ys, b.params, b.part_f, b.arrivals, b.state_i, b.state_f, vocab, parts, STAGE_P=stage,
                CHUNK=chunk, SUB=sub, C=CANDIDATES, BLOCK_P=block_p, USE_PDL=pdl, num_warps=4, launch_pdl=pdl,
            )  # fmt: skip
    _draw_kernel[grid](
        b.ys, b.params, counts, counts.stride(0), b.part_f, b.part_i, b.arrivals, b.state_i, b.state_f,
        b.tokens, vocab, parts, CHUNK=chunk, BLOCK_P=block_p, USE_PDL=pdl, num_warps=8, launch_pdl=pdl,
    )  # fmt: skip
