"""The statistics of a sweep: one measurement window, when a level is stable, and the row a
level reports from its last windows."""

from __future__ import annotations

import collections
import dataclasses
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["PERCENTILES", "STABLE_WINDOWS", "Row", "Window", "is_stable", "summarize"]

STABLE_WINDOWS = 3
PERCENTILES = (50, 90, 95, 99)


@dataclasses.dataclass(frozen=True)
class Window:
    """One measurement window: the latencies (s) of the requests that succeeded in it, the
    failures by status name, and how many requests started in it with how many were in
    flight as each started."""

    seconds: float
    latencies: np.ndarray
    errors: Mapping[str, int] = dataclasses.field(default_factory=dict)
    in_flight: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies) / self.seconds

    @property
    def p95(self) -> float | None:
        """p95 latency in seconds; None when no request succeeded."""
        return float(np.percentile(self.latencies, 95)) if len(self.latencies) else None


def is_stable(windows: Sequence[Window], tolerance: float, count: int = STABLE_WINDOWS) -> bool:
    """Whether the last `count` windows agree: their throughputs, and their p95 latencies,
    each lie within `tolerance` times their mean. Windows in which every request failed agree
    with each other (a level that fails steadily is measured), never with ones in which some
    succeeded; a window in which no request finished at all (requests longer than a window,
    or a server that stopped answering) is never stable."""
    if len(windows) < count:
        return False
    recent = windows[-count:]
    if any(not len(w.latencies) and not w.errors for w in recent):
        return False
    return _agree([w.requests_per_s for w in recent], tolerance) and _agree(
        [w.p95 for w in recent], tolerance
    )


def _agree(values: Sequence[float | None], tolerance: float) -> bool:
    known = [v for v in values if v is not None]
    if not known:
        return True
    if len(known) < len(values):
        return False
    mean = statistics.fmean(known)
    return all(abs(v - mean) <= tolerance * mean for v in known)


@dataclasses.dataclass(frozen=True)
class Row:
    """One level of the sweep, from its last windows (the columns are described in
    hessd.tools.bench)."""

    mode: str
    concurrency: int | None
    request_rate: float | None
    requests_per_s: float
    points_per_s: float
    p50_ms: float | None
    p90_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    completed: int
    errors: int
    errors_by_code: dict[str, int]
    sent_per_s: float
    in_flight_mean: float | None
    in_flight_max: int | None
    seconds: float
    windows: int
    status: str
    window_stats: list[dict[str, Any]]

    @property
    def level(self) -> float:
        """The concurrency or the request rate, whichever the sweep varied."""
        level = self.concurrency if self.mode == "concurrency" else self.request_rate
        assert level is not None, self
        return level


def summarize(windows: Sequence[Window], batch: int, mode: str, level: float, status: str) -> Row:
    """The row of one level: the last STABLE_WINDOWS windows taken together."""
    recent = windows[-STABLE_WINDOWS:]
    seconds = sum(w.seconds for w in recent)
    latencies = np.concatenate([w.latencies for w in recent])
    in_flight = np.concatenate([w.in_flight for w in recent])
    errors: collections.Counter[str] = collections.Counter()
    for w in recent:
        errors.update(w.errors)
    percentiles: list[float | None] = [None] * len(PERCENTILES)
    if len(latencies):
        percentiles = [float(p) * 1e3 for p in np.percentile(latencies, PERCENTILES)]
    requests_per_s = len(latencies) / seconds
    return Row(
        mode=mode,
        concurrency=int(level) if mode == "concurrency" else None,
        request_rate=float(level) if mode == "request_rate" else None,
        requests_per_s=requests_per_s,
        points_per_s=requests_per_s * batch,
        p50_ms=percentiles[0],
        p90_ms=percentiles[1],
        p95_ms=percentiles[2],
        p99_ms=percentiles[3],
        completed=len(latencies),
        errors=sum(errors.values()),
        errors_by_code=dict(sorted(errors.items())),
        sent_per_s=len(in_flight) / seconds,
        in_flight_mean=float(in_flight.mean()) if len(in_flight) else None,
        in_flight_max=int(in_flight.max()) if len(in_flight) else None,
        seconds=seconds,
        windows=len(windows),
        status=status,
        window_stats=[
            {
                "seconds": w.seconds,
                "completed": len(w.latencies),
                "errors": sum(w.errors.values()),
                "requests_per_s": w.requests_per_s,
                "p95_ms": None if w.p95 is None else w.p95 * 1e3,
            }
            for w in windows
        ],
    )
