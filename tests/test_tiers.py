"""The tiered KV cache: exact attention over any split of pages into tiers, bit-exact migrations,
corrupt disk pages caught, budgets kept under random workloads, and identical greedy tokens end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_hf_model
from megatier import LLM, MegatierError, SamplingParams
from megatier.config import ModelConfig
from megatier.executors.base import StepBatch
from megatier.executors.reference import attention
from megatier.kv.attention import TieredAttention
from megatier.kv.cpu_attention import cpu_attention, load_library
from megatier.kv.disk import KVCorruptError
from megatier.kv.locality import plan_migrations
from megatier.kv.tiers import DISK, DRAM, HBM, TieredKV

PAGE = 4


def tiny_cfg(heads: int = 4, kv_heads: int = 2, head_dim: int = 8, layers: int = 2) -> ModelConfig:
    return ModelConfig(
        "llama",
        vocab_size=32,
        hidden_size=heads * head_dim,
        intermediate_size=16,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
    )


def make_tiers(cfg: ModelConfig, pages: tuple[int, int, int], tmp_path, dtype=torch.float32, device="cpu") -> TieredKV:
    page_bytes = cfg.kv_bytes_per_token(dtype) * PAGE
    hbm, dram, disk = (n * page_bytes for n in pages)
    return TieredKV(
        cfg,
        page_size=PAGE,
        dtype=dtype,
        device=torch.device(device),
        hbm_bytes=hbm,
        dram_bytes=dram,
        disk_bytes=disk,
        disk_dir=tmp_path / "kv",
    )


def put(tiers: TieredKV, page: int, tier: int, data: torch.Tensor) -> None:
    """Place `page` in `tier` and write its bytes there."""
    slot = tiers.assign(page, tier)
    if tier == HBM:
        tiers.hbm.kv[slot] = data
    elif tier == DRAM:
        tiers.dram[slot] = data
    else:
        tiers.disk.write(slot, data.contiguous().view(-1).view(torch.uint8).numpy())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_tiered_attention_equals_dense_attention(data, tmp_path_factory):
    """Any split of the pages over 1-3 tiers (tiers may be empty; a sequence may be one token) gives
    dense attention within 1e-5 in fp32; so does sparse mode with a budget of the whole context."""
    tmp_path = tmp_path_factory.mktemp("split")
    cfg = tiny_cfg(heads=data.draw(st.sampled_from([2, 4])), kv_heads=data.draw(st.sampled_from([1, 2])))
    lens = data.draw(st.lists(st.integers(1, 5 * PAGE), min_size=1, max_size=3))
    used_tiers = data.draw(st.sets(st.sampled_from([HBM, DRAM, DISK]), min_size=1))
    num = sum(-(-n // PAGE) for n in lens)
    tiers = make_tiers(cfg, (num + 2, num + 2, num + 2), tmp_path)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    tables, page = [], 0
    for n in lens:
        table = []
        for _ in range(-(-n // PAGE)):
            put(
                tiers,
                page,
                data.draw(st.sampled_from(sorted(used_tiers))),
                torch.randn(tiers.page_shape, generator=gen),
            )
            table.append(page)
            page += 1
        tables.append(table)
    q = torch.randn(len(lens), cfg.num_heads, cfg.head_dim, generator=gen)
    batch = StepBatch([0] * len(lens), [n - 1 for n in lens], [1] * len(lens), tables)
    for mode in ("dense", "sparse"):
        attn = TieredAttention(cfg, tiers, mode=mode, sparse_fraction=1.0)
        if mode == "sparse":  # give the scorer real metadata
            for b, table in enumerate(tables):
                keys = torch.stack([tiers.read_page(p)[:, 0] for p in table])
                rows = torch.full((len(table),), PAGE)
                rows[-1] = lens[b] - (len(table) - 1) * PAGE
                attn.meta.set_from_keys(torch.tensor(table), keys, rows)
        attn.begin_step(batch)
        for layer in range(cfg.num_layers):
            got = attn.decode(layer, q)
            for b, (n, table) in enumerate(zip(lens, tables, strict=True)):
                kv = torch.stack([tiers.read_page(p)[layer] for p in table])  # [pages, 2, Hkv, P, D]
                kv = kv.permute(1, 0, 3, 2, 4).reshape(2, -1, cfg.num_kv_heads, cfg.head_dim)[:, :n]
                want = attention(q[b : b + 1], kv[0], kv[1], n - 1)[0]
                torch.testing.assert_close(got[b], want, atol=1e-5, rtol=1e-5)
        attn.end_step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(8, 2, 64), (9, 3, 64), (18, 1, 24), (16, 2, 128)])
def test_c_kernel_matches_torch(dtype, heads, kv_heads, head_dim):
    """Every GQA group size the kernel specializes (and the generic and chunked ones) in both dtypes; a
    head_dim the machine's vector width does not divide is refused by the C kernel and served by torch."""
    if load_library() is None:
        pytest.skip("no C compiler")
    gen = torch.Generator().manual_seed(0)
    pool = torch.randn(20, 2, kv_heads, 16, head_dim, generator=gen).to(dtype)
    q = torch.randn(3, heads, head_dim, generator=gen)
    offsets = np.array([0, 7, 7, 12])  # the middle sequence reads nothing
    pages = np.random.default_rng(0).permutation(20)[:12].astype(np.int32)
    rows = np.full(12, 16, dtype=np.int32)
    rows[[6, 11]] = [3, 1]
    out_t, lse_t = cpu_attention(q, pool, offsets, pages, rows, 0.125, impl="torch")
    if head_dim % load_library().vector_width():  # e.g. 24 with 16-lane AVX-512: the C kernel declines
        with pytest.raises(MegatierError, match="head_dim % vector_width"):
            cpu_attention(q, pool, offsets, pages, rows, 0.125, impl="c")
        out_c, lse_c = cpu_attention(q, pool, offsets, pages, rows, 0.125, impl="auto", threads=2)
    else:
        out_c, lse_c = cpu_attention(q, pool, offsets, pages, rows, 0.125, impl="c", threads=2)
    torch.testing.assert_close(out_c, out_t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_c, lse_t, atol=1e-5, rtol=1e-5)
    assert torch.all(out_c[1] == 0) and torch.all(lse_c[1] == float("-inf"))


def test_pages_survive_every_migration_path(tmp_path):
    cfg = tiny_cfg()
    tiers = make_tiers(cfg, (6, 6, 6), tmp_path, dtype=torch.bfloat16)
    originals = {p: torch.randn(tiers.page_shape).to(torch.bfloat16) for p in range(4)}
    for p, data in originals.items():
        put(tiers, p, HBM, data)
    for dst in (DRAM, DISK, DRAM, HBM, DRAM, DISK):
        tiers.move(list(originals), dst)
        tiers.wait_all()
        for p, data in originals.items():
            assert tiers.tier[p] == dst
            assert torch.equal(tiers.read_page(p).view(torch.int16), data.view(torch.int16))
    # A page freed while its copy is in flight gives both slots back.
    tiers.move([0], DRAM)
    tiers.release([0])
    tiers.wait_all()
    assert tiers.used(DISK) == 3 and tiers.used(DRAM) == 0
    tiers.close()


def test_corrupt_or_missing_disk_page_is_detected(tmp_path):
    cfg = tiny_cfg()
    tiers = make_tiers(cfg, (4, 4, 4), tmp_path)
    for p in range(2):
        put(tiers, p, DISK, torch.randn(tiers.page_shape))
    path = tiers.disk.path(int(tiers.slot[0]))
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(KVCorruptError, match="corrupt"):
        tiers.read_page(0)
    # Attention over the page fails with the same clear error (never garbage).
    attn = TieredAttention(cfg, tiers, mode="dense")
    attn.begin_step(StepBatch([0], [PAGE * 2 - 1], [1], [[1, 0]]))
    with pytest.raises(KVCorruptError, match=str(path)):
        attn.decode(cfg.num_layers - 1, torch.randn(1, cfg.num_heads, cfg.head_dim))
    # A promotion of a corrupt page fails at commit, leaving the page where it was.
    tiers.move([0], DRAM)
    with pytest.raises(KVCorruptError):
        tiers.wait_all()
    assert tiers.tier[0] == DISK and tiers.used(DRAM) == 0
    tiers.disk.path(int(tiers.slot[1])).unlink()
    with pytest.raises(KVCorruptError, match="missing"):
        tiers.read_page(1)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ops=st.lists(st.tuples(st.sampled_from(["alloc", "free", "shuffle", "migrate"]), st.integers(1, 6)), max_size=30)
)
def test_budgets_respected_under_random_workloads(ops, tmp_path_factory):
    """Whatever happens, no tier holds more pages than its budget, every live page has exactly one
    slot, and its bytes are intact."""
    cfg = tiny_cfg(layers=1)
    tiers = make_tiers(cfg, (5, 4, 6), tmp_path_factory.mktemp("budget"))
    alloc = tiers.allocator
    live: dict[int, torch.Tensor] = {}
    rng = np.random.default_rng(len(ops))
    for op, n in ops:
        if op == "alloc" and alloc.num_free >= n and n < tiers.capacity(HBM):
            pages = alloc.allocate(n)
            tiers.writing = set(pages)
            tiers.place_new(pages)
            tiers.writing = set()
            for p in pages:
                live[p] = torch.randn(tiers.page_shape)
                tiers.hbm.kv[int(tiers.slot[p])] = live[p]
        elif op == "free" and live:
            gone = list(rng.choice(list(live), size=min(n, len(live)), replace=False))
            alloc.free([int(p) for p in gone])
            for p in gone:
                del live[int(p)]
        elif op == "shuffle":
            tiers.priority[:] = rng.random(tiers.num_pages).astype(np.float32) * 10
        else:
            started = plan_migrations(tiers, n * tiers.page_bytes)
            assert started <= n * tiers.page_bytes
        tiers.poll()
        for t in (HBM, DRAM, DISK):
            assert tiers.used(t) <= tiers.capacity(t)
        placed = [(int(tiers.tier[p]), int(tiers.slot[p])) for p in live if p not in tiers.inflight]
        assert len(set(placed)) == len(placed)
        assert all(t >= 0 for t, _ in placed)
    tiers.wait_all()
    for p, data in live.items():
        assert torch.equal(tiers.read_page(p), data)
    assert sum(tiers.used(t) for t in (HBM, DRAM, DISK)) == len(live)
    tiers.close()


def test_migration_brings_important_pages_to_hbm(tmp_path):
    cfg = tiny_cfg(layers=1)
    tiers = make_tiers(cfg, (6, 10, 0), tmp_path)
    for p in range(14):
        put(tiers, p, HBM if p < 5 else DRAM, torch.randn(tiers.page_shape))
    hot = [9, 11, 12, 13]
    tiers.priority[:] = 0.1
    tiers.priority[hot] = 5.0
    for _ in range(6):
        plan_migrations(tiers, 2 * tiers.page_bytes)
        tiers.wait_all()
    assert all(tiers.tier[p] == HBM for p in hot)
    assert tiers.used(HBM) <= tiers.capacity(HBM) - tiers.reserve[HBM] + 1


@pytest.mark.gpu
@pytest.mark.parametrize("mode, misses", [("dense", "gpu"), ("sparse", "gpu"), ("sparse", "cpu")])
def test_tiered_attention_on_cuda_equals_dense_attention(tmp_path, mode, misses):
    """On the GPU machine: HBM pages through the Triton kernel, DRAM pages through the C kernel (dense)
    or zero-copy reads / the C kernel (sparse misses), disk pages staged; the merge equals dense
    attention in fp32."""
    cfg = tiny_cfg(heads=8, kv_heads=2, head_dim=64)
    lens = [37, 5, 64, 17]
    num = sum(-(-n // PAGE) for n in lens)
    tiers = make_tiers(cfg, (num, num, num), tmp_path, device="cuda")
    gen = torch.Generator().manual_seed(0)
    placement = torch.randint(0, 3, (num,), generator=gen).tolist()
    tables, page = [], 0
    for n in lens:
        tables.append(list(range(page, page + -(-n // PAGE))))
        for p in tables[-1]:
            put(tiers, p, [HBM, DRAM, DISK][placement[p]], torch.randn(tiers.page_shape, generator=gen))
        page += len(tables[-1])
    q = torch.randn(len(lens), cfg.num_heads, cfg.head_dim, generator=gen)
    batch = StepBatch([0] * len(lens), [n - 1 for n in lens], [1] * len(lens), tables)
    attn = TieredAttention(cfg, tiers, mode=mode, sparse_fraction=1.0, sparse_misses=misses)
    for b, table in enumerate(tables):
        keys = torch.stack([tiers.read_page(p)[:, 0] for p in table])
        rows = torch.full((len(table),), PAGE)
        rows[-1] = lens[b] - (len(table) - 1) * PAGE
        attn.meta.set_from_keys(torch.tensor(table).cuda(), keys.cuda(), rows.cuda())
    attn.begin_step(batch)
    for layer in range(cfg.num_layers):
        got = attn.decode(layer, q.cuda()).cpu()
        for b, (n, table) in enumerate(zip(lens, tables, strict=True)):
            kv = torch.stack([tiers.read_page(p)[layer] for p in table])
            kv = kv.permute(1, 0, 3, 2, 4).reshape(2, -1, cfg.num_kv_heads, cfg.head_dim)[:, :n]
            want = attention(q[b : b + 1], kv[0], kv[1], n - 1)[0]
            torch.testing.assert_close(got[b], want, atol=1e-4, rtol=1e-4)
    attn.end_step()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path, _ = make_hf_model(tmp_path_factory.mktemp("tiny"), "llama-llama3rope-tied-bias")
    return path


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_greedy_tokens_identical_all_hbm_vs_tiered(tiny_model, tmp_path, device):
    prompts = [list(range(10, 80)), list(range(40, 85))]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    common = dict(device=device, dtype="float32", backend="reference", max_num_batched_tokens=32, max_num_seqs=4)
    want = [o.token_ids for o in LLM(str(tiny_model), **common).generate(prompts, params)]
    page_gib = LLM(str(tiny_model), **common).config.kv_bytes_per_token(torch.float32) * 16 / 2**30
    # 11 pages of context in all: 8 HBM slots and 3 DRAM slots (one of each kept free), so pages spill.
    for mode, budget in (("dense", 0.125), ("sparse", 1.0)):
        llm = LLM(
            str(tiny_model),
            **common,
            kv_hbm=8 * page_gib,
            kv_dram=3 * page_gib,
            kv_disk=8 * page_gib,
            kv_disk_dir=str(tmp_path / mode),
            kv_mode=mode,
            kv_sparse_budget=budget,
        )
        got = [o.token_ids for o in llm.generate(prompts, params)]
        assert got == want, mode
        tiers = llm.engine.executor.tiers
        assert tiers.moved_bytes[DRAM][DISK] > 0, (mode, tiers.moved_bytes)  # it did spill
        assert llm.engine.executor.stats.bytes_read["disk"] > 0


def test_sparse_mode_reads_its_budget(tiny_model):
    llm = LLM(str(tiny_model), device="cpu", max_num_batched_tokens=64, kv_mode="sparse", kv_sparse_budget=0.25)
    llm.generate([[t % 300 for t in range(480)]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    stats = llm.engine.executor.stats
    pages_per_layer_step = stats.selected_pages / stats.steps / llm.config.num_layers
    assert pages_per_layer_step == pytest.approx(0.25 * 31, abs=1)  # 30-31 pages of context


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kv_mode="fast"), "kv_mode"),
        (dict(kv_hbm=1e-3, kv_disk=1.0), "kv_disk needs kv_dram"),
        (dict(kv_hbm=1e-9), "kv_hbm"),
        (dict(kv_hbm=0.01, kv_sparse_budget=0.0), "kv_sparse_budget"),
        (dict(kv_hbm=0.01, backend="graph"), "backend"),
    ],
)
def test_bad_tier_settings_are_refused(tiny_model, kwargs, match):
    with pytest.raises(MegatierError, match=match):
        LLM(str(tiny_model), device="cpu", **kwargs)
