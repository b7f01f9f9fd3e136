"""Prometheus metrics of one server, on their own registry (several servers may share a
process in tests), served over HTTP by prometheus_client on --metrics-port."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import jax
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from hessd.service.batcher import Batcher
    from hessd.service.engine import Engine
    from hessd.service.registry import Registry
    from hessd.service.resident import ResidentStore

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
_POINT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)


class Metrics:
    """Requests by method, kind and status; latency, queue and compute time; batch sizes;
    and, read at scrape time (once `watch` has named them), the engine's compile and cache
    counters, the batcher's counters, the number of registered functions and device memory
    in use."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "hessd_requests", "Calls answered", ["method", "kind", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "hessd_request_seconds", "Time from call to answer", ["method", "kind"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.compute = Histogram(
            "hessd_compute_seconds", "Time in the engine (device work and transfers)", ["kind"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.queue = Histogram(
            "hessd_queue_seconds", "Time a call waited to be batched with others",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.batch_points = Histogram(
            "hessd_batch_points", "Points per request", buckets=_POINT_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        # The labelled children by their labels: prometheus_client's labels() takes a lock
        # and builds a key on every call, which thousands of calls a second notice.
        self._requests: dict[tuple[str, str, str], Any] = {}
        self._latency: dict[tuple[str, str], Any] = {}
        self._compute: dict[str, Any] = {}

    def observe_call(
        self, method: str, kind: str, status: str, seconds: float, points: int
    ) -> None:
        """One call answered: its count, its latency and, if it sent points, how many."""
        counter = self._requests.get((method, kind, status))
        if counter is None:
            counter = self._requests[method, kind, status] = self.requests.labels(
                method, kind, status
            )
        counter.inc()
        latency = self._latency.get((method, kind))
        if latency is None:
            latency = self._latency[method, kind] = self.latency.labels(method, kind)
        latency.observe(seconds)
        if points:
            self.batch_points.observe(points)

    def observe_compute(self, label: str, seconds: float) -> None:
        """Time one call spent in the engine."""
        histogram = self._compute.get(label)
        if histogram is None:
            histogram = self._compute[label] = self.compute.labels(label)
        histogram.observe(seconds)

    def watch(
        self,
        engine: Engine,
        functions: Registry,
        batcher: Batcher,
        resident: ResidentStore | None = None,
    ) -> None:
        """Report the state of these parts at every scrape."""
        self.registry.register(_StateCollector(engine, functions, batcher, resident))

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve /metrics over HTTP; returns the bound port (0 picks one)."""
        server, _ = start_http_server(port, host, registry=self.registry)
        return server.server_port


class _StateCollector:
    """Counters that live in the engine and registry, read when Prometheus scrapes."""

    def __init__(
        self,
        engine: Engine,
        functions: Registry,
        batcher: Batcher,
        resident: ResidentStore | None = None,
    ):
        self.engine, self.functions, self.batcher = engine, functions, batcher
        self.resident = resident

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats
        yield CounterMetricFamily("hessd_compiles", "XLA compilations", value=stats.compiles)
        yield CounterMetricFamily(
            "hessd_compile_seconds", "Seconds spent compiling", value=stats.compile_seconds
        )
        cache = CounterMetricFamily(
            "hessd_executable_cache", "Executable cache lookups", labels=["result"]
        )
        cache.add_metric(["hit"], stats.hits)
        cache.add_metric(["miss"], stats.misses)
        yield cache
        yield GaugeMetricFamily(
            "hessd_registered_functions", "Functions held", value=len(self.functions)
        )
        yield GaugeMetricFamily(
            "hessd_registered_bytes", "Bytes of registered specs held", value=self.functions.nbytes
        )
        memory = GaugeMetricFamily(
            "hessd_device_memory_bytes", "Device memory in use", labels=["device"]
        )
        for device in jax.local_devices():
            in_use = (device.memory_stats() or {}).get("bytes_in_use")
            if in_use is not None:
                memory.add_metric([str(device.id)], in_use)
        yield memory
        batches = CounterMetricFamily(
            "hessd_batcher", "Dynamic batching of concurrent calls", labels=["event"]
        )
        for event in ("requests", "batches", "coalesced", "dropped", "rejected"):
            batches.add_metric([event], getattr(self.batcher.stats, event))
        yield batches
        yield GaugeMetricFamily(
            "hessd_batcher_queued_points", "Points waiting or computing in batches",
            value=self.batcher.queued,
        )  # fmt: skip
        if self.resident is not None:
            yield GaugeMetricFamily(
                "hessd_resident_tensors", "Resident tensors held (Put)", value=len(self.resident)
            )
            yield GaugeMetricFamily(
                "hessd_resident_bytes", "Bytes of resident tensors held", value=self.resident.nbytes
            )
