"""`megatier bench tiers` runs every method end to end (on CPU: a smoke run) and writes its record and plots."""

from __future__ import annotations

import json

from conftest import make_hf_model
from megatier.bench.tiers import METHODS
from megatier.cli import main


def test_bench_tiers_smoke(tmp_path):
    path, _ = make_hf_model(tmp_path / "model", "llama-mqa-untied")
    argv = [
        "bench",
        "tiers",
        "--model",
        str(path),
        "--batch",
        "2",
        "--context",
        "64",
        "128",
        "--steps",
        "1",
        "--repeats",
        "1",
        "--warmup",
        "1",
    ]
    argv += ["--hbm-fraction", "0.25", "0.5", "--json", str(tmp_path / "r.json"), "--plot-dir", str(tmp_path / "p")]
    assert main(argv) == 0
    runs = json.loads((tmp_path / "r.json").read_text())["results"]["runs"]
    assert {r["method"] for r in runs} == set(METHODS)
    assert all(r["tokens_per_s"] > 0 for r in runs)
    assert all(0 <= r["hbm_hit_rate"] <= 1 for r in runs if r["method"] != "gpu-only")
    dense = [r for r in runs if r["method"] == "static-dense" and r["hbm_fraction"] == 0.25 and r["context"] == 128]
    assert dense and dense[0]["bytes_read_per_step"]["dram"] > 0  # HBM holds a quarter: the rest is read in DRAM
    assert len(list((tmp_path / "p").glob("*.png"))) == 3


def test_bench_tiers_migration_budget_is_applied(tmp_path):
    """--migration-mib reaches the store (the budget's effect is tested on the store in test_tiered_kv.py)."""
    path, _ = make_hf_model(tmp_path / "model", "llama-mqa-untied")
    argv = ["bench", "tiers", "--model", str(path), "--batch", "2", "--context", "256", "--steps", "2"]
    argv += ["--repeats", "1", "--warmup", "2", "--drift-every", "2", "--hbm-fraction", "0.25"]
    argv += ["--methods", "megatier-sparse", "--migration-mib", "0.25", "--json", str(tmp_path / "r.json")]
    assert main(argv) == 0
    (run,) = json.loads((tmp_path / "r.json").read_text())["results"]["runs"]
    assert run["migration_budget_bytes"] == 2**18
    assert run["migrated_bytes_per_step"] <= 2**18


def test_bench_tiers_pcie_share_is_fixed_for_megatier_dense(tmp_path):
    """--pcie-share replaces the balancer for megatier-dense: that share of the DRAM slices is read over
    "PCIe" (on CPU, the same gather into staging), the rest by the host kernel."""
    path, _ = make_hf_model(tmp_path / "model", "llama-mqa-untied")
    argv = ["bench", "tiers", "--model", str(path), "--batch", "2", "--context", "256", "--steps", "2"]
    argv += ["--repeats", "1", "--warmup", "1", "--hbm-fraction", "0.25", "--methods", "megatier-dense"]
    argv += ["--pcie-share", "0.5", "--json", str(tmp_path / "r.json")]
    assert main(argv) == 0
    (run,) = json.loads((tmp_path / "r.json").read_text())["results"]["runs"]
    assert run["pcie_share"] == 0.5
    read = run["bytes_read_per_step"]
    assert read["pcie"] > 0 and abs(read["pcie"] - read["dram"]) <= 0.1 * (read["pcie"] + read["dram"])


def test_bench_tiers_refuses_a_pcie_share_outside_0_1(tmp_path, capsys):
    path, _ = make_hf_model(tmp_path / "model", "llama-mqa-untied")
    argv = ["bench", "tiers", "--model", str(path), "--batch", "2", "--context", "64", "--steps", "1", "--repeats", "1"]
    assert main([*argv, "--methods", "megatier-dense", "--pcie-share", "1.5"]) != 0
    assert "pcie_share" in capsys.readouterr().err
