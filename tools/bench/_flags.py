"""The flags of `hessd bench`, and what they make: the function to register, the levels of
the sweep and the options of every request."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hessd.proto.kinds import JacobianMode, Kind
from hessd.tools import _args
from hessd.tools._common import EVENT_LOOPS, Refused, add_connection_arguments
from hessd.tools._function_file import DTYPES, FunctionSpec, load_function_file
from hessd.tools.bench._statistics import STABLE_WINDOWS

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_TAYLOR_ORDER",
    "add_arguments",
    "compute_options",
    "function_spec",
    "jsonable_args",
    "load_levels",
]

DEFAULT_CONCURRENCY = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_TAYLOR_ORDER = 2

Shape = tuple[int, ...]


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
        "--dtype", choices=DTYPES, help="with --expression: the function's dtype (float32)"
    )
    parser.add_argument(
        "--kind",
        choices=[k.value for k in Kind],
        default=Kind.GRADIENT.value,
        help="(default: %(default)s)",
    )
    parser.add_argument("--wrt", help="the input derivatives are taken with respect to")
    parser.add_argument(
        "--mode", choices=[m.value for m in JacobianMode], help="jacobian: (default: auto)"
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
        type=_args.at_least(STABLE_WINDOWS),
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
        "--seed",
        type=_args.non_negative_int,
        default=0,
        help="of the random constants, points and vectors (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        default="results/bench",
        help="writes OUT.csv and OUT.json (and with --plot OUT-throughput.png, "
        "OUT-latency.png); folders are created (default: %(default)s)",
    )
    parser.add_argument("--plot", action="store_true", help="also draw the two PNGs")
    parser.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default="auto",
        help="the load's event loop: uvloop's (~10%% less CPU per call, so more of the "
        "cores are left to a server on the same machine), the standard library's, or auto: "
        "uvloop where it is installed (default: %(default)s)",
    )
    connection = add_connection_arguments(
        parser,
        timeout=30.0,
        what="per measured request; a late one is a DEADLINE_EXCEEDED error",
    )
    connection.add_argument(
        "--connect-timeout",
        type=_args.positive_float,
        default=10.0,
        help="seconds for the server to answer ServerInfo, the first call; the client retries "
        "UNAVAILABLE meanwhile (default: %(default)s)",
    )
    connection.add_argument(
        "--setup-timeout",
        type=_args.positive_float,
        default=300.0,
        help="seconds each for registering and for the first request, which compiles "
        "(default: %(default)s)",
    )


def _levels(number: Callable[[str], float]) -> Callable[[str], list[float]]:
    """A comma-separated list of positive numbers: `1,2,4` or `500`."""

    def parse(text: str) -> list[float]:
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


def _shape(text: str, what: str) -> Shape:
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


def _input_flag(text: str) -> tuple[str, Shape]:
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


def function_spec(args: argparse.Namespace) -> tuple[FunctionSpec, dict[str, str]]:
    """The function to register, and where each constant came from (for the metadata)."""
    if args.function is not None:
        given = [flag for flag in ("inputs", "constant", "dtype") if getattr(args, flag)]
        if given:
            raise Refused(
                f"--function holds the whole function; drop --{', --'.join(given)}, or use "
                "--expression instead"
            )
        spec = load_function_file(Path(args.function))
        return spec, {name: f"{args.function}" for name in spec.constants}
    if not args.inputs:
        raise Refused("--expression needs --inputs NAME=SHAPE for each input, e.g. x=256")
    inputs = dict(args.inputs)
    constants = dict(args.constant)
    for flag, pairs, names in (
        ("--inputs", args.inputs, inputs),
        ("--constant", args.constant, constants),
    ):
        if len(pairs) != len(names):
            raise Refused(f"{flag} gives a name twice: {[n for n, _ in pairs]}")
    if both := sorted(set(inputs) & set(constants)):
        raise Refused(f"{both} is given both as an input and as a constant")
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
        raise Refused(
            f"--constant {name}={source}: cannot load it as a .npy array ({e}); a source is "
            "random:SHAPE, zeros:SHAPE or a .npy path"
        ) from None


def load_levels(args: argparse.Namespace) -> list[float]:
    """The concurrencies or request rates to sweep, in order."""
    if args.request_rate is not None:
        return args.request_rate
    if args.arrivals != "poisson":
        raise Refused("--arrivals applies to --request-rate")
    return args.concurrency or list(DEFAULT_CONCURRENCY)


def compute_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of AsyncClient.compute besides the vector."""
    if args.mode is not None and args.kind != Kind.JACOBIAN.value:
        raise Refused(f"--mode applies to --kind jacobian, not {args.kind}")
    if args.order is not None and args.kind != Kind.TAYLOR.value:
        raise Refused(f"--order applies to --kind taylor, not {args.kind}")
    options: dict[str, Any] = {}
    if args.wrt is not None:
        options["wrt"] = args.wrt
    if args.kind == Kind.JACOBIAN.value:
        options["mode"] = args.mode or JacobianMode.AUTO.value
    if args.kind == Kind.TAYLOR.value:
        options["order"] = args.order or DEFAULT_TAYLOR_ORDER
    return options


def jsonable_args(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as given, leaving out what a CLI wiring may add (a handler function) and
    the bearer token."""
    kept: dict[str, Any] = {}
    for name, value in vars(args).items():
        if name == "token":
            kept[name] = None if value is None else "(given)"
        elif isinstance(value, str | int | float | bool | type(None)):
            kept[name] = value
        elif isinstance(value, list):
            kept[name] = [list(v) if isinstance(v, tuple) else v for v in value]
    return kept
