"""The flags of `hessd spectrum`, and the options they give the job and the server."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from hessd.proto.kinds import Method
from hessd.tools import _args
from hessd.tools._common import Refused, add_connection_arguments

__all__ = ["METHODS", "add_arguments", "job_options", "server_options"]

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
        help="points per request, and per resumable part (default: %(default)s)",
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
    connection = add_connection_arguments(parser, timeout=600.0, what="per request")
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


def server_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The job options as Client.spectrum takes them: a count not given (None) is the
    server's default, which Client.spectrum spells 0."""
    return {
        name: 0 if name in _SERVER_CHOSEN and value is None else value
        for name, value in options.items()
    }
