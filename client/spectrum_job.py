"""`hessd spectrum`: the Hessian spectrum at a file of points, in resumable chunks.

    hessd spectrum --function f.toml --points x.npy --out result.npz --method lanczos --k 4

The function file (.json or .toml) holds what `Client.register` takes:

    expression = "0.5 * x @ A @ x"        # required
    dtype = "float64"                     # optional, "float32" by default
    [inputs]                              # required: name -> shape of one point
    x = [4]
    [constants]                           # optional: a nested list in the function's
    A = "A.npy"                           # dtype, or a .npy path relative to this file

The points are a .npy array (batch, *shape) for a function of one input, or a .npz with one
(batch, *shape) array per input name. The result (np.savez) holds, per point:

    eigenvalues      exact (batch, n) ascending; lanczos (batch, 2k): k smallest, k largest
    eigenvectors     with --eigenvectors: (batch, n, n) or (batch, n, 2k)
    residuals        lanczos (batch, 2k)
    nodes, weights   density (batch, probes, steps); grid, density (batch, grid_size)
    point_class      (batch,) "minimum", "maximum", "saddle" or "degenerate"
    stationary       (batch,) bool; tol, gtol (batch,) the tolerances used
    gradient_norm    (batch,)
    method, function_id   0-d strings

The server classifies every point; for density from the extreme SLQ Ritz values, which lie
inside [λmin, λmax], converge to its ends, and equal them once --num-steps reaches n.

Resume: every finished chunk is written to `<out>.parts/chunk-<start:08d>.npz` beside a
manifest.json that records what defines the job. The same command run again skips the chunks
on disk; the result is assembled from the chunk files in either case, so it does not depend
on how often the job was interrupted. The same --seed goes with every chunk and the server
derives each point's probes from it, so results do not depend on the chunking either.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from hessd.client import Client, Function, HessdError, NotFound, Spectrum, Unavailable, _args

__all__ = ["add_arguments", "main"]

METHODS = ("exact", "lanczos", "density")
CLASSES = ("minimum", "maximum", "saddle", "degenerate")
DEFAULT_K = 20
# The flags that define each method's results, in the manifest's order. They all go to the
# server, which refuses an option that does not apply to the method.
_JOB_OPTIONS = {
    "exact": ("wrt", "seed", "eigenvectors", "tol", "gtol"),
    "lanczos": ("wrt", "seed", "eigenvectors", "k", "num_steps", "tol", "gtol"),
    "density": ("wrt", "seed", "num_steps", "num_probes", "tol", "gtol"),
}
_METHOD_FLAGS = ("eigenvectors", "k", "num_steps", "num_probes")
_SPEC_KEYS = ("expression", "inputs", "constants", "dtype")
_DTYPES = ("float32", "float64")
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 10.0
MANIFEST = "manifest.json"
# Backoff waits go through here, so that tests can make them instant.
_sleep = time.sleep

T = TypeVar("T")


class JobError(Exception):
    """A problem with the command's files or flags; main prints it and returns 2."""


class ServerGone(Exception):
    """The server stayed unavailable for longer than --retry-seconds."""


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
    parser.add_argument("--method", choices=METHODS, default="exact", help="(default: exact)")
    parser.add_argument(
        "--k",
        type=_args.positive_int,
        help=f"lanczos: how many smallest and largest eigenvalues (default: {DEFAULT_K})",
    )
    parser.add_argument(
        "--plot",
        metavar="PNG",
        help="also plot: a histogram of the eigenvalues, or the mean density for density",
    )
    parser.add_argument("--address", default="127.0.0.1:50051", help="(default: %(default)s)")
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
    parser.add_argument(
        "--timeout",
        type=_args.positive_float,
        default=600.0,
        help="seconds per request (default: %(default)s)",
    )
    parser.add_argument(
        "--retry-seconds",
        type=_args.non_negative_float,
        default=120.0,
        help="how long to keep retrying while the server is unavailable (default: %(default)s)",
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
        help="show the progress bar even when stderr is not a terminal",
    )


def main(args: argparse.Namespace) -> int:
    """Run the job; the exit code: 0 done, 1 the server stayed away, 2 a refused file, flag
    or request, 130 interrupted (the finished chunks stay for a resume)."""
    started = time.perf_counter()
    try:
        spec = _load_spec(Path(args.function))
        points, num_points = _load_points(Path(args.points), spec.inputs)
        options = _job_options(args)
        out = Path(args.out)
        if not out.parent.is_dir():
            raise JobError(f"--out {out}: the folder {out.parent} does not exist")
        points_sha256 = _sha256(Path(args.points))
        progress_bar = _progress_bar_class()
    except JobError as e:
        return _refuse(e)
    except KeyboardInterrupt:
        print("interrupted before any point was computed", file=sys.stderr)
        return 130
    parts = out.with_name(out.name + ".parts")
    starts = range(0, num_points, args.chunk_size)

    def saved_points() -> int:
        return sum(
            min(args.chunk_size, num_points - s) for s in starts if _chunk_path(parts, s).exists()
        )

    server = _Server(args.address, args.timeout, args.retry_seconds, spec)
    try:
        function = server.register()
        manifest = {
            "function_id": function.id,
            "method": args.method,
            "options": options,
            "chunk_size": args.chunk_size,
            "num_points": num_points,
            "points_sha256": points_sha256,
        }
        _claim_parts(parts, manifest)
        resumed = saved_points()
        todo = [s for s in starts if not _chunk_path(parts, s).exists()]
        server_options = _server_options(options)
        with progress_bar(
            total=num_points,
            initial=resumed,
            unit="pt",
            desc="spectrum",
            file=sys.stderr,
            disable=not (args.progress or sys.stderr.isatty()),
        ) as bar:
            for start in todo:
                stop = min(start + args.chunk_size, num_points)
                chunk = {name: np.ascontiguousarray(a[start:stop]) for name, a in points.items()}
                spectrum = server.spectrum(chunk, args.method, server_options)
                _save_npz(_chunk_path(parts, start), _chunk_arrays(spectrum))
                bar.update(stop - start)
        result = _assemble(parts, starts, args.chunk_size, num_points)
        result["method"] = np.array(args.method)
        result["function_id"] = np.array(function.id)
        _save_npz(out, result)
        shutil.rmtree(parts)
    except KeyboardInterrupt:
        print(
            f"interrupted after {saved_points()} of {num_points} points; "
            "run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    except ServerGone as e:
        saved = saved_points()
        if saved:
            print(
                f"hessd spectrum: {e}. {saved} of {num_points} points are saved in {parts}; "
                "run the same command again to resume",
                file=sys.stderr,
            )
        else:
            print(f"hessd spectrum: {e}. No points were computed", file=sys.stderr)
        return 1
    except (JobError, HessdError) as e:
        return _refuse(e)
    finally:
        server.close()
    try:
        if args.plot:
            _plot(Path(args.plot), result, args.method, function.id)
    except JobError as e:
        return _refuse(e)
    wall = time.perf_counter() - started
    print(_summary(result, args.method, function.id, wall, num_points - resumed, resumed))
    return 0


def _refuse(error: Exception) -> int:
    print(f"hessd spectrum: {error}", file=sys.stderr)
    return 2


# ------------------------------------------------------------------------------ the inputs


@dataclasses.dataclass(frozen=True)
class FunctionSpec:
    """What Client.register takes, read from a function file."""

    expression: str
    inputs: dict[str, tuple[int, ...]]
    constants: dict[str, np.ndarray]
    dtype: str


def _load_spec(path: Path) -> FunctionSpec:
    """Read and check a function file; JobError says what is wrong with it."""
    try:
        if path.suffix == ".json":
            raw = json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".toml":
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        else:
            raise JobError(f"function file {path}: name a .json or a .toml file")
    except (OSError, UnicodeDecodeError) as e:
        raise JobError(f"cannot read function file {path}: {e}") from None
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise JobError(
            f"function file {path} is not valid {path.suffix[1:].upper()}: {e}"
        ) from None
    where = f"function file {path}"
    if not isinstance(raw, dict):
        raise JobError(f"{where}: expected a table of {', '.join(_SPEC_KEYS)}")
    unknown = sorted(set(raw) - set(_SPEC_KEYS))
    if unknown:
        raise JobError(f"{where}: unknown keys {unknown}; the keys are {', '.join(_SPEC_KEYS)}")
    expression = raw.get("expression")
    if not isinstance(expression, str) or not expression.strip():
        raise JobError(f"{where}: `expression` must be a non-empty string, got {expression!r}")
    dtype = raw.get("dtype", "float32")
    if dtype not in _DTYPES:
        raise JobError(f"{where}: `dtype` must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    inputs = raw.get("inputs")
    if not isinstance(inputs, dict) or not inputs:
        raise JobError(
            f"{where}: `inputs` must map each input name to the shape of one point, "
            'e.g. {"x": [3]}; got ' + repr(inputs)
        )
    shapes = {}
    for name, shape in inputs.items():
        if not (
            isinstance(shape, list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise JobError(
                f"{where}: input {name!r} has shape {shape!r}; a shape is a list of "
                "non-negative integers, [] for a scalar"
            )
        shapes[name] = tuple(shape)
    constants = raw.get("constants", {})
    if not isinstance(constants, dict):
        raise JobError(f"{where}: `constants` must map names to arrays, got {constants!r}")
    return FunctionSpec(
        expression=expression,
        inputs=shapes,
        constants={
            name: _load_constant(value, name, dtype, path) for name, value in constants.items()
        },
        dtype=dtype,
    )


def _load_constant(value: Any, name: str, dtype: str, spec_path: Path) -> np.ndarray:
    """A constant: a .npy path relative to the function file, sent as stored (the client
    refuses a lossy conversion), or numbers written in the file, read in the function's
    dtype as a literal would be."""
    where = f"function file {spec_path}: constant {name!r}"
    if isinstance(value, str):
        npy = spec_path.parent / value
        try:
            return np.load(npy, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise JobError(f"{where}: cannot load {npy} as a .npy array: {e}") from None
    if isinstance(value, bool) or not isinstance(value, int | float | list):
        raise JobError(f"{where} must be a number, a nested list of them or a .npy path")
    try:
        return np.array(value, dtype=dtype)
    except (ValueError, TypeError):
        raise JobError(f"{where} is not a rectangular nested list of numbers") from None


def _load_points(
    path: Path, inputs: Mapping[str, tuple[int, ...]]
) -> tuple[dict[str, np.ndarray], int]:
    """The points file as one array per input, and the number of points."""
    names = list(inputs)
    try:
        if path.suffix == ".npy":
            if len(names) != 1:
                raise JobError(
                    f"points file {path}: the function has inputs {names}; give a .npz "
                    "with one array per input"
                )
            # Memory-mapped: each chunk is read when it is sent.
            points = {names[0]: np.load(path, mmap_mode="r", allow_pickle=False)}
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                points = {name: archive[name] for name in archive.files}
        else:
            raise JobError(f"points file {path}: name a .npy or a .npz file")
    except (OSError, ValueError) as e:
        raise JobError(f"cannot load points file {path}: {e}") from None
    if sorted(points) != sorted(names):
        raise JobError(
            f"points file {path} holds arrays {sorted(points)}; the function takes "
            f"inputs {names}: give one array per input, named after it"
        )
    counts = set()
    for name, shape in inputs.items():
        array = points[name]
        if array.ndim != len(shape) + 1 or array.shape[1:] != shape:
            batched = str(("batch", *shape)).replace("'", "")
            raise JobError(
                f"points file {path}: input {name!r} has shape {array.shape}; expected "
                f"{batched}, a leading batch axis then the shape of one point"
            )
        counts.add(array.shape[0])
    if len(counts) > 1:
        described = ", ".join(f"{n} {points[n].shape[0]}" for n in names)
        raise JobError(
            f"points file {path}: the inputs hold different numbers of points: {described}"
        )
    (num_points,) = counts
    if num_points == 0:
        raise JobError(f"points file {path} holds no points")
    return {name: points[name] for name in names}, num_points


def _job_options(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that define this method's results; a flag of another method is refused."""
    applies = _JOB_OPTIONS[args.method]
    for name in _METHOD_FLAGS:
        if name not in applies and getattr(args, name) not in (None, False):
            takers = [m for m, names in _JOB_OPTIONS.items() if name in names]
            raise JobError(
                f"--{name.replace('_', '-')} does not apply to --method {args.method}; "
                f"it applies to {' and '.join(takers)}"
            )
    options = {name: getattr(args, name) for name in applies}
    if args.method == "lanczos" and options["k"] is None:
        options["k"] = DEFAULT_K
    return options


def _server_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The job options as Client.spectrum takes them: None (a flag not given) is the
    server's default, which Client.spectrum spells 0 for counts."""
    kept = dict(options)
    for name in ("num_steps", "num_probes"):
        if name in kept and kept[name] is None:
            kept[name] = 0
    return kept


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _progress_bar_class():
    # Imported here: `hessd serve` imports this module, and a server needs no tqdm.
    try:
        from tqdm import tqdm
    except ImportError:
        raise JobError("the progress bar needs tqdm: pip install 'hessd[jobs]'") from None
    return tqdm


# ------------------------------------------------------------------------------ the server


class _Server:
    """The server as this job sees it: while it is unavailable, reconnect and retry with
    exponential backoff for up to `retry_seconds`; when a restarted server has forgotten the
    function (NOT_FOUND), register it again and retry once."""

    def __init__(self, address: str, timeout: float, retry_seconds: float, spec: FunctionSpec):
        self.address = address
        self.timeout = timeout
        self.retry_seconds = retry_seconds
        self.spec = spec
        self.function: Function | None = None
        self._client = Client(address, timeout=timeout)

    def register(self) -> Function:
        self.function = self._retrying(
            lambda: self._client.register(
                self.spec.expression, self.spec.inputs, self.spec.constants, self.spec.dtype
            )
        )
        return self.function

    def spectrum(
        self, points: Mapping[str, np.ndarray], method: str, options: Mapping[str, Any]
    ) -> Spectrum:
        def call() -> Spectrum:
            return self._client.spectrum(self.function, points, method, **options)

        try:
            return self._retrying(call)
        except NotFound:
            self.register()
            return self._retrying(call)

    def close(self) -> None:
        self._client.close()

    def _retrying(self, call: Callable[[], T]) -> T:
        first_failure = None
        delay = FIRST_BACKOFF_S
        while True:
            try:
                return call()
            except Unavailable as e:
                now = time.monotonic()
                first_failure = now if first_failure is None else first_failure
                left = self.retry_seconds - (now - first_failure)
                if left <= 0:
                    raise ServerGone(
                        f"the server at {self.address} stayed unavailable for "
                        f"{now - first_failure:.1f} s (--retry-seconds {self.retry_seconds:g}); "
                        f"last error: {e}"
                    ) from None
                _sleep(min(delay, left))
                delay = min(2 * delay, MAX_BACKOFF_S)
                # A fresh channel tries to connect at once; the old one may be in gRPC's own
                # reconnect backoff, which grows to minutes.
                self._client.close()
                self._client = Client(self.address, timeout=self.timeout)


# ------------------------------------------------------------------------------ the parts


def _chunk_path(parts: Path, start: int) -> Path:
    return parts / f"chunk-{start:08d}.npz"


def _claim_parts(parts: Path, manifest: dict[str, Any]) -> None:
    """Create the parts folder with its manifest, or check that the one there is this job's."""
    path = parts / MANIFEST
    if parts.exists():
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            existing = None
        except (OSError, ValueError) as e:
            raise JobError(
                f"cannot read {path} ({e}); delete {parts} to start over, or use another --out"
            ) from None
        if existing is None and any(parts.glob("chunk-*.npz")):
            raise JobError(
                f"{parts} holds chunks but no {MANIFEST}, so nothing says which job they belong "
                "to; delete it to start over, or use another --out"
            )
        if existing is not None:
            if existing != manifest:
                there, now = _flat(existing), _flat(manifest)
                differences = "; ".join(
                    f"{key}: {there.get(key)!r} there, {now.get(key)!r} now"
                    for key in sorted(set(there) | set(now))
                    if there.get(key) != now.get(key)
                )
                raise JobError(
                    f"{parts} holds the parts of a different job ({differences}); results of "
                    "two jobs are never mixed: delete the folder to start over, or use "
                    "another --out"
                )
            return
    parts.mkdir(exist_ok=True)
    _write_atomically(path, lambda f: f.write(json.dumps(manifest, indent=2).encode() + b"\n"))


def _flat(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """A manifest with its options spelled as the flags: {"--k": 3, "chunk_size": 64, ...}."""
    options = manifest.get("options")
    flat = {key: value for key, value in manifest.items() if key != "options"}
    if isinstance(options, dict):
        flat |= {"--" + name.replace("_", "-"): value for name, value in options.items()}
    return flat


def _chunk_arrays(spectrum: Spectrum) -> dict[str, np.ndarray]:
    """What a chunk file holds: every field the server returned."""
    return {
        field.name: getattr(spectrum, field.name)
        for field in dataclasses.fields(spectrum)
        if getattr(spectrum, field.name) is not None
    }


def _assemble(parts: Path, starts: range, chunk_size: int, num_points: int) -> dict[str, Any]:
    """The chunk files, concatenated along the batch axis."""
    pieces: dict[str, list[np.ndarray]] = {}
    for start in starts:
        path = _chunk_path(parts, start)
        expected = min(chunk_size, num_points - start)
        with np.load(path, allow_pickle=False) as chunk:
            for name in chunk.files:
                array = chunk[name]
                if array.shape[:1] != (expected,):
                    raise JobError(
                        f"{path} holds {name} of shape {array.shape}, not {expected} points; "
                        f"delete {parts} to start over"
                    )
                pieces.setdefault(name, []).append(array)
    return {name: np.concatenate(arrays) for name, arrays in pieces.items()}


def _save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    _write_atomically(path, lambda f: np.savez(f, **arrays))


def _write_atomically(path: Path, write: Callable[[Any], object]) -> None:
    """Write to a temporary file in the same folder, then rename it over `path`: a reader
    (or a resume) sees the old file or the whole new one, never a part."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------ the report


def _plot(path: Path, result: Mapping[str, np.ndarray], method: str, function_id: str) -> None:
    """A histogram of every eigenvalue at every point (log counts), or for density the mean
    of the points' smoothed densities on one grid spanning all of theirs."""
    # Imported here, and the Agg canvas used directly: no display, no pyplot state, and no
    # matplotlib for runs that do not plot.
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise JobError("--plot needs matplotlib: pip install 'hessd[jobs]'") from None
    num_points = result["gradient_norm"].shape[0]
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    canvas = FigureCanvasAgg(figure)
    ax, along = figure.subplots(1, 2, width_ratios=(3, 2))
    if method == "density":
        grid, density = result["grid"], result["density"]
        common = np.linspace(grid.min(), grid.max(), grid.shape[1])
        mean = np.mean(
            [np.interp(common, g, d, left=0, right=0) for g, d in zip(grid, density, strict=True)],
            axis=0,
        )
        ax.plot(common, mean)
        ax.set_ylabel("spectral density, mean over points")
        lo, hi = result["nodes"].min(axis=(1, 2)), result["nodes"].max(axis=(1, 2))
    else:
        eigenvalues = result["eigenvalues"]
        # symlog: curvature spans decades on both sides of zero.
        scale = np.max(np.abs(eigenvalues)) or 1.0
        ax.hist(eigenvalues.ravel(), bins=_symlog_bins(eigenvalues, scale), log=True)
        ax.set_xscale("symlog", linthresh=1e-4 * scale)
        ax.set_ylabel("count (log scale)")
        lo, hi = eigenvalues[:, 0], eigenvalues[:, -1]
    ax.set_xlabel("Hessian eigenvalue λ")
    ax.set_title(f"{method}: {num_points} points, function {function_id[:12]}")
    # The extremes per point, in the order of the points file: along a training run, how
    # the curvature evolves.
    index = np.arange(num_points)
    along.plot(index, hi, "o-", label="λmax")
    along.plot(index, lo, "o-", label="λmin")
    along.axhline(0.0, color="gray", linewidth=0.8)
    along.set_yscale("symlog", linthresh=1e-4 * (np.max(np.abs([lo, hi])) or 1.0))
    along.set_xlabel("point (row of --points)")
    along.set_ylabel("extreme eigenvalue")
    along.legend()
    try:
        canvas.print_png(str(path))
    except OSError as e:
        raise JobError(f"cannot write the plot {path}: {e}") from None


def _symlog_bins(values: np.ndarray, scale: float, per_side: int = 50) -> np.ndarray:
    """Histogram edges evenly spaced on a symlog axis with linear range 1e-4 · scale."""
    threshold = 1e-4 * scale
    positive = np.geomspace(threshold, scale * (1 + 1e-9), per_side)
    return np.concatenate([-positive[::-1], [0.0], positive])


def _summary(
    result: Mapping[str, np.ndarray],
    method: str,
    function_id: str,
    wall: float,
    computed: int,
    resumed: int,
) -> str:
    """One line per class: count, fraction, how many stationary; the total; the timing."""
    point_class, stationary = result["point_class"], result["stationary"]
    total = point_class.shape[0]
    lines = [f"{'class':<12}{'count':>8}{'fraction':>10}{'stationary':>12}"]
    for name in CLASSES:
        members = point_class == name
        count = int(members.sum())
        lines.append(
            f"{name:<12}{count:>8}{count / total:>10.3f}{int(stationary[members].sum()):>12}"
        )
    lines.append(f"{'total':<12}{total:>8}{1:>10.3f}{int(stationary.sum()):>12}")
    timing = f"{method}, function {function_id[:12]}: {wall:.2f} s wall, "
    timing += f"{computed / wall:.1f} points/s"
    if resumed:
        timing += f" ({computed} computed now, {resumed} resumed from an earlier run)"
    lines.append(timing)
    if method == "density":
        lines.append("classes of density from the extreme Ritz values of the SLQ runs")
    return "\n".join(lines)
