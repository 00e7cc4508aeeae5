"""The KV stores: the contract both honour, exact attention over any split of slices into tiers, bit-exact
migrations, corrupt disk slices caught, budgets kept under random workloads, per-layer placement and
selection, and identical greedy tokens end to end on the reference and graph executors."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_hf_model
from megatier import LLM, MegatierError, SamplingParams
from megatier.config import ModelConfig
from megatier.engine import Engine
from megatier.executors.base import StepBatch
from megatier.executors.graph import GraphExecutor
from megatier.executors.reference import ReferenceExecutor, attention
from megatier.kv import cpu_attention
from megatier.kv.disk import KVCorruptError
from megatier.kv.host_partial import HostPartial
from megatier.kv.locality import plan_migrations
from megatier.kv.pages import KVCache, block_table_tensor
from megatier.kv.tiered import TieredKV
from megatier.kv.tiers import DISK, DRAM, HBM, TieredPools
from megatier.loader import dummy_weights

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's -inf lse rows

PAGE = 4
CPU = torch.device("cpu")


def tiny_cfg(heads: int = 4, kv_heads: int = 2, head_dim: int = 16, layers: int = 2) -> ModelConfig:
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


def slice_bytes(cfg: ModelConfig, dtype=torch.float32) -> int:
    return cfg.kv_bytes_per_token(dtype) * PAGE // cfg.num_layers


def make_pools(cfg, slices: tuple[int, int, int], tmp_path, dtype=torch.float32, device="cpu") -> TieredPools:
    hbm, dram, disk = (n * slice_bytes(cfg, dtype) for n in slices)
    return TieredPools(
        cfg, page_size=PAGE, dtype=dtype, device=torch.device(device), hbm_bytes=hbm, dram_bytes=dram,
        disk_bytes=disk, disk_dir=tmp_path / "kv",
    )  # fmt: skip


def put(pools: TieredPools, page: int, layer: int, tier: int, data: torch.Tensor) -> None:
    """Place slice (page, layer) in `tier` and write its bytes there."""
    slot = pools.assign(page, layer, tier)
    if tier == HBM:
        pools.hbm.kv[slot] = data.to(pools.device)
    elif tier == DRAM:
        pools.dram[slot] = data
    else:
        pools.disk.write(slot, data.contiguous().view(-1).view(torch.uint8).numpy())


def fill_random(pools: TieredPools, tables: list[list[int]], draw_tier, gen) -> dict:
    """Every slice of the pages in `tables` in a tier `draw_tier()` picks; returns the data by slice."""
    data = {}
    for table in tables:
        for page in table:
            for layer in range(pools.num_layers):
                data[page, layer] = torch.randn(pools.slice_shape, generator=gen).to(pools.dtype)
                put(pools, page, layer, draw_tier(), data[page, layer])
    return data


def dense_reference(q, data, tables, lens, layer, cfg) -> torch.Tensor:
    out = []
    for b, (n, table) in enumerate(zip(lens, tables, strict=True)):
        kv = torch.stack([data[p, layer][0] for p in table]).float()  # [pages, 2, Hkv, P, D]
        kv = kv.permute(1, 0, 3, 2, 4).reshape(2, -1, cfg.num_kv_heads, cfg.head_dim)[:, :n]
        out.append(attention(q[b : b + 1].float(), kv[0], kv[1], n - 1)[0])
    return torch.stack(out)


def store_on(pools: TieredPools, cfg: ModelConfig, **kw) -> TieredKV:
    return TieredKV(cfg, page_size=PAGE, dtype=pools.dtype, device=pools.device, hbm_bytes=0, pools=pools, **kw)


def decode_plan(store, lens: list[int], tables: list[list[int]]):
    batch = StepBatch([0] * len(lens), [n - 1 for n in lens], [1] * len(lens), tables)
    device = store.device
    plan = store.begin_step(
        batch, block_table_tensor(tables, device), torch.tensor(lens, dtype=torch.int32, device=device)
    )
    return plan


def ref_attention(cfg):
    """The reference executor's HbmAttention (no weights needed for attention alone)."""
    ex = ReferenceExecutor.__new__(ReferenceExecutor)
    ex.cfg, ex.page_size = cfg, PAGE
    return ex.hbm_attention


# -- the contract both stores honour -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cache", "tiered"])
def test_store_contract(kind, tmp_path):
    """begin_step places what a step writes; layer_kv addresses it; attend over a decode batch equals dense
    attention; the allocator hands out the store's logical pages and takes them back."""
    cfg = tiny_cfg()
    gen = torch.Generator().manual_seed(0)
    if kind == "cache":
        store = KVCache.allocate(cfg, 12, PAGE, torch.float32, CPU)
    else:
        store = store_on(make_pools(cfg, (24, 24, 0), tmp_path), cfg)
    assert store.tiered is (kind == "tiered") and store.allocator.num_pages == store.num_pages >= 12
    lens = [9, 3]
    tables = [store.allocator.allocate(3), store.allocator.allocate(1)]
    # A prompt step writes every page: layer_kv says where each layer's pages are.
    prompt = StepBatch([0] * sum(lens), [0, 0], lens, tables)
    plan = store.begin_step(prompt, block_table_tensor(tables, CPU), torch.tensor(lens, dtype=torch.int32))
    data = {}
    for layer in range(cfg.num_layers):
        where = store.layer_kv(plan, layer)
        for b, table in enumerate(tables):
            for c, page in enumerate(table):
                data[page, layer] = torch.randn((1, *where.pool.shape[2:]), generator=gen)
                where.pool[int(where.tables[b, c]), where.layer] = data[page, layer][0]
    store.end_step(plan)
    plan = decode_plan(store, lens, tables)
    q = torch.randn(2, cfg.num_heads, cfg.head_dim, generator=gen)
    for layer in range(cfg.num_layers):
        got = store.attend(plan, layer, q, ref_attention(cfg))
        torch.testing.assert_close(got, dense_reference(q, data, tables, lens, layer, cfg), atol=1e-5, rtol=1e-5)
    store.end_step(plan)
    store.allocator.free([p for t in tables for p in t])
    assert store.allocator.num_free == store.num_pages


@pytest.mark.parametrize("caller_works, spin_us", [(True, 2000.0), (False, 0.0)])
def test_host_partial_from_a_foreign_thread_over_steps(caller_works, spin_us):
    """HostPartial's per-layer jobs run by a thread that is not the one that built them (as CUDA's
    callback thread runs them), with the pool spinning between layers or not, over steps whose lists
    change: every layer within fp32 rounding of the torch implementation, padding rows empty, and each
    layer's host time measured."""
    cfg = tiny_cfg(heads=8, kv_heads=2, head_dim=64, layers=3)
    gen, rng = torch.Generator().manual_seed(3), np.random.default_rng(3)
    pool = torch.randn((40, 1, 2, 2, PAGE, 64), generator=gen).bfloat16()
    host = HostPartial(pool, cfg, 0.125, CPU, threads=2)
    assert (host.caller_works, host.spin_us) == (True, 0.0)  # no spinning through CPU-only model work
    host.caller_works, host.spin_us = caller_works, spin_us
    errors: list[BaseException] = []
    for _ in range(3):
        lists = []
        for _ in range(cfg.num_layers):
            counts = rng.integers(0, 9, 3)
            offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
            lists.append((offsets, rng.permutation(40)[: offsets[-1]].astype(np.int32)))
        host.set_lists(lists, 4)  # 3 sequences in a bucket of 4 rows
        q = torch.randn((4, cfg.num_heads, 64), generator=gen)

        def step(lists=lists, q=q) -> None:
            try:
                for layer, (offsets, slots) in enumerate(lists):
                    handle = host.start(layer, q)
                    if handle is None:
                        assert offsets[-1] == 0
                        continue
                    out, lse = host.finish(handle)
                    rows = np.full(len(slots), PAGE, dtype=np.int32)
                    want = cpu_attention.cpu_attention(q[:3], pool[:, 0], offsets, slots, rows, 0.125, impl="torch")
                    torch.testing.assert_close(out[:3], want[0], rtol=1e-5, atol=1e-5)
                    torch.testing.assert_close(lse[:3], want[1], rtol=0, atol=1e-5)
                    assert torch.all(out[3] == 0) and torch.all(lse[3] == float("-inf"))
            except BaseException as err:  # re-raised on the test's thread
                errors.append(err)

        worker = threading.Thread(target=step)
        worker.start()
        worker.join()
        assert not errors, errors[0]
        for (seconds, wake), (offsets, _) in zip(host.layer_times(), lists, strict=True):
            assert (seconds > 0) == (offsets[-1] > 0) and 0 <= wake <= seconds


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_tiered_attention_equals_dense_attention(data, tmp_path_factory):
    """Any split of the slices over 1-3 tiers, chosen per (page, layer) (a tier may be empty; a sequence
    may be one token), gives dense attention within 1e-5 in fp32, in dense mode with any PCIe share and
    in sparse mode (every way of reading misses) with a budget of the whole context. The host partial
    runs the C kernel (head_dim 16 and 24: no torch fallback)."""
    tmp_path = tmp_path_factory.mktemp("split")
    cfg = tiny_cfg(
        heads=data.draw(st.sampled_from([2, 4])),
        kv_heads=data.draw(st.sampled_from([1, 2])),
        head_dim=data.draw(st.sampled_from([16, 24])),
    )
    lens = data.draw(st.lists(st.integers(1, 5 * PAGE), min_size=1, max_size=3))
    used = sorted(data.draw(st.sets(st.sampled_from([HBM, DRAM, DISK]), min_size=1)))
    num = sum(-(-n // PAGE) for n in lens) * cfg.num_layers + 2 * cfg.num_layers
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    tables, page = [], 0
    for n in lens:
        tables.append(list(range(page, page + -(-n // PAGE))))
        page += len(tables[-1])
    q = torch.randn(len(lens), cfg.num_heads, cfg.head_dim, generator=gen)
    variants = [dict(mode="dense", pcie_share=data.draw(st.sampled_from([0.0, 0.5, 1.0])))]
    variants += [dict(mode="sparse", sparse_budget=1.0, sparse_misses=m) for m in ("gpu", "fetch", "cpu")]
    for kw in variants:
        pools = make_pools(cfg, (num, num, num), tmp_path / kw["mode"] / kw.get("sparse_misses", "-"))
        kv = fill_random(pools, tables, lambda: data.draw(st.sampled_from(used)), gen)
        store = store_on(pools, cfg, **kw)
        for p in range(page):  # the scorer's metadata, from the keys
            keys = torch.stack([kv[p, layer][0, 0] for layer in range(cfg.num_layers)])
            store.meta.set_from_keys(torch.tensor([p]), keys[None], torch.tensor([PAGE]))
        # A decode step at each sequence's last position: that page comes up to HBM (bytes unchanged).
        plan = decode_plan(store, lens, tables)
        calls = cpu_attention.CALLS["torch"]
        for layer in range(cfg.num_layers):
            got = store.attend(plan, layer, q, ref_attention(cfg))
            want = dense_reference(q, kv, tables, lens, layer, cfg)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert cpu_attention.CALLS["torch"] == calls  # the host partials ran the C kernel
        store.end_step(plan)
        pools.close()


def test_slices_survive_every_migration_path(tmp_path):
    cfg = tiny_cfg()
    pools = make_pools(cfg, (12, 12, 12), tmp_path, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    originals = fill_random(pools, [[0, 1, 2]], lambda: HBM, gen)
    flat = np.array([p * cfg.num_layers + layer for p, layer in originals])
    for dst in (DRAM, DISK, DRAM, HBM, DRAM, DISK):
        pools.move(flat, dst)
        pools.wait_all()
        for (p, layer), data in originals.items():
            assert pools.tier[p, layer] == dst
            assert torch.equal(pools.gather(np.array([p]), layer)[0].view(torch.int16), data.view(torch.int16))
    # One layer of a page moves alone (per-slice placement), and a page freed mid-copy frees both ends.
    pools.move(np.array([0 * cfg.num_layers + 1]), DRAM)
    pools.wait_all()
    assert pools.tier[0].tolist() == [DISK, DRAM]
    pools.move(np.array([1 * cfg.num_layers]), DRAM)
    pools.release([1])
    pools.wait_all()
    assert pools.used(DISK) == 3 and pools.used(DRAM) == 1
    pools.close()


def test_corrupt_or_missing_disk_slice_is_detected(tmp_path):
    cfg = tiny_cfg(layers=1)
    pools = make_pools(cfg, (4, 4, 4), tmp_path)
    for p in range(2):
        put(pools, p, 0, DISK, torch.randn(pools.slice_shape))
    put(pools, 2, 0, HBM, torch.randn(pools.slice_shape))
    path = pools.disk.path(int(pools.slot[0, 0]))
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(KVCorruptError, match="corrupt"):
        pools.read_page(0)
    # Attention over the slice fails with the same clear error (never garbage).
    store = store_on(pools, cfg)
    plan = decode_plan(store, [2 * PAGE + 1], [[1, 0, 2]])
    with pytest.raises(KVCorruptError, match=str(path)):
        store.attend(plan, 0, torch.randn(1, cfg.num_heads, cfg.head_dim), ref_attention(cfg))
    # A promotion of a corrupt slice fails at commit, leaving it where it was.
    pools.move(np.array([0]), DRAM)
    with pytest.raises(KVCorruptError):
        pools.wait_all()
    assert pools.tier[0, 0] == DISK and pools.used(DRAM) == 0
    pools.disk.path(int(pools.slot[1, 0])).unlink()
    with pytest.raises(KVCorruptError, match="missing"):
        pools.read_page(1)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ops=st.lists(st.tuples(st.sampled_from(["alloc", "free", "shuffle", "migrate"]), st.integers(1, 6)), max_size=30)
)
def test_budgets_respected_under_random_workloads(ops, tmp_path_factory):
    """Whatever happens, no tier holds more slices than its budget, every live slice has exactly one
    slot, and its bytes are intact; priorities differ by layer, so layers of one page split up."""
    cfg = tiny_cfg(layers=2)
    pools = make_pools(cfg, (10, 8, 12), tmp_path_factory.mktemp("budget"))
    store = store_on(pools, cfg)
    alloc, layers = store.allocator, cfg.num_layers
    live: dict[tuple[int, int], torch.Tensor] = {}
    rng = np.random.default_rng(len(ops))
    for op, n in ops:
        if op == "alloc" and alloc.num_free >= n and n * layers < pools.capacity(HBM):
            pages = alloc.allocate(n)
            pools.place_for_writing(pages)
            pools.writing[:] = False
            for p in pages:
                for layer in range(layers):
                    live[p, layer] = torch.randn(pools.slice_shape)
                    pools.hbm.kv[int(pools.slot[p, layer])] = live[p, layer]
        elif op == "free" and live:
            pages = sorted({p for p, _ in live})
            gone = [int(p) for p in rng.choice(pages, size=min(n, len(pages)), replace=False)]
            alloc.free(gone)
            live = {k: v for k, v in live.items() if k[0] not in gone}
        elif op == "shuffle":
            pools.priority[:] = rng.random(pools.priority.shape).astype(np.float32) * 10
        else:
            started = plan_migrations(pools, n * pools.slice_bytes)
            assert started <= n * pools.slice_bytes
        pools.poll()
        for t in (HBM, DRAM, DISK):
            assert pools.used(t) <= pools.capacity(t)
        placed = [
            (int(pools.tier[p, layer]), int(pools.slot[p, layer]))
            for p, layer in live
            if not pools.moving[p * layers + layer]
        ]
        assert len(set(placed)) == len(placed) and all(t >= 0 for t, _ in placed)
    pools.wait_all()
    for (p, layer), data in live.items():
        assert torch.equal(pools.gather(np.array([p]), layer)[0], data)
    assert sum(pools.used(t) for t in (HBM, DRAM, DISK)) == len(live)
    pools.close()


def test_migration_brings_each_layers_important_slices_to_hbm(tmp_path):
    """Hot pages differ by layer: after migration every layer's hot slices are in HBM, while HBM holds
    fewer slices than the union of hot pages times the layers would need."""
    cfg = tiny_cfg(layers=2)
    pools = make_pools(cfg, (12, 24, 0), tmp_path)
    for p in range(14):
        for layer in range(2):
            put(pools, p, layer, HBM if p < 5 else DRAM, torch.randn(pools.slice_shape))
    hot = {0: [9, 11, 12, 13], 1: [6, 7, 8, 10]}
    pools.priority[:] = 0.1
    for layer, pages in hot.items():
        pools.priority[pages, layer] = 5.0
    for _ in range(8):
        plan_migrations(pools, 2 * pools.slice_bytes)
        pools.wait_all()
    for layer, pages in hot.items():
        assert (pools.tier[pages, layer] == HBM).all(), layer
    assert pools.used(HBM) <= pools.capacity(HBM)
    pools.close()


def test_a_migration_budget_beyond_the_reserve_is_spent_in_one_step(tmp_path):
    """HBM full of cold slices, hot ones in DRAM: one plan with room for every swap brings them all up,
    although HBM keeps one page of free slots (a move holds a free slot until the next step, so only
    in-place swaps get past that), and every slice's bytes survive the swap."""
    cfg = tiny_cfg(layers=2)
    pools = make_pools(cfg, (20, 40, 0), tmp_path)
    assert pools.reserve[HBM] == 2
    gen = torch.Generator().manual_seed(3)
    hbm_pages, dram_pages = list(range(9)), list(range(9, 25))
    data = fill_random(pools, [hbm_pages], lambda: HBM, gen)
    data |= fill_random(pools, [dram_pages], lambda: DRAM, gen)
    hot = dram_pages[:8]
    pools.priority[:] = 0.1
    pools.priority[hot] = 5.0
    started = plan_migrations(pools, 32 * pools.slice_bytes)
    pools.wait_all()
    assert (pools.tier[hot] == HBM).all()
    assert started == 32 * pools.slice_bytes and pools.moved_bytes[DRAM, HBM] == 16 * pools.slice_bytes
    assert pools.used(HBM) == 18 and len(pools.slots[HBM]) == pools.reserve[HBM]
    for (p, layer), original in data.items():
        assert torch.equal(pools.gather(np.array([p]), layer)[0], original), (p, layer)
    with pytest.raises(ValueError, match="HBM slices with DRAM"):
        pools.swap([hot[0] * cfg.num_layers], [hot[1] * cfg.num_layers])  # both in HBM now
    pools.close()


def test_a_plan_exchanges_the_ends_of_the_priority_order_and_stops_at_the_margin(tmp_path):
    """HBM full: one plan swaps the most important DRAM slices for the least important HBM ones, pair by
    pair in priority order, and stops at the first pair whose gain is under HYSTERESIS (or the budget)."""
    cfg = tiny_cfg(layers=2)
    pools = make_pools(cfg, (20, 60, 0), tmp_path)
    gen = torch.Generator().manual_seed(5)
    fill_random(pools, [list(range(9))], lambda: HBM, gen)
    fill_random(pools, [list(range(9, 34))], lambda: DRAM, gen)
    flat_prio = pools.priority.reshape(-1)
    rng = np.random.default_rng(5)
    in_hbm, in_dram = np.flatnonzero(pools.tier.reshape(-1) == HBM), np.flatnonzero(pools.tier.reshape(-1) == DRAM)
    flat_prio[in_hbm] = 1.0 + rng.permutation(len(in_hbm))  # 1 .. 18, distinct
    flat_prio[in_dram] = 0.0
    flat_prio[in_dram[:6]] = [40.0, 30.0, 8.0, 6.0, 5.5, 0.5]  # pairs with HBM 1, 2, 3, 4 pass; 5.5 vs 5 fails
    coldest = in_hbm[np.argsort(flat_prio[in_hbm])][:4]
    started = plan_migrations(pools, 100 * pools.slice_bytes)
    pools.wait_all()
    tier = pools.tier.reshape(-1)
    assert started == 8 * pools.slice_bytes
    assert (tier[in_dram[:4]] == HBM).all() and (tier[in_dram[4:]] == DRAM).all()
    assert (tier[coldest] == DRAM).all() and (tier[np.setdiff1d(in_hbm, coldest)] == HBM).all()
    flat_prio[:] = np.where(tier == HBM, 1.0, 9.0)  # every DRAM slice now beats every HBM one
    assert plan_migrations(pools, 6 * pools.slice_bytes) == 6 * pools.slice_bytes  # the budget stops it
    pools.close()


def test_sparse_selection_picks_the_pages_that_matter(tmp_path):
    """A context with three high-attention pages among twenty: a budget of sinks + recent window + three
    must read exactly them (a selector that took the lowest-scored pages would miss them all), and the
    result equals attention over those pages alone."""
    cfg = tiny_cfg(heads=4, kv_heads=1, head_dim=16, layers=1)
    pools = make_pools(cfg, (64, 64, 0), tmp_path)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, cfg.num_heads, cfg.head_dim, generator=gen)
    n_pages, hot = 20, [5, 11, 14]
    kv = {}
    for p in range(n_pages):
        kv[p, 0] = torch.randn(pools.slice_shape, generator=gen) * 0.1
        if p in hot:  # keys along q's mean direction: large scores for every head
            kv[p, 0][0, 0] += 3 * q[0].mean(0)
        put(pools, p, 0, HBM if p % 2 else DRAM, kv[p, 0])
    store = store_on(pools, cfg, mode="sparse", sink_pages=1, recent_tokens=PAGE, migrate=False)
    store.sparse_budget = (1 + 2 + len(hot)) / n_pages  # sink, recent window (2 pages), the hot ones
    for p in range(n_pages):
        store.meta.set_from_keys(torch.tensor([p]), kv[p, 0][:, 0][None], torch.tensor([PAGE]))
    lens = [n_pages * PAGE]
    plan = decode_plan(store, lens, [list(range(n_pages))])
    got = store.attend(plan, 0, q, ref_attention(cfg))
    read = [0, *hot, 18, 19]
    want = dense_reference(
        q, {(i, 0): kv[p, 0] for i, p in enumerate(read)}, [list(range(len(read)))], [len(read) * PAGE], 0, cfg
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert store._counts[1] == len(read)
    pools.close()


@pytest.mark.parametrize("bonus_over_gap, reads_resident", [(0.0, False), (0.5, False), (2.0, True)])
def test_the_residency_bonus_keeps_a_resident_page_only_within_its_margin(tmp_path, bonus_over_gap, reads_resident):
    """One free slot in the budget, two contenders: page 2 in DRAM scores `gap` above page 4 in HBM (the
    other candidates score lower, in DRAM). Selection reads page 2 unless the bonus exceeds the gap."""
    cfg = tiny_cfg(heads=4, kv_heads=1, head_dim=16, layers=1)
    pools = make_pools(cfg, (64, 64, 0), tmp_path)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, cfg.num_heads, cfg.head_dim, generator=gen)
    n_pages, dram_hot, hbm_warm = 8, 2, 4
    kv = {}
    for p in range(n_pages):
        kv[p, 0] = torch.randn(pools.slice_shape, generator=gen) * 0.1
        kv[p, 0][0, 0] += {dram_hot: 3.0, hbm_warm: 2.0}.get(p, 0.0) * q[0].mean(0)
        put(pools, p, 0, HBM if p in (0, hbm_warm, 6, 7) else DRAM, kv[p, 0])
    store = store_on(pools, cfg, mode="sparse", sink_pages=1, recent_tokens=PAGE, migrate=False)
    store.sparse_budget = 4 / n_pages  # the sink, the recent window (2 pages) and one more
    for p in range(n_pages):
        store.meta.set_from_keys(torch.tensor([p]), kv[p, 0][:, 0][None], torch.tensor([PAGE]))
    tables = torch.arange(n_pages)[None]
    scores = store.meta.score(0, q, tables, torch.tensor([n_pages]), store.scale)[0]
    gap = float(scores[dram_hot] - scores[hbm_warm])
    assert gap > 0 and scores[hbm_warm] > scores[[1, 3, 5]].max()  # the setup is what the docstring says
    store.residency_bonus = bonus_over_gap * gap
    plan = decode_plan(store, [n_pages * PAGE], [list(range(n_pages))])
    got = store.attend(plan, 0, q, ref_attention(cfg))
    read = [0, hbm_warm if reads_resident else dram_hot, 6, 7]
    want = dense_reference(
        q, {(i, 0): kv[p, 0] for i, p in enumerate(read)}, [list(range(len(read)))], [len(read) * PAGE], 0, cfg
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    pools.close()


# -- end to end -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path, _ = make_hf_model(tmp_path_factory.mktemp("tiny"), "llama-llama3rope-tied-bias")
    return path


PROMPTS = [list(range(10, 80)), list(range(40, 85))]


def test_greedy_tokens_identical_all_hbm_vs_tiered_reference(tiny_model, tmp_path):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    common = dict(device="cpu", dtype="float32", backend="reference", max_num_batched_tokens=32, max_num_seqs=4)
    want = [o.token_ids for o in LLM(str(tiny_model), **common).generate(PROMPTS, params)]
    page_gib = LLM(str(tiny_model), **common).config.kv_bytes_per_token(torch.float32) * 16 / 2**30
    # 11 pages of context in all: 8 pages of HBM and 3 of DRAM (less reserves), so slices spill to disk.
    for mode, budget in (("dense", 0.125), ("sparse", 1.0)):
        llm = LLM(
            str(tiny_model), **common, kv_hbm=8 * page_gib, kv_dram=3 * page_gib, kv_disk=8 * page_gib,
            kv_disk_dir=str(tmp_path / mode), kv_mode=mode, kv_sparse_budget=budget,
        )  # fmt: skip
        got = [o.token_ids for o in llm.generate(PROMPTS, params)]
        assert got == want, mode
        store = llm.engine.executor.cache
        assert store.pools.moved_bytes[DRAM][DISK] > 0, (mode, store.pools.moved_bytes)  # it did spill
        assert store.stats.bytes_read["disk"] > 0 or mode == "sparse"


@pytest.mark.parametrize("kw", [dict(mode="dense", pcie_share=0.5), dict(mode="sparse", sparse_budget=1.0)])
def test_greedy_tokens_identical_all_hbm_vs_tiered_graph(tiny_model, kw):
    """The graph executor over a tiered store: eager on the CPU (Triton interpreted), captured on a GPU."""
    from megatier.config import load_config
    from megatier.loader import load_safetensors_weights

    cfg = load_config(tiny_model)
    weights = load_safetensors_weights(tiny_model, cfg)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)

    def run(store) -> list[list[int]]:
        engine = Engine(GraphExecutor(cfg, weights, cache=store), None, eos_token_ids=(), max_model_len=256)
        ids = [engine.add_request(p, params) for p in PROMPTS]
        out = {i: [] for i in ids}
        while engine.has_unfinished():
            for u in engine.step():
                out[u.request_id] += u.new_token_ids
        return [out[i] for i in ids]

    page_bytes = cfg.kv_bytes_per_token(torch.float32) * 16
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # compiled Triton needs CUDA tensors
    want = run(KVCache.allocate(cfg, 16, 16, torch.float32, device))
    store = TieredKV(
        cfg, page_size=16, dtype=torch.float32, device=device, hbm_bytes=8 * page_bytes, dram_bytes=4 * page_bytes, **kw
    )
    assert run(store) == want
    assert store.stats.bytes_read["dram"] + store.stats.bytes_read["pcie"] > 0  # DRAM slices were read


def test_sparse_mode_reads_its_budget(tiny_model):
    llm = LLM(str(tiny_model), device="cpu", max_num_batched_tokens=64, kv_mode="sparse", kv_sparse_budget=0.25)
    llm.generate([[t % 300 for t in range(480)]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    stats = llm.engine.executor.cache.stats
    pages_per_layer_step = stats.selected_slices / stats.steps / llm.config.num_layers
    assert pages_per_layer_step == pytest.approx(0.25 * 31, abs=1)  # 30-31 pages of context


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kv_mode="fast"), "kv_mode"),
        (dict(kv_hbm=1e-3, kv_disk=1.0), "kv_disk needs kv_dram"),
        (dict(kv_hbm=1e-9), "kv_hbm"),
        (dict(kv_hbm=0.01, kv_sparse_budget=0.0), "kv_sparse_budget"),
        (dict(kv_hbm=0.01, kv_sparse_residency_bonus=-1.0), "kv_sparse_residency_bonus"),
        (dict(kv_hbm=0.01, backend="megakernel"), "backend"),
    ],
)
def test_bad_tier_settings_are_refused(tiny_model, kwargs, match):
    with pytest.raises(MegatierError, match=match):
        LLM(str(tiny_model), device="cpu", **kwargs)


def test_graph_executor_accepts_a_tiered_store_but_not_multi_step(tiny_model):
    from megatier.config import load_config

    cfg = load_config(tiny_model)
    store = TieredKV(
        cfg, page_size=16, dtype=torch.float32, device=CPU, hbm_bytes=8 * cfg.kv_bytes_per_token(torch.float32) * 16
    )
    ex = GraphExecutor(cfg, dummy_weights(cfg, 0, torch.float32, CPU), cache=store)
    with pytest.raises(MegatierError, match="tiered KV cache plans every step"):
        ex.decode_greedy(StepBatch([1], [0], [1], [[0]]), 2)


def test_each_layers_hot_pages_migrate_to_hbm_end_to_end(tmp_path):
    """Decode steps over a sparse store whose hot pages differ by layer: importance is tracked per
    (page, layer) and migration brings each layer's own hot slices into HBM, within the HBM budget,
    raising the hit rate (a per-page importance summed over layers would move both layers' sets)."""
    cfg = tiny_cfg(heads=4, kv_heads=1, head_dim=16, layers=2)
    n_pages, hot = 24, {0: [4, 7, 9], 1: [12, 15, 17]}
    pools = make_pools(cfg, (20, 60, 0), tmp_path)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, cfg.num_heads, cfg.head_dim, generator=gen)
    store = store_on(pools, cfg, mode="sparse", sink_pages=1, recent_tokens=PAGE, migration_bytes=4 * pools.slice_bytes)
    store.sparse_budget = 6 / n_pages
    for p in range(n_pages):
        for layer in range(2):
            data = torch.randn(pools.slice_shape, generator=gen) * 0.1
            if p in hot[layer]:
                data[0, 0] += 3 * q[0].mean(0)
            put(pools, p, layer, HBM if p < 3 or p >= n_pages - 2 else DRAM, data)
            store.meta.set_from_keys(torch.tensor([p]), data[0, 0], torch.tensor([PAGE]), layer)
    hits = []
    for _ in range(8):
        plan = decode_plan(store, [n_pages * PAGE], [list(range(n_pages))])
        before = (store.stats.hbm_hits, store.stats.selected_slices)
        for layer in range(2):
            store.attend(plan, layer, q, ref_attention(cfg))
        store.end_step(plan)
        pools.wait_all()
        hits.append((store.stats.hbm_hits - before[0]) / (store.stats.selected_slices - before[1]))
    for layer, pages in hot.items():
        assert (pools.tier[pages, layer] == HBM).all(), (layer, pools.tier[:, layer])
        other = hot[1 - layer]
        assert not (pools.tier[other, layer] == HBM).all(), layer  # the other layer's set stayed out
    assert hits[0] < 0.8 and hits[-1] == 1.0, hits
    pools.close()


# -- on the GPU machine ----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "kw",
    [
        dict(mode="dense"),  # balanced PCIe share + host partial as a host node
        dict(mode="dense", pcie_share=0.0),
        dict(mode="dense", fetch_all=True),
        dict(mode="sparse", sparse_budget=1.0),
        dict(mode="sparse", sparse_budget=1.0, sparse_misses="fetch"),
        dict(mode="sparse", sparse_budget=1.0, sparse_misses="cpu"),
    ],
)
def test_cuda_graph_tiered_decode_equals_all_hbm(tiny_model, kw):
    """The graph executor on CUDA captures the tiered decode step (host partial as a host node, PCIe
    gathers on a side stream) and gives the all-HBM executor's greedy tokens and, step by step, its
    logits within fp32 rounding."""
    from megatier.config import load_config
    from megatier.loader import load_safetensors_weights

    cuda = torch.device("cuda")
    cfg = load_config(tiny_model)
    weights = load_safetensors_weights(tiny_model, cfg)
    page_bytes = cfg.kv_bytes_per_token(torch.float32) * 16
    prompts = [list(range(10, 80)), list(range(40, 85)), list(range(3, 150))]

    def run(store):
        ex = GraphExecutor(cfg, weights, cache=store)
        tables = [store.allocator.allocate(16) for _ in prompts]
        # One prompt per step: HBM cannot take all three prompts' pages at once, so earlier ones spill.
        logits = torch.cat([ex.forward(StepBatch(p, [0], [len(p)], [t])) for p, t in zip(prompts, tables, strict=True)])
        tokens, steps = [logits.argmax(-1).tolist()], []
        for i in range(24):
            logits = ex.forward(StepBatch(tokens[-1], [len(p) + i for p in prompts], [1] * 3, tables))
            steps.append(logits)
            tokens.append(logits.argmax(-1).tolist())
        return tokens, torch.stack(steps), ex

    want, want_logits, _ = run(KVCache.allocate(cfg, 64, 16, torch.float32, cuda))
    store = TieredKV(
        cfg, page_size=16, dtype=torch.float32, device=cuda, hbm_bytes=14 * page_bytes, dram_bytes=48 * page_bytes, **kw
    )
    got, got_logits, ex = run(store)
    assert got == want
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
    assert store.stats.hit_rate < 1  # DRAM slices were read
    if kw.get("sparse_misses") != "cpu":
        assert ex.graphs, "the tiered decode step was not captured"


@pytest.mark.gpu
def test_cuda_host_partial_runs_inside_the_graph(tiny_model):
    """Replays of a captured dense step run the C kernel as a host node: its measured time grows with
    replays while Python does nothing per layer."""
    from megatier.config import load_config

    cuda = torch.device("cuda")
    cfg = load_config(tiny_model)
    page_bytes = cfg.kv_bytes_per_token(torch.bfloat16) * 16
    store = TieredKV(
        cfg,
        page_size=16,
        dtype=torch.bfloat16,
        device=cuda,
        hbm_bytes=8 * page_bytes,
        dram_bytes=64 * page_bytes,
        pcie_share=0.0,
    )
    ex = GraphExecutor(cfg, dummy_weights(cfg, 0, torch.bfloat16, cuda), cache=store)
    table = store.allocator.allocate(40)
    for start in range(0, 300, 60):  # prefill chunks of 4 pages: a step's written pages must fit in HBM
        ex.forward(StepBatch(list(range(start, start + 60)), [start], [60], [table]))
    for i in range(6):
        ex.forward(StepBatch([1], [300 + i], [1], [table]))
    torch.cuda.synchronize()
    assert ex.graphs and store.stats.bytes_read["dram"] > 0
    assert store.stats.cpu_s > 0  # measured inside the host function
    times = store.host.layer_times()  # the last replay's, per layer
    assert any(seconds > 0 for seconds, _ in times) and all(0 <= wake <= seconds for seconds, wake in times)


def test_forced_pages_are_the_sinks_and_the_recent_window_of_each_table(tmp_path):
    """The store reads only the ends of the page tables for them; the same pages as the column mask."""
    from megatier.kv.locality import forced_columns

    cfg = tiny_cfg()
    store = store_on(make_pools(cfg, (8, 8, 0), tmp_path), cfg, sink_pages=2, recent_tokens=3 * PAGE)
    rng = np.random.default_rng(3)
    for _ in range(20):
        counts = rng.integers(1, 12, size=4)
        tables = [rng.permutation(100)[: n + int(rng.integers(0, 3))].tolist() for n in counts]
        mask = forced_columns(counts, 14, store.sink_pages, store.recent_pages)
        want = np.unique([t[c] for t, row in zip(tables, mask, strict=True) for c in np.flatnonzero(row)])
        assert np.array_equal(store._forced_pages(tables, counts), want)


def test_the_dram_pool_is_huge_page_aligned_memory_that_outlives_its_views():
    """The DRAM tier's allocation: the shape asked, aligned to a 2 MiB page (so THP can back all of it;
    the share that got huge pages is measured, not asserted: it depends on the OS), data that survives
    the allocator's locals, and an empty pool for a zero-slot tier."""
    import gc

    from megatier.kv.host_memory import HUGE_PAGE, host_pool, huge_page_fraction

    pool = host_pool((37, 2, 3, 16, 8), torch.bfloat16, pinned=False)
    assert pool.shape == (37, 2, 3, 16, 8) and pool.dtype == torch.bfloat16
    assert pool.data_ptr() % HUGE_PAGE == 0
    data = torch.randn(pool.shape).to(torch.bfloat16)
    view = pool[5:9]
    pool.copy_(data)
    del pool
    gc.collect()
    assert torch.equal(view, data[5:9])
    fraction = huge_page_fraction(view)
    assert fraction is None or 0.0 <= fraction <= 1.0
    assert host_pool((0, 2, 3), torch.float32, pinned=False).shape == (0, 2, 3)
