"""Prometheus metrics of a scoring service, in a registry of its own (one per app).

Latency and request counts are recorded per request; everything the scorer already counts
(cache, rows by source, Redis errors, the version) is read at scrape time, so the hot path
does no metric bookkeeping for it.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from serving.scorer import Scorer

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class _ScorerCollector(Collector):
    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer

    def collect(self) -> Iterator:
        scorer = self.scorer
        snapshot = scorer.snapshot
        model = scorer.config.model
        version = GaugeMetricFamily(
            "embtab_model_version", "Live version being served (-1: none)", labels=["model"]
        )
        version.add_metric([model], snapshot.version if snapshot else -1)
        yield version
        delta = GaugeMetricFamily(
            "embtab_model_delta", "Last delta applied to the served version", labels=["model"]
        )
        delta.add_metric([model], snapshot.delta if snapshot else -1)
        yield delta
        yield GaugeMetricFamily(
            "embtab_degraded",
            "1 while answers are degraded: Redis unreachable, or the served version's data "
            "missing from it",
            value=1 if scorer.degraded else 0,
        )
        yield GaugeMetricFamily(
            "embtab_data_missing",
            "1 while the served version's data is missing from Redis (it lost its data)",
            value=1 if scorer.data_missing else 0,
        )
        yield CounterMetricFamily(
            "embtab_redis_errors",
            "Redis calls that failed or timed out",
            value=scorer.health.errors,
        )
        rows = CounterMetricFamily(
            "embtab_rows", "Embedding rows read, by where they came from", labels=["source"]
        )
        counts = scorer.counts
        rows.add_metric(["resident"], counts.resident)
        rows.add_metric(["cache"], counts.cached)
        rows.add_metric(["redis"], counts.fetched)
        rows.add_metric(["default"], counts.defaulted)
        yield rows
        yield CounterMetricFamily(
            "embtab_scored_candidates", "Candidates scored", value=counts.candidates
        )
        unknown = CounterMetricFamily(
            "embtab_unknown_ids",
            "Raw ids in requests that the feature's vocabulary does not hold (scored with the "
            "out-of-vocabulary id, or as an empty bag)",
            labels=["feature"],
        )
        for feature, count in sorted(scorer.unknown_ids.items()):
            unknown.add_metric([feature], count)
        yield unknown
        local = counts.resident + counts.cached
        total = local + counts.fetched + counts.defaulted
        yield GaugeMetricFamily(
            "embtab_cache_hit_rate",
            "Rows read locally (resident in the model's tables, or in the row cache) over all "
            "rows read, since start",
            value=local / total if total else 0.0,
        )
        if snapshot is None:
            return
        stats = snapshot.cache.stats()
        yield GaugeMetricFamily(
            "embtab_row_cache_hit_rate",
            "Row cache hits over row cache lookups (this version)",
            value=stats.hit_rate,
        )
        yield GaugeMetricFamily(
            "embtab_cache_bytes", "Bytes held by the row cache", value=stats.bytes
        )
        yield GaugeMetricFamily("embtab_cache_rows", "Rows held by the row cache", value=stats.rows)
        yield CounterMetricFamily(
            "embtab_cache_evictions", "Rows evicted from the row cache", value=stats.evictions
        )
        yield CounterMetricFamily(
            "embtab_cache_invalidations", "Rows invalidated by deltas", value=stats.invalidations
        )


class ServiceMetrics:
    def __init__(self, scorer: Scorer) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "embtab_score_latency_seconds",
            "Time from a /score request's arrival to its answer",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "embtab_score_requests",
            "/score requests by HTTP status",
            ["status"],
            registry=self.registry,
        )
        self.batch_requests = Histogram(
            "embtab_score_batch_requests",
            "Requests scored together in one micro-batch",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_ScorerCollector(scorer))

    def render(self) -> bytes:
        return generate_latest(self.registry)
