"""`hessd spectrum` from flags to result: read the function and the points, send them in
chunks, save each chunk, assemble, plot and summarise; its exit codes."""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import numpy as np

from hessd.client import HessdError
from hessd.tools._common import (
    Refused,
    ServerGone,
    connection_options,
    matplotlib,
    refuse,
    run_interruptibly,
)
from hessd.tools._function_file import load_function_file
from hessd.tools.spectrum._flags import job_options, server_options
from hessd.tools.spectrum._parts import assemble, chunk_arrays, chunk_path, claim_parts, save_npz
from hessd.tools.spectrum._report import plot, summary
from hessd.tools.spectrum._server import RetryingServer

__all__ = ["load_points", "main"]

TOOL = "hessd spectrum"


class _Progress(Protocol):
    def __enter__(self) -> _Progress: ...

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> object: ...

    def update(self, n: int) -> object: ...


class _NoProgress:
    """The progress bar where none is shown."""

    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None

    def update(self, n: int) -> None:
        return None


def main(args: argparse.Namespace) -> int:
    """Run the job; the exit code: 0 done, 1 the server stayed away, 2 a refused file, flag
    or request, 130 interrupted (the finished chunks stay for a resume)."""
    return run_interruptibly(TOOL, lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    try:
        spec = load_function_file(Path(args.function))
        points, num_points = load_points(Path(args.points), spec.inputs)
        options = job_options(args)
        connection = connection_options(args)
        out = Path(args.out)
        if not out.parent.is_dir():
            raise Refused(f"--out {out}: the folder {out.parent} does not exist")
        if args.plot:
            matplotlib()
        progress = _progress_bar(args.progress)
        points_sha256 = _sha256(Path(args.points))
    except Refused as e:
        return refuse(TOOL, e)
    except KeyboardInterrupt:
        print(f"{TOOL}: interrupted before any point was computed", file=sys.stderr)
        return 130
    parts = out.with_name(out.name + ".parts")
    starts = range(0, num_points, args.chunk_size)

    def saved_points() -> int:
        return sum(
            min(args.chunk_size, num_points - s) for s in starts if chunk_path(parts, s).exists()
        )

    server: RetryingServer | None = None
    try:
        server = RetryingServer(args.address, args.timeout, args.retry_seconds, spec, connection)
        server.connect()
        function = server.register()
        manifest = {
            "function_id": function.id,
            "method": args.method,
            "options": options,
            "chunk_size": args.chunk_size,
            "num_points": num_points,
            "points_sha256": points_sha256,
        }
        claim_parts(parts, manifest)
        resumed = saved_points()
        todo = [s for s in starts if not chunk_path(parts, s).exists()]
        sent = server_options(options)
        with progress(num_points, resumed) as bar:
            for start in todo:
                stop = min(start + args.chunk_size, num_points)
                chunk = {name: np.ascontiguousarray(a[start:stop]) for name, a in points.items()}
                spectrum = server.spectrum(chunk, args.method, sent)
                save_npz(chunk_path(parts, start), chunk_arrays(spectrum))
                bar.update(stop - start)
        result = assemble(parts, starts, args.chunk_size, num_points)
        result["method"] = np.array(args.method)
        result["function_id"] = np.array(function.id)
        save_npz(out, result)
        shutil.rmtree(parts)
    except KeyboardInterrupt:
        saved = saved_points()
        if saved:
            print(
                f"{TOOL}: interrupted after {saved} of {num_points} points; "
                "run the same command again to resume",
                file=sys.stderr,
            )
        else:
            print(f"{TOOL}: interrupted before any point was computed", file=sys.stderr)
        return 130
    except ServerGone as e:
        saved = saved_points()
        if saved:
            print(
                f"{TOOL}: {e}. {saved} of {num_points} points are saved in {parts}; "
                "run the same command again to resume",
                file=sys.stderr,
            )
        else:
            print(f"{TOOL}: {e}. No points were computed", file=sys.stderr)
        return 1
    except (Refused, HessdError) as e:
        return refuse(TOOL, e)
    finally:
        if server is not None:
            server.close()
    try:
        if args.plot:
            plot(Path(args.plot), result, args.method, function.id)
    except Refused as e:
        return refuse(TOOL, e)
    except KeyboardInterrupt:
        print(f"{TOOL}: interrupted while plotting; the result is in {out}", file=sys.stderr)
        return 130
    wall = time.perf_counter() - started
    print(summary(result, args.method, function.id, wall, num_points - resumed, resumed))
    return 0


def load_points(
    path: Path, inputs: Mapping[str, tuple[int, ...]]
) -> tuple[dict[str, np.ndarray], int]:
    """The points file as one array per input, and the number of points."""
    names = list(inputs)
    try:
        if path.suffix == ".npy":
            if len(names) != 1:
                raise Refused(
                    f"points file {path}: the function has inputs {names}; give a .npz "
                    "with one array per input"
                )
            # Memory-mapped: each chunk is read when it is sent.
            points = {names[0]: np.load(path, mmap_mode="r", allow_pickle=False)}
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                points = {name: archive[name] for name in archive.files}
        else:
            raise Refused(f"points file {path}: name a .npy or a .npz file")
    except (OSError, ValueError) as e:
        raise Refused(f"cannot load points file {path}: {e}") from None
    if sorted(points) != sorted(names):
        raise Refused(
            f"points file {path} holds arrays {sorted(points)}; the function takes "
            f"inputs {names}: give one array per input, named after it"
        )
    counts = set()
    for name, shape in inputs.items():
        array = points[name]
        if array.ndim != len(shape) + 1 or array.shape[1:] != shape:
            batched = str(("batch", *shape)).replace("'", "")
            raise Refused(
                f"points file {path}: input {name!r} has shape {array.shape}; expected "
                f"{batched}, a leading batch axis then the shape of one point"
            )
        counts.add(array.shape[0])
    if len(counts) > 1:
        described = ", ".join(f"{n} {points[n].shape[0]}" for n in names)
        raise Refused(
            f"points file {path}: the inputs hold different numbers of points: {described}"
        )
    (num_points,) = counts
    if num_points == 0:
        raise Refused(f"points file {path} holds no points")
    return {name: points[name] for name in names}, num_points


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _progress_bar(asked: bool) -> Callable[[int, int], _Progress]:
    """The progress bar, (total, initial) -> bar: tqdm's when asked for (--progress) or
    stderr is a terminal, else none. tqdm is imported only then: missing, it is refused when
    asked for and quietly left out on a terminal."""
    if not (asked or sys.stderr.isatty()):
        return lambda total, initial: _NoProgress()
    try:
        from tqdm import tqdm
    except ImportError:
        if asked:
            raise Refused("--progress needs tqdm: pip install tqdm, or 'hessd[jobs]'") from None
        return lambda total, initial: _NoProgress()

    def bar(total: int, initial: int) -> Any:
        return tqdm(total=total, initial=initial, unit="pt", desc="spectrum", file=sys.stderr)

    return bar
