"""`hessd bench`: throughput and latency of one derivative kind, in the spirit of Triton's
perf_analyzer.

    hessd bench --address 127.0.0.1:50051 --expression "sum(tanh(A @ x)**2)" \
        --inputs x=256 --constant A=random:256x256 --kind gradient --batch 1 \
        --concurrency 1,2,4,8,16,32,64 --out results/bench --plot

The function is an expression with --inputs (NAME=SHAPE, SHAPE as `256`, `4x3`, or `()` for
a scalar) and --constant NAME=SOURCE (`random:SHAPE`: standard normal from --seed, scaled by
1/√(last axis) so that `A @ x` stays of order one; `zeros:SHAPE`; or a .npy path), or a
function file (--function, the format of `hessd spectrum --function`). The points
(batch, *shape) per input, and for hvp, jvp, vjp and taylor a vector, are drawn once from
--seed; every request sends the same ones.

Two load models, one asyncio loop over one AsyncClient (grpc.aio) channel:

    --concurrency 1,4,16   closed loop: at each level c, c coroutines each await one request
                           after another, so c requests are in flight at all times
    --request-rate 100,500 open loop: requests start at Poisson arrivals of that mean rate
                           (--arrivals constant: evenly spaced) whether or not earlier ones
                           have finished; in-flight is unbounded and reported

Latency is measured around `await client.compute(...)`: the client's encoding and event-loop
delays are part of it, as they are of what an asyncio caller sees, and so are the retries the
client makes on UNAVAILABLE (a retried request counts once, as a success or an error).

Each level is measured in windows of --window-seconds, repeated until the last 3 windows
agree within --stability on throughput and on p95 latency (every one within that fraction of
their mean), or until --max-windows; then the level is marked "unstable". A request belongs
to the window in which it completes. The row reports the last 3 windows together:

    requests_per_s         successful requests per second
    points_per_s           requests_per_s * batch
    p50_ms … p99_ms        latency percentiles of the successful requests
    completed, errors      counts; errors_by_code by gRPC status name (a failed request is
                           an error, never a latency)
    sent_per_s             requests started per second (open loop: the arrival rate achieved)
    in_flight_mean, _max   requests in flight as each request started, itself included
    windows, status        windows measured; "stable", "unstable", or for a level cut short
                           "interrupted" or "server unavailable"

Output: the table on stdout, `<out>.csv` (one row per level, the columns of COLUMNS),
`<out>.json` ({"metadata": {...}, "rows": [...]}, each row also with its window_stats), and
with --plot `<out>-throughput.png` and `<out>-latency.png`.

Exit codes: 0 measured; 1 no server answered at --address within --connect-timeout, or the
setup did not finish within --setup-timeout, or every request of a window failed with
UNAVAILABLE (the client retries UNAVAILABLE with backoff first); 2 a refused flag, file or
request (the first request is sent before the sweep, so a kind the function does not take
fails there); 130 interrupted, after printing and writing what was measured so far.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import csv
import dataclasses
import datetime
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from hessd.client import AsyncClient, DeadlineExceeded, Function, HessdError, Unavailable, _args
from hessd.client.spectrum_job import FunctionSpec, JobError, _load_spec

__all__ = [
    "COLUMNS",
    "Row",
    "Window",
    "add_arguments",
    "format_table",
    "is_stable",
    "main",
    "plot",
    "summarize",
    "write_results",
]

KINDS = ("value", "gradient", "jacobian", "hessian", "hvp", "jvp", "vjp", "taylor2", "taylor")
_VECTOR_KINDS = ("hvp", "jvp", "vjp", "taylor")
_DTYPES = ("float32", "float64")
DEFAULT_CONCURRENCY = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_TAYLOR_ORDER = 2
STABLE_WINDOWS = 3
PERCENTILES = (50, 90, 95, 99)
COLUMNS = (
    "mode",
    "concurrency",
    "request_rate",
    "requests_per_s",
    "points_per_s",
    "p50_ms",
    "p90_ms",
    "p95_ms",
    "p99_ms",
    "completed",
    "errors",
    "errors_by_code",
    "sent_per_s",
    "in_flight_mean",
    "in_flight_max",
    "seconds",
    "windows",
    "status",
)


class BenchError(Exception):
    """A refused flag or file; main prints it and returns 2."""


class ServerGone(Exception):
    """No server answered at the start, or a whole window of requests failed with
    UNAVAILABLE (the server went away mid-sweep); main prints it and returns 1."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `hessd bench`."""
    function = parser.add_mutually_exclusive_group(required=True)
    function.add_argument("--expression", help='the function, e.g. "sum(tanh(A @ x)**2)"')
    function.add_argument(
        "--function",
        metavar="SPEC",
        help="the function as a .json or .toml file (the format of hessd spectrum --function), "
        "instead of --expression, --inputs, --constant and --dtype",
    )
    parser.add_argument(
        "--inputs",
        nargs="+",
        type=_input_flag,
        default=[],
        metavar="NAME=SHAPE",
        help="with --expression: each input and the shape of one point, e.g. x=256 X=4x3 s=()",
    )
    parser.add_argument(
        "--constant",
        action="append",
        type=_constant_flag,
        default=[],
        metavar="NAME=SOURCE",
        help="with --expression, repeatable: random:SHAPE (standard normal from --seed, "
        "scaled by 1/sqrt(last axis)), zeros:SHAPE, or a .npy path",
    )
    parser.add_argument(
        "--dtype", choices=_DTYPES, help="with --expression: the function's dtype (float32)"
    )
    parser.add_argument("--address", default="127.0.0.1:50051", help="(default: %(default)s)")
    parser.add_argument("--kind", choices=KINDS, default="gradient", help="(default: gradient)")
    parser.add_argument("--wrt", help="the input derivatives are taken with respect to")
    parser.add_argument(
        "--mode", choices=("auto", "forward", "reverse"), help="jacobian: (default: auto)"
    )
    parser.add_argument(
        "--order",
        type=_args.positive_int,
        help=f"taylor: how many directional derivatives (default: {DEFAULT_TAYLOR_ORDER})",
    )
    parser.add_argument(
        "--batch", type=_args.positive_int, default=1, help="points per request (default: 1)"
    )
    load = parser.add_mutually_exclusive_group()
    load.add_argument(
        "--concurrency",
        type=_levels(int),
        metavar="C,C,...",
        help="closed loop: requests in flight at each level "
        f"(default: {','.join(map(str, DEFAULT_CONCURRENCY))})",
    )
    load.add_argument(
        "--request-rate",
        type=_levels(float),
        metavar="R,R,...",
        help="open loop: requests started per second at each level, in-flight unbounded",
    )
    parser.add_argument(
        "--arrivals",
        choices=("poisson", "constant"),
        default="poisson",
        help="--request-rate: exponential or equal gaps between starts (default: %(default)s)",
    )
    parser.add_argument(
        "--window-seconds",
        type=_args.positive_float,
        default=2.0,
        help="length of one measurement window (default: %(default)s)",
    )
    parser.add_argument(
        "--max-windows",
        type=_at_least(STABLE_WINDOWS),
        default=10,
        help="windows per level before it is reported as unstable (default: %(default)s)",
    )
    parser.add_argument(
        "--stability",
        type=_args.positive_float,
        default=0.10,
        help=f"the last {STABLE_WINDOWS} windows' throughput and p95 must each lie within this "
        "fraction of their mean (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=_args.positive_float,
        default=30.0,
        help="seconds per measured request; a late one is a DEADLINE_EXCEEDED error "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=_args.positive_float,
        default=10.0,
        help="seconds for the server to answer ServerInfo, the first call; the client retries "
        "UNAVAILABLE meanwhile (default: %(default)s)",
    )
    parser.add_argument(
        "--setup-timeout",
        type=_args.positive_float,
        default=300.0,
        help="seconds each for registering and for the first request, which compiles "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=_at_least(0), default=0, help="of the random constants, points and vectors"
    )
    parser.add_argument(
        "--out",
        default="results/bench",
        help="writes OUT.csv and OUT.json (and with --plot OUT-throughput.png, "
        "OUT-latency.png); folders are created (default: %(default)s)",
    )
    parser.add_argument("--plot", action="store_true", help="also draw the two PNGs")


def main(args: argparse.Namespace) -> int:
    """Run the sweep; the exit code: 0 measured, 1 no server, 2 refused, 130 interrupted."""
    started_at = _now()
    try:
        spec, constant_sources = _function_spec(args)
        levels = _load_levels(args)
        options = _compute_options(args)
        if args.plot:
            _matplotlib()
        out = Path(args.out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BenchError(f"--out {out}: cannot create {out.parent}: {e}") from None
    except BenchError as e:
        return _refuse(e)
    except KeyboardInterrupt:
        print("hessd bench: interrupted before anything was measured", file=sys.stderr)
        return 130
    sweep = _Sweep(args, spec, levels, options)
    try:
        asyncio.run(sweep.run())
        outcome, code = "finished", 0
    except KeyboardInterrupt:
        outcome, code = "interrupted", 130
        print("hessd bench: interrupted", file=sys.stderr)
    except ServerGone as e:
        outcome, code = "server unavailable", 1
        print(f"hessd bench: {e}", file=sys.stderr)
    except (HessdError, BenchError) as e:
        return _refuse(e)
    rows = sweep.rows(partial=outcome)
    if not rows:
        if code == 130:
            print("hessd bench: nothing was measured", file=sys.stderr)
        return code
    print(format_table(rows, args.batch))
    metadata = {
        "args": _jsonable_args(args),
        "function": {
            "id": sweep.function.id if sweep.function else None,
            "expression": spec.expression,
            "inputs": {name: list(shape) for name, shape in spec.inputs.items()},
            "constants": constant_sources,
            "dtype": spec.dtype,
            "output_shape": list(sweep.function.output_shape) if sweep.function else None,
        },
        "server_info": sweep.server_info,
        "client": {
            "host": platform.node(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
        },
        "started_at": started_at,
        "finished_at": _now(),
        "outcome": outcome,
    }
    try:
        written = write_results(out, rows, metadata)
        if args.plot:
            written += plot(out, rows, args.batch, _plot_title(args, spec))
    except (OSError, BenchError) as e:
        print(f"hessd bench: cannot write the results: {e}", file=sys.stderr)
        return code or 2
    print("wrote " + ", ".join(str(p) for p in written))
    return code


def _refuse(error: Exception) -> int:
    print(f"hessd bench: {error}", file=sys.stderr)
    return 2


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------ the flags


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _levels(number: type) -> Callable[[str], list]:
    """A comma-separated list of positive numbers: `1,2,4` or `500`."""

    def parse(text: str) -> list:
        try:
            values = [number(part) for part in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated positive numbers such as 1,4,16; got {text!r}"
            ) from None
        if not all(v > 0 and math.isfinite(v) for v in values):
            raise argparse.ArgumentTypeError(f"every level must be positive, got {text!r}")
        return values

    return parse


def _shape(text: str, what: str) -> tuple[int, ...]:
    """`256` → (256,), `4x3` → (4, 3), `()` → ()."""
    if text == "()":
        return ()
    try:
        shape = tuple(int(d) for d in text.split("x"))
    except ValueError:
        shape = ()
    if not shape or not all(d > 0 for d in shape):
        raise argparse.ArgumentTypeError(
            f"{what}: shape {text!r}; write positive sizes joined by x (256, 4x3), "
            "or () for a scalar"
        )
    return shape


def _input_flag(text: str) -> tuple[str, tuple[int, ...]]:
    name, sep, shape = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=SHAPE such as x=256, got {text!r}")
    return name, _shape(shape, f"input {name!r}")


def _constant_flag(text: str) -> tuple[str, str]:
    name, sep, source = text.partition("=")
    if not sep or not name.isidentifier() or not source:
        raise argparse.ArgumentTypeError(
            f"expected NAME=SOURCE such as A=random:256x256, A=zeros:3 or A=a.npy; got {text!r}"
        )
    for prefix in ("random:", "zeros:"):
        if source.startswith(prefix):
            _shape(source.removeprefix(prefix), f"constant {name!r}")
    return name, source


def _function_spec(args: argparse.Namespace) -> tuple[FunctionSpec, dict[str, str]]:
    """The function to register, and where each constant came from (for the metadata)."""
    if args.function is not None:
        given = [flag for flag in ("inputs", "constant", "dtype") if getattr(args, flag)]
        if given:
            raise BenchError(
                f"--function holds the whole function; drop --{', --'.join(given)}, or use "
                "--expression instead"
            )
        try:
            spec = _load_spec(Path(args.function))
        except JobError as e:
            raise BenchError(str(e)) from None
        sources = {name: f"{args.function}" for name in spec.constants}
        return spec, sources
    if not args.inputs:
        raise BenchError("--expression needs --inputs NAME=SHAPE for each input, e.g. x=256")
    inputs = dict(args.inputs)
    constants = dict(args.constant)
    for flag, pairs, names in (
        ("--inputs", args.inputs, inputs),
        ("--constant", args.constant, constants),
    ):
        if len(pairs) != len(names):
            raise BenchError(f"{flag} gives a name twice: {[n for n, _ in pairs]}")
    if both := sorted(set(inputs) & set(constants)):
        raise BenchError(f"{both} is given both as an input and as a constant")
    dtype = args.dtype or "float32"
    rng = np.random.default_rng(args.seed)
    spec = FunctionSpec(
        expression=args.expression,
        inputs=inputs,
        constants={name: _constant(name, s, dtype, rng) for name, s in constants.items()},
        dtype=dtype,
    )
    return spec, constants


def _constant(name: str, source: str, dtype: str, rng: np.random.Generator) -> np.ndarray:
    if source.startswith("random:"):
        shape = _shape(source.removeprefix("random:"), name)
        scale = 1 / math.sqrt(shape[-1]) if shape else 1.0
        return (scale * rng.standard_normal(shape)).astype(dtype)
    if source.startswith("zeros:"):
        return np.zeros(_shape(source.removeprefix("zeros:"), name), dtype)
    try:
        return np.load(source, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BenchError(
            f"--constant {name}={source}: cannot load it as a .npy array ({e}); a source is "
            "random:SHAPE, zeros:SHAPE or a .npy path"
        ) from None


def _load_levels(args: argparse.Namespace) -> list[float]:
    if args.request_rate is not None:
        return args.request_rate
    if args.arrivals != "poisson":
        raise BenchError("--arrivals applies to --request-rate")
    return args.concurrency or list(DEFAULT_CONCURRENCY)


def _compute_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of AsyncClient.compute besides the vector."""
    if args.mode is not None and args.kind != "jacobian":
        raise BenchError(f"--mode applies to --kind jacobian, not {args.kind}")
    if args.order is not None and args.kind != "taylor":
        raise BenchError(f"--order applies to --kind taylor, not {args.kind}")
    options: dict[str, Any] = {}
    if args.wrt is not None:
        options["wrt"] = args.wrt
    if args.kind == "jacobian":
        options["mode"] = args.mode or "auto"
    if args.kind == "taylor":
        options["order"] = args.order or DEFAULT_TAYLOR_ORDER
    return options


def _jsonable_args(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as given, leaving out what a CLI wiring may add (a handler function)."""
    kept = {}
    for name, value in vars(args).items():
        if isinstance(value, str | int | float | bool | type(None)):
            kept[name] = value
        elif isinstance(value, list):
            kept[name] = [list(v) if isinstance(v, tuple) else v for v in value]
    return kept


# ------------------------------------------------------------------------------ measuring


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
    if all(v is None for v in values):
        return True
    if any(v is None for v in values):
        return False
    mean = statistics.fmean(values)
    return all(abs(v - mean) <= tolerance * mean for v in values)


@dataclasses.dataclass(frozen=True)
class Row:
    """One level of the sweep, from its last windows (see the module docstring)."""

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
    def level(self) -> int | float:
        return self.concurrency if self.mode == "concurrency" else self.request_rate


def summarize(windows: Sequence[Window], batch: int, mode: str, level: float, status: str) -> Row:
    """The row of one level: the last STABLE_WINDOWS windows taken together."""
    recent = windows[-STABLE_WINDOWS:]
    seconds = sum(w.seconds for w in recent)
    latencies = np.concatenate([w.latencies for w in recent])
    in_flight = np.concatenate([w.in_flight for w in recent])
    errors: collections.Counter[str] = collections.Counter()
    for w in recent:
        errors.update(w.errors)
    if len(latencies):
        percentiles = [float(p) * 1e3 for p in np.percentile(latencies, PERCENTILES)]
    else:
        percentiles = [None] * len(PERCENTILES)
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


class _Recorder:
    """What happens between two window cuts; cut() hands it over as a Window."""

    def __init__(self) -> None:
        self.in_flight = 0
        self._reset()

    def _reset(self) -> None:
        self._start = time.perf_counter()
        self._latencies: list[float] = []
        self._errors: collections.Counter[str] = collections.Counter()
        self._in_flight: list[int] = []

    def started(self) -> None:
        self.in_flight += 1
        self._in_flight.append(self.in_flight)

    def finished(self, latency: float | None, error: HessdError | None = None) -> None:
        self.in_flight -= 1
        if error is None:
            self._latencies.append(latency)
        else:
            self._errors[error.code.name] += 1

    def cut(self) -> Window:
        window = Window(
            seconds=time.perf_counter() - self._start,
            latencies=np.array(self._latencies),
            errors=dict(self._errors),
            in_flight=np.array(self._in_flight, dtype=np.int64),
        )
        self._reset()
        return window


class _Sweep:
    """The whole run inside one event loop. What it measured stays readable after the loop
    was interrupted: `rows()` reports the finished levels and the windows of the current
    one."""

    def __init__(
        self,
        args: argparse.Namespace,
        spec: FunctionSpec,
        levels: Sequence[float],
        options: Mapping[str, Any],
    ):
        self.args = args
        self.spec = spec
        self.levels = levels
        self.options = dict(options)
        self.mode = "request_rate" if args.request_rate is not None else "concurrency"
        self.server_info: dict[str, Any] | None = None
        self.function: Function | None = None
        self._rows: list[Row] = []
        self._level: float | None = None
        self._windows: list[Window] = []

    def rows(self, partial: str) -> list[Row]:
        """The finished levels, then the one under way (if it has a window) with status
        `partial`."""
        if self._level is None or not self._windows:
            return list(self._rows)
        row = summarize(self._windows, self.args.batch, self.mode, self._level, partial)
        return [*self._rows, row]

    async def run(self) -> None:
        args = self.args
        async with AsyncClient(args.address, timeout=args.timeout) as client:
            call = await self._set_up(client)
            for level in self.levels:
                self._level, self._windows = level, []
                if self.mode == "concurrency":
                    status = await self._closed_loop(call, int(level))
                else:
                    status = await self._open_loop(call, level)
                row = summarize(self._windows, args.batch, self.mode, level, status)
                self._rows.append(row)
                self._level = None
                print(_progress_line(row), file=sys.stderr, flush=True)

    async def _set_up(self, client: AsyncClient) -> Callable[[], Any]:
        """Ask for the server's info, register, and send the first request (it compiles);
        returns the measured call."""
        args, spec = self.args, self.spec
        try:
            self.server_info = await client.server_info(timeout=args.connect_timeout)
        except (Unavailable, DeadlineExceeded) as e:
            raise ServerGone(
                f"no hessd server answered at {args.address} within --connect-timeout "
                f"{args.connect_timeout:g} s: {e}"
            ) from None
        setup = args.setup_timeout
        try:
            self.function = f = await client.register(
                spec.expression, spec.inputs, spec.constants, spec.dtype, timeout=setup
            )
            call = await self._first_request(client, f, setup)
        except (Unavailable, DeadlineExceeded) as e:
            raise ServerGone(
                f"the server at {args.address} answered ServerInfo but did not register the "
                f"function and answer its first request (which compiles) within "
                f"--setup-timeout {setup:g} s: {e}"
            ) from None
        return call

    async def _first_request(
        self, client: AsyncClient, f: Function, timeout: float
    ) -> Callable[[], Any]:
        """Draw the points (and the vector) and send them once: a kind the function does not
        take fails here, before the sweep. Returns the measured call."""
        args = self.args
        if args.wrt is not None and args.wrt not in f.inputs:
            raise BenchError(f"--wrt {args.wrt}: the function's inputs are {list(f.inputs)}")
        rng = np.random.default_rng([args.seed, 1])
        points = {
            name: rng.standard_normal((args.batch, *shape)).astype(f.dtype)
            for name, shape in f.inputs.items()
        }
        options = dict(self.options)
        if args.kind in _VECTOR_KINDS:
            shape = (
                f.output_shape if args.kind == "vjp" else f.inputs[args.wrt or next(iter(f.inputs))]
            )
            options["vector"] = rng.standard_normal((args.batch, *shape)).astype(f.dtype)
        await client.compute(f, args.kind, points, timeout=timeout, **options)

        def call():
            return client.compute(f, args.kind, points, **options)

        return call

    async def _measure(self, recorder: _Recorder) -> str:
        """Cut windows until the level is stable or --max-windows; the level's status."""
        args = self.args
        while True:
            await asyncio.sleep(args.window_seconds)
            window = recorder.cut()
            self._windows.append(window)
            if not len(window.latencies) and set(window.errors) == {"UNAVAILABLE"}:
                raise ServerGone(
                    f"every request of a {window.seconds:.1f} s window failed with "
                    f"UNAVAILABLE: the server at {args.address} went away"
                )
            if is_stable(self._windows, args.stability):
                return "stable"
            if len(self._windows) >= args.max_windows:
                return "unstable"

    async def _closed_loop(self, call: Callable[[], Any], concurrency: int) -> str:
        recorder = _Recorder()

        async def worker() -> None:
            while True:
                await _timed(call, recorder)

        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        try:
            return await self._measure(recorder)
        finally:
            await _cancel(workers)

    async def _open_loop(self, call: Callable[[], Any], rate: float) -> str:
        recorder = _Recorder()
        gaps = random.Random(self.args.seed)
        requests: set[asyncio.Task] = set()

        async def arrivals() -> None:
            # An absolute schedule: a late wake-up starts the overdue requests at once
            # instead of shifting every later arrival.
            loop = asyncio.get_running_loop()
            due = loop.time()
            while True:
                if self.args.arrivals == "poisson":
                    due += gaps.expovariate(rate)
                else:
                    due += 1 / rate
                await asyncio.sleep(max(0.0, due - loop.time()))
                request = asyncio.create_task(_timed(call, recorder))
                requests.add(request)
                request.add_done_callback(requests.discard)

        scheduler = asyncio.create_task(arrivals())
        try:
            return await self._measure(recorder)
        finally:
            await _cancel([scheduler])
            await _cancel(list(requests))


async def _timed(call: Callable[[], Any], recorder: _Recorder) -> None:
    recorder.started()
    start = time.perf_counter()
    try:
        await call()
    except HessdError as e:
        recorder.finished(None, e)
        # A call refused before it waits on anything would never give the event loop back
        # to a closed-loop worker, and the window would never end.
        await asyncio.sleep(0)
    except asyncio.CancelledError:
        recorder.in_flight -= 1
        raise
    else:
        recorder.finished(time.perf_counter() - start)


async def _cancel(tasks: Sequence[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# ------------------------------------------------------------------------------ the report


def _progress_line(row: Row) -> str:
    p95 = "-" if row.p95_ms is None else f"{row.p95_ms:.2f} ms"
    return (
        f"{_level_name(row)} {_format_level(row)}: {row.requests_per_s:.1f} req/s, "
        f"p95 {p95}, {row.errors} errors, {row.windows} windows, {row.status}"
    )


def _level_name(row: Row) -> str:
    return "concurrency" if row.mode == "concurrency" else "rate/s"


def _format_level(row: Row) -> str:
    return str(row.concurrency) if row.mode == "concurrency" else f"{row.request_rate:g}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(rows: Sequence[Row], batch: int) -> str:
    """One line per level; errors by status name in the last column."""
    open_loop = rows[0].mode == "request_rate"
    header = [_level_name(rows[0]), "req/s", "points/s", "p50 ms", "p90 ms", "p95 ms", "p99 ms"]
    if open_loop:
        header += ["sent/s", "in-flight max"]
    header += ["windows", "status", "errors"]
    lines = []
    for row in rows:
        cells = [
            _format_level(row),
            f"{row.requests_per_s:.1f}",
            f"{row.points_per_s:.1f}",
            *(_ms(getattr(row, f"p{p}_ms")) for p in PERCENTILES),
        ]
        if open_loop:
            cells += [f"{row.sent_per_s:.1f}", str(row.in_flight_max or 0)]
        cells += [str(row.windows), row.status, _errors_text(row.errors_by_code)]
        lines.append(cells)
    widths = [max(len(h), *(len(cells[i]) for cells in lines)) for i, h in enumerate(header)]
    text = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    for cells in lines:
        text.append("  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    text.append(f"batch {batch}; latency of successful requests; rows from the last windows")
    return "\n".join(text)


def _errors_text(errors: Mapping[str, int]) -> str:
    return " ".join(f"{code}={n}" for code, n in errors.items()) or "0"


def write_results(out: Path, rows: Sequence[Row], metadata: Mapping[str, Any]) -> list[Path]:
    """`<out>.csv` (COLUMNS) and `<out>.json` ({"metadata", "rows"}); the paths written."""
    csv_path, json_path = out.with_name(out.name + ".csv"), out.with_name(out.name + ".json")
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            values = dataclasses.asdict(row)
            values["errors_by_code"] = " ".join(f"{c}={n}" for c, n in row.errors_by_code.items())
            writer.writerow({c: "" if values[c] is None else values[c] for c in COLUMNS})
    document = {"metadata": metadata, "rows": [dataclasses.asdict(row) for row in rows]}
    json_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return [csv_path, json_path]


def _plot_title(args: argparse.Namespace, spec: FunctionSpec) -> str:
    expression = " ".join(spec.expression.split())
    if len(expression) > 50:
        expression = expression[:47] + "..."
    return f"{args.kind} of {expression}, batch {args.batch}"


def _matplotlib():
    # Imported here, and the Agg canvas used directly: no display, no pyplot state, and no
    # matplotlib for runs that do not plot.
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install 'hessd[jobs]'") from None
    return Figure, FigureCanvasAgg


def plot(out: Path, rows: Sequence[Row], batch: int, title: str) -> list[Path]:
    """`<out>-throughput.png` (requests/s, and points/s on the right axis) and
    `<out>-latency.png` (p50 … p99) against the level; levels that are not stable are drawn
    with open markers."""
    Figure, FigureCanvasAgg = _matplotlib()
    from matplotlib import ticker

    x = np.array([row.level for row in rows], dtype=float)
    stable = np.array([row.status == "stable" for row in rows])
    if not stable.all():
        title += "; open markers: not stable"
    paths = []

    def axes():
        figure = Figure(figsize=(7, 4.5), layout="constrained")
        ax = figure.subplots()
        # One tick per level, labelled as given: 1, 2, 4 … or the rates.
        ax.set_xscale("log")
        ax.set_xticks(x, [_format_level(row) for row in rows])
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        if rows[0].mode == "concurrency":
            ax.set_xlabel("concurrency (requests in flight)")
        else:
            ax.set_xlabel("offered request rate (requests/s)")
        ax.set_title(title, fontsize="medium")
        return FigureCanvasAgg(figure), ax

    def draw(ax, values: np.ndarray, label: str, color: str) -> None:
        ax.plot(x, values, "-", color=color, label=label)
        ax.plot(x[stable], values[stable], "o", color=color)
        ax.plot(x[~stable], values[~stable], "o", mfc="none", color=color)

    canvas, ax = axes()
    draw(ax, np.array([row.requests_per_s for row in rows]), "requests/s", "C0")
    if rows[0].mode == "request_rate":
        ax.plot(x, x, "--", color="gray", linewidth=0.8, label="offered")
    # points/s is requests/s times the batch: a second scale on the same curve.
    points = ax.secondary_yaxis("right", functions=(lambda r: r * batch, lambda p: p / batch))
    points.set_ylabel(f"points/s (batch {batch})")
    ax.set_ylabel("requests/s")
    ax.set_ylim(bottom=0)
    ax.legend()
    paths.append(out.with_name(out.name + "-throughput.png"))
    canvas.print_png(str(paths[-1]))

    canvas, ax = axes()
    for i, p in enumerate(PERCENTILES):
        values = [getattr(row, f"p{p}_ms") for row in rows]
        draw(ax, np.array([np.nan if v is None else v for v in values]), f"p{p}", f"C{i}")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_ylabel("latency of successful requests (ms)")
    ax.legend()
    paths.append(out.with_name(out.name + "-latency.png"))
    canvas.print_png(str(paths[-1]))
    return paths
