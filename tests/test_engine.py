"""Engine and LLM behaviour: stopping rules, continuous batching, preemption, aborts, streaming."""

from __future__ import annotations

import pytest
import torch

from conftest import make_hf_model, write_byte_tokenizer
from megatier import LLM, MegatierError, SamplingParams
from megatier.config import ModelConfig, load_config
from megatier.engine import Engine
from megatier.executors.base import StepBatch
from megatier.kv.pages import KVCache

EOS = 3


class ScriptExecutor:
    """Logits that make token script[context_len] the best choice and runner_up[...] the second best."""

    name = "script"
    page_size = 4
    device = torch.device("cpu")
    cfg = ModelConfig(
        "llama",
        vocab_size=16,
        hidden_size=8,
        intermediate_size=8,
        num_layers=1,
        num_heads=1,
        num_kv_heads=1,
        head_dim=8,
    )

    def __init__(self, script: list[int], runner_up: int = 9, num_pages: int = 64):
        self.script, self.runner_up = script, runner_up
        self.num_pages = num_pages
        self.cache = KVCache.allocate(self.cfg, num_pages, self.page_size, torch.float32, self.device)
        self.forward_calls = 0

    def _row(self, context_len: int) -> torch.Tensor:
        row = torch.zeros(self.cfg.vocab_size)
        row[self.runner_up] = 5.0
        row[self.script[context_len % len(self.script)]] = 10.0
        return row

    def forward(self, batch: StepBatch) -> torch.Tensor:
        self.forward_calls += 1
        return torch.stack([self._row(c) for c in batch.context_lens])


def run(engine: Engine, prompt: list[int], params: SamplingParams):
    rid = engine.add_request(prompt, params)
    updates = []
    while engine.has_unfinished():
        updates += [u for u in engine.step() if u.request_id == rid]
    return [t for u in updates for t in u.new_token_ids], updates[-1]


def script_engine(script, max_model_len=64, overlap=True, **kw) -> Engine:
    executor = ScriptExecutor(script, **kw)
    return Engine(executor, None, eos_token_ids=(EOS,), max_model_len=max_model_len, overlap=overlap)


SCRIPT = [0, 0, 5, 6, 7, 8, EOS, 7, 8, 5, 6, 7, 8, 5, 6, 7]  # after a 2-token prompt: 5 6 7 8 EOS ...


def test_eos_stops_and_ignore_eos_runs_to_max_tokens():
    tokens, last = run(script_engine(SCRIPT), [1, 2], SamplingParams(temperature=0, max_tokens=10))
    assert tokens == [5, 6, 7, 8, EOS] and last.finish_reason == "stop"
    tokens, last = run(script_engine(SCRIPT), [1, 2], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert tokens == [5, 6, 7, 8, EOS, 7, 8, 5, 6, 7] and last.finish_reason == "length"


def test_min_tokens_bans_eos_until_reached():
    tokens, _ = run(script_engine(SCRIPT), [1, 2], SamplingParams(temperature=0, max_tokens=10, min_tokens=6))
    assert tokens[4] == 9 and EOS not in tokens[:6]


def test_stop_token_ids():
    tokens, last = run(script_engine(SCRIPT), [1, 2], SamplingParams(temperature=0, stop_token_ids=[7]))
    assert tokens == [5, 6, 7] and (last.finish_reason, last.stop_reason) == ("stop", 7)


def test_max_model_len_ends_with_length():
    tokens, last = run(script_engine(SCRIPT, max_model_len=5), [1, 2], SamplingParams(temperature=0, ignore_eos=True))
    assert len(tokens) == 3 and last.finish_reason == "length"


@pytest.mark.parametrize(
    "prompt, message",
    [([1] * 64, "maximum context length is 64"), ([], "empty"), ([1, 16], "outside the vocabulary")],
)
def test_bad_prompts_are_rejected(prompt, message):
    with pytest.raises(MegatierError, match=message):
        script_engine(SCRIPT).add_request(prompt, SamplingParams())


@pytest.mark.parametrize("overlap", [False, True])
def test_overlapped_steps_give_the_same_tokens_and_drop_the_one_past_eos(overlap):
    """Overlapped, the step after the one that samples EOS is already queued when EOS is seen: it runs,
    and its token is dropped. max_tokens is known ahead, so no step runs past it."""
    engine = script_engine(SCRIPT, overlap=overlap)
    tokens, last = run(engine, [1, 2], SamplingParams(temperature=0, max_tokens=10))
    assert tokens == [5, 6, 7, 8, EOS] and last.finish_reason == "stop"
    assert engine.executor.forward_calls == 5 + overlap
    assert engine.scheduler.num_pages_in_use == 0
    engine = script_engine(SCRIPT, overlap=overlap)
    tokens, last = run(engine, [1, 2], SamplingParams(temperature=0, max_tokens=3))
    assert tokens == [5, 6, 7] and last.finish_reason == "length" and engine.executor.forward_calls == 3


@pytest.mark.parametrize("overlap", [False, True])
def test_request_that_needs_exactly_every_free_page_finishes(overlap):
    """Prompt 2 + 15 outputs: KV for 16 tokens (the last output never enters the cache) = all 4 pages.
    A scheduler that refuses the last free page preempts the request forever instead."""
    executor = ScriptExecutor(SCRIPT, num_pages=4)
    engine = Engine(executor, None, eos_token_ids=(EOS,), max_model_len=64, overlap=overlap)
    engine.add_request([1, 2], SamplingParams(temperature=0, max_tokens=15, ignore_eos=True))
    tokens = []
    for _ in range(100):
        if not engine.has_unfinished():
            break
        tokens += [t for u in engine.step() for t in u.new_token_ids]
    assert not engine.has_unfinished() and len(tokens) == 15
    assert engine.scheduler.num_pages_in_use == 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, _ = make_hf_model(tmp_path_factory.mktemp("qwen2"), "qwen2")
    write_byte_tokenizer(path)
    return path


def test_preemption_keeps_outputs_identical(tiny):
    prompts = [
        torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 30, 17, 5, 22, 13)
    ]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    roomy = LLM(str(tiny), page_size=4, kv_cache_gb=0.01).generate(prompts, params)
    # 24 pages of 4 tokens cannot hold six sequences of up to 54 tokens: the scheduler must preempt.
    page_bytes = 4 * load_config(tiny).kv_bytes_per_token(torch.float32)
    cramped = LLM(
        str(tiny), page_size=4, kv_cache_gb=24 * page_bytes / 2**30, max_model_len=64, max_num_batched_tokens=32
    )
    assert cramped.stats.kv_pages == 24
    outputs = cramped.generate(prompts, params)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in roomy]
    assert cramped.engine.scheduler.num_pages_in_use == 0


def test_abort_frees_pages(tiny):
    llm = LLM(str(tiny), page_size=4, kv_cache_gb=0.01)
    rid = llm.engine.add_request(list(range(40)), SamplingParams(max_tokens=100, ignore_eos=True))
    llm.engine.step()
    assert llm.engine.scheduler.num_pages_in_use == 10
    llm.engine.abort_request(rid)
    assert llm.engine.scheduler.num_pages_in_use == 0 and not llm.engine.has_unfinished()


def test_n_samples_are_seeded_and_distinct(tiny):
    llm = LLM(str(tiny), kv_cache_gb=0.01)
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    first = llm.generate("abc", params)[0]
    again = llm.generate("abc", params)[0]
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in again.outputs]
    assert len({tuple(o.token_ids) for o in first.outputs}) == 3
    # The same seed alone gives the first completion's text, whatever shares the batch.
    alone = llm.generate(
        ["xyz", "abc"],
        [SamplingParams(max_tokens=5), SamplingParams(temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)],
    )
    assert alone[1].token_ids == first.outputs[0].token_ids


def test_stream_equals_batch_text_and_stop_strings_apply(tiny):
    llm = LLM(str(tiny), kv_cache_gb=0.01)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    full = llm.generate("hello", params)[0]
    assert "".join(llm.generate_stream("hello", params)) == full.text
    stop = full.text[10:13]
    cut = llm.generate("hello", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]))[0]
    assert (
        cut.text == full.text[: full.text.index(stop)]
        and cut.finish_reason == "stop"
        and cut.outputs[0].stop_reason == stop
    )


def test_chat_and_logprobs(tiny):
    llm = LLM(str(tiny), kv_cache_gb=0.01)
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=4, logprobs=2))[0]
    assert out.prompt_token_ids == llm.tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    assert len(out.logprobs) == len(out.token_ids) and all(len(lp) >= 2 for lp in out.logprobs)
    batch = llm.chat(
        [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]], SamplingParams(max_tokens=3)
    )
    assert len(batch) == 2


@pytest.mark.parametrize("budget", [256, 7])  # the whole prompt in one step, and in chunks of 7 tokens
def test_prompt_logprobs_equal_a_full_sequence_log_softmax(tmp_path, budget):
    path, model = make_hf_model(tmp_path, "llama-mqa-untied")
    llm = LLM(str(path), max_num_batched_tokens=budget)
    prompts = [torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (40, 1, 23)]
    params = [SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2), SamplingParams(max_tokens=3)]
    outs = llm.generate(prompts, [params[0], params[0], params[1]])
    assert outs[2].prompt_logprobs is None and outs[1].prompt_logprobs.logprobs == [None]
    scored, ids = outs[0].prompt_logprobs, prompts[0]
    assert len(scored) == 40 and scored.logprobs[0] is None and scored.ranks[0] is None
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    got = torch.tensor([scored.logprobs[p][ids[p]] for p in range(1, 40)])
    assert torch.allclose(got, logp[torch.arange(39), torch.tensor(ids[1:])], atol=1e-5)
    for p in range(1, 40):
        top = logp[p - 1].topk(2)
        assert set(top.indices.tolist()) <= set(scored.logprobs[p]) and len(scored.logprobs[p]) <= 3
        assert scored.ranks[p] == int((logp[p - 1] > logp[p - 1, ids[p]]).sum()) + 1
    # The generated tokens are those of a request without prompt logprobs.
    assert outs[0].token_ids == llm.generate(ids, SamplingParams(temperature=0, max_tokens=3))[0].token_ids


def test_prompt_logprobs_survive_preemption(tiny):
    """A sequence preempted mid-prompt is recomputed from the start; it keeps the logprobs it had and
    scores the rest once."""
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (30, 22, 17)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, prompt_logprobs=1)
    roomy = LLM(str(tiny), page_size=4, kv_cache_gb=0.01).generate(prompts, params)
    page_bytes = 4 * load_config(tiny).kv_bytes_per_token(torch.float32)
    cramped = LLM(
        str(tiny), page_size=4, kv_cache_gb=16 * page_bytes / 2**30, max_model_len=64, max_num_batched_tokens=8
    )
    outputs = cramped.generate(prompts, params)
    for ours, theirs in zip(outputs, roomy, strict=True):
        assert ours.token_ids == theirs.token_ids and ours.prompt_logprobs.ranks == theirs.prompt_logprobs.ranks
        for a, b in zip(ours.prompt_logprobs.logprobs[1:], theirs.prompt_logprobs.logprobs[1:], strict=True):
            assert a.keys() == b.keys() and list(a.values()) == pytest.approx(list(b.values()), abs=1e-5)


def test_logit_bias_token_ids_are_checked_against_the_vocabulary():
    engine = script_engine(SCRIPT)
    with pytest.raises(MegatierError, match="logit_bias token id 16 is outside the vocabulary"):
        engine.add_request([1, 2], SamplingParams(logit_bias={16: 1.0}))
    assert not engine.has_unfinished()
    tokens, _ = run(engine, [1, 2], SamplingParams(temperature=0, max_tokens=3, logit_bias={9: 6.0}))
    assert tokens == [9, 9, 9]  # the runner-up (5 below the best) wins with a bias of 6
