"""Histogram observations gathered per batch read exactly as prometheus_client's own observe."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from gateway.metrics import BUCKETS, OVERHEAD_BUCKETS, Metrics

# Every bucket's bound, just under and just over it, zero, and past the last finite bound.
AMOUNTS = sorted(
    {0.0, 1e-9, 200.0, 1e6}
    | {*BUCKETS, *OVERHEAD_BUCKETS}
    | {math.nextafter(bound, 0) for bound in (*BUCKETS, *OVERHEAD_BUCKETS)}
    | {math.nextafter(bound, math.inf) for bound in (*BUCKETS, *OVERHEAD_BUCKETS)}
)


def _series_lines(registry: CollectorRegistry, name: str) -> list[str]:
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if line.startswith(name) and "_created" not in line]


def _reference(
    name: str, buckets: tuple[float, ...], amounts: list[float], labels: tuple[str, ...], label: str = "route"
) -> list[str]:
    registry = CollectorRegistry()
    histogram = Histogram(name, "reference", (label,) if labels else (), buckets=buckets, registry=registry)
    series = histogram.labels(*labels) if labels else histogram
    for amount in amounts:
        series.observe(amount)
    return _series_lines(registry, name)


@pytest.mark.parametrize("batch", [1, 3, len(AMOUNTS)])
def test_labelled_series_read_as_observe_would(batch: int) -> None:
    metrics = Metrics()
    series = metrics.child(metrics.request_duration, "prompt")
    for start in range(0, len(AMOUNTS), batch):
        for amount in AMOUNTS[start : start + batch]:
            metrics.observe(series, amount)
        metrics.flush()
    name = "policy_gateway_request_duration_seconds"
    got = [line for line in _series_lines(metrics.registry, name) if 'route="prompt"' in line]
    assert got == _reference(name, BUCKETS, AMOUNTS, ("prompt",))


def test_unlabelled_series_and_other_buckets() -> None:
    metrics = Metrics()
    for amount in AMOUNTS:
        metrics.observe(metrics.upstream_duration, amount)
        metrics.observe(metrics.child(metrics.overhead, "prompt"), amount / 7)
    metrics.flush()
    name = "policy_gateway_upstream_duration_seconds"
    assert _series_lines(metrics.registry, name) == _reference(name, BUCKETS, AMOUNTS, ())
    overhead = "policy_gateway_overhead_seconds"
    got = [line for line in _series_lines(metrics.registry, overhead) if 'stage="prompt"' in line]
    assert got == _reference(overhead, OVERHEAD_BUCKETS, [a / 7 for a in AMOUNTS], ("prompt",), "stage")


def test_a_scrape_sees_what_is_pending() -> None:
    metrics = Metrics()
    metrics.observe(metrics.upstream_duration, 0.003)
    exposition = metrics.exposition().decode()
    assert 'policy_gateway_upstream_duration_seconds_bucket{le="0.005"} 1.0' in exposition
    assert "policy_gateway_upstream_duration_seconds_count 1.0" in exposition


def test_a_series_without_the_expected_internals_is_observed_directly() -> None:
    class Plain:
        def __init__(self) -> None:
            self.seen: list[float] = []

        def observe(self, amount: float) -> None:
            self.seen.append(amount)

    metrics, plain = Metrics(), Plain()
    metrics.observe(plain, 0.5)
    assert plain.seen == [0.5]
    metrics.flush()
    assert plain.seen == [0.5]
