"""Timing for the benchmark scripts: warm-ups, repeats and medians, CPU time from /proc,
waiting for a quiet machine, and writing the results as JSON."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import math
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

__all__ = [
    "Timed",
    "closed_loop",
    "cpu_seconds",
    "interleaved",
    "median_ms",
    "timed",
    "wait_for_quiet",
    "warm_up",
    "write_json",
]


@dataclasses.dataclass(frozen=True)
class Timed:
    """Seconds of each timed call, and what the last call returned."""

    times: list[float]
    result: Any

    @property
    def median(self) -> float:
        """Median seconds per call."""
        return statistics.median(self.times)


def timed(fn: Callable[[], Any], repeats: int) -> Timed:
    """Call `fn` once untimed (compiles, first transfers), then `repeats` times, timed."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return Timed(times, result)


def median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def warm_up(methods: Mapping[str, Callable[[], object]]) -> dict[str, float]:
    """Call each method once (compiles, first transfers): seconds of each call."""
    seconds = {}
    for name, fn in methods.items():
        start = time.perf_counter()
        fn()
        seconds[name] = time.perf_counter() - start
    return seconds


def interleaved(
    methods: Mapping[str, Callable[[], object]],
    rounds: Mapping[str, int],
    servers: Mapping[str, int] | None = None,
) -> tuple[dict[str, list[float]], dict[str, dict[str, float]]]:
    """Seconds per call of each (warmed-up) method, in rounds that call every method still
    due once, in turn, so that a change in the machine's load falls on all of them; and
    the mean CPU ms per call of this process ("client_cpu_ms") and, for a method in
    `servers` (name -> pid), of its server process ("server_cpu_ms"), read outside the
    timed calls."""
    servers = servers or {}
    times: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, collections.Counter] = {name: collections.Counter() for name in methods}
    for i in range(max(rounds.values())):
        for name, fn in methods.items():
            if i < rounds[name]:
                pid = servers.get(name)
                client, server = cpu_seconds(), cpu_seconds(pid) if pid else 0.0
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
                cpu[name]["client_cpu_ms"] += 1e3 * (cpu_seconds() - client)
                if pid:
                    cpu[name]["server_cpu_ms"] += 1e3 * (cpu_seconds(pid) - server)
    means = {
        name: {key: total / rounds[name] for key, total in counter.items()}
        for name, counter in cpu.items()
    }
    return times, means


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system, every thread) of process `pid`, or of this one; NaN where
    /proc cannot tell."""
    if pid is None:
        return time.process_time()
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(threshold: float, max_wait: float) -> float:
    """Wait until the 1-minute load average is below `threshold` (at most `max_wait` s)."""
    deadline = time.monotonic() + max_wait
    load = os.getloadavg()[0]
    while load > threshold and time.monotonic() < deadline:
        print(f"load average {load:.2f} > {threshold}: waiting", file=sys.stderr, flush=True)
        time.sleep(min(15.0, max(deadline - time.monotonic(), 0.0)))
        load = os.getloadavg()[0]
    return load


def write_json(path: pathlib.Path, record: object) -> None:
    """`record` as indented JSON at `path`, its folder made if missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


async def closed_loop(call: Callable[[], Awaitable[object]], calls: int, concurrency: int) -> None:
    """`calls` awaits of `call`, `concurrency` of them in flight at any time."""
    remaining = calls

    async def caller() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    await asyncio.gather(*(caller() for _ in range(concurrency)))
