"""The load: one asyncio loop over one AsyncClient channel, a closed loop (c requests in
flight) or an open loop (requests started at arrivals of a given rate), cut into windows
by a recorder until each level is stable."""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import numpy as np

from hessd.client import AsyncClient, DeadlineExceeded, Function, HessdError, Unavailable
from hessd.proto.kinds import Kind
from hessd.tools._common import Refused, ServerGone
from hessd.tools._function_file import FunctionSpec
from hessd.tools.bench._report import progress_line
from hessd.tools.bench._statistics import Row, Window, is_stable, summarize

__all__ = ["Sweep"]

Call = Callable[[], Awaitable[Any]]


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

    def succeeded(self, latency: float) -> None:
        self.in_flight -= 1
        self._latencies.append(latency)

    def failed(self, error: HessdError) -> None:
        self.in_flight -= 1
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


def _tls_hint(connection: Mapping[str, Any]) -> str:
    """What else keeps a server from answering, by the TLS flags given: a failed handshake
    looks like no server at all."""
    if not connection.get("tls"):
        return "; a server with TLS answers only with --tls or --tls-ca"
    if "certificate_chain" not in connection:
        return (
            "; a server that requires client certificates (mutual TLS) answers only with "
            "--tls-cert and --tls-key"
        )
    return ""


class Sweep:
    """The whole run inside one event loop. What it measured stays readable after the loop
    was interrupted: `rows()` reports the finished levels and the windows of the current
    one."""

    def __init__(
        self,
        args: argparse.Namespace,
        spec: FunctionSpec,
        levels: Sequence[float],
        options: Mapping[str, Any],
        connection: Mapping[str, Any],
    ) -> None:
        self.args = args
        self.spec = spec
        self.levels = levels
        self.options = dict(options)
        self.connection = dict(connection)
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
        async with AsyncClient(args.address, timeout=args.timeout, **self.connection) as client:
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
                print(progress_line(row), file=sys.stderr, flush=True)

    async def _set_up(self, client: AsyncClient) -> Call:
        """Ask for the server's info, register, and send the first request (it compiles);
        returns the measured call."""
        args, spec = self.args, self.spec
        try:
            self.server_info = await client.server_info(timeout=args.connect_timeout)
        except (Unavailable, DeadlineExceeded) as e:
            raise ServerGone(
                f"no hessd server answered at {args.address} within --connect-timeout "
                f"{args.connect_timeout:g} s: {e}{_tls_hint(self.connection)}"
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

    async def _first_request(self, client: AsyncClient, f: Function, timeout: float) -> Call:
        """Draw the points (and the vector) and send them once: a kind the function does not
        take fails here, before the sweep. Returns the measured call."""
        args = self.args
        if args.wrt is not None and args.wrt not in f.inputs:
            raise Refused(f"--wrt {args.wrt}: the function's inputs are {list(f.inputs)}")
        rng = np.random.default_rng([args.seed, 1])
        points = {
            name: rng.standard_normal((args.batch, *shape)).astype(f.dtype)
            for name, shape in f.inputs.items()
        }
        options = dict(self.options)
        kind = Kind.parse(args.kind)
        if kind.takes_vector:
            if kind.vector_is_output_shaped:
                shape = f.output_shape
            else:
                shape = f.inputs[args.wrt or next(iter(f.inputs))]
            options["vector"] = rng.standard_normal((args.batch, *shape)).astype(f.dtype)
        await client.compute(f, args.kind, points, timeout=timeout, **options)

        def call() -> Awaitable[Any]:
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

    async def _closed_loop(self, call: Call, concurrency: int) -> str:
        recorder = _Recorder()

        async def worker() -> None:
            while True:
                await _timed(call, recorder)

        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        try:
            return await self._measure(recorder)
        finally:
            await _cancel(workers)

    async def _open_loop(self, call: Call, rate: float) -> str:
        recorder = _Recorder()
        gaps = random.Random(self.args.seed)
        requests: set[asyncio.Task[None]] = set()

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


async def _timed(call: Call, recorder: _Recorder) -> None:
    recorder.started()
    start = time.perf_counter()
    try:
        await call()
    except HessdError as e:
        recorder.failed(e)
        # A call refused before it waits on anything would never give the event loop back
        # to a closed-loop worker, and the window would never end.
        await asyncio.sleep(0)
    except asyncio.CancelledError:
        recorder.in_flight -= 1
        raise
    else:
        recorder.succeeded(time.perf_counter() - start)


async def _cancel(tasks: Sequence[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
