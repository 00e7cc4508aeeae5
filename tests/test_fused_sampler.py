"""The fused sampler (kernels/sample.py, through Sampler(fused=True)), on the GPU where there is one and
under TRITON_INTERPRET=1 elsewhere: greedy
rows are torch.argmax, the kept sets of top-k / top-p / min-p are the host oracle's exactly (ties at the
thresholds included), every draw is the Gumbel-max of a torch re-implementation of its noise, the draws
follow the distribution, and a seed gives the same tokens in any batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from host_sampler import HostRow, _apply_penalties, _filter
from megatier.kernels.sample import S_MAX, S_PLO, Flag, Param, SampleBuffers
from megatier.sampling import Sampler, SampleRow, SamplingParams, _mix32, seed_hash

VOCAB = 3000  # two programs per row (chunks of 2048): partials are combined across programs
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sampler(vocab: int = VOCAB) -> Sampler:
    return Sampler(vocab, DEVICE, fused=True)


def on_device(logits: torch.Tensor) -> torch.Tensor:
    return logits.to(DEVICE)


def random_logits(rows: int, seed: int, vocab: int = VOCAB, ties: bool = True) -> torch.Tensor:
    """Logits in bf16 precision (as LM heads give them), so equal values are common at any threshold."""
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    return logits.bfloat16().float() if ties else logits


def key(y: torch.Tensor) -> torch.Tensor:
    """The kernels' orderable integer key of fp32 values."""
    b = torch.where(y == 0, torch.zeros_like(y), y).view(torch.int32).long()
    return torch.where(b < 0, b ^ 0x7FFFFFFF, b)


def kernel_kept(s: Sampler, rows: int) -> torch.Tensor:
    """The tokens the last call kept per row: at or above its threshold key, and within min_p."""
    b: SampleBuffers = s._buffers
    y, state_f, state_i = b.ys[:rows].cpu(), b.state_f[:rows].cpu(), b.state_i[:rows].cpu()
    min_p = torch.tensor([0.0] * rows)[:, None]
    for i, row in enumerate(b.params[:rows].tolist()):
        if row[Param.FLAGS] & Flag.USE_MIN_P:
            min_p[i] = torch.tensor([row[Param.MIN_P]], dtype=torch.int32).view(torch.float32)
    w = (y - state_f[:, S_MAX.value, None]).exp()
    return (key(y) >= state_i[:, S_PLO.value, None]) & (y > float("-inf")) & (w >= min_p)


def oracle_kept(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    return _filter(logits, params) > float("-inf")


def mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def gumbel(seed: int, position: int, vocab: int) -> torch.Tensor:
    """The draw kernel's noise, in torch: -log(E), E = -log(1 - q), q from a hash of (seed, position, t)."""
    row = _mix32(seed_hash(seed) ^ position)
    h = mix32(mix32(row ^ torch.arange(vocab)) ^ 0x9E3779B9)
    q = (h.float() + 0.5) * 2.3283064365386963e-10
    one_minus_q = ((0xFFFFFFFF - h).float() + 0.5) * 2.3283064365386963e-10
    series = q * (1.0 + q * (0.5 + q * (0.3333333333 + q * (0.25 + q * 0.2))))
    return -torch.where(q < 0.015625, series, -one_minus_q.log()).log()


FILTERS = [
    SamplingParams(temperature=0.7, top_p=0.95),
    SamplingParams(temperature=1.0, top_p=0.3),
    SamplingParams(temperature=0.5, top_p=0.99),
    SamplingParams(temperature=1.3, top_k=7),
    SamplingParams(temperature=1.0, top_k=2999),
    SamplingParams(temperature=0.8, top_k=40, top_p=0.6),
    SamplingParams(temperature=1.0, min_p=0.05),
    SamplingParams(temperature=2.0, top_k=100, top_p=0.9, min_p=0.2),
    SamplingParams(temperature=1.0),
]


@pytest.mark.parametrize("ties", [True, False])
def test_kept_sets_are_the_oracles_and_draws_are_gumbel_max(ties):
    """Every filter's kept set equals the oracle's token for token (bf16-valued logits tie at most
    thresholds), and each row's token is the argmax of y + noise over that set."""
    logits = random_logits(len(FILTERS), 1 if ties else 2, ties=ties)
    s = sampler()
    rows = [SampleRow(i, p, 100 + i, 3, []) for i, p in enumerate(FILTERS)]
    tokens = [t for t, _ in s.sample(on_device(logits), rows).result()]
    kept = kernel_kept(s, len(rows))
    for i, p in enumerate(FILTERS):
        expected = oracle_kept(logits[i], p)
        assert torch.equal(kept[i], expected), (p, int(kept[i].sum()), int(expected.sum()))
        y = logits[i] / p.temperature
        score = torch.where(expected, y + gumbel(100 + i, 3, VOCAB), float("-inf"))
        assert tokens[i] == int(score.argmax()), p


def test_ties_at_the_threshold_stay_or_go_together():
    """top-k keeps every token equal to the k-th largest (exactly k without ties); top-p keeps the token
    that crosses top_p with every token equal to it, and drops the tokens below."""
    logits = torch.full((3, VOCAB), -20.0)
    logits[:, [5, 2500, 700, 1800, 9]] = torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0])  # three-way tie below the top
    params = [
        SamplingParams(top_k=2),  # the 2nd largest is tied: all three stay
        SamplingParams(top_k=1, temperature=1.0, top_p=1.0),  # top_k=1: greedy
        SamplingParams(top_p=0.5),  # the top token holds ~0.5: the tie group crosses or not
    ]
    s = sampler()
    tokens = [
        t for t, _ in s.sample(on_device(logits), [SampleRow(i, p, i, 0, []) for i, p in enumerate(params)]).result()
    ]
    kept = kernel_kept(s, 3)
    assert set(torch.nonzero(kept[0]).flatten().tolist()) == {5, 2500, 700, 1800}
    assert tokens[1] == 5
    assert torch.equal(kept[2], oracle_kept(logits[2], params[2]))
    top = logits[2].softmax(-1)[5]
    assert set(torch.nonzero(kept[2]).flatten().tolist()) == ({5} if top >= 0.5 else {5, 2500, 700, 1800})


def test_greedy_is_bitwise_torch_argmax_with_penalties_bias_and_bans():
    """Greedy rows of a sampled batch, and an all-greedy batch, take torch.argmax of the penalized
    logits (first index among equal maxima) — with the torch path's penalties for the penalized row."""
    logits = random_logits(5, 3)
    logits[0, [10, 2047, 2048, 2999]] = 50.0  # equal maxima across the two programs: the first wins
    p_plain, p_pen = SamplingParams(temperature=0), SamplingParams(temperature=0, repetition_penalty=1.7)
    p_bias = SamplingParams(temperature=0, logit_bias={77: 60.0})
    sampled = SamplingParams(temperature=0.7, top_p=0.9)
    for batch in ([p_plain, p_pen, p_bias, p_plain, p_plain], [p_plain, p_pen, p_bias, sampled, p_plain]):
        s = sampler()
        rows = [SampleRow(i, p, i, 0, [int(logits[1].argmax())]) for i, p in enumerate(batch)]
        rows[4] = SampleRow(4, p_plain, 4, 0, [], banned_ids=(int(logits[4].argmax()),))
        tokens = [t for t, _ in s.sample(on_device(logits), rows).result()]
        host = HostRow(p_pen, None, rows[1].prompt_ids, [])
        assert tokens[0] == 10
        assert tokens[1] == int(_apply_penalties(logits[1].clone(), host).argmax())
        assert tokens[2] == 77
        assert tokens[4] == int(logits[4].topk(2).indices[1])
        if batch[3].greedy:
            assert tokens[3] == int(logits[3].argmax())


def test_draws_follow_the_distribution():
    """Over many seeds each token comes up as often as softmax(y) over the kept set says: a
    chi-square statistic far below what a wrong distribution (e.g. temperature ignored) gives."""
    vocab, n = 8, 600
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -8.0])
    p = SamplingParams(temperature=0.8, min_p=0.1)  # keeps the 4 best
    rows = [SampleRow(seed, p, seed, 5, []) for seed in range(n)]
    tokens = torch.tensor([t for t, _ in sampler(vocab).sample(on_device(logits.expand(n, -1)), rows).result()])
    probs = (logits / 0.8).masked_fill(~oracle_kept(logits, p), float("-inf")).softmax(-1)
    counts = torch.bincount(tokens, minlength=vocab).float()
    assert counts[~oracle_kept(logits, p)].sum() == 0
    kept = probs > 0

    def chi2(q: torch.Tensor) -> float:
        return float(((counts[kept] - n * q[kept]) ** 2 / (n * q[kept])).sum())

    assert kept.sum() == 4
    assert chi2(probs) < 16  # 3 degrees of freedom: p < 0.0012 above 16
    wrong = logits.masked_fill(~kept, float("-inf")).softmax(-1)  # temperature 1 instead of 0.8
    assert chi2(wrong) > 2 * chi2(probs) + 10


def test_gumbel_noise_reference_follows_the_distribution():
    """The noise itself over 20000 seeds (torch re-implementation, which the kernels match exactly):
    argmax(y + noise) is softmax(y)-distributed, rare tokens included."""
    y = torch.tensor([3.0, 1.0, 0.0, -2.0, -4.0])
    n = 20000
    winners = torch.stack([(y + gumbel(seed, 0, 5)).argmax() for seed in range(n)])
    freq = torch.bincount(winners, minlength=5) / n
    assert (freq - y.softmax(-1)).abs().max() < 0.01
    assert freq[4] > 0


MIXED = [
    SamplingParams(temperature=0.7, top_p=0.9),
    SamplingParams(temperature=0),
    SamplingParams(temperature=1.3, top_k=4, min_p=0.05),
    SamplingParams(temperature=0.9, repetition_penalty=1.3, presence_penalty=0.4, logit_bias={5: 3.0}),
    SamplingParams(temperature=1.0, frequency_penalty=0.5, top_p=0.95),
]


def test_seeded_draws_do_not_depend_on_the_batch():
    """A row's tokens are a function of its logits, settings, seed and position (penalty counts
    included): alone, or in any order among others, step after step; and sampled rows do vary."""

    def run(order: list[int]) -> dict[int, list[int]]:
        s, got = sampler(), {i: [] for i in order}
        for position in range(4):
            logits = torch.cat([random_logits(1, 100 * i + position) for i in order])
            rows = [SampleRow(i, MIXED[i], 7 + i, position, [1, 2, 3]) for i in order]
            for i, (token, _) in zip(order, s.sample(on_device(logits), rows).result(), strict=True):
                got[i].append(token)
        return got

    together = run(list(range(len(MIXED))))
    assert run(list(reversed(range(len(MIXED))))) == together
    assert run([3]) == {3: together[3]}
    assert run([4, 0]) == {4: together[4], 0: together[0]}
    assert len(set(together[0])) > 1


def test_logprobs_and_tokens_agree_with_the_torch_path_for_greedy():
    logits = random_logits(2, 9)
    rows = [SampleRow(i, SamplingParams(temperature=0, logprobs=3), i, 0, []) for i in range(2)]
    fused = sampler().sample(on_device(logits), rows).result()
    torch_path = Sampler(VOCAB, torch.device("cpu"), fused=False).sample(logits, rows).result()
    assert [token for token, _ in fused] == [token for token, _ in torch_path]
    for (_, got), (_, want) in zip(fused, torch_path, strict=True):  # the GPU's fp32 log-softmax rounds apart
        assert list(got) == list(want) and np.allclose(list(got.values()), list(want.values()), rtol=0, atol=1e-5)


@pytest.mark.gpu
def test_on_the_gpu_graph_replays_give_the_eager_tokens_and_greedy_is_torch_argmax():
    """Captured (from the second call on) and eager launches agree step after step, penalties counted
    once per draw; greedy rows are torch.argmax at the Llama 3 vocabulary."""
    device, vocab = torch.device("cuda"), 128256
    rows = [*MIXED, *FILTERS[:3]]
    eager, captured = Sampler(vocab, device, capture=False), Sampler(vocab, device)
    for position in range(5):
        logits = random_logits(len(rows), position, vocab).to(device)
        batch = [SampleRow(i, p, i, position, [1, 2, 3]) for i, p in enumerate(rows)]
        assert captured.sample(logits, batch).result() == eager.sample(logits, batch).result()
        greedy = [t for t, _ in captured.sample(logits[:1], [SampleRow(-1, MIXED[1], 0, 0, [])]).result()]
        assert greedy == [int(logits[0].argmax())]
    assert captured.graph_error is None and any(g is not None for g in captured._graphs.values())
    assert torch.equal(captured._counts, eager._counts)
