"""Prometheus series of the server, named like vLLM's (`vllm:` -> `megatier:`) so dashboards carry over.

Latencies are observed on the event loop as updates reach each request; the engine thread sets the
gauges after every step. Each server has its own registry, so several can live in one process (tests).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
TTFT_BUCKETS = (*LATENCY_BUCKETS, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


class ServerMetrics:
    def __init__(self, num_kv_pages: int):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "megatier:time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "megatier:inter_token_latency_seconds",
            "Time between successive tokens of a sequence (k tokens delivered together count k times, gap/k each)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "megatier:e2e_request_latency_seconds",
            "Time from a request's arrival to the end of a sequence",
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.running = Gauge("megatier:num_requests_running", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("megatier:num_requests_waiting", "Sequences queued for a place in the batch", registry=r)
        self.kv_pages_in_use = Gauge("megatier:kv_pages_in_use", "KV cache pages held by sequences", registry=r)
        self.kv_pages_total = Gauge("megatier:kv_pages_total", "KV cache pages in the pool", registry=r)
        self.kv_pages_total.set(num_kv_pages)
        self._migrated_seen = 0
        self.prompt_tokens = Counter("megatier:prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("megatier:generation_tokens", "Generated tokens", registry=r)
        self.finished = Counter(
            "megatier:request_success", "Finished sequences by finish reason", ["finished_reason"], registry=r
        )
        self.rejected = Counter(
            "megatier:requests_rejected", "Requests refused with 503 (queue full or shutting down)", registry=r
        )

        # Tiered KV (kv_hbm / kv_dram / kv_disk): where the pages are, what moved, how often HBM served.
        self.kv_tier_pages = Gauge(
            "megatier:kv_tier_pages", "KV pages' worth of (page, layer) slices in each tier", ["tier"], registry=r
        )
        self.kv_migrated_bytes = Counter(
            "megatier:kv_migrated_bytes", "KV bytes moved between tiers by the placement scheduler", registry=r
        )
        self.kv_hbm_hit_rate = Gauge(
            "megatier:kv_hbm_hit_rate", "Share of the KV slices read by decode steps that were in HBM", registry=r
        )

    def engine_state(self, running: int, waiting: int, kv_pages_in_use: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_pages_in_use.set(kv_pages_in_use)

    def tier_state(self, store) -> None:
        """The gauges of a TieredKV store (kv/tiered.py) after a step."""
        for tier, pages in store.pages_per_tier().items():
            self.kv_tier_pages.labels(tier).set(pages)
        moved = store.stats.migrated_bytes - self._migrated_seen
        if moved > 0:
            self.kv_migrated_bytes.inc(moved)
        self._migrated_seen = store.stats.migrated_bytes
        self.kv_hbm_hit_rate.set(store.stats.hit_rate)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
