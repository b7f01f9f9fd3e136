"""`hessd bench` from flags to report, and its exit codes."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import sys
from pathlib import Path
from typing import Any

import grpc

from hessd.client import HessdError
from hessd.tools._common import (
    Refused,
    ServerGone,
    connection_options,
    event_loop_factory,
    matplotlib,
    refuse,
    run_interruptibly,
)
from hessd.tools._function_file import FunctionSpec
from hessd.tools.bench._flags import compute_options, function_spec, jsonable_args, load_levels
from hessd.tools.bench._load import Sweep
from hessd.tools.bench._report import format_table, plot, plot_title, write_results

__all__ = ["main"]

TOOL = "hessd bench"


def main(args: argparse.Namespace) -> int:
    """Run the sweep; the exit code: 0 measured, 1 no server, 2 refused, 130 interrupted."""
    return run_interruptibly(TOOL, lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    started_at = _now()
    try:
        spec, constant_sources = function_spec(args)
        levels = load_levels(args)
        options = compute_options(args)
        connection = connection_options(args)
        loop_factory = event_loop_factory(args.event_loop)
        if args.plot:
            matplotlib()
        out = Path(args.out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise Refused(f"--out {out}: cannot create {out.parent}: {e}") from None
    except Refused as e:
        return refuse(TOOL, e)
    except KeyboardInterrupt:
        print(f"{TOOL}: interrupted before anything was measured", file=sys.stderr)
        return 130
    sweep = Sweep(args, spec, levels, options, connection)
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(sweep.run())
        outcome, code = "finished", 0
    except KeyboardInterrupt:
        outcome, code = "interrupted", 130
    except ServerGone as e:
        outcome, code = "server unavailable", 1
        print(f"{TOOL}: {e}", file=sys.stderr)
    except (HessdError, Refused) as e:
        return refuse(TOOL, e)
    rows = sweep.rows(partial=outcome)
    if code == 130:
        done = "interrupted" if rows else "interrupted before anything was measured"
        print(f"{TOOL}: {done}", file=sys.stderr)
    if not rows:
        return code
    print(format_table(rows, args.batch))
    loop = "asyncio" if loop_factory is None else "uvloop"
    metadata = _metadata(args, spec, constant_sources, sweep, started_at, outcome, loop)
    written: list[Path] = []
    try:
        written += write_results(out, rows, metadata)
        if args.plot:
            written += plot(
                out, rows, args.batch, plot_title(args.kind, spec.expression, args.batch)
            )
    except (OSError, Refused) as e:
        print(f"{TOOL}: cannot write the results: {e}", file=sys.stderr)
        return code or 2
    except KeyboardInterrupt:
        wrote = f"; wrote {', '.join(str(p) for p in written)}" if written else ""
        print(f"{TOOL}: interrupted while writing the results{wrote}", file=sys.stderr)
        return 130
    print("wrote " + ", ".join(str(p) for p in written))
    return code


def _metadata(
    args: argparse.Namespace,
    spec: FunctionSpec,
    constant_sources: dict[str, str],
    sweep: Sweep,
    started_at: str,
    outcome: str,
    event_loop: str,
) -> dict[str, Any]:
    f = sweep.function
    return {
        "args": jsonable_args(args),
        "function": {
            "id": f.id if f else None,
            "expression": spec.expression,
            "inputs": {name: list(shape) for name, shape in spec.inputs.items()},
            "constants": constant_sources,
            "dtype": spec.dtype,
            "output_shape": list(f.output_shape) if f else None,
        },
        "server_info": sweep.server_info,
        "client": {
            "host": platform.node(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "event_loop": event_loop,
        },
        "started_at": started_at,
        "finished_at": _now(),
        "outcome": outcome,
    }


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
