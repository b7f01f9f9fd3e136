"""Throughput of hessd against in-process JAX and against the raw gRPC transport, in one run.

Each workload is measured three ways, interleaved round by round so that a noisy machine
disturbs them alike, each warmed up first (compiles excluded), median of --repeats rounds:

  service     Client.compute(f, kind, X) against a `hessd serve` subprocess on loopback
  in-process  np.asarray(jax.jit(jax.vmap(kind))(X)) in this process, same jax.numpy
              function, same dtype
  floor       a raw gRPC echo server in another subprocess (benchmarks/_servers.py) that
              takes the very request bytes the client would send and answers as many bytes
              as hessd would, by the transport the client picks: one unary call up to the
              client's stream_threshold (1 MiB), above it a bidirectional stream of the
              same messages hessd's ComputeStream exchanges (a header, then ~1 MiB chunks).
              Raw bytes both ways, no protobuf, no compute: the cost of moving the bytes.
              It answers hessd's method names over a channel configured as the client's,
              so the same service config (retries) applies.

ratio = service / (in-process + floor); a service that only added its transport to JAX
would score 1. Also printed: the mean CPU time per call of this process and of the server
process (from /proc, in 10 ms clock ticks summed over the rounds: coarse for short calls).

The single-point gradient is also driven at concurrency 64 (AsyncClient, 64 calls in
flight, against 64 raw grpc.aio unary calls in flight for the floor). That row has two
floors: the echo server above (a grpc.server over threads, the faster server model for
small calls on this machine, which the target is judged against) and the same echo on a
grpc.aio server, hessd's own model. The Hessian and
Jacobian workloads are also timed in-process with PyTorch's torch.func, 2 threads, same
float32 data: vmap(hessian) and vmap(jacrev(jacrev)), vmap(jacrev). A method whose
warm-up call takes over 5 s (torch's vmap(hessian)) is timed in 2 rounds only.

`--phases` adds, per workload, the pieces of the service's path timed one by one in this
process (no gRPC): client encode, server parse / handler / serialize, engine.run, client
decode, and in-process compute and device-to-host copy apart.

    python benchmarks/throughput.py [--repeats 7] [--only hessian] [--phases]
        [--server aio|threads] [--out benchmarks/results/throughput-cpu.json]

The machine should be quiet: the run waits (up to --max-wait seconds) for the 1-minute
load average to fall below --quiet-load, and records the load it ran under.

The pieces live beside this file: _workloads.py (the seven workloads), _torch_peers.py,
_wire.py (the bytes a call moves; the floor's calls), _servers.py (hessd serve and the echo
server), _measure.py (the interleaved rounds, concurrency 64, the targets), _phases.py
(--phases) and _timing.py.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import pathlib
import platform
import sys
import time
from typing import Any

import jax

from hessd.client import Client
from hessd.tools._common import EVENT_LOOPS

from _measure import (
    CALLS_PER_ROUND,
    CONCURRENCY,
    LATENCY_CALLS,
    RATIO_TARGET,
    SLOW_ROUNDS,
    SLOW_SECONDS,
    THROUGHPUT_TARGET,
    measure,
    measure_concurrent,
    verdict,
)
from _phases import phase_server, phases
from _servers import start_echo_server, start_server
from _timing import wait_for_quiet, write_json
from _torch_peers import THREADS as TORCH_THREADS
from _wire import Floor
from _workloads import MAX_OUTPUT_BYTES, WORKLOADS, workload

SERVER_FLAGS = ("--max-output-bytes", str(MAX_OUTPUT_BYTES))  # the rest at their defaults


# --- output -------------------------------------------------------------------------------


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def targets(rows: list[dict], rates: list[dict]) -> list[dict[str, str]]:
    """Each target this run can judge: what it asks, and "meets" or "misses by X%"."""
    found = []
    for r in rows:
        if r["target"] != "-":
            what = f"{r['workload']}: service / (in-process + floor) = {r['ratio']:.2f}"
            found.append({"target": f"{what} <= {RATIO_TARGET}", "verdict": r["target"]})
    for r in rates:
        what = f"{r['workload']}: service / raw unary rate = {r['ratio']:.2f}"
        found.append({"target": f"{what} >= {THROUGHPUT_TARGET}", "verdict": r["target"]})
    for r in rows:
        if r["name"] == "hessian" and "service_over_fastest_torch" in r:
            over = r["service_over_fastest_torch"]
            what = f"{r['workload']}: hessd / fastest torch.func = {over:.2f}"
            found.append({"target": f"{what} < 1", "verdict": verdict(over, 1.0, True)})
    return found


def print_tables(rows: list[dict], rates: list[dict], phase_rows: dict) -> None:
    print(
        f"{'workload':<42}{'transport':>10}{'bytes in':>11}{'bytes out':>11}{'service ms':>12}"
        f"{'in-proc ms':>12}{'floor ms':>10}{'ratio':>7}  target (ratio <= {RATIO_TARGET})"
    )
    for r in rows:
        print(
            f"{r['workload']:<42}{r['transport']:>10}{human_bytes(r['bytes_in']):>11}"
            f"{human_bytes(r['bytes_out']):>11}{r['service_ms']:>12.2f}{r['in_process_ms']:>12.2f}"
            f"{r['floor_ms']:>10.2f}{r['ratio']:>7.2f}  {r['target']}"
        )
    for r in rows:
        if "ratio_vs_plain_floor" in r:
            print(
                f"  {r['workload']}: against the plain floor ({human_bytes(r['plain_bytes_out'])} "
                f"out, {r['floor_plain_ms']:.2f} ms) the ratio is {r['ratio_vs_plain_floor']:.2f}"
            )
    if rows:
        print()
        print(
            f"{'CPU ms per call (mean)':<42}{'service: client':>16}{'server':>8}"
            f"{'floor: client':>15}{'server':>8}{'in-process':>12}"
        )
        for r in rows:
            cpu = r["cpu_ms_per_call"]
            print(
                f"{r['workload']:<42}{cpu['service']['client_cpu_ms']:>16.2f}"
                f"{cpu['service']['server_cpu_ms']:>8.2f}{cpu['floor']['client_cpu_ms']:>15.2f}"
                f"{cpu['floor']['server_cpu_ms']:>8.2f}{cpu['in_process']['client_cpu_ms']:>12.2f}"
            )
    if rates:
        print()
        print(
            f"{'workload':<42}{'bytes in':>11}{'bytes out':>11}{'service /s':>12}{'floor /s':>10}"
            f"{'ratio':>7}  target (ratio >= {THROUGHPUT_TARGET})"
        )
        for r in rates:
            print(
                f"{r['workload']:<42}{human_bytes(r['bytes_in']):>11}"
                f"{human_bytes(r['bytes_out']):>11}{r['service_per_s']:>12.0f}"
                f"{r['floor_per_s']:>10.0f}{r['ratio']:>7.2f}  {r['target']}"
            )
            print(
                f"  CPU µs per call, client + server process: service "
                f"{r['service_client_cpu_us']:.0f} + {r['service_server_cpu_us']:.0f}, "
                f"floor {r['floor_client_cpu_us']:.0f} + {r['floor_server_cpu_us']:.0f}"
            )
            if "ratio_vs_aio_floor" in r:
                print(
                    f"  against a grpc.aio echo server (hessd's model): "
                    f"{r['floor_aio_per_s']:.0f}/s, ratio {r['ratio_vs_aio_floor']:.2f}; CPU "
                    f"{r['floor_aio_client_cpu_us']:.0f} + {r['floor_aio_server_cpu_us']:.0f}"
                )
    peers = [r for r in rows if "service_over_fastest_torch" in r]
    if peers:
        print()
        print(
            f"{'workload':<30}{'torch.func':>22}{'torch ms':>10}{'hessd ms':>10}{'JAX ms':>10}"
            f"{'hessd / torch':>15}"
        )
        for r in peers:
            names = [k[len("torch ") : -len("_ms")] for k in r if k.startswith("torch ")]
            for name in names:
                torch_ms = r[f"torch {name}_ms"]
                print(
                    f"{r['workload']:<30}{name:>22}{torch_ms:>10.1f}{r['service_ms']:>10.1f}"
                    f"{r['in_process_ms']:>10.1f}{r['service_ms'] / torch_ms:>15.2f}"
                )
    for label, pieces in phase_rows.items():
        print()
        print(f"phases of {label} (ms, median)")
        for name, ms in pieces.items():
            print(f"  {name:<28}{ms:>10.2f}")
    print()
    print("targets")
    for t in targets(rows, rates):
        print(f"  {t['verdict']:<18}{t['target']}")


def versions() -> dict[str, str]:
    names = ("hessd", "jax", "jaxlib", "grpcio", "protobuf", "numpy", "torch")
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


# --- main ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="rounds per workload (median)")
    parser.add_argument("--only", action="append", choices=WORKLOADS, help="repeatable")
    parser.add_argument("--phases", action="store_true", help="also time the pieces")
    parser.add_argument("--out", type=pathlib.Path)
    parser.add_argument("--quiet-load", type=float, default=1.5)
    parser.add_argument("--max-wait", type=float, default=240.0, help="seconds")
    parser.add_argument("--echo-workers", type=int, default=16, help=argparse.SUPPRESS)
    parser.add_argument(
        "--server",
        choices=("aio", "threads"),
        default="aio",
        help="the transport of the hessd serve measured (--server)",
    )
    parser.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default="auto",
        help="the event loop of the hessd serve measured (--event-loop)",
    )
    args = parser.parse_args()
    selected = args.only or list(WORKLOADS)

    backend = jax.default_backend()
    out = args.out or pathlib.Path(__file__).parent / "results" / f"throughput-{backend}.json"
    load_start = wait_for_quiet(args.quiet_load, args.max_wait)
    started = time.perf_counter()
    server_flags = (*SERVER_FLAGS, "--server", args.server, "--event-loop", args.event_loop)
    proc, address, _ = start_server(*server_flags)
    echo_proc, echo = start_echo_server(args.echo_workers)
    # hessd's own server model, for the concurrency row: a second floor beside the first.
    echo_aio_proc, echo_aio = start_echo_server(args.echo_workers, aio=True)
    floor = Floor(echo)
    rows: list[dict[str, Any]] = []
    rates: list[dict[str, Any]] = []
    phase_rows: dict[str, dict[str, float]] = {}
    try:
        with contextlib.ExitStack() as stack:
            client = stack.enter_context(Client(address, timeout=600))
            server = stack.enter_context(phase_server()) if args.phases else None
            info = client.server_info()
            pids = {"service": proc.pid, "floor": echo_proc.pid, "floor_aio": echo_aio_proc.pid}
            echoes = {"floor": echo, "floor_aio": echo_aio}
            for name in WORKLOADS:
                if name not in selected:
                    continue
                print(f"measuring {name}", file=sys.stderr, flush=True)
                w = workload(name, client)
                if name == "gradient-c64":
                    rates.append(
                        measure_concurrent(
                            w, address, echoes, pids, client.stream_threshold, args.repeats
                        )
                    )
                    continue
                rows.append(measure(w, client, floor, pids, args.repeats))
                if server is not None:
                    phase_rows[w.label] = phases(
                        w, server, client.stream_threshold, args.repeats, rows[-1]["floor_ms"]
                    )
    finally:
        floor.close()
        for p in (proc, echo_proc, echo_aio_proc):
            p.terminate()
            p.wait(timeout=30)

    device = info["devices"][0]["kind"]
    print(
        f"backend {backend} ({device}), {os.cpu_count()} CPUs, median of --repeats {args.repeats}"
    )
    print_tables(rows, rates, phase_rows)
    meta = {
        "backend": backend,
        "device": device,
        "versions": versions(),
        "cpus": os.cpu_count(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "repeats": args.repeats,
        "latency_calls_per_round": LATENCY_CALLS,
        "concurrency": CONCURRENCY,
        "calls_per_concurrency_round": CALLS_PER_ROUND,
        "seconds": time.perf_counter() - started,
        "server_flags": server_flags,
        "echo_server_workers": args.echo_workers,
        "torch_threads": TORCH_THREADS,
        "slow_method": {"seconds": SLOW_SECONDS, "rounds": SLOW_ROUNDS},
        "targets": {
            "ratio_at_most": RATIO_TARGET,
            "concurrency_throughput_ratio_at_least": THROUGHPUT_TARGET,
        },
    }
    record = {
        "meta": meta,
        "rows": rows,
        "concurrency": rates,
        "targets": targets(rows, rates),
        "phases": phase_rows,
    }
    write_json(out, record)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
