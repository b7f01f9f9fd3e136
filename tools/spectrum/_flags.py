"""The flags of `hessd spectrum`, and the options they give the job and the server."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from hessd.proto.kinds import BuiltinLoss, Method, Operator, Reduction
from hessd.tools import _args
from hessd.tools._common import DEFAULT_ADDRESS, Refused, add_connection_arguments

__all__ = [
    "METHODS",
    "OPERATORS",
    "add_arguments",
    "addresses",
    "job_options",
    "manifest_objective",
    "objective_options",
    "server_options",
]

METHODS = tuple(m.value for m in (Method.EXACT, Method.LANCZOS, Method.DENSITY))
# The flags that define each method's results, in the manifest's order. They all go to the
# server, which refuses an option that does not apply to the method.
_JOB_OPTIONS = {
    "exact": ("wrt", "seed", "eigenvectors", "tol", "gtol"),
    "lanczos": ("wrt", "seed", "eigenvectors", "k", "num_steps", "tol", "gtol"),
    "density": ("wrt", "seed", "num_steps", "num_probes", "tol", "gtol"),
}
_METHOD_FLAGS = ("eigenvectors", "k", "num_steps", "num_probes")
# Counts the server picks when a request leaves them 0.
_SERVER_CHOSEN = ("k", "num_steps", "num_probes")
OPERATORS = tuple(o.value for o in Operator)
# The flags of an objective over --data, as Client.spectrum names them. All but the chunk
# of examples define the results (which do not depend on the chunking beyond rounding), so
# they go in the manifest.
_OBJECTIVE_OPTIONS = ("operator", "loss", "target", "reduction", "mc_samples")
_OBJECTIVE_DEFAULTS: dict[str, Any] = {
    "operator": Operator.HESSIAN_OPERATOR.value,
    "loss": None,
    "target": "y",
    "reduction": Reduction.MEAN.value,
    "mc_samples": 0,
    "data_chunk_size": 0,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `hessd spectrum`."""
    parser.add_argument(
        "--function", required=True, metavar="SPEC", help="the function: a .json or .toml file"
    )
    parser.add_argument(
        "--points",
        required=True,
        help=".npy (batch, *shape) for a function of one input, or .npz with one per input",
    )
    parser.add_argument("--out", required=True, help="the result, written with np.savez")
    parser.add_argument(
        "--method", choices=METHODS, default=Method.EXACT.value, help="(default: %(default)s)"
    )
    parser.add_argument(
        "--k",
        type=_args.positive_int,
        help="lanczos: how many smallest and largest eigenvalues (default: the server's, as "
        "Client.spectrum: 6, or n // 2 if that is fewer)",
    )
    parser.add_argument(
        "--plot",
        metavar="PNG",
        help="also plot: a histogram of the eigenvalues, or the mean density for density, "
        "and the extreme eigenvalues per point",
    )
    parser.add_argument(
        "--chunk-size",
        type=_args.positive_int,
        default=64,
        help="points per request, and per resumable part (default: %(default)s); the "
        "examples per pass over --data are --data-chunk-size",
    )
    parser.add_argument(
        "--seed",
        type=_args.non_negative_int,
        default=0,
        help="seed of the random probes and start vectors, the same for every chunk "
        "(default: %(default)s)",
    )
    parser.add_argument("--wrt", help="the input whose Hessian is analysed (default: the first)")
    parser.add_argument(
        "--eigenvectors", action="store_true", help="exact and lanczos: also save eigenvectors"
    )
    parser.add_argument(
        "--num-steps", type=_args.positive_int, help="lanczos and density: Lanczos steps per run"
    )
    parser.add_argument("--num-probes", type=_args.positive_int, help="density: random probes")
    parser.add_argument(
        "--tol", type=_args.non_negative_float, help="eigenvalues within ±tol count as zero"
    )
    parser.add_argument(
        "--gtol", type=_args.non_negative_float, help="a point is stationary when ‖∇f‖ ≤ gtol"
    )
    parser.add_argument(
        "--progress",
        action="store_true",
        help="show the progress bar (it needs tqdm) even when stderr is not a terminal",
    )
    objective = parser.add_argument_group(
        "objective over a data set",
        "With --data, the function is a model f(w, x) (or, without --loss, a scalar "
        "per-example term), its points are parameter vectors (checkpoints), and the "
        "spectrum is of a curvature operator of L(w) = mean (or sum) over the examples.",
    )
    objective.add_argument(
        "--data",
        metavar="NPZ",
        help="the data set: one (N, ...) array per per-example input of the function, and "
        "the targets (--target) when --loss is given; uploaded once per server",
    )
    objective.add_argument(
        "--operator",
        choices=OPERATORS,
        help="with --data: the curvature operator (default: hessian); ggn and fisher need --loss",
    )
    objective.add_argument(
        "--loss",
        help="with --data: mse, softmax_cross_entropy, or an expression in output and "
        "target; without it the function is the per-example loss",
    )
    objective.add_argument(
        "--target", help="with --loss: the array of --data that holds the targets (default: y)"
    )
    objective.add_argument(
        "--reduction",
        choices=tuple(r.value for r in Reduction),
        help="with --data: L is the mean or the sum over the examples (default: mean)",
    )
    objective.add_argument(
        "--data-chunk-size",
        type=_args.positive_int,
        help="with --data: examples per pass on the device (default: the server picks it "
        "from its memory); results do not depend on it beyond rounding",
    )
    objective.add_argument(
        "--mc-samples",
        type=_args.positive_int,
        help="with --operator fisher: sampled labels per example (default: the server's)",
    )
    parser.add_argument(
        "--concurrency",
        type=_args.positive_int,
        default=1,
        help="requests in flight at once, spread over the --address servers in turn "
        "(default: %(default)s)",
    )
    connection = add_connection_arguments(parser, timeout=600.0, what="per request")
    # Several --address: the shared flag, redefined in its group as a repeatable one.
    connection.conflict_handler = "resolve"
    connection.add_argument(
        "--address",
        action="append",
        help="host:port, or dns:///name:port for every replica the name resolves to; "
        f"repeat it to spread the chunks over several servers (default: {DEFAULT_ADDRESS})",
    )
    connection.add_argument(
        "--retry-seconds",
        type=_args.non_negative_float,
        default=120.0,
        help="seconds in all to wait for an unavailable server, per request, before giving "
        "up; the finished chunks are kept (default: %(default)s)",
    )


def job_options(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that define this method's results; a flag of another method is refused.
    A count not given stays None: the server picks it."""
    applies = _JOB_OPTIONS[args.method]
    for name in _METHOD_FLAGS:
        if name not in applies and getattr(args, name) not in (None, False):
            takers = [m for m, names in _JOB_OPTIONS.items() if name in names]
            raise Refused(
                f"--{name.replace('_', '-')} does not apply to --method {args.method}; "
                f"it applies to {' and '.join(takers)}"
            )
    return {name: getattr(args, name) for name in applies}


def addresses(args: argparse.Namespace) -> list[str]:
    """The servers, in the order given (the default's one if none)."""
    return list(args.address or [DEFAULT_ADDRESS])


def objective_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """The objective's flags as Client.spectrum takes them (without the data), None without
    --data; one of them without --data, or a combination the server would refuse, is
    refused here with the flag's name."""
    given = {name: getattr(args, name) for name in _OBJECTIVE_DEFAULTS}
    if args.data is None:
        stray = [name for name, value in given.items() if value is not None]
        if stray:
            flags = ", ".join("--" + name.replace("_", "-") for name in stray)
            raise Refused(f"{flags} apply to an objective over a data set: give --data NPZ")
        return None
    options: dict[str, Any] = {
        name: _OBJECTIVE_DEFAULTS[name] if value is None else value for name, value in given.items()
    }
    operator = Operator.parse(options["operator"])
    if options["loss"] is None:
        if operator.needs_loss:
            raise Refused(
                f"--operator {operator.value} needs the model and its loss given apart: add "
                f"--loss ({', '.join(b.value for b in BuiltinLoss)}, or an expression in "
                "output and target) and give the model as the function"
            )
        if args.target is not None:
            raise Refused("--target names the targets of --loss; give --loss too")
    if args.mc_samples is not None and operator is not Operator.FISHER:
        raise Refused(f"--mc-samples applies to --operator fisher, not {operator.value}")
    return options


def manifest_objective(options: Mapping[str, Any]) -> dict[str, Any]:
    """The objective options that define the results (the manifest's part)."""
    return {name: options[name] for name in _OBJECTIVE_OPTIONS}


def server_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The job options as Client.spectrum takes them: a count not given (None) is the
    server's default, which Client.spectrum spells 0."""
    return {
        name: 0 if name in _SERVER_CHOSEN and value is None else value
        for name, value in options.items()
    }
