"""The server's own ceiling: `megatier serve`'s host path (HTTP, the event loop, the engine thread,
detokenization, streaming) over a model whose step costs nothing, measured with `megatier bench serve`.

    .venv/bin/python scripts/serve_host_ceiling.py [--concurrency 1,16,64] [--profile-dir DIR]

The embedded SmolLM2's tokenizer and engine run as they do in serving; the executor's forward returns a
persistent logits buffer and the sampler returns a fixed token without touching it, so no tensor work is
timed. What a GPU step costs is then the difference between this ceiling and the bench on the GPU: if
`bench throughput` at batch 64 takes 1.7 ms a step, a server whose host path alone takes longer than
that per step cannot reach it. The client runs in its own process (as on the GPU machine). With
--profile-dir, the engine thread and the event loop are profiled (cProfile per thread) during the c64 run.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from megatier import LLM
from megatier.bench.common import record, write_json
from megatier.sampling import Sampled
from megatier.serve.app import create_app
from serve_helpers import live_server


def instant_app(max_num_seqs: int):
    llm = LLM(max_model_len=512, max_num_seqs=max_num_seqs, max_num_batched_tokens=8192)
    engine = llm.engine
    vocab = engine.executor.cfg.vocab_size
    logits = torch.zeros(max_num_seqs * 2 + 8192, vocab)
    token = llm.tokenizer.encode(" the")[-1]
    engine.executor.forward = lambda batch: logits[: len(batch.last_logit_rows())]
    engine.sampler.sample = lambda x, rows, masks=None: Sampled(
        torch.full((len(rows),), token), x, [r.params.logprobs for r in rows]
    )
    return create_app(llm, served_model_name="instant")


def bench(url: str, concurrency: int, prompts: int, out: Path, processes: int | None) -> dict:
    profile = ["-m", "cProfile", "-o", os.environ["CLIENT_PROFILE"]] if os.environ.get("CLIENT_PROFILE") else []
    cmd = [
        sys.executable, *profile, "-m", "megatier.cli", "bench", "serve", "--base-url", url, "--random-input-len", "128",
        "--random-output-len", "128", "--ignore-eos", "--max-concurrency", str(concurrency), "--num-prompts",
        str(prompts), "--num-warmups", str(min(concurrency, 8)), "--json", str(out),
    ]  # fmt: skip
    cmd += ["--client-processes", str(processes)] if processes else []
    before, server_cpu, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.process_time(), time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=os.environ | {"PYTHONPATH": "src"})
    after, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter() - wall
    client_cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    rec = json.loads(out.read_text())
    rec["busy"] = {
        "server_cpu_per_wall": (time.process_time() - server_cpu) / wall,
        "client_cpu_per_wall": client_cpu / wall,
    }
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--profile-dir")
    ap.add_argument("--json", help="write the record here")
    ap.add_argument("--client-processes", type=int, help="bench serve's --client-processes (default: its own)")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    app = instant_app(max(levels))
    results = {}
    with live_server(app) as (url, _), tempfile.TemporaryDirectory() as tmp:
        for c in levels:
            profilers: list[cProfile.Profile] = []
            if args.profile_dir and c == max(levels):
                threading.setprofile(lambda *a: None)  # threads started from here on are not profiled
                profilers = _profile_threads(app)
            rec = bench(url, c, max(16, 2 * c), Path(tmp) / f"c{c}.json", args.client_processes)
            for name, prof in profilers:
                prof.disable()
                path = Path(args.profile_dir) / f"serve_host_{name}_c{c}.txt"
                with path.open("w") as f:
                    pstats.Stats(prof, stream=f).sort_stats("tottime").print_stats(30)
            s = rec.get("results", rec)
            results[c] = {k: s[k] for k in ("output_throughput", "median_tpot_ms", "median_itl_ms") if k in s}
            results[c] |= rec["busy"]
            print(f"concurrency {c:3d}: {json.dumps(results[c])}", flush=True)
    if args.json:
        config = {
            "client_processes": args.client_processes,
            "input_len": 128,
            "output_len": 128,
            "cores": os.cpu_count(),
        }
        write_json(args.json, record("serve_host_ceiling", torch.device("cpu"), config, results))


def _profile_threads(app) -> list[tuple[str, cProfile.Profile]]:
    """cProfile in the engine thread (switched on from inside it, between two steps)."""
    engine = app.state.megatier.engine
    prof = cProfile.Profile()
    step = engine._step

    def profiled_step() -> None:
        if not getattr(profiled_step, "on", False):
            prof.enable()
            profiled_step.on = True
        step()

    engine._step = profiled_step
    return [("engine", prof)]


if __name__ == "__main__":
    main()
