"""The batcher: coalesced requests give each caller exactly its unbatched rows.

Orderings are made deterministic with GatedEngine, whose calls wait for a gate while the
test admits callers one by one (each admitted once batcher.queued has grown by its points).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from hessd.proto.v1 import hessd_pb2
from hessd.service import kinds
from hessd.service.batcher import IDLE_TURNS, Batcher
from hessd.service.engine import Engine, bucket_for
from hessd.service.errors import Cancelled, InvalidArgument, ResourceExhausted
from hessd.service.program import build_program

from conftest import allclose

Kind = kinds.Kind


def spec(source: str, **inputs: tuple[int, ...]) -> hessd_pb2.FunctionSpec:
    return hessd_pb2.FunctionSpec(
        expression=hessd_pb2.Expression(source=source),
        inputs=[
            hessd_pb2.InputSpec(name=name, shape=shape, dtype=hessd_pb2.FLOAT64)
            for name, shape in inputs.items()
        ],
    )


TANH = build_program(spec("sum(tanh(x)**2)", x=(3,)))
SINE = build_program(spec("sum(x * sin(x)) + x[0] * x[1]", x=(2,)))
AFFINE = build_program(spec("sum(tanh(A @ x)**2)", x=(3,), A=(3, 3)))


class GatedEngine:
    """An Engine that records each call and holds it until `gate` is set (set at first);
    with `error` it raises that instead of computing."""

    def __init__(self, engine: Engine | None = None, error: BaseException | None = None):
        self.engine = engine or Engine(max_bucket=64)
        self.error = error
        self.gate = threading.Event()
        self.gate.set()
        self.calls: list[tuple[int, int, object]] = []  # (points, thread id, args)
        self.buckets: set[tuple] = set()  # (function id, request, bucket) of every call
        self._lock = threading.Lock()

    def run(self, program, request, args, is_active=lambda: True):
        points = next(a for i, a in enumerate(args) if i not in request.shared).shape[0]
        with self._lock:
            self.calls.append((points, threading.get_ident(), args))
            bucket = max(bucket_for(points, 64), len(self.engine.devices))
            self.buckets.add((program.function_id, request, bucket))
        assert self.gate.wait(timeout=10), "the test never opened the gate"
        if self.error is not None:
            raise self.error
        return self.engine.run(program, request, args)

    @property
    def points(self) -> list[int]:
        return [points for points, _, _ in self.calls]


class Call(threading.Thread):
    """batcher.run in a thread, keeping its result or exception."""

    def __init__(self, batcher, program, request, args, is_active=lambda: True, start_line=None):
        super().__init__()
        self.batcher, self.program, self.request, self.args = batcher, program, request, args
        self.is_active = is_active
        self.start_line = start_line
        self.result = self.error = None

    def run(self):
        try:
            if self.start_line is not None:
                self.start_line.wait()
            self.result = self.batcher.run(
                self.program, self.request, self.args, is_active=self.is_active
            )
        except BaseException as e:
            self.error = e


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.001)


def admit(batcher: Batcher, program, request, args, is_active=lambda: True) -> Call:
    """Start a call and return once the batcher has admitted it (so arrival order is fixed)."""
    before = batcher.queued
    points = next(a for i, a in enumerate(args) if i not in request.shared).shape[0]
    call = Call(batcher, program, request, args, is_active)
    call.start()
    wait_for(lambda: batcher.queued == before + points)
    return call


def finish(*calls: Call) -> None:
    for call in calls:
        call.join(timeout=10)
        assert not call.is_alive()


def points(n: int, size: int, seed: int) -> list[np.ndarray]:
    return [np.random.default_rng(seed).normal(size=(n, size))]


def assert_same(actual, expected):
    """Equal to float64 rounding: XLA's code for two batch buckets may differ in the last
    bit (a batch of 5 runs in bucket 8, the same point alone in bucket 1), while a wrong or
    shifted row differs at order one."""
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for name in expected:
            assert actual[name].shape == expected[name].shape
            allclose(actual[name], expected[name])
    else:
        assert actual.shape == expected.shape
        allclose(actual, expected)


def test_concurrent_callers_get_their_unbatched_rows():
    engine = GatedEngine()
    batcher = Batcher(engine, max_size=8, max_delay_s=0.005, max_queue=1024)
    requests = [
        (program, kinds.make_request(program, kind))
        for program in (TANH, SINE)
        for kind in (Kind.VALUE, Kind.GRADIENT, Kind.HESSIAN)
    ]
    start_line = threading.Barrier(32, timeout=10)
    done: list[list] = [[] for _ in range(32)]

    def caller(i: int) -> None:
        rng = np.random.default_rng(i)
        start_line.wait()
        for _ in range(20):
            program, request = requests[rng.integers(len(requests))]
            x = rng.normal(size=(int(rng.integers(1, 6)), program.inputs[0].shape[0]))
            done[i].append((program, request, x, batcher.run(program, request, [x])))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(map(len, done)) == batcher.stats.requests == 640
    assert batcher.stats.batches < batcher.stats.requests
    assert batcher.stats.coalesced > 0
    assert batcher.stats.points == sum(x.shape[0] for mine in done for _, _, x, _ in mine)
    for mine in done:
        for program, request, x, result in mine:
            assert_same(result, engine.run(program, request, [x]))
    # Batches stay within max_size, and compile nothing but one executable per bucket.
    assert max(engine.points) <= 8
    assert {bucket for _, _, bucket in engine.buckets} <= {1, 2, 4, 8}
    assert engine.engine.stats.compiles == len(engine.buckets)


def test_callers_arriving_while_a_batch_computes_share_one_call():
    engine = GatedEngine()
    batcher = Batcher(engine, max_size=64, max_delay_s=30, max_queue=1024)
    request = kinds.make_request(TANH, Kind.GRADIENT)
    engine.gate.clear()
    first = admit(batcher, TANH, request, points(1, 3, 0))
    wait_for(lambda: len(engine.calls) == 1)  # alone: its key was idle
    start_line = threading.Barrier(15, timeout=10)
    calls = [
        Call(batcher, TANH, request, points(i % 3 + 1, 3, i), start_line=start_line)
        for i in range(1, 16)
    ]
    for call in calls:
        call.start()
    wait_for(lambda: batcher.queued == 1 + sum(c.args[0].shape[0] for c in calls))
    engine.gate.set()
    finish(first, *calls)
    assert engine.points == [1, sum(c.args[0].shape[0] for c in calls)]
    assert batcher.stats.requests == 16
    assert batcher.stats.batches == 2
    assert batcher.stats.coalesced == 15
    for call in [first, *calls]:
        assert call.error is None
        assert_same(call.result, engine.engine.run(TANH, request, call.args))


def test_a_lone_caller_does_not_wait_for_company():
    batcher = Batcher(GatedEngine(), max_size=64, max_delay_s=60, max_queue=1024)
    call = Call(batcher, TANH, kinds.make_request(TANH, Kind.VALUE), points(2, 3, 0))
    call.start()
    finish(call)
    assert call.error is None and call.result.shape == (2,)


def test_the_delay_bounds_the_wait_behind_a_computing_batch():
    engine = GatedEngine()
    batcher = Batcher(engine, max_size=64, max_delay_s=0.02, max_queue=1024)
    request = kinds.make_request(TANH, Kind.VALUE)
    engine.gate.clear()
    first = admit(batcher, TANH, request, points(1, 3, 0))
    second = admit(batcher, TANH, request, points(2, 3, 1))
    wait_for(lambda: len(engine.calls) == 2)  # the second went without the first finishing
    engine.gate.set()
    finish(first, second)
    assert engine.points == [1, 2]


def test_a_full_batch_departs_and_an_oversized_request_runs_alone():
    engine = GatedEngine()
    batcher = Batcher(engine, max_size=4, max_delay_s=30, max_queue=1024)
    request = kinds.make_request(TANH, Kind.GRADIENT)
    engine.gate.clear()
    calls = [admit(batcher, TANH, request, points(b, 3, i)) for i, b in enumerate((1, 3, 1))]
    wait_for(lambda: len(engine.calls) == 2)  # [1] alone, then [3, 1] full
    big = Call(batcher, TANH, request, points(5, 3, 9))
    big.start()
    wait_for(lambda: len(engine.calls) == 3)
    assert batcher.queued == 5  # the oversized request is not queued
    engine.gate.set()
    finish(*calls, big)
    assert engine.points == [1, 4, 5]
    assert engine.calls[2][2] is big.args
    for call in [*calls, big]:
        assert_same(call.result, engine.engine.run(TANH, request, call.args))


def test_zero_delay_calls_the_engine_directly():
    engine = GatedEngine()
    batcher = Batcher(engine, max_size=64, max_delay_s=0)
    request = kinds.make_request(TANH, Kind.HESSIAN)
    calls = [Call(batcher, TANH, request, points(2, 3, i)) for i in range(8)]
    for call in calls:
        call.start()
    finish(*calls)
    assert batcher.stats.requests == batcher.stats.batches == 8
    assert batcher.stats.coalesced == 0
    assert batcher.stats.points == 16
    seen = {id(args): thread for _, thread, args in engine.calls}
    for call in calls:
        assert seen[id(call.args)] == call.ident  # its own args, in its own thread
        assert_same(call.result, engine.engine.run(TANH, request, call.args))


def test_a_full_queue_refuses_at_once():
    engine = GatedEngine()
    batcher = Batcher(engine, max_size=4, max_delay_s=30, max_queue=8)
    request = kinds.make_request(TANH, Kind.VALUE)
    engine.gate.clear()
    # [1] computes alone, [1,1,1,1] fills a batch and computes, [1,1,1] waits behind them.
    calls = [admit(batcher, TANH, request, points(1, 3, i)) for i in range(8)]
    assert batcher.queued == 8
    with pytest.raises(ResourceExhausted, match=r"limit of 8 points \(--batch-max-queue\)"):
        batcher.run(TANH, request, points(1, 3, 8))
    assert batcher.stats.rejected == 1
    engine.gate.set()
    finish(*calls)
    assert engine.points == [1, 4, 3]
    assert all(call.error is None for call in calls)
    assert batcher.queued == 0
    batcher.run(TANH, request, points(4, 3, 9))  # room again


def test_a_caller_that_has_gone_is_dropped_before_compute():
    engine = GatedEngine()
    batcher = Batcher(engine, max_size=64, max_delay_s=30, max_queue=1024)
    request = kinds.make_request(TANH, Kind.GRADIENT)
    engine.gate.clear()
    active = {"leader": True, "gone": True, "stays": True}
    first = admit(batcher, TANH, request, points(1, 3, 0))
    leader, gone, stays = (
        admit(batcher, TANH, request, points(b, 3, b), is_active=lambda name=name: active[name])
        for b, name in ((2, "leader"), (3, "gone"), (1, "stays"))
    )
    active["gone"] = False
    engine.gate.set()
    finish(first, leader, gone, stays)
    assert engine.points == [1, 3]  # the leader's 2 and the remaining follower's 1
    assert isinstance(gone.error, Cancelled)
    assert gone.result is None
    assert batcher.stats.dropped == 1
    for call in (leader, stays):
        assert_same(call.result, engine.engine.run(TANH, request, call.args))


def test_a_leader_that_has_gone_still_computes_for_its_followers():
    engine = GatedEngine()
    batcher = Batcher(engine, max_size=64, max_delay_s=30, max_queue=1024)
    request = kinds.make_request(TANH, Kind.VALUE)
    engine.gate.clear()
    first = admit(batcher, TANH, request, points(1, 3, 0))
    leader = admit(batcher, TANH, request, points(2, 3, 1), is_active=lambda: False)
    follower = admit(batcher, TANH, request, points(3, 3, 2))
    engine.gate.set()
    finish(first, leader, follower)
    assert isinstance(leader.error, Cancelled)
    assert engine.points == [1, 3]
    assert_same(follower.result, engine.engine.run(TANH, request, follower.args))


def test_an_inactive_caller_with_batching_off_is_not_computed():
    engine = GatedEngine()
    batcher = Batcher(engine, max_delay_s=0)
    with pytest.raises(Cancelled):
        batcher.run(TANH, kinds.make_request(TANH, Kind.VALUE), points(1, 3, 0), is_active=bool)
    assert engine.calls == []
    assert batcher.stats.dropped == 1


@pytest.mark.parametrize("error", [InvalidArgument("bad point"), RuntimeError("engine bug")])
def test_an_engine_error_reaches_every_caller_of_its_batch(error):
    engine = GatedEngine()
    batcher = Batcher(engine, max_size=64, max_delay_s=30, max_queue=1024)
    request = kinds.make_request(TANH, Kind.VALUE)
    engine.gate.clear()
    calls = [admit(batcher, TANH, request, points(i + 1, 3, i)) for i in range(4)]
    engine.error = error
    engine.gate.set()
    finish(*calls)
    assert engine.points == [1, 9]
    for call in calls:
        assert call.error is error
    assert batcher.queued == 0
    engine.error = None
    assert batcher.run(TANH, request, points(2, 3, 0)).shape == (2,)


def test_dict_results_split_by_caller():
    engine = GatedEngine()
    batcher = Batcher(engine, max_size=64, max_delay_s=30, max_queue=1024)
    request = kinds.make_request(SINE, Kind.TAYLOR2)
    engine.gate.clear()
    calls = [admit(batcher, SINE, request, points(b, 2, b)) for b in (1, 2, 3, 1)]
    engine.gate.set()
    finish(*calls)
    assert engine.points == [1, 6]
    for call in calls:
        expected = engine.engine.run(SINE, request, call.args)
        assert call.result["hessian"].shape == (call.args[0].shape[0], 2, 2)
        assert_same(call.result, expected)


def test_shared_inputs_batch_only_with_equal_bytes():
    engine = GatedEngine()
    batcher = Batcher(engine, max_size=64, max_delay_s=30, max_queue=1024)
    request = kinds.make_request(AFFINE, Kind.GRADIENT, shared=("A",))
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 3, 3))
    engine.gate.clear()
    calls = [
        admit(batcher, AFFINE, request, [rng.normal(size=(n, 3)), matrix])
        for n, matrix in ((1, a), (2, a), (1, b), (3, a.copy()))
    ]
    wait_for(lambda: len(engine.calls) == 2)
    engine.gate.set()
    finish(*calls)
    # [1] alone; then the two calls with equal A together, and the one with another A apart
    # (its key was idle, so it went at once).
    assert sorted(engine.points) == [1, 1, 5]
    assert batcher.stats.coalesced == 2
    for call in calls:
        assert_same(call.result, engine.engine.run(AFFINE, request, call.args))


def test_limits_are_checked():
    with pytest.raises(ValueError, match="max_queue"):
        Batcher(GatedEngine(), max_size=64, max_queue=8)
    with pytest.raises(ValueError, match="max_size"):
        Batcher(GatedEngine(), max_size=0)


# run_async: the same batching for callers on one event loop (the server's fast path).


def test_async_callers_that_arrive_together_share_one_call_and_get_their_rows():
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    engine = GatedEngine()
    batcher = Batcher(engine, max_size=64, max_delay_s=0.01)
    request = kinds.make_request(TANH, Kind.GRADIENT)
    points = np.random.default_rng(0).normal(size=(12, 3))

    async def main() -> list[np.ndarray]:
        with ThreadPoolExecutor(2) as executor:
            calls = [
                batcher.run_async(TANH, request, [points[i : i + 1]], executor=executor)
                for i in range(12)
            ]  # fmt: skip
            return await asyncio.gather(*calls)

    results = asyncio.run(main())
    assert len(engine.calls) == 1 and engine.calls[0][0] == 12
    for i, rows in enumerate(results):
        allclose(rows, 2 * np.tanh(points[i : i + 1]) / np.cosh(points[i : i + 1]) ** 2)
    assert batcher.stats.coalesced == 12 and batcher.queued == 0


def test_async_quick_lone_caller_computes_at_once_on_the_loop():
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    engine = GatedEngine()
    batcher = Batcher(engine, max_size=64, max_delay_s=0.01)
    request = kinds.make_request(TANH, Kind.GRADIENT)
    timings: list[tuple[float, int]] = []

    async def main() -> np.ndarray:
        with ThreadPoolExecutor(1) as executor:
            return await batcher.run_async(
                TANH, request, [np.ones((2, 3))], executor=executor,
                quick=lambda args: True, timed=lambda s, n: timings.append((s, n)),
            )  # fmt: skip

    result = asyncio.run(main())
    assert engine.calls[0][1] == threading.get_ident()  # this thread: the loop's
    assert result.shape == (2, 3) and timings and timings[0][1] == 2


async def _turns_counted(counter: list[int]) -> None:
    """Counts the event loop's turns into counter[0] until cancelled."""
    while True:
        counter[0] += 1
        await asyncio.sleep(0)


def test_async_callers_that_keep_arriving_wait_for_each_other():
    # One a turn apart: a batch waiting for company takes each while they keep coming.
    from concurrent.futures import ThreadPoolExecutor

    engine = GatedEngine()
    batcher = Batcher(engine, max_size=64, max_delay_s=10.0)
    request = kinds.make_request(TANH, Kind.GRADIENT)
    points = np.random.default_rng(1).normal(size=(6, 3))

    async def main() -> list[np.ndarray]:
        with ThreadPoolExecutor(1) as executor:
            calls = []
            for i in range(6):
                calls.append(asyncio.create_task(
                    batcher.run_async(TANH, request, [points[i : i + 1]], executor=executor)
                ))  # fmt: skip
                for _ in range(IDLE_TURNS // 2):
                    await asyncio.sleep(0)
            return await asyncio.gather(*calls)

    results = asyncio.run(main())
    assert engine.points == [6]
    for i, rows in enumerate(results):
        allclose(rows, 2 * np.tanh(points[i : i + 1]) / np.cosh(points[i : i + 1]) ** 2)


def test_async_lone_callers_back_off_from_waiting_and_company_resets_it():
    # A wait that finds no one lets the next 1, 3, 7, ... lone calls go at once (a quick one
    # computed before the loop turns again); company makes the next lone call wait again.
    from concurrent.futures import ThreadPoolExecutor

    engine = GatedEngine()
    batcher = Batcher(engine, max_size=64, max_delay_s=10.0)
    request = kinds.make_request(TANH, Kind.GRADIENT)
    turns = [0]
    waited: list[bool] = []

    async def lone(executor) -> None:
        before = turns[0]
        await batcher.run_async(
            TANH, request, [np.ones((1, 3))], executor=executor, quick=lambda args: True
        )
        waited.append(turns[0] - before >= IDLE_TURNS)

    async def main() -> None:
        ticker = asyncio.create_task(_turns_counted(turns))
        await asyncio.sleep(0)
        with ThreadPoolExecutor(1) as executor:
            for _ in range(14):
                await lone(executor)
            await asyncio.gather(*(lone(executor) for _ in range(3)))  # company
            await lone(executor)
        ticker.cancel()

    asyncio.run(main())
    wait, once = True, False
    assert waited[:14] == [wait, once, wait, once, once, once, wait] + [once] * 7
    assert engine.points[14] == 3  # the next wait found company: the three together
    assert waited[17] is True  # company seen: the next lone call waits for more


def test_async_wait_for_company_ends_at_max_delay():
    # A call every turn of the loop: company never stops coming, and max_delay_s ends it.
    from concurrent.futures import ThreadPoolExecutor

    engine = GatedEngine()
    batcher = Batcher(engine, max_size=4096, max_delay_s=0.02, max_queue=4096)
    request = kinds.make_request(TANH, Kind.GRADIENT)

    async def main() -> float:
        with ThreadPoolExecutor(1) as executor:
            calls = []
            start = time.perf_counter()
            while not engine.calls and len(calls) < 4096:
                calls.append(asyncio.create_task(
                    batcher.run_async(TANH, request, [np.ones((1, 3))], executor=executor)
                ))  # fmt: skip
                await asyncio.sleep(0)
            first = time.perf_counter() - start
            await asyncio.gather(*calls)
            return first

    first = asyncio.run(main())
    assert 1 < engine.points[0] < 4096  # it gathered, and did not wait to be full
    assert 0.02 <= first < 5.0


def test_async_queue_limit_and_gone_callers():
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    engine = GatedEngine()
    batcher = Batcher(engine, max_size=4, max_delay_s=0.01, max_queue=4)
    request = kinds.make_request(TANH, Kind.GRADIENT)

    async def main() -> list[object]:
        with ThreadPoolExecutor(1) as executor:
            calls = [
                batcher.run_async(TANH, request, [np.ones((3, 3))], executor=executor),
                batcher.run_async(TANH, request, [np.ones((3, 3))], executor=executor),
                batcher.run_async(TANH, request, [np.ones((1, 3))], executor=executor,
                                  is_active=lambda: False),
            ]  # fmt: skip
            return await asyncio.gather(*calls, return_exceptions=True)

    first, second, gone = asyncio.run(main())
    assert isinstance(first, np.ndarray) and first.shape == (3, 3)
    assert isinstance(second, ResourceExhausted) and "--batch-max-queue" in str(second)
    assert isinstance(gone, Cancelled)
    assert batcher.stats.rejected == 1 and batcher.stats.dropped == 1 and batcher.queued == 0
