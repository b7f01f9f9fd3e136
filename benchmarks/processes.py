"""Scaling of `hessd serve --processes N`: calls/s of single-point gradients (n=8) against N
server processes on one port, for each N given, in one run.

One `hessd serve --processes N` per N, all started first and kept up together; then rounds
that measure each N in turn (a change in the machine's load falls on every N alike), median
of --repeats rounds. In a round, --clients driver processes (this script run with --drive),
each one AsyncClient (one connection) with --concurrency calls in flight, call for
--seconds. A connection sticks to the server process the kernel's SO_REUSEPORT hash gave it,
so each driver reconnects until it reaches the process it was dealt (driver i: process
i mod N): the load is spread evenly, as it would be on average over many connections.

Per N it prints calls/s (and its ratio to N=1), p50 and p99 latency over every call of the
median round, and the CPU time per call of the drivers together and of the servers
together (from /proc, in 10 ms clock ticks: coarse for short calls). On a machine with few
cores the drivers compete with the servers for them: the scaling seen is a lower bound.

    python benchmarks/processes.py [--processes 1,2] [--clients 4] [--concurrency 16]
        [--seconds 4] [--repeats 3] [--out benchmarks/results/processes-cpu.json]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import importlib.metadata
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import threading
import time
from typing import Any

import grpc
import numpy as np

from hessd.client import AsyncClient, Function
from hessd.proto.v1 import hessd_pb2, hessd_pb2_grpc

from _timing import cpu_seconds, wait_for_quiet, write_json

EXPRESSION = "sum(tanh(A @ x)**2)"  # benchmarks/_workloads.py's, n=8, float32
N_INPUT = 8
SERVER_FLAGS = ("--host", "127.0.0.1", "--port", "0", "--compile-cache-dir", "")


# --- the drivers (this script with --drive) -----------------------------------------------


async def connect(address: str, server_id: str) -> tuple[AsyncClient, dict[str, Any]]:
    """An AsyncClient whose connection reached the server process `server_id` (any, if
    empty): each new channel is a new connection, which the kernel hashes anew."""
    for attempt in range(1, 201):
        client = AsyncClient(address, timeout=60)
        reached = (await client.server_info())["server_id"]
        if not server_id or reached == server_id:
            return client, {"ready": True, "server_id": reached, "attempts": attempt}
        await client.close()
    raise RuntimeError(f"200 connections never reached server {server_id}")


async def closed_loops(
    client: AsyncClient, f: Function, x: np.ndarray, concurrency: int, seconds: float
) -> dict[str, Any]:
    """`concurrency` loops of gradient calls for `seconds`: what they did."""
    latencies: list[float] = []
    errors = 0
    cpu = time.process_time()
    start = time.perf_counter()
    end = start + seconds

    async def caller() -> None:
        nonlocal errors
        while (now := time.perf_counter()) < end:
            try:
                await client.gradient(f, x)
            except grpc.RpcError:
                errors += 1
            latencies.append(time.perf_counter() - now)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return {
        "calls": len(latencies),
        "errors": errors,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu,
        "latencies_ms": [round(1e3 * t, 3) for t in latencies],
    }


async def drive(address: str, server_id: str, concurrency: int) -> None:
    """Connect to `server_id`, register the function and warm up, print {"ready": ...};
    then per `window SECONDS` line on stdin run the closed loops and print what they did,
    one JSON line each."""
    rng = np.random.default_rng(0)
    a = (rng.normal(size=(N_INPUT, N_INPUT)) / np.sqrt(N_INPUT)).astype(np.float32)
    x = rng.normal(size=(1, N_INPUT)).astype(np.float32)
    client, ready = await connect(address, server_id)
    f = await client.register(EXPRESSION, {"x": (N_INPUT,)}, {"A": a})
    for _ in range(50):
        await client.gradient(f, x)
    print(json.dumps(ready), flush=True)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        record = await closed_loops(client, f, x, concurrency, float(line.split()[1]))
        print(json.dumps(record), flush=True)
    await client.close()


class Driver:
    """A driver process: --drive against `address`, reaching `server_id`."""

    def __init__(self, address: str, server_id: str, concurrency: int):
        args = [sys.executable, __file__, "--drive", address, "--server-id", server_id]
        self.proc = subprocess.Popen(
            [*args, "--concurrency", str(concurrency)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.ready = self.answer()

    def answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"driver exited ({self.proc.wait()})")
        return json.loads(line)

    def start_window(self, seconds: float) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"window {seconds}\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)
        if self.proc.stdout:
            self.proc.stdout.close()


# --- the servers --------------------------------------------------------------------------


class Served:
    """`hessd serve --processes N` on a free loopback port: its address and the pids of the
    server processes (the supervisor's children for N > 1), its stderr drained by a thread."""

    def __init__(self, processes: int):
        args = [sys.executable, "-m", "hessd.tools.cli", "serve", *SERVER_FLAGS]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [*args, "--processes", str(processes)], env=env, stderr=subprocess.PIPE, text=True
        )
        self.log: collections.deque[str] = collections.deque(maxlen=50)
        suffix = f" with {processes} processes" if processes > 1 else " "
        pattern = re.compile(rf"listening on ([\d.]+:\d+){suffix}")
        children: list[int] = []
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            if match := re.search(r"process \d+ serving \(pid (\d+)\)", line):
                children.append(int(match.group(1)))
            if match := pattern.search(line):
                self.address = match.group(1)
                break
        else:
            raise RuntimeError("the server exited before listening:\n" + "".join(self.log))
        self.pids = children or [self.proc.pid]
        stderr = self.proc.stderr
        threading.Thread(target=lambda: self.log.extend(stderr), daemon=True).start()

    def server_ids(self, want: int) -> list[str]:
        """The server_id of each of its processes, asked over new connections."""
        ids: list[str] = []
        self.backend = ""
        for _ in range(200):
            options = [("grpc.use_local_subchannel_pool", 1)]
            with grpc.insecure_channel(self.address, options=options) as channel:
                stub = hessd_pb2_grpc.HessdStub(channel)
                reply = stub.ServerInfo(hessd_pb2.ServerInfoRequest(), timeout=30)
            self.backend = reply.backend
            if reply.server_id not in ids:
                ids.append(reply.server_id)
            if len(ids) == want:
                return ids
        raise RuntimeError(f"found {len(ids)} of {want} server processes")

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


# --- measuring ----------------------------------------------------------------------------


def window(served: Served, drivers: list[Driver], seconds: float) -> dict[str, Any]:
    """One round against one N: every driver for `seconds`, at once."""
    server_cpu = served.cpu_seconds()
    for d in drivers:
        d.start_window(seconds)
    found = [d.answer() for d in drivers]
    server_cpu = served.cpu_seconds() - server_cpu
    calls = sum(r["calls"] for r in found)
    latencies = [t for r in found for t in r["latencies_ms"]]
    return {
        "calls_per_s": sum(r["calls"] / r["seconds"] for r in found),
        "calls": calls,
        "errors": sum(r["errors"] for r in found),
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "client_cpu_us": 1e6 * sum(r["cpu_seconds"] for r in found) / calls,
        "server_cpu_us": 1e6 * server_cpu / calls,
        "calls_per_driver": [r["calls"] for r in found],
    }


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("hessd", "jax", "jaxlib", "grpcio", "protobuf", "numpy"):
        found[name] = importlib.metadata.version(name)
    return found


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'processes':>9}{'calls/s':>10}{'vs N=1':>8}{'p50 ms':>8}{'p99 ms':>8}"
        f"{'client µs':>11}{'server µs':>11}{'errors':>8}  calls per driver"
    )
    base = rows[0]["calls_per_s"]
    for r in rows:
        print(
            f"{r['processes']:>9}{r['calls_per_s']:>10.0f}{r['calls_per_s'] / base:>8.2f}"
            f"{r['p50_ms']:>8.2f}{r['p99_ms']:>8.2f}{r['client_cpu_us']:>11.0f}"
            f"{r['server_cpu_us']:>11.0f}{r['errors']:>8}  {r['calls_per_driver']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,2", help="values of N, comma-separated")
    parser.add_argument("--clients", type=int, default=4, help="driver processes")
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight each")
    parser.add_argument("--seconds", type=float, default=4.0, help="per round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per N (median)")
    parser.add_argument("--out", type=pathlib.Path)
    parser.add_argument("--quiet-load", type=float, default=1.5)
    parser.add_argument("--max-wait", type=float, default=60.0, help="seconds")
    parser.add_argument("--drive", help=argparse.SUPPRESS)
    parser.add_argument("--server-id", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        asyncio.run(drive(args.drive, args.server_id, args.concurrency))
        return

    counts = [int(n) for n in args.processes.split(",")]
    load_start = wait_for_quiet(args.quiet_load, args.max_wait)
    started = time.perf_counter()
    served: dict[int, Served] = {}
    drivers: dict[int, list[Driver]] = {}
    try:
        for n in counts:
            served[n] = Served(n)
        for n in counts:
            print(f"connecting {args.clients} drivers to N={n}", file=sys.stderr, flush=True)
            ids = served[n].server_ids(n)
            drivers[n] = [
                Driver(served[n].address, ids[i % n], args.concurrency) for i in range(args.clients)
            ]
        for n in counts:  # an unmeasured round each: compiles, connections, caches
            window(served[n], drivers[n], 1.0)
        rounds: dict[int, list[dict[str, Any]]] = {n: [] for n in counts}
        for i in range(args.repeats):
            for n in counts:
                print(f"round {i + 1}/{args.repeats}, N={n}", file=sys.stderr, flush=True)
                rounds[n].append(window(served[n], drivers[n], args.seconds))
    finally:
        for found in drivers.values():
            for d in found:
                d.close()
        for s in served.values():
            s.close()

    backend = served[counts[0]].backend
    out = args.out or pathlib.Path(__file__).parent / "results" / f"processes-{backend}.json"
    rows = []
    for n in counts:
        median = sorted(rounds[n], key=lambda r: r["calls_per_s"])[len(rounds[n]) // 2]
        rows.append(
            {
                "processes": n,
                **median,
                "calls_per_s_rounds": [r["calls_per_s"] for r in rounds[n]],
                "connection_attempts": [d.ready["attempts"] for d in drivers[n]],
            }
        )
    print(
        f"single-point gradient n={N_INPUT}, {args.clients} drivers x {args.concurrency} in "
        f"flight, {backend}, {os.cpu_count()} CPUs, "
        f"median of {args.repeats} rounds of {args.seconds} s"
    )
    print_table(rows)
    meta = {
        "backend": backend,
        "versions": versions(),
        "cpus": os.cpu_count(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "clients": args.clients,
        "concurrency_per_client": args.concurrency,
        "seconds_per_round": args.seconds,
        "repeats": args.repeats,
        "seconds": time.perf_counter() - started,
        "server_flags": SERVER_FLAGS,
        "workload": f"gradient of {EXPRESSION}, n={N_INPUT}, batch 1, float32",
    }
    write_json(out, {"meta": meta, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
