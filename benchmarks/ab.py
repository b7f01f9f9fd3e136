"""Two `hessd serve`s measured in one run: A against a baseline B, and both against the raw
gRPC floors, at 64 calls in flight.

The machines here drift from day to day and minute to minute (the same code's calls/s has
moved 2.5x between days), so a figure from another run is no baseline. This script keeps
four servers up together and measures them in interleaved rounds, A and B alternating which
goes first, median of --rounds:

  A              this checkout's `hessd serve`, with --a-flags and --a-env
  B              the baseline: another checkout's `hessd` (--b-hessd, e.g. the virtualenv
                 of an older commit), or this one with --b-flags and --b-env
  floor          the raw gRPC echo server over threads (benchmarks/_servers.py), the floor
                 throughput.py's concurrency target is judged against
  floor aio      the same echo on a grpc.aio server, hessd's model

Each server gets the single-point gradient of throughput.py (sum(tanh(A x)^2), n=8, one
point a call) from this checkout's AsyncClient, the floors the very request bytes it sends
(raw grpc.aio unary calls). Printed per server: calls/s, its ratio to B and to the floor,
and the CPU time per call of the client (this process) and of the server process (from
/proc, in 10 ms clock ticks).

    git worktree add /tmp/before REV && make -C /tmp/before .venv/.installed-server
    python benchmarks/ab.py --b-hessd /tmp/before/.venv/bin/hessd
    python benchmarks/ab.py --b-env JAX_CPU_ENABLE_ASYNC_DISPATCH=false
    python benchmarks/ab.py --b-flags "--event-loop asyncio" [--rounds 7] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import pathlib
import platform
import shlex
import statistics
import subprocess
import sys
from collections.abc import Sequence

from hessd.client import AsyncClient, Client
from hessd.tools._common import EVENT_LOOPS, event_loop_factory

from _measure import CALLS_PER_ROUND, CONCURRENCY, Call, echo_call, rates
from _servers import hessd_command, start_echo_server, start_server
from _timing import wait_for_quiet, write_json
from _wire import wire_of
from _workloads import workload

ECHO_WORKERS = 16  # as throughput.py's
SERVERS = ("A", "B", "floor", "floor aio")


def _environment(pairs: Sequence[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"ab.py: --a-env/--b-env takes NAME=VALUE, got {pair!r}")
        env[name] = value
    return env


def _version(command: Sequence[str], tree: pathlib.Path) -> str:
    """`hessd --version` of `command`, and the commit of the checkout `tree` it runs from."""
    found = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60)
    commit = subprocess.run(
        ["git", "-C", str(tree), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return f"{(found.stdout or found.stderr).strip()} at {commit.stdout.strip() or 'unknown'}"


def _tree(command: Sequence[str]) -> pathlib.Path:
    """The checkout a `hessd` command runs from: that of its virtualenv (.venv/bin/hessd)."""
    return pathlib.Path(command[0]).resolve().parent.parent.parent


async def _measure(
    addresses: dict[str, str], pids: dict[str, int], rounds: int
) -> tuple[dict[str, dict[str, list[float]]], int, int]:
    async with contextlib.AsyncExitStack() as stack:
        calls: dict[str, Call] = {}
        wire = None
        for name in ("A", "B"):
            with Client(addresses[name]) as setup:
                w = workload("gradient-c64", setup)
            wire = wire or wire_of(w.function, w.kind, w.points, w.options, 1 << 20)
            client = await stack.enter_async_context(AsyncClient(addresses[name], timeout=600))
            calls[name] = functools.partial(client.compute, w.function, w.kind, w.points)
        assert wire is not None
        for name in ("floor", "floor aio"):
            calls[name] = await echo_call(stack, addresses[name], wire)

        def order(i: int) -> Sequence[str]:  # A and B take turns at going first
            return SERVERS if i % 2 == 0 else ("B", "A", *SERVERS[2:])

        found = await rates(calls, pids, rounds, per_round=2 * CALLS_PER_ROUND, order=order)
        return found, wire.bytes_in, wire.bytes_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a-flags", default="", help="flags for A's hessd serve, one string")
    parser.add_argument("--a-env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument(
        "--b-hessd", help="B's hessd command (another checkout's); default this checkout's"
    )
    parser.add_argument("--b-flags", default="", help="flags for B's hessd serve, one string")
    parser.add_argument("--b-env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--event-loop", choices=EVENT_LOOPS, default="auto", help="the client's")
    parser.add_argument("--quiet-load", type=float, default=1.5)
    parser.add_argument("--max-wait", type=float, default=120.0)
    parser.add_argument("--out", type=pathlib.Path, help="write the figures as JSON here too")
    args = parser.parse_args()

    here = pathlib.Path(__file__).resolve().parent.parent
    b_command = hessd_command() if args.b_hessd is None else shlex.split(args.b_hessd)
    specs = {
        "A": (hessd_command(), shlex.split(args.a_flags), _environment(args.a_env)),
        "B": (b_command, shlex.split(args.b_flags), _environment(args.b_env)),
    }
    versions = {
        "A": _version(specs["A"][0], here),
        "B": _version(b_command, here if args.b_hessd is None else _tree(b_command)),
    }
    load_start = wait_for_quiet(args.quiet_load, args.max_wait)
    processes: list[subprocess.Popen] = []
    addresses: dict[str, str] = {}
    try:
        for name, (command, flags, env) in specs.items():
            process, addresses[name], _ = start_server(*flags, command=command, env=env)
            processes.append(process)
        for name, aio in (("floor", False), ("floor aio", True)):
            process, addresses[name] = start_echo_server(ECHO_WORKERS, aio=aio)
            processes.append(process)
        pids = {name: p.pid for name, p in zip(SERVERS, processes, strict=True)}
        with asyncio.Runner(loop_factory=event_loop_factory(args.event_loop)) as runner:
            found, bytes_in, bytes_out = runner.run(_measure(addresses, pids, args.rounds))
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)

    median = {
        name: {key: statistics.median(values) for key, values in measured.items()}
        for name, measured in found.items()
    }
    baseline, floor = median["B"]["per_s"], median["floor"]["per_s"]
    print(
        f"gradient n=8 batch=1, {CONCURRENCY} in flight, {bytes_in} B in, {bytes_out} B out; "
        f"median of {args.rounds} rounds of {2 * CALLS_PER_ROUND} calls"
    )
    print(f"{'server':<11}{'calls/s':>9}{'/ B':>7}{'/ floor':>9}{'client µs':>11}{'server µs':>11}")
    for name in SERVERS:
        m = median[name]
        print(
            f"{name:<11}{m['per_s']:>9.0f}{m['per_s'] / baseline:>7.2f}{m['per_s'] / floor:>9.2f}"
            f"{m['client_cpu_us']:>11.0f}{m['server_cpu_us']:>11.0f}"
        )
    for name, (_, flags, env) in specs.items():
        print(f"  {name}: {versions[name]}; flags {flags or '-'}; env {env or '-'}")
    if args.out is None:
        return
    write_json(
        args.out,
        {
            "meta": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "load_average_start": load_start,
                "load_average_end": os.getloadavg(),
                "rounds": args.rounds,
                "calls_per_round": 2 * CALLS_PER_ROUND,
                "concurrency": CONCURRENCY,
                "client_event_loop": args.event_loop,
                "servers": {
                    name: {"version": versions[name], "command": c, "flags": f, "env": e}
                    for name, (c, f, e) in specs.items()
                },
            },
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "median": median,
            "ratio_a_over_b": median["A"]["per_s"] / baseline,
            "ratio_a_over_floor": median["A"]["per_s"] / floor,
            "rounds": {name: dict(measured) for name, measured in found.items()},
        },
    )


if __name__ == "__main__":
    sys.exit(main())
