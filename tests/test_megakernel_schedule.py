"""The program builder and the validator: valid schedules pass, each kind of broken one is rejected."""

from __future__ import annotations

import dataclasses

import pytest

from megatier.executors.megakernel.isa import Instr, Op, encode_queues
from megatier.executors.megakernel.layout import Dims
from megatier.executors.megakernel.schedule import STRATEGIES, Program, ScheduleError, build_program, validate

TOY = Dims(
    hidden=64, heads=4, kv_heads=2, head_dim=16, inter=96, vocab=300, layers=2, batch=2, splits=2, page_size=4,
    max_pages=16,
)  # fmt: skip


def _replace(p: Program, index: int, **changes) -> Program:
    """The same program with instruction `index` changed everywhere it appears."""
    new = dataclasses.replace(p.instrs[index], **changes)
    instrs = [new if i.index == index else i for i in p.instrs]
    queues = [[new if i.index == index else i for i in q] for q in p.queues]
    return Program(p.dims, p.num_sms, instrs, queues)


def _first(p: Program, op: Op, layer: int = 0) -> Instr:
    return next(i for i in p.instrs if i.op == op and i.layer == layer)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("num_sms", [1, 3, 132])
def test_built_programs_validate(strategy, num_sms):
    validate(build_program(TOY, num_sms, strategy, seed=num_sms))


def test_llama_1b_shapes_validate_on_132_sms():
    d = dataclasses.replace(TOY, hidden=2048, heads=32, kv_heads=8, head_dim=64, inter=8192, vocab=128256)
    d = dataclasses.replace(d, layers=2, batch=1, splits=1, page_size=16, max_pages=64)
    for strategy in ("round_robin", "balanced"):
        p = build_program(d, 132, strategy)
        validate(p)
        lengths = [len(q) for q in p.queues]
        assert max(lengths) - min(lengths) <= 4  # every phase is spread evenly


def test_encoding_round_trips():
    p = build_program(TOY, 3)
    words, lengths = encode_queues(p.queues)
    assert words.shape[-1] == 16 and lengths.tolist() == [len(q) for q in p.queues]
    for sm, q in enumerate(p.queues):
        assert [Instr.decode(words[sm, k].tolist()) for k in range(len(q))] == q


def test_rejects_wrong_counter_target():
    p = build_program(TOY, 3)
    i = _first(p, Op.GATEUP)
    with pytest.raises(ScheduleError, match="signals add up"):
        validate(_replace(p, i.index, wait=(i.wait[0], i.wait[1] - 1)))


def test_rejects_queue_out_of_global_order():
    p = build_program(TOY, 2, "round_robin")
    queues = [list(q) for q in p.queues]
    queues[0][0], queues[0][1] = queues[0][1], queues[0][0]
    with pytest.raises(ScheduleError, match="global order"):
        validate(Program(p.dims, p.num_sms, p.instrs, queues))


def test_rejects_missing_dependency_as_race():
    """Gate/up waiting for attention instead of the O-projection reads resid while it is rewritten."""
    p = build_program(TOY, 3)
    i = _first(p, Op.GATEUP)
    o = _first(p, Op.OPROJ)
    with pytest.raises(ScheduleError, match="race on resid"):
        validate(_replace(p, i.index, wait=o.wait))


def test_rejects_write_before_all_readers_done():
    """Layer-1 QKV rewrites q; waiting only for the O-projection of layer 0 is enough for RAW on resid
    but not for every reader: here it waits for nothing at all."""
    p = build_program(TOY, 3)
    i = _first(p, Op.QKV, layer=1)
    with pytest.raises(ScheduleError, match="race"):
        validate(_replace(p, i.index, wait=None))


def test_rejects_cycle():
    p = build_program(TOY, 3)
    i = _first(p, Op.QKV, layer=0)
    down = _first(p, Op.DOWN, layer=0)
    with pytest.raises(ScheduleError, match=r"cycle|later in the order"):
        validate(_replace(p, i.index, wait=(down.signal[0], TOY.hidden_tiles)))


def test_rejects_uncovered_and_duplicated_work():
    p = build_program(TOY, 3)
    i = _first(p, Op.DOWN)
    with pytest.raises(ScheduleError, match="exactly once"):
        validate(_replace(p, i.index, args=(i.args[0], i.args[1] - 1) if i.args[1] - i.args[0] > 1 else (0, 2)))


def test_rejects_wrong_arrival_target():
    p = build_program(TOY, 3)
    i = _first(p, Op.ATTN)
    with pytest.raises(ScheduleError):
        validate(_replace(p, i.index, arrive_target=1))


def test_qk_norm_keeps_whole_heads_per_instruction():
    d = dataclasses.replace(TOY, qk_norm=True, head_dim=32)  # two tiles per head
    p = build_program(d, 7, "random", seed=3)
    validate(p)
    i = _first(p, Op.QKV)
    assert i.args[0] % d.head_tiles == 0 and i.args[1] % d.head_tiles == 0
    with pytest.raises(ScheduleError, match="whole heads"):
        validate(_replace(p, i.index, args=(i.args[0], i.args[1] - 1)))


def test_qkv_tiles_hold_whole_rope_pairs():
    for t in range(TOY.qkv_tiles):
        j, dims = TOY.qkv_tile(t)
        if j < TOY.heads + TOY.kv_heads:
            half = TOY.head_dim // 2
            assert sorted(dims) == sorted({x % half for x in dims} | {x % half + half for x in dims})
    assert sorted(TOY.qkv_permutation()) == list(range(TOY.qkv_tiles * 16))
