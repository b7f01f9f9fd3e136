"""The client's own CPU per call, by phase: what Client.compute and AsyncClient.compute
spend in this process on a small call, beside a raw gRPC unary call of the same bytes.

Against a `hessd serve` subprocess on loopback (so this process's CPU is the client's
alone; with two CPUs or more the server runs on the last, this process on the others),
f = sum(tanh(A @ x)**2) with n=8, float64, registered once, one point per call:

  build         what Client.compute does before its call: _requests.compute_call, for a
                call like one answered before a PlannedCall (its wire bytes)
  decode        call.result(reply): the reply's arrays (a reply received beforehand)
  call          the rest of Client.compute: gRPC's call (serializing, parsing the reply)
                and the client's code around it (total - build - decode)
  total         Client.compute(f, kind, X), one call at a time
  raw           a raw unary call of the request's bytes (no protobuf either way) on the
                client's channel, with its metadata and timeout: the transport's share
  first build   compute_request(...).filled(): a key's first call, every check made
  first decode  its decoding (codec.decode of every tensor)

and for AsyncClient.compute with 64 calls in flight (the workload of throughput.py's
gradient-c64), its total against 64 raw grpc.aio unary calls in flight; build and decode
there are the sync figures (the same code). CPU is time.process_time() (every thread of
this process) over rounds of many calls; each figure is the median over rounds of µs per
call. The machine should be quiet: the figures move with its load.

    python benchmarks/client_cost.py [--label after] [--rounds 9]
        [--out benchmarks/results/client-cost-cpu.json]

The JSON keeps the figures of other labels found in the file: "before" was measured on
the client before plans (commit 2a134c2), where Client.compute built every call with
compute_request(...).filled(), so there build = first build and decode = first decode.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from hessd.client import AsyncClient, Client, Function, _requests
from hessd.proto.v1 import hessd_pb2

from _servers import start_server
from _timing import closed_loop, write_json

N = 8
CONCURRENCY = 64
CALLS = 300  # per round, sync
ASYNC_CALLS = 1280  # per round, 20 per coroutine
COMPUTE = "/hessd.v1.Hessd/Compute"
KINDS: dict[str, dict[str, Any]] = {
    "value": {},
    "gradient": {},
    "hvp": {"vector": np.ones((1, N))},
    "hessian": {},
}
PHASES = ("build", "call", "decode", "total", "raw", "first build", "first decode")
ASYNC_KIND = "gradient"


def pin_apart(server_pid: int) -> None:
    """The server's threads on the last CPU, this process on the others (threads made
    later inherit their maker's CPUs), so that neither takes the other's time."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return
    os.sched_setaffinity(0, cpus[:-1])
    for task in os.listdir(f"/proc/{server_pid}/task"):
        with contextlib.suppress(OSError):  # a thread that has ended
            os.sched_setaffinity(int(task), {cpus[-1]})


def cpu_us_per_call(fn: Callable[[], object], calls: int, rounds: int) -> float:
    """Median over `rounds` of µs of this process's CPU per call of `fn`."""
    return interleaved({"fn": fn}, calls, rounds)["fn"]


def interleaved(methods: dict[str, Callable[[], object]], calls: int, rounds: int) -> dict:
    """Per method, the median over `rounds` of µs of this process's CPU per call; each
    round calls every method `calls` times in turn, so that the machine's moods fall on
    all of them alike."""
    per_round: dict[str, list[float]] = {name: [] for name in methods}
    for fn in methods.values():
        fn()
    for _ in range(rounds):
        for name, fn in methods.items():
            start = time.process_time()
            for _ in range(calls):
                fn()
            per_round[name].append(1e6 * (time.process_time() - start) / calls)
    return {name: statistics.median(found) for name, found in per_round.items()}


async def async_interleaved(
    methods: dict[str, Callable[[], Awaitable[object]]], calls: int, rounds: int
) -> dict[str, float]:
    """As `interleaved`, with CONCURRENCY calls in flight."""

    async def measured(call: Callable[[], Awaitable[object]]) -> float:
        start = time.process_time()
        await closed_loop(call, calls, CONCURRENCY)
        return 1e6 * (time.process_time() - start) / calls

    per_round: dict[str, list[float]] = {name: [] for name in methods}
    for call in methods.values():
        await measured(call)  # warm-up
    for _ in range(rounds):
        for name, call in methods.items():
            per_round[name].append(await measured(call))
    return {name: statistics.median(found) for name, found in per_round.items()}


def identity(b: bytes) -> bytes:
    return b


def built(f: Function, kind: str, x: np.ndarray, options: dict, threshold: int) -> tuple:
    """What Client.compute builds before its call: (the call, the request it sends)."""
    call = _requests.compute_call(f, kind, x, options, threshold)
    if isinstance(call, _requests.PlannedCall):
        return call, call.wire
    return call, call.filled()


def sync_phases(c: Client, f: Function, x: np.ndarray, rounds: int) -> dict[str, dict]:
    raw = c._channel.unary_unary(
        COMPUTE, request_serializer=identity, response_deserializer=identity
    )
    threshold = c.stream_threshold
    found = {}
    for kind, options in KINDS.items():
        first = c.compute(f, kind, x, **options)  # the call that leaves a plan
        full = _requests.compute_request(f, kind, x, **options)
        request = full.filled().SerializeToString()
        reply = hessd_pb2.ComputeResponse.FromString(
            raw(request, metadata=c._metadata, timeout=c.timeout)
        )
        call, _ = built(f, kind, x, options, threshold)
        np.testing.assert_array_equal(call.result(reply), first)
        phases = {
            "build": cpu_us_per_call(
                lambda kind=kind, options=options: built(f, kind, x, options, threshold),
                CALLS * 10,
                rounds,
            ),
            "decode": cpu_us_per_call(
                lambda call=call, reply=reply: call.result(reply), CALLS * 10, rounds
            ),
            **interleaved(
                {
                    "total": lambda kind=kind, options=options: c.compute(f, kind, x, **options),
                    "raw": lambda request=request: raw(
                        request, metadata=c._metadata, timeout=c.timeout
                    ),
                },
                CALLS,
                rounds,
            ),
            # The first call of a key (no plan yet): compute_request's checks and decoding.
            "first build": cpu_us_per_call(
                lambda kind=kind, options=options: _requests.compute_request(
                    f, kind, x, **options
                ).filled(),
                CALLS * 10,
                rounds,
            ),
            "first decode": cpu_us_per_call(
                lambda full=full, reply=reply: full.result(reply), CALLS * 10, rounds
            ),
        }
        phases["call"] = phases["total"] - phases["build"] - phases["decode"]
        found[kind] = phases
    return found


async def async_phases(
    address: str, f: Function, x: np.ndarray, build_decode: dict[str, float], rounds: int
) -> dict[str, float]:
    async with AsyncClient(address, timeout=600) as c:
        raw = c._channel.unary_unary(
            COMPUTE, request_serializer=identity, response_deserializer=identity
        )
        request = _requests.compute_request(f, ASYNC_KIND, x).filled().SerializeToString()
        metadata = c._metadata
        found = await async_interleaved(
            {
                "total": lambda: c.compute(f, ASYNC_KIND, x),
                "raw": lambda: raw(request, metadata=metadata, timeout=600),
            },
            ASYNC_CALLS,
            rounds,
        )
    phases = {p: build_decode[p] for p in ("build", "decode", "first build", "first decode")}
    phases |= found
    phases["call"] = phases["total"] - phases["build"] - phases["decode"]
    return phases


def table(record: dict[str, dict]) -> str:
    rows = [
        f"{'label':<8} {'workload':<20} "
        + " ".join(f"{p.replace('first ', '1st '):>9}" for p in PHASES)
        + f" {'total/raw':>9}"
    ]
    for label, found in record.items():
        for workload, phases in found.items():
            figures = (f"{phases[p]:9.1f}" if p in phases else f"{'-':>9}" for p in PHASES)
            rows.append(
                f"{label:<8} {workload:<20} "
                + " ".join(figures)
                + f" {phases['total'] / phases['raw']:9.2f}"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", default="current")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path(__file__).parent / "results" / "client-cost-cpu.json",
    )
    args = parser.parse_args()
    load = os.getloadavg()[0]
    proc, address, _ = start_server()
    pin_apart(proc.pid)
    try:
        rng = np.random.default_rng(0)
        A = rng.normal(size=(N, N))
        x = rng.normal(size=(1, N))
        with Client(address, timeout=600) as c:
            f = c.register("sum(tanh(A @ x)**2)", {"x": (N,)}, {"A": A}, dtype="float64")
            found = {f"sync {kind}": p for kind, p in sync_phases(c, f, x, args.rounds).items()}
        found[f"async {ASYNC_KIND} c{CONCURRENCY}"] = asyncio.run(
            async_phases(address, f, x, found[f"sync {ASYNC_KIND}"], args.rounds)
        )
    finally:
        proc.terminate()
        proc.wait()
    record = json.loads(args.out.read_text()) if args.out.exists() else {}
    results = record.get("results", {}) | {args.label: found}
    loads = record.get("load_1min", {}) | {args.label: load}
    print("µs of client CPU per call (n=8, float64, one point):")
    print(table(results))
    write_json(
        args.out,
        {
            "about": "µs of client CPU per call, median over rounds (benchmarks/client_cost.py)",
            "n": N,
            "dtype": "float64",
            "concurrency": CONCURRENCY,
            "rounds": args.rounds,
            "load_1min": loads,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
