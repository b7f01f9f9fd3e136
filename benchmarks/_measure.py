"""Measuring one workload of throughput.py three ways, interleaved: through the service,
in-process, and on the transport floor (plus its torch.func twins); and the single-point
gradient at concurrency 64 against raw unary calls in flight."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc
import numpy as np

from hessd.client import AsyncClient, Client

from _timing import closed_loop, cpu_seconds, interleaved, median_ms
from _wire import COMPUTE, Floor, Wire, echo_channel, wire_of
from _workloads import Workload

__all__ = [
    "CALLS_PER_ROUND",
    "CONCURRENCY",
    "LATENCY_CALLS",
    "RATIO_TARGET",
    "SLOW_ROUNDS",
    "SLOW_SECONDS",
    "THROUGHPUT_TARGET",
    "echo_call",
    "measure",
    "measure_concurrent",
    "rates",
    "verdict",
]

RATIO_TARGET = 1.25
THROUGHPUT_TARGET = 0.7
CONCURRENCY = 64
CALLS_PER_ROUND = 1280  # concurrency-64 rounds: 20 calls per coroutine
LATENCY_CALLS = 40  # single-point latency: calls per --repeats round
SLOW_SECONDS, SLOW_ROUNDS = 5.0, 2  # torch.func's vmap(hessian) takes ~15 s a call


def check_close(name: str, got: np.ndarray, want: np.ndarray) -> float:
    """Max |got - want| / max |want|; warns above float32 rounding."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    error = float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))
    if not error < 1e-4:
        print(f"warning: {name} differs from in-process JAX by {error:.1e}", file=sys.stderr)
    return error


def verdict(value: float, target: float, lower_is_better: bool) -> str:
    """ "meets", or by how much `value` misses `target` ("misses by 12%")."""
    if value <= target if lower_is_better else value >= target:
        return "meets"
    miss = value / target - 1 if lower_is_better else 1 - value / target
    return f"misses by {100 * miss:.0f}%"


def measure(
    w: Workload, client: Client, floor: Floor, servers: Mapping[str, int], rounds: int
) -> dict[str, Any]:
    """Service, in-process, floor and torch times of one workload, interleaved.

    The warm-up calls also check the service's and torch's results against in-process
    JAX. A method whose warm-up took over SLOW_SECONDS runs SLOW_ROUNDS rounds at most.
    """
    threshold = client.stream_threshold
    wire = wire_of(w.function, w.kind, w.points, w.options, threshold)
    methods: dict[str, Callable[[], object]] = {
        "in_process": lambda: np.asarray(w.local()),
        "service": lambda: w.service(client),
        "floor": lambda: floor.call(wire),
    }
    plain = None
    if w.options.get("packed"):
        plain = wire_of(w.function, w.kind, w.points, {**w.options, "packed": False}, threshold)
        methods["floor_plain"] = lambda: floor.call(plain)
    for name, fn in w.torch.items():
        methods[f"torch {name}"] = fn
    warm, errors, reference = {}, {}, None
    for name, fn in methods.items():
        start = time.perf_counter()
        result = fn()
        warm[name] = time.perf_counter() - start
        if name == "in_process":
            reference = result
        elif not name.startswith("floor"):
            result = result.numpy() if name.startswith("torch") else result
            errors[name] = check_close(f"{w.label} ({name})", result, reference)
        del result
    del reference
    base = rounds if w.large else rounds * LATENCY_CALLS
    repeats = {n: base if s < SLOW_SECONDS else min(base, SLOW_ROUNDS) for n, s in warm.items()}
    load = os.getloadavg()[0]
    # The server process each method talks to, for its CPU time.
    pids = {
        name: servers["floor" if name.startswith("floor") else "service"]
        for name in methods
        if name == "service" or name.startswith("floor")
    }
    times, cpu = interleaved(methods, repeats, pids)
    row = {
        "name": w.name,
        "workload": w.label,
        "transport": "stream" if wire.streamed else "unary",
        "bytes_in": wire.bytes_in,
        "bytes_out": wire.bytes_out,
        "load_1min": load,
        "repeats": repeats,
        "max_rel_error": errors,
        **{f"{name}_ms": median_ms(t) for name, t in times.items()},
        "cpu_ms_per_call": cpu,
    }
    row["ratio"] = row["service_ms"] / (row["in_process_ms"] + row["floor_ms"])
    if plain is not None:
        row["plain_bytes_out"] = plain.bytes_out
        row["ratio_vs_plain_floor"] = row["service_ms"] / (
            row["in_process_ms"] + row["floor_plain_ms"]
        )
    row["target"] = verdict(row["ratio"], RATIO_TARGET, lower_is_better=True) if w.large else "-"
    if w.torch:
        fastest = min(row[f"torch {name}_ms"] for name in w.torch)
        row["service_over_fastest_torch"] = row["service_ms"] / fastest
    return row


Call = Callable[[], Awaitable[object]]


async def echo_call(stack: contextlib.AsyncExitStack, address: str, wire: Wire) -> Call:
    """A raw grpc.aio unary call of `wire`'s request to the echo server at `address`, over
    a channel configured as the client's (closed with `stack`)."""
    channel = await stack.enter_async_context(echo_channel(address, grpc.aio))
    unary = channel.unary_unary(COMPUTE)
    return functools.partial(unary, wire.request[0], metadata=wire.metadata, timeout=600)


async def rates(
    calls: Mapping[str, Call],
    pids: Mapping[str, int],
    rounds: int,
    per_round: int = CALLS_PER_ROUND,
    order: Callable[[int], Sequence[str]] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Per call: requests/s and CPU µs per call of this process and of pids[name] (its
    server's process), CONCURRENCY in flight, `per_round` calls a round; one warm-up round
    each, then `rounds` rounds measuring each in turn, in order(i) for round i (default
    the order of `calls`)."""

    async def measured(call: Call, server_pid: int) -> dict:
        client_cpu, server_cpu = cpu_seconds(), cpu_seconds(server_pid)
        start = time.perf_counter()
        await closed_loop(call, per_round, CONCURRENCY)
        seconds = time.perf_counter() - start
        return {
            "per_s": per_round / seconds,
            "client_cpu_us": 1e6 * (cpu_seconds() - client_cpu) / per_round,
            "server_cpu_us": 1e6 * (cpu_seconds(server_pid) - server_cpu) / per_round,
        }

    found: dict[str, dict[str, list[float]]] = {n: collections.defaultdict(list) for n in calls}
    for name, call in calls.items():
        await measured(call, pids[name])  # warm-up
    for i in range(rounds):
        for name in list(calls) if order is None else order(i):
            for key, value in (await measured(calls[name], pids[name])).items():
                found[name][key].append(value)
    return found


async def concurrent_rates(
    address: str,
    echoes: Mapping[str, str],
    pids: Mapping[str, int],
    w: Workload,
    wire: Wire,
    rounds: int,
) -> dict[str, dict[str, list[float]]]:
    """rates() of "service" (AsyncClient against hessd) and of "floor", "floor_aio" (raw
    grpc.aio unary calls against the echo servers of those names), CALLS_PER_ROUND calls
    per round, rounds alternated."""
    async with contextlib.AsyncExitStack() as stack:
        client = await stack.enter_async_context(AsyncClient(address, timeout=600))
        methods: dict[str, Call] = {
            "service": lambda: client.compute(w.function, w.kind, w.points, **w.options),
        }
        for name, echo in echoes.items():
            methods[name] = await echo_call(stack, echo, wire)
        return await rates(methods, pids, rounds)


def measure_concurrent(
    w: Workload,
    address: str,
    echoes: Mapping[str, str],
    pids: Mapping[str, int],
    threshold: int,
    rounds: int,
) -> dict[str, Any]:
    """The single-point workload `w` at CONCURRENCY calls in flight: requests/s of the
    service against the raw unary rate of the same bytes (to each echo server), medians
    over `rounds`. The ratio and target are against "floor", the faster server model."""
    wire = wire_of(w.function, w.kind, w.points, w.options, threshold)
    load = os.getloadavg()[0]
    found = asyncio.run(concurrent_rates(address, echoes, pids, w, wire, rounds))
    row = {
        "name": w.name,
        "workload": f"{w.label}, {CONCURRENCY} in flight",
        "transport": "unary",
        "bytes_in": wire.bytes_in,
        "bytes_out": wire.bytes_out,
        "load_1min": load,
        "repeats": rounds,
        "calls_per_round": CALLS_PER_ROUND,
        **{
            f"{name}_{key}": statistics.median(values)
            for name, measured in found.items()
            for key, values in measured.items()
        },
    }
    row["ratio"] = row["service_per_s"] / row["floor_per_s"]
    if "floor_aio_per_s" in row:
        row["ratio_vs_aio_floor"] = row["service_per_s"] / row["floor_aio_per_s"]
    row["target"] = verdict(row["ratio"], THROUGHPUT_TARGET, lower_is_better=False)
    return row
