"""Soak: thousands of mixed requests at concurrency 32, over loopback, bounded in count.

One test sends HESSD_SOAK_REQUESTS requests (default 16,000) from 32 threads sharing one
channel to the in-process server: about 85% valid requests of every kind (value, gradient,
jacobian, hessian, hvp, jvp, vjp, shared inputs, exact spectra) checked against closed
forms, 10% malformed ones that must get their typed error, and 5% cancelled ones: a future
cancelled right after it is sent must end CANCELLED, a call with a 0.1 ms deadline
DEADLINE_EXCEEDED, either with a correct result when the server was quicker. Any other
outcome is a failure. It prints the request rate (run pytest with -s to see it).

Memory: the server runs in this process, so this process's resident set (/proc/self/statm)
and the number of Python objects the collector tracks are measured after a warm-up (which
compiles the executables and starts every thread), halfway and at the end. The resident
set may grow by at most _MAX_RSS_GROWTH over the run; the objects by fewer than one per two
requests over the second half, when nothing new should compile (a late compile adds a few
hundred; runs here add 0-2,000 over the whole run, and 50-150 over the second half).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import gc
import os
import threading
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from hessd.proto import codec
from hessd.proto.v1 import hessd_pb2, hessd_pb2_grpc

from conftest import allclose

_REQUESTS = int(os.environ.get("HESSD_SOAK_REQUESTS", "16000"))
_WARMUP = 2000
_CONCURRENCY = 32
_TIMEOUT = 30.0  # per call; a DEADLINE_EXCEEDED under it is a failure
_TINY_TIMEOUT = 1e-4
# After the warm-up the steady state needs no new memory: executables are compiled, threads
# and channel buffers exist, glibc arenas are sized; measured growth is 0-8 MiB. 64 MiB
# leaves room for allocator noise and still catches a native leak of ~5 KB per request
# (a call's buffers, a traced program); smaller leaks of Python objects show in the count.
_MAX_RSS_GROWTH = 64 * 2**20

# The functions, float64, and the constants their closed forms use.
_A = np.array([[2.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.5, 1.0, 4.0]])  # not symmetric
_W = np.array([[0.3, -0.2, 0.5], [0.1, 0.4, -0.6]])
_X = np.array([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0], [1.0, 1.0, 1.0], [2.0, -1.0, 0.0]])
_Y = np.array([1.0, -1.0, 0.5, 2.0])
_SPECS = {
    "quad": ("x @ A @ x", {"x": (3,)}, {"A": _A}),
    "layer": ("tanh(W @ x)", {"x": (3,)}, {"W": _W}),
    "lsq": ("0.5 * sum((X @ w - y)**2)", {"w": (3,), "X": (4, 3), "y": (4,)}, {}),
}
_H_QUAD = _A + _A.T


def _spec(source, inputs, constants) -> hessd_pb2.FunctionSpec:
    spec = hessd_pb2.FunctionSpec(
        expression=hessd_pb2.Expression(source=source),
        inputs=[
            hessd_pb2.InputSpec(name=n, shape=s, dtype=hessd_pb2.FLOAT64) for n, s in inputs.items()
        ],
    )
    for name, value in constants.items():
        codec.encode(value, out=spec.constants.add(name=name).tensor)
    return spec


def _named(**arrays) -> list[hessd_pb2.NamedTensor]:
    return [hessd_pb2.NamedTensor(name=n, tensor=codec.encode(a)) for n, a in arrays.items()]


@dataclasses.dataclass(frozen=True)
class _Call:
    """One request, how to send it, and what must come back."""

    method: str  # "Compute" or "Spectrum"
    request: object
    check: Callable[[object], None] | None = None  # of the response, for valid requests
    code: grpc.StatusCode = grpc.StatusCode.OK  # expected refusal, for malformed ones
    fragment: str = ""


def _compute(kind, check, vector=None, **fields) -> _Call:
    if vector is not None:
        fields["vector"] = codec.encode(vector)
    return _Call("Compute", hessd_pb2.ComputeRequest(kind=kind, **fields), check)


def _output(expected):
    return lambda response: allclose(codec.decode(response.output), expected)


def _valid(ids: dict[str, str], rng: np.random.Generator) -> _Call:
    """A valid request of a random kind at 3 or 4 random points (one batch bucket)."""
    batch = int(rng.integers(3, 5))
    x = rng.normal(size=(batch, 3))
    v = rng.normal(size=(batch, 3))
    quad = {"function_id": ids["quad"], "inputs": _named(x=x)}
    layer = {"function_id": ids["layer"], "inputs": _named(x=x)}
    t = np.tanh(x @ _W.T)  # layer's value, (batch, 2)
    match int(rng.integers(0, 11)):
        case 0:
            expected = np.einsum("bi,ij,bj->b", x, _A, x)
            return _compute(kind=hessd_pb2.VALUE, check=_output(expected), **quad)
        case 1:
            return _compute(kind=hessd_pb2.GRADIENT, check=_output(x @ _H_QUAD.T), **quad)
        case 2:
            expected = np.broadcast_to(_H_QUAD, (batch, 3, 3))
            return _compute(kind=hessd_pb2.HESSIAN, check=_output(expected), **quad)
        case 3:
            return _compute(kind=hessd_pb2.HVP, check=_output(v @ _H_QUAD.T), vector=v, **quad)
        case 4:
            return _compute(kind=hessd_pb2.VALUE, check=_output(t), **layer)
        case 5:
            expected = (1 - t**2)[:, :, None] * _W
            return _compute(kind=hessd_pb2.JACOBIAN, check=_output(expected), **layer)
        case 6:
            expected = (1 - t**2) * (v @ _W.T)
            return _compute(kind=hessd_pb2.JVP, check=_output(expected), vector=v, **layer)
        case 7:
            u = rng.normal(size=(batch, 2))
            expected = ((1 - t**2) * u) @ _W
            return _compute(kind=hessd_pb2.VJP, check=_output(expected), vector=u, **layer)
        case 8:  # per-example gradients with the data shared
            return _compute(
                function_id=ids["lsq"],
                kind=hessd_pb2.GRADIENT,
                inputs=_named(w=x, X=_X, y=_Y),
                shared=["X", "y"],
                check=_output((x @ _X.T - _Y) @ _X),
            )
        case 9:
            return _compute(
                function_id=ids["lsq"],
                kind=hessd_pb2.HESSIAN,
                inputs=_named(w=x, X=_X, y=_Y),
                shared=["X", "y"],
                check=_output(np.broadcast_to(_X.T @ _X, (batch, 3, 3))),
            )
        case _:
            eigenvalues = np.linalg.eigvalsh(_H_QUAD)  # all > 0: every point is a minimum

            def check(response):
                allclose(codec.decode(response.eigenvalues), np.tile(eigenvalues, (batch, 1)))
                assert codec.decode(response.point_class).tolist() == [1] * batch

            request = hessd_pb2.SpectrumRequest(
                function_id=ids["quad"], inputs=_named(x=x), method=hessd_pb2.EXACT
            )
            return _Call("Spectrum", request, check)


def _malformed(ids: dict[str, str], rng: np.random.Generator) -> _Call:
    """A request with one thing wrong, and the status and message fragment it must get."""
    x = rng.normal(size=(4, 3))
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    match int(rng.integers(0, 7)):
        case 0:
            request = hessd_pb2.ComputeRequest(
                function_id=ids["quad"], kind=hessd_pb2.VALUE, inputs=_named(x=x[:, :2])
            )
            return _Call("Compute", request, code=invalid, fragment="expected (batch, 3)")
        case 1:
            request = hessd_pb2.ComputeRequest(
                function_id=ids["layer"], kind=hessd_pb2.GRADIENT, inputs=_named(x=x)
            )
            return _Call("Compute", request, code=invalid, fragment="scalar-output")
        case 2:
            request = hessd_pb2.ComputeRequest(
                function_id="0" * 64, kind=hessd_pb2.VALUE, inputs=_named(x=x)
            )
            return _Call("Compute", request, code=grpc.StatusCode.NOT_FOUND, fragment="register")
        case 3:
            tensor = hessd_pb2.Tensor(dtype=hessd_pb2.FLOAT64, shape=[4, 3], data=b"\0" * 40)
            request = hessd_pb2.ComputeRequest(
                function_id=ids["quad"],
                kind=hessd_pb2.VALUE,
                inputs=[hessd_pb2.NamedTensor(name="x", tensor=tensor)],
            )
            return _Call("Compute", request, code=invalid, fragment="bytes of data")
        case 4:
            request = hessd_pb2.ComputeRequest(function_id=ids["quad"], kind=99, inputs=_named(x=x))
            return _Call("Compute", request, code=invalid, fragment="unknown kind 99")
        case 5:
            request = hessd_pb2.ComputeRequest(
                function_id=ids["quad"], kind=hessd_pb2.HVP, inputs=_named(x=x)
            )
            return _Call("Compute", request, code=invalid, fragment="is missing")
        case _:
            request = hessd_pb2.SpectrumRequest(function_id=ids["layer"], inputs=_named(x=x))
            return _Call("Spectrum", request, code=invalid, fragment="scalar-output")


def _send(stub, call: _Call, cancel: str | None) -> str:
    """Send `call` (cancel: None, "future" or "deadline"); check the outcome and return its
    name; AssertionError on anything else."""
    method = getattr(stub, call.method)
    try:
        if cancel == "future":
            future = method.future(call.request, timeout=_TIMEOUT)
            if future.cancel():
                assert future.cancelled() and future.code() is grpc.StatusCode.CANCELLED
                return "cancelled"
            response = future.result()  # it finished before the cancel
        else:
            timeout = _TINY_TIMEOUT if cancel == "deadline" else _TIMEOUT
            response = method(call.request, timeout=timeout)
    except grpc.RpcError as error:
        code = error.code()
        if cancel == "deadline" and code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return "deadline_exceeded"
        assert call.check is None, (code, error.details())
        assert code is call.code and call.fragment in error.details(), (code, error.details())
        return "refused"
    assert call.check is not None, f"{call.code} expected, got a result"
    call.check(response)
    return "ok"


def _run(stub, ids, count: int, seed: int) -> tuple[collections.Counter, list[str]]:
    """`count` requests from _CONCURRENCY threads; the outcomes, and up to 20 failures."""
    outcomes: collections.Counter = collections.Counter()
    failures: list[str] = []
    lock = threading.Lock()
    next_index = iter(range(count))

    def worker(number: int) -> None:
        rng = np.random.default_rng([seed, number])
        mine: collections.Counter = collections.Counter()
        while True:
            with lock:
                if next(next_index, None) is None:
                    break
            roll = rng.random()
            cancel = "future" if roll < 0.025 else "deadline" if roll < 0.05 else None
            call = _malformed(ids, rng) if 0.05 <= roll < 0.15 else _valid(ids, rng)
            try:
                mine[_send(stub, call, cancel)] += 1
            except Exception as error:  # recorded, so that one failure does not hide others
                mine["failed"] += 1
                with lock:
                    if len(failures) < 20:
                        failures.append(f"{call.method} {call.request}: {error!r}"[:2000])
        with lock:
            outcomes.update(mine)

    with concurrent.futures.ThreadPoolExecutor(_CONCURRENCY) as pool:
        for future in [pool.submit(worker, n) for n in range(_CONCURRENCY)]:
            future.result()
    return outcomes, failures


@pytest.fixture(scope="module")
def stub(server_address):
    with grpc.insecure_channel(server_address) as channel:
        yield hessd_pb2_grpc.HessdStub(channel)


def _memory() -> tuple[int, int]:
    """(resident bytes of this process, Python objects the collector tracks), collected."""
    gc.collect()
    with open("/proc/self/statm") as statm:
        resident = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return resident, len(gc.get_objects())


def test_soak_mixed_requests_at_concurrency_32(stub):
    ids = {
        name: stub.Register(
            hessd_pb2.RegisterRequest(spec=_spec(*spec)), timeout=_TIMEOUT
        ).function_id
        for name, spec in _SPECS.items()
    }
    # Warm-up: compiles the (function, kind, batch bucket) executables that concurrency 32
    # produces (the batcher coalesces concurrent requests into larger buckets), and starts
    # every thread on both sides.
    _, failures = _run(stub, ids, _WARMUP, seed=0)
    assert not failures, "\n".join(failures)
    memory = [_memory()]
    outcomes: collections.Counter = collections.Counter()
    start = time.perf_counter()
    for half in (1, 2):
        counts, failures = _run(stub, ids, _REQUESTS // 2, seed=half)
        outcomes.update(counts)
        assert not failures, f"{counts['failed']} failures, the first:\n" + "\n".join(failures)
        memory.append(_memory())
    seconds = time.perf_counter() - start
    (resident, _), _, (resident_end, _) = memory
    print(
        f"\nsoak: {sum(outcomes.values())} requests in {seconds:.1f} s at concurrency "
        f"{_CONCURRENCY}: {sum(outcomes.values()) / seconds:.0f} requests/s; {dict(outcomes)}; "
        f"resident {resident / 2**20:.0f} -> {resident_end / 2**20:.0f} MiB, Python objects "
        + " -> ".join(str(objects) for _, objects in memory)
    )
    if _REQUESTS >= 2000:  # the mix is random: check it where its shares are sure to show
        assert outcomes["ok"] >= 0.75 * _REQUESTS and outcomes["refused"] >= 0.05 * _REQUESTS
        assert outcomes["cancelled"] > 0 and outcomes["deadline_exceeded"] > 0
    assert resident_end - resident < _MAX_RSS_GROWTH, (resident, resident_end)
    # A late compile adds a few hundred objects (its jaxpr, kept by the executable cache);
    # leaking one object every two requests would add _REQUESTS / 4 in the second half.
    assert memory[2][1] - memory[1][1] < _REQUESTS // 4, memory
