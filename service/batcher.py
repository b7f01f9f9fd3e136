"""Dynamic batching: concurrent requests for the same computation share one device call.

An engine call costs about the same for 1 point as for a few dozen (measured on 2 CPU cores,
gradient of sum(tanh(A @ x)**2), n=256: 0.045 ms for 1 point, 0.13 ms for 64), so many small
concurrent requests run far faster as one call. Requests coalesce when they have the same key

    (function id, request, per-point shapes and dtypes, blake2b of each shared input's bytes)

that is, when the engine would run them with one executable and identical shared parameters;
their per-point args are concatenated along the batch axis and the result split back.

There is no background thread. The first caller for a key becomes the leader of a new batch.
It waits for company only while a batch of the same key is computing, since callers that
arrive meanwhile would otherwise queue behind the device anyway; it departs as soon as that
batch is done, its own holds `max_size` points, or `max_delay_s` has passed, whichever comes
first. An idle key departs at once: a lone caller pays no delay. The leader then closes the
batch, drops the callers that have gone (cancelled or past their deadline), concatenates the
rest, calls the engine once and hands each caller its own rows. The others (followers) block
until the leader has answered them. Every caller of a batch sees that call's exception.

`run_async` is the same batching for callers on one asyncio event loop (the server's fast
path), where the engine call of a small computation is cheap but the loop's own work per
call is not: a batch is a list of futures, and it also waits while calls keep joining it,
until the loop has turned IDLE_TURNS times without one. On a busy loop each turn is another
call's work, so concurrent calls gather (measured on 2 cores, single-point gradients at 64
in flight over gRPC: ~5 calls a batch, 2,000 -> 3,700 calls/s); on an idle one the 16
turns take ~25 µs. A wait that found no one makes the next lone calls of that computation
go at once (1, 3, 7, ... up to MAX_SKIP), without suspending when the call is quick. The
engine call runs on the loop when short and compiled, else on an executor. Both share the
limits and the statistics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from typing import TYPE_CHECKING

import numpy as np

from hessd.service.engine import Engine, EngineRequest, Output
from hessd.service.errors import Cancelled, ResourceExhausted

if TYPE_CHECKING:
    from hessd.service.program import Program

__all__ = ["Batcher", "BatcherStats"]

_GONE_WAITING = "the call was cancelled or passed its deadline while waiting for its batch"


@dataclasses.dataclass
class BatcherStats:
    """Counters since start.

    requests: calls of Batcher.run; batches: engine calls made; points: points computed;
    coalesced: requests that shared their engine call with at least one other; dropped:
    requests whose caller had gone before compute; rejected: requests refused, queue full.
    """

    requests: int = 0
    batches: int = 0
    points: int = 0
    coalesced: int = 0
    dropped: int = 0
    rejected: int = 0


@dataclasses.dataclass(eq=False)
class _Caller:
    """One call of Batcher.run in a batch and, once `done` is set, its answer."""

    args: Sequence[np.ndarray]
    points: int
    is_active: Callable[[], bool]
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: Output | None = None
    error: BaseException | None = None
    arrived: float = dataclasses.field(default_factory=time.perf_counter)


@dataclasses.dataclass(eq=False)
class _Waiter:
    """One call of Batcher.run_async in a batch: its answer is `future`'s."""

    args: Sequence[np.ndarray]
    points: int
    is_active: Callable[[], bool]
    future: asyncio.Future
    arrived: float = dataclasses.field(default_factory=time.perf_counter)


@dataclasses.dataclass(eq=False)
class _Gathering:
    """Waiters of one key gathered on the event loop for one engine call, and what that
    call needs."""

    key: Hashable
    program: Program
    request: EngineRequest
    executor: Executor
    waiters: list[_Waiter]
    points: int
    company: _Company
    waited: bool  # whether it waits for company, or goes on the loop's next turn
    opened: float  # time.perf_counter() of its first caller (uvloop's loop.time() is in ms)
    idle: int = 0  # turns of the loop in a row in which no caller joined
    joins: int = 0  # callers joined since the last turn
    quick: Callable[[Sequence[np.ndarray]], bool] | None = None
    timed: Callable[[float, int], None] | None = None
    timer: asyncio.Handle | None = None
    departed: bool = False


# The most lone calls let go at once between two waits for company that found none.
MAX_SKIP = 255


@dataclasses.dataclass(eq=False)
class _Company:
    """Whether run_async's new batches of one computation wait for company: `skip` counts
    the lone calls that still go at once before the next wait, and `backoff` is what it is
    reset to after a wait that found no one (doubling, up to MAX_SKIP)."""

    function_id: str
    backoff: int = 0
    skip: int = 0

    def waits(self) -> bool:
        """Whether a new batch waits for company; counts a lone call let go if not."""
        if self.skip:
            self.skip -= 1
            return False
        return True

    def found(self, gathering: _Gathering) -> None:
        """Learn from a batch as it departs."""
        if len(gathering.waiters) > 1:
            self.backoff = self.skip = 0
        elif gathering.waited:  # waited, and no one came
            self.backoff = self.skip = min(2 * self.backoff + 1, MAX_SKIP)


# A batch waiting for company goes after this many turns of the event loop in which no
# call joined it: while the loop is busy with other calls, its turns are long and calls
# keep joining; once it is idle, 16 turns take ~25 µs on asyncio's loop, ~8 µs on uvloop's
# (measured on 2 cores; a floor of 25 µs on uvloop changed nothing measurable, c1 to c64).
IDLE_TURNS = 16


@dataclasses.dataclass(eq=False)
class _Batch:
    """Callers of one key gathered for one engine call."""

    callers: list[_Caller]
    points: int
    # Set when waiting longer gains nothing: the batch is full, a caller did not fit, or
    # no batch of this key is computing.
    go: threading.Event = dataclasses.field(default_factory=threading.Event)


class Batcher:
    """Coalesces concurrent engine.run calls with equal keys into one device call.

    max_size: most points in one batch. A request of more points gains nothing from company:
        it runs alone, straight on the engine, and is not counted against max_queue.
    max_delay_s: longest a leader waits for company (only while a batch of its key is
        computing). 0 turns batching off: run calls engine.run in the caller's thread.
    max_queue: most points admitted and not yet answered (waiting for a batch or computing),
        over all keys; a request that would pass it is refused at once with
        ResourceExhausted. At least max_size, so that any batchable request fits when idle.
    observe_queue: called with each batched caller's wait in seconds as its batch starts
        (the server's queue-time histogram).

    Callers whose `is_active()` is false when their batch is built are not computed; they
    get Cancelled (gRPC has already told their client CANCELLED or DEADLINE_EXCEEDED).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_size: int = 64,
        max_delay_s: float = 0.002,
        max_queue: int = 4096,
        observe_queue: Callable[[float], None] | None = None,
    ):
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, got {max_size}")
        if max_delay_s < 0:
            raise ValueError(f"max_delay_s must not be negative, got {max_delay_s}")
        if max_queue < max_size:
            raise ValueError(f"max_queue ({max_queue}) must be at least max_size ({max_size})")
        self.engine = engine
        self.max_size = max_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.stats = BatcherStats()
        self._lock = threading.Lock()
        self._open: dict[tuple, _Batch] = {}  # by key: the batch still taking callers
        self._computing: dict[tuple, int] = {}  # by key: its batches inside engine.run
        # Called with each batched caller's wait, in seconds, as its batch starts (metrics).
        self.observe_queue = observe_queue
        self._queued = 0
        # run_async's state, touched on the event loop's thread only.
        self._gathering: dict[Hashable, _Gathering] = {}
        self._computing_async: dict[Hashable, int] = {}
        # By computation (the caller's key, without shared inputs' digests): what its
        # batches found of company.
        self._companies: dict[Hashable, _Company] = {}

    @property
    def queued(self) -> int:
        """Points admitted and not yet answered: waiting for their batch or computing."""
        return self._queued

    def run(
        self,
        program: Program,
        request: EngineRequest,
        args: Sequence[np.ndarray],
        *,
        is_active: Callable[[], bool] = lambda: True,
    ) -> Output:
        """Same contract and result as engine.run(program, request, args), but may share
        the device call with concurrent callers.

        args: the program's inputs (then any vector), each (batch, *shape) except the shared
        ones (request.shared), which are (*shape). Returns (batch, ...) arrays: one, or a
        dict of them. `is_active` (gRPC's context.is_active) is asked just before compute.

        Raises Cancelled when is_active() is false by then, ResourceExhausted when the queue
        is full, and whatever engine.run raises.
        """
        points = _points(request, args)
        with self._lock:
            self.stats.requests += 1
        if self.max_delay_s == 0 or points > self.max_size or points == 0 or not request.coalesces:
            return self._run_alone(program, request, args, points, is_active)
        key = _key(program, request, args)
        caller = _Caller(args, points, is_active)
        with self._lock:
            if self._queued + points > self.max_queue:
                self.stats.rejected += 1
                raise self._queue_full(points)
            self._queued += points
            batch = self._open.get(key)
            leader = batch is None or batch.points + points > self.max_size
            if batch is not None and not leader:
                batch.callers.append(caller)
                batch.points += points
            else:
                if batch is not None:
                    # This caller does not fit: send that batch off now, start the next.
                    del self._open[key]
                    batch.go.set()
                batch = _Batch([caller], points)
                self._open[key] = batch
                if key not in self._computing:
                    batch.go.set()
            if batch.points == self.max_size:
                del self._open[key]
                batch.go.set()
        if leader:
            self._lead(key, program, request, batch)
        else:
            caller.done.wait()
        if caller.error is not None:
            raise caller.error
        assert caller.result is not None  # the leader sets one of the two
        return caller.result

    async def run_async(
        self,
        program: Program,
        request: EngineRequest,
        args: Sequence[np.ndarray],
        *,
        executor: Executor,
        is_active: Callable[[], bool] = lambda: True,
        key: Hashable | None = None,
        quick: Callable[[Sequence[np.ndarray]], bool] | None = None,
        timed: Callable[[float, int], None] | None = None,
    ) -> Output:
        """run() for a caller on the event loop: the same result, errors and limits, with
        the engine called on `executor`. Concurrent callers of one key share a call.

        A new batch waits for company: while a batch of its key computes (it goes when
        that one ends), and otherwise while calls keep joining it, that is until IDLE_TURNS
        turns of the loop in a row bring none; at most max_delay_s, and it goes at once
        when it holds max_size points. A wait that finds no one lets the next 1, 3, 7, ...
        (up to MAX_SKIP) lone calls of its computation go at once, a quick one without
        suspending, before the next wait; one that finds company ends that. So calls one
        at a time pay a wait (IDLE_TURNS turns of an idle loop, ~25 µs) once in
        MAX_SKIP + 1 at most, and concurrent calls share their engine calls.

        key: stands for (program, request, per-point shapes and dtypes) when the caller
            has one (the fast path's plan); the shared inputs' digests are added to it.
        quick: asked with a batch's args as it departs; True runs the engine right there on
            the loop, which saves two thread hand-offs and is for calls known to be short
            and compiled (Engine.compiled).
        timed: told the seconds each engine call of the batch took, and its points.
        """
        loop = asyncio.get_running_loop()
        points = _points(request, args)
        with self._lock:
            self.stats.requests += 1
        if self.max_delay_s == 0 or points > self.max_size or points == 0 or not request.coalesces:
            if quick is not None and quick(args):
                return self._run_alone(program, request, args, points, is_active, timed)
            return await loop.run_in_executor(
                executor, self._run_alone, program, request, args, points, is_active, timed
            )
        computation = (program.function_id, request) if key is None else key
        key = _key(program, request, args, key)
        gathering = self._gathering.get(key)
        if gathering is not None and gathering.points + points > self.max_size:
            self._depart(gathering)
            gathering = None
        if gathering is None:
            company = self._company(computation, program.function_id)
            waits = key in self._computing_async or company.waits()
            if not waits and quick is not None and quick(args):
                # Short, compiled and alone: computed now, without suspending the call. On
                # the event loop a suspension and resumption cost more than such a call.
                return self._run_alone(program, request, args, points, is_active, timed)
        with self._lock:
            if self._queued + points > self.max_queue:
                self.stats.rejected += 1
                raise self._queue_full(points)
            self._queued += points
        waiter = _Waiter(args, points, is_active, loop.create_future())
        if gathering is None:
            gathering = _Gathering(
                key, program, request, executor, [], 0, company, waits, time.perf_counter(),
                quick=quick, timed=timed,
            )  # fmt: skip
            self._gathering[key] = gathering
            if key in self._computing_async:
                # For the batch computing (its end sends this one off), or max_delay_s.
                gathering.timer = loop.call_later(self.max_delay_s, self._depart, gathering)
            elif waits:
                # For company, while calls keep coming (or max_delay_s).
                gathering.timer = loop.call_soon(self._turn, gathering)
            else:
                # Off on the loop's next turn, with whoever arrives in this one.
                gathering.timer = loop.call_soon(self._depart, gathering)
        gathering.joins += 1
        gathering.waiters.append(waiter)
        gathering.points += points
        if gathering.points == self.max_size:
            self._depart(gathering)
        return await waiter.future

    def _company(self, computation: Hashable, function_id: str) -> _Company:
        company = self._companies.get(computation)
        if company is None:
            if len(self._companies) >= 4096:  # bounded: computations come and go
                self._companies.clear()
            company = self._companies[computation] = _Company(function_id)
        return company

    def forget(self, function_id: str) -> None:
        """Drop what is kept of a function's computations (evicted from the registry: a
        computation's key may hold its Program)."""
        for computation, company in list(self._companies.items()):
            if company.function_id == function_id:
                self._companies.pop(computation, None)

    def _turn(self, gathering: _Gathering) -> None:
        """A turn of the loop for a batch waiting for company: it goes after IDLE_TURNS
        turns in a row in which no call joined it, or max_delay_s after its first call."""
        if gathering.departed:
            return
        gathering.idle = 0 if gathering.joins else gathering.idle + 1
        gathering.joins = 0
        elapsed = time.perf_counter() - gathering.opened
        if gathering.idle >= IDLE_TURNS or elapsed >= self.max_delay_s:
            self._depart(gathering)
        else:
            gathering.timer = asyncio.get_running_loop().call_soon(self._turn, gathering)

    def _depart(self, gathering: _Gathering) -> None:
        """Close `gathering`, drop its callers that have gone, and start its engine call."""
        if gathering.departed:
            return
        gathering.departed = True
        if gathering.timer is not None:
            gathering.timer.cancel()
        gathering.company.found(gathering)
        key, request = gathering.key, gathering.request
        if self._gathering.get(key) is gathering:
            del self._gathering[key]
        active = []
        for waiter in gathering.waiters:
            if waiter.future.done():  # the call's task was cancelled
                continue
            if waiter.is_active():
                active.append(waiter)
            else:
                waiter.future.set_exception(Cancelled(_GONE_WAITING))
        self._closed(len(gathering.waiters), active)
        if not active:
            with self._lock:
                self._queued -= gathering.points
            return
        args = _concatenate(request, [w.args for w in active])
        run = functools.partial(
            self._timed_run,
            gathering.program,
            request,
            args,
            lambda: any(w.is_active() for w in active),
            gathering.timed,
        )
        if gathering.quick is not None and gathering.quick(args):
            try:
                result = run()
            except Exception as e:
                self._answer(gathering, active, None, e)
            else:
                self._answer(gathering, active, result, None)
            return
        self._computing_async[key] = self._computing_async.get(key, 0) + 1
        computing = asyncio.get_running_loop().run_in_executor(gathering.executor, run)
        computing.add_done_callback(functools.partial(self._computed, gathering, active))

    def _timed_run(
        self,
        program: Program,
        request: EngineRequest,
        args: Sequence[np.ndarray],
        is_active: Callable[[], bool],
        timed: Callable[[float, int], None] | None,
    ) -> Output:
        start = time.perf_counter()
        result = self.engine.run(program, request, args, is_active=is_active)
        if timed is not None:
            timed(time.perf_counter() - start, _points(request, args))
        return result

    def _computed(
        self, gathering: _Gathering, active: list[_Waiter], computing: asyncio.Future
    ) -> None:
        """Answer a batch computed on the executor; send the next batch of its key off."""
        key = gathering.key
        self._computing_async[key] -= 1
        if not self._computing_async[key]:
            del self._computing_async[key]
            waiting = self._gathering.get(key)
            if waiting is not None:
                self._depart(waiting)
        error = computing.exception()
        self._answer(gathering, active, None if error else computing.result(), error)

    def _answer(
        self,
        gathering: _Gathering,
        active: list[_Waiter],
        result: Output | None,
        error: BaseException | None,
    ) -> None:
        """Hand each waiter its rows, or the call's exception."""
        with self._lock:
            self._queued -= gathering.points
        if error is not None:
            for waiter in active:
                if not waiter.future.done():
                    waiter.future.set_exception(error)
            return
        assert result is not None
        for waiter, rows in zip(active, _split(result, active), strict=True):
            if not waiter.future.done():
                waiter.future.set_result(rows)

    def _queue_full(self, points: int) -> ResourceExhausted:
        return ResourceExhausted(
            f"the batching queue is full: {self._queued} points are waiting or "
            f"computing and this request adds {points}, over this server's limit of "
            f"{self.max_queue} points (--batch-max-queue); retry with backoff"
        )

    def _run_alone(
        self,
        program: Program,
        request: EngineRequest,
        args: Sequence[np.ndarray],
        points: int,
        is_active: Callable[[], bool],
        timed: Callable[[float, int], None] | None = None,
    ) -> Output:
        if not is_active():
            with self._lock:
                self.stats.dropped += 1
            raise Cancelled("the call was cancelled or passed its deadline before compute")
        with self._lock:
            self.stats.batches += 1
            self.stats.points += points
        return self._timed_run(program, request, args, is_active, timed)

    def _lead(self, key: tuple, program: Program, request: EngineRequest, batch: _Batch) -> None:
        """Wait for company, then compute the batch and answer every caller in it."""
        batch.go.wait(self.max_delay_s)
        with self._lock:
            if self._open.get(key) is batch:
                del self._open[key]
            self._computing[key] = self._computing.get(key, 0) + 1
        # Closed: no caller joins any more, so its list is read without the lock.
        try:
            active = []
            for caller in batch.callers:
                if caller.is_active():
                    active.append(caller)
                else:
                    caller.error = Cancelled(_GONE_WAITING)
            self._closed(len(batch.callers), active)
            if active:
                self._compute(program, request, active)
        except BaseException as e:
            for caller in batch.callers:
                if caller.error is None and caller.result is None:
                    caller.error = e
            raise
        finally:
            with self._lock:
                self._queued -= batch.points
                self._computing[key] -= 1
                if not self._computing[key]:
                    del self._computing[key]
                    # The device is free of this key: its waiting batch need wait no longer.
                    if key in self._open:
                        self._open[key].go.set()
            for caller in batch.callers:
                caller.done.set()

    def _closed(self, callers: int, active: Sequence[_Caller | _Waiter]) -> None:
        """A batch of `callers` closed with `active` of them still there: their waits go
        to observe_queue, and the statistics count the batch."""
        if self.observe_queue is not None:
            now = time.perf_counter()
            for caller in active:
                self.observe_queue(now - caller.arrived)
        with self._lock:
            self.stats.dropped += callers - len(active)
            if active:
                self.stats.batches += 1
                self.stats.points += sum(c.points for c in active)
                if len(active) > 1:
                    self.stats.coalesced += len(active)

    def _compute(self, program: Program, request: EngineRequest, callers: list[_Caller]) -> None:
        """One engine call for `callers`; each gets its rows, or the call's exception."""
        args = _concatenate(request, [c.args for c in callers])
        try:
            result = self.engine.run(
                program, request, args, is_active=lambda: any(c.is_active() for c in callers)
            )
        except Exception as e:
            for caller in callers:
                caller.error = e
            return
        for caller, rows in zip(callers, _split(result, callers), strict=True):
            caller.result = rows


def _concatenate(
    request: EngineRequest, args: Sequence[Sequence[np.ndarray]]
) -> Sequence[np.ndarray]:
    """The args of one engine call for callers' `args`: per-point ones concatenated along
    the batch axis, shared ones (equal, by the key) taken from the first."""
    if len(args) == 1:
        return args[0]
    return [
        a if i in request.shared else np.concatenate([c[i] for c in args])
        for i, a in enumerate(args[0])
    ]


def _split(result: Output, callers: Sequence[_Caller | _Waiter]) -> list[Output]:
    """Each caller's rows of a batch's result, in order."""
    if len(callers) == 1:
        return [result]
    parts: list[Output] = []
    start = 0
    for caller in callers:
        rows = slice(start, start + caller.points)
        if isinstance(result, dict):
            parts.append({name: array[rows] for name, array in result.items()})
        else:
            parts.append(result[rows])
        start = rows.stop
    return parts


def _points(request: EngineRequest, args: Sequence[np.ndarray]) -> int:
    """The batch size: the leading axis of the first per-point arg (as engine.run)."""
    return next(a for i, a in enumerate(args) if i not in request.shared).shape[0]


def _key(
    program: Program,
    request: EngineRequest,
    args: Sequence[np.ndarray],
    prefix: Hashable | None = None,
) -> tuple:
    """What must be equal for two requests to share a call: the engine's cache key without
    the bucket (or a `prefix` that stands for it), plus a digest of every shared input, so
    different parameters never mix."""
    signature: list[tuple[object, ...]] = []
    for i, a in enumerate(args):
        if i in request.shared:
            digest = hashlib.blake2b(np.ascontiguousarray(a).data, digest_size=16).digest()
            signature.append((a.shape, a.dtype, digest))
        elif prefix is None:
            signature.append((a.shape[1:], a.dtype))
    if prefix is not None:
        return prefix, tuple(signature)
    return program.function_id, request, tuple(signature)
