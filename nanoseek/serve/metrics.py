"""Prometheus metrics of one server (its own registry, so several apps in one process do not mix).

    metrics = Metrics(scheduler)
    metrics.count("/v1/chat/completions", 200); metrics.first_token(0.12); metrics.tokens(30, 12)
    body, content_type = metrics.render()       # GET /metrics

Counters: requests by path and status, prompt and generated tokens. Histograms: time to first
token, time per output token. Gauges, read from the scheduler when scraped: waiting requests,
running rows, KV-cache use (tokens held / slots x context) and the prefix-cache hit rate
(prompt tokens restored / prompt tokens admitted).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ROUTES = {"/", "/health", "/ready", "/metrics", "/tokenize", "/detokenize", "/openapi.json", "/v1/models",
          "/v1/chat/completions", "/v1/completions"}


class Metrics:
    def __init__(self, scheduler):
        self.scheduler = scheduler
        r = self.registry = CollectorRegistry()
        self.requests = Counter("nanoseek_requests", "HTTP requests by path and status", ["path", "status"], registry=r)
        self.prompt_tokens = Counter("nanoseek_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("nanoseek_generation_tokens", "generated tokens", registry=r)
        self.ttft = Histogram("nanoseek_time_to_first_token_seconds", "request arrival to its first token",
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=r)
        self.tpot = Histogram("nanoseek_time_per_output_token_seconds", "time between a request's tokens",
                              buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1), registry=r)
        Gauge("nanoseek_waiting_requests", "requests queued for a slot", registry=r).set_function(
            lambda: scheduler.waiting)
        Gauge("nanoseek_running_requests", "rows being decoded", registry=r).set_function(
            lambda: len(scheduler.rows))
        Gauge("nanoseek_kv_cache_usage", "fraction of the latent cache's token slots in use", registry=r
              ).set_function(self._kv_use)
        Gauge("nanoseek_prefix_cache_hit_rate", "prompt tokens restored from the prefix cache / admitted",
              registry=r).set_function(self._hit_rate)

    def _kv_use(self) -> float:
        s = self.scheduler
        rows = list(s.rows)
        slots = s.batch.free + len(rows)
        return sum(row.length for row in rows) / max(slots * s.context, 1)

    def _hit_rate(self) -> float:
        st = self.scheduler.stats
        return st["cached_tokens"] / st["prompt_tokens"] if st["prompt_tokens"] else 0.0

    def count(self, path: str, status: int) -> None:
        self.requests.labels(path if path in ROUTES else "other", str(status)).inc()

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def per_token(self, seconds: float, n: int) -> None:
        for _ in range(n):
            self.tpot.observe(seconds / max(n, 1))

    def tokens(self, prompt: int, generated: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.generation_tokens.inc(generated)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
