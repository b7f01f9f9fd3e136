"""Both transports (--server threads and aio; service/server.py, threads.py, handlers.py):
how they stop, and, for aio, that no thread is held by what waits.

Stopping: health says NOT_SERVING and new calls get UNAVAILABLE at once; a call in flight
that ends within the grace is answered; one still computing when the grace ends is
answered at once with an error (its client is not left waiting for its deadline), and the
server has stopped by then.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
import time

import grpc
import numpy as np
import pytest

from hessd.client import Client, HessdError
from hessd.proto import codec
from hessd.proto.v1 import hessd_pb2, hessd_pb2_grpc
from hessd.service.config import ServerConfig
from hessd.service.server import create_server, event_loop_factory

SLOW = "sum(tanh(x)**2) + sum(x**4)"  # a spectrum: one eigh of n×n per point


def _gradient_request(fid: str) -> hessd_pb2.ComputeRequest:
    request = hessd_pb2.ComputeRequest(function_id=fid, kind=hessd_pb2.GRADIENT)
    codec.encode(np.ones((1, 3)), out=request.inputs.add(name="x").tensor)
    return request


# The threaded transport, and the asyncio one on each event loop (--event-loop).
TRANSPORTS = [("threads", "auto"), ("aio", "auto"), ("aio", "asyncio")]


@pytest.mark.parametrize(("transport", "loop"), TRANSPORTS)
def test_stop_answers_calls_in_flight_and_refuses_new_ones(transport, loop):
    # One point per engine call, so that the spectrum in flight is many device calls.
    config = ServerConfig(port=0, workers=4, max_batch_bucket=1, server=transport, event_loop=loop)
    server, port = create_server(config)
    server.start()
    address = f"127.0.0.1:{port}"
    try:
        with (
            Client(address, timeout=300) as c,
            grpc.insecure_channel(address) as channel,
            concurrent.futures.ThreadPoolExecutor(2) as pool,
        ):
            f = c.register(SLOW, {"x": (400,)}, dtype="float64")
            small = c.register("sum(x**2)", {"x": (3,)}, dtype="float64")
            x = np.random.default_rng(0).normal(size=(4000, 400))  # a minute of eigh
            c.spectrum(f, x[:1])  # compiled
            stub = hessd_pb2_grpc.HessdStub(channel)
            stub.Compute(_gradient_request(small.id), timeout=10)  # planned: the fast path
            runaway = pool.submit(c.spectrum, f, x)  # far longer than the grace
            short = pool.submit(c.spectrum, f, x[:2])  # well within it
            time.sleep(0.5)
            start = time.monotonic()
            stopped = server.stop(grace=5.0)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Compute(_gradient_request(small.id), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in refused.value.details()
            assert short.result(timeout=30).eigenvalues.shape == (2, 400)
            with pytest.raises(HessdError):
                runaway.result(timeout=30)
            answered = time.monotonic() - start
            assert stopped.wait(10)
        # The grace, then the cancellation: not the runaway's minutes or its deadline.
        assert answered < 5.0 + 10
    finally:
        server.stop(None)


def test_waiting_calls_hold_no_thread(monkeypatch):
    """More fast-path calls in flight than the server has threads, all answered: a call
    waiting for its batch waits on the event loop, not on a thread. (No call is quick
    enough to run on the loop itself here, so every batch goes to the one device thread.)"""
    import asyncio

    from hessd.client import AsyncClient
    from hessd.service import fastpath

    monkeypatch.setattr(fastpath, "QUICK_SECONDS", 0.0)

    config = ServerConfig(port=0, workers=1, batch_max_delay_us=2000, server="aio")
    server, port = create_server(config)
    server.start()
    try:

        async def main() -> list[np.ndarray]:
            async with AsyncClient(f"127.0.0.1:{port}", timeout=60) as c:
                f = await c.register("sum(x**2)", {"x": (3,)}, dtype="float64")
                points = np.arange(3.0)[None] + np.arange(64.0)[:, None, None]
                await c.gradient(f, points[0])  # planned
                return await asyncio.gather(*(c.gradient(f, p) for p in points))

        gradients = asyncio.run(main())
        for i, g in enumerate(gradients):
            np.testing.assert_array_equal(g, 2 * (np.arange(3.0) + i)[None])
        assert server.servicer.batcher.stats.coalesced > 0
    finally:
        server.stop(None)


def test_aio_quick_calls_in_flight_together_share_engine_calls():
    """Quick calls (computed on the event loop itself) at 64 in flight over gRPC: a batch
    waits for the calls that keep arriving, so they share engine calls, each getting its
    own rows; fewer engine calls than calls."""
    import asyncio

    from hessd.client import AsyncClient

    server, port = create_server(ServerConfig(port=0, server="aio"))
    server.start()
    try:

        async def main() -> list[np.ndarray]:
            async with AsyncClient(f"127.0.0.1:{port}", timeout=60) as c:
                f = await c.register("sum(x**3)", {"x": (3,)}, dtype="float64")
                points = np.arange(3.0)[None] + np.arange(64.0)[:, None, None]
                for _ in range(3):
                    await c.gradient(f, points[0])  # planned, timed: quick
                return await asyncio.gather(*(c.gradient(f, p) for p in points))

        stats = server.servicer.batcher.stats
        gradients = asyncio.run(main())
        for i, g in enumerate(gradients):
            np.testing.assert_allclose(g, 3 * (np.arange(3.0) + i)[None] ** 2, rtol=1e-15)
        assert stats.coalesced > 0 and stats.batches < stats.requests
    finally:
        server.stop(None)


@pytest.mark.parametrize(("transport", "loop"), TRANSPORTS)
def test_a_result_stream_cancelled_midway_ends_its_call(transport, loop):
    """A client that stops reading a streamed result and cancels: the call ends (the
    server's count of calls in flight falls back to 0) and the server serves on."""
    config = ServerConfig(port=0, workers=2, server=transport, event_loop=loop)
    server, port = create_server(config)
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as c:
            f = c.register("x * 2.0", {"x": (1024,)}, dtype="float64")
            stub = hessd_pb2_grpc.HessdStub(c._channel)
            header = hessd_pb2.ComputeRequest(function_id=f.id, kind=hessd_pb2.VALUE)
            points = np.ones((1024, 1024))  # 8 MiB each way: 8 chunks of result
            codec.encode(points, out=header.inputs.add(name="x").tensor, data=False)
            from hessd.proto import stream

            call = stub.ComputeStream(stream.send("compute_request", header, [points]))
            first = next(call)
            assert first.WhichOneof("part") == "compute_response"
            call.cancel()
            deadline = time.monotonic() + 10
            while server.active and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server.active == 0
            np.testing.assert_array_equal(c.value(f, np.ones((1, 1024))), 2 * np.ones((1, 1024)))
    finally:
        server.stop(None)


def test_event_loop_is_uvloop_where_installed_and_asyncio_on_request():
    uvloop = pytest.importorskip("uvloop")
    assert event_loop_factory("auto") is uvloop.new_event_loop
    assert event_loop_factory("uvloop") is uvloop.new_event_loop
    assert event_loop_factory("asyncio") is asyncio.new_event_loop
    server, _ = create_server(ServerConfig(port=0, event_loop="asyncio"))
    try:
        assert server.transport_name == "aio, asyncio"
    finally:
        server.stop(None)


def test_event_loop_auto_falls_back_to_asyncio_without_uvloop(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    assert event_loop_factory("auto") is asyncio.new_event_loop
    with pytest.raises(ValueError, match="uvloop is not installed"):
        event_loop_factory("uvloop")


def test_an_unknown_event_loop_is_refused_before_binding():
    with pytest.raises(ValueError, match="--event-loop is auto, uvloop or asyncio, not 'tokio'"):
        create_server(ServerConfig(port=0, event_loop="tokio"))
