"""`hessd spectrum` from flags to result: read the function, the points and the data set,
send the points in chunks to one or several servers, save each chunk, assemble, plot and
summarise; its exit codes."""

from __future__ import annotations

import argparse
import hashlib
import queue
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import numpy as np

from hessd.client import Handle, HessdError
from hessd.tools._common import (
    Refused,
    ServerGone,
    connection_options,
    matplotlib,
    refuse,
    run_interruptibly,
)
from hessd.tools._function_file import load_function_file
from hessd.tools.spectrum._flags import (
    addresses,
    job_options,
    manifest_objective,
    objective_options,
    server_options,
)
from hessd.tools.spectrum._parts import assemble, chunk_arrays, chunk_path, claim_parts, save_npz
from hessd.tools.spectrum._report import plot, summary
from hessd.tools.spectrum._server import RetryingServer

__all__ = ["load_data", "load_points", "main"]

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
        options = job_options(args)
        objective = objective_options(args)
        data: dict[str, np.ndarray] = {}
        if objective is not None:
            target = objective["target"] if objective["loss"] is not None else None
            data = load_data(Path(args.data), spec.inputs, target)
        point_inputs = {name: shape for name, shape in spec.inputs.items() if name not in data}
        points, num_points = load_points(Path(args.points), point_inputs)
        servers_at = addresses(args)
        if args.concurrency < len(servers_at):
            raise Refused(
                f"--concurrency {args.concurrency} is less than the {len(servers_at)} "
                f"--address servers, so some would get no work: give --concurrency "
                f"{len(servers_at)} or more"
            )
        connection = connection_options(args)
        out = Path(args.out)
        if not out.parent.is_dir():
            raise Refused(f"--out {out}: the folder {out.parent} does not exist")
        if args.plot:
            matplotlib()
        progress = _progress_bar(args.progress)
        points_sha256 = _sha256(Path(args.points))
        data_sha256 = _sha256(Path(args.data)) if objective is not None else None
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

    # One server (a channel of its own) per request in flight, the addresses in turn.
    servers: list[RetryingServer] = []
    try:
        for i in range(args.concurrency):
            address = servers_at[i % len(servers_at)]
            servers.append(
                RetryingServer(address, args.timeout, args.retry_seconds, spec, connection)
            )
        for server in servers:
            server.connect()
        function = servers[0].register()
        for server in servers[1:]:
            server.register()
        manifest: dict[str, Any] = {
            "function_id": function.id,
            "method": args.method,
            "options": options,
            "chunk_size": args.chunk_size,
            "num_points": num_points,
            "points_sha256": points_sha256,
        }
        if objective is not None:
            manifest["options"] = options | manifest_objective(objective)
            manifest["data_sha256"] = data_sha256
        claim_parts(parts, manifest)
        resumed = saved_points()
        todo = [s for s in starts if not chunk_path(parts, s).exists()]
        sent = server_options(options)
        if objective is not None and todo:
            sent |= _objective_request(objective, _put_once_per_server(servers, data))
        idle: queue.SimpleQueue[RetryingServer] = queue.SimpleQueue()
        for server in servers:
            idle.put(server)
        stopping = threading.Event()

        def compute(start: int) -> int:
            """Send one chunk and save its result; the points it held (0 once the job
            stops)."""
            if stopping.is_set():
                return 0
            server = idle.get()
            try:
                stop = min(start + args.chunk_size, num_points)
                chunk = {name: np.ascontiguousarray(a[start:stop]) for name, a in points.items()}
                spectrum = server.spectrum(chunk, args.method, sent)
                save_npz(chunk_path(parts, start), chunk_arrays(spectrum))
                return stop - start
            except BaseException:
                stopping.set()
                raise
            finally:
                idle.put(server)

        with progress(num_points, resumed) as bar:
            _run_chunks(todo, compute, args.concurrency, stopping, bar.update)
        result = assemble(parts, starts, args.chunk_size, num_points)
        result["method"] = np.array(args.method)
        result["function_id"] = np.array(function.id)
        if objective is not None:
            result["operator"] = np.array(objective["operator"])
            result["data_sha256"] = np.array(data_sha256)
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
        # Closing the channels also cancels the calls still in flight after a Ctrl-C.
        for server in servers:
            server.close()
    operator = None if objective is None else objective["operator"]
    try:
        if args.plot:
            plot(Path(args.plot), result, args.method, function.id, operator)
    except Refused as e:
        return refuse(TOOL, e)
    except KeyboardInterrupt:
        print(f"{TOOL}: interrupted while plotting; the result is in {out}", file=sys.stderr)
        return 130
    wall = time.perf_counter() - started
    print(summary(result, args.method, function.id, wall, num_points - resumed, resumed, operator))
    return 0


def _run_chunks(
    starts: Iterable[int],
    compute: Callable[[int], int],
    concurrency: int,
    stopping: threading.Event,
    update: Callable[[int], object],
) -> None:
    """compute(start) for every start, `concurrency` at once, update(points) as each ends.
    The first failure stops the job: chunks not started are dropped; those in flight end
    and are saved (a resume skips them), except after Ctrl-C, which does not wait for them
    (the channels' closing cancels them)."""
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="hessd-spectrum")
    interrupted = False
    try:
        for future in as_completed([pool.submit(compute, start) for start in starts]):
            update(future.result())
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        stopping.set()
        pool.shutdown(wait=not interrupted, cancel_futures=True)


def _put_once_per_server(
    servers: list[RetryingServer], data: Mapping[str, np.ndarray]
) -> dict[str, Handle]:
    """Upload the data set to each address once (the first server of each); the handles
    are content addresses, the same on every server, so every request names them."""
    handles: dict[str, Handle] = {}
    done: set[str] = set()
    for server in servers:
        if server.address in done:
            continue
        done.add(server.address)
        handles = {name: server.put(array) for name, array in data.items()}
    return handles


def _objective_request(objective: Mapping[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
    """The objective's keyword arguments of Client.spectrum; counts left 0 are the server's."""
    return {
        "data": dict(data),
        "loss": objective["loss"],
        "operator": objective["operator"],
        "reduction": objective["reduction"],
        "target": objective["target"],
        "chunk_size": objective["data_chunk_size"],
        "mc_samples": objective["mc_samples"],
    }


def load_data(
    path: Path, inputs: Mapping[str, tuple[int, ...]], target: str | None
) -> dict[str, np.ndarray]:
    """The data file (--data) as one (N, ...) array per name: per-example inputs of the
    function and, with a loss, the targets. Checked here, before any upload: the names,
    every input's shape per example, one N for all."""
    if path.suffix != ".npz":
        raise Refused(
            f"data file {path}: name a .npz file with one (N, ...) array per per-example input "
            "(np.savez(path, x=X, y=Y))"
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            data = {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as e:
        raise Refused(f"cannot load data file {path}: {e}") from None
    names = list(inputs)
    allowed = set(names) | ({target} if target is not None else set())
    unknown = sorted(set(data) - allowed)
    if unknown:
        neither = "nor the targets of --loss" if target is not None else "and --loss is not given"
        raise Refused(
            f"data file {path} holds {unknown}, which are not inputs of the function "
            f"({names}) {neither}; name each array after the input it feeds"
            + (f", and the targets {target!r} (or say --target)" if target is not None else "")
        )
    if target is not None and target not in data:
        raise Refused(
            f"data file {path} has no array {target!r} of targets for --loss; it holds "
            f"{sorted(data)}: add one, or name the array of targets with --target"
        )
    given = [name for name in names if name in data]
    if not given:
        raise Refused(
            f"data file {path} holds no input of the function: give one (N, ...) array per "
            f"per-example input, named after it (the function's inputs are {names}; the "
            "points, checkpoints, are the others)"
        )
    if len(given) == len(names):
        raise Refused(
            f"data file {path} holds every input of the function ({names}); the points "
            "(checkpoints) are the inputs it leaves out: leave the parameters out of it"
        )
    for name, array in data.items():
        if array.ndim == 0:
            raise Refused(
                f"data file {path}: {name!r} is a scalar; every array needs a leading "
                "example axis (N, ...)"
            )
        if name in inputs and array.shape[1:] != inputs[name]:
            batched = str(("N", *inputs[name])).replace("'", "")
            raise Refused(
                f"data file {path}: input {name!r} has shape {array.shape}; expected "
                f"{batched}, a leading example axis then the shape of one example"
            )
    counts = {name: array.shape[0] for name, array in data.items()}
    if len(set(counts.values())) > 1:
        described = ", ".join(f"{name} {count}" for name, count in counts.items())
        raise Refused(
            f"data file {path}: the arrays hold different numbers of examples: {described}"
        )
    if not next(iter(counts.values())):
        raise Refused(f"data file {path} holds no examples (N = 0)")
    return data


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
