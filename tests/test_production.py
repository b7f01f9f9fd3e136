"""Running hessd for others: TLS and mutual TLS, bearer tokens, limits per token, health,
reflection, metrics, request logs, graceful shutdown, and several replicas."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import certs
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from hessd.client import (
    Client,
    DeadlineExceeded,
    HessdError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from hessd.service.config import ServerConfig
from hessd.service.server import create_server

TOKEN = "pipeline-token-0123456789"
EXPORT_TOKEN = "export-token-0123456789ab"
LIMITED_TOKEN = "limited-token-0123456789"
TOKENS = {
    "tokens": [
        {"name": "pipeline", "token": TOKEN},
        {"name": "exporter", "token": EXPORT_TOKEN, "permissions": ["export"]},
        {"name": "limited", "token": LIMITED_TOKEN, "max_concurrent": 1},
    ]
}


def started(**config):
    server, port = create_server(ServerConfig(host="127.0.0.1", port=0, workers=8, **config))
    server.start()
    return server, f"127.0.0.1:{port}"


def sum_of_squares(c):
    return c.register("sum(x**2)", {"x": (3,)}, dtype="float64")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    made = certs.make_pki()
    for name, pem in made.items():
        (folder / f"{name}.pem").write_bytes(pem)
    return folder, made


def test_tls(pki):
    folder, made = pki
    server, address = started(
        tls_cert=str(folder / "server_cert.pem"), tls_key=str(folder / "server_key.pem")
    )
    try:
        with Client(address, tls=True, root_certificates=made["ca"], timeout=30) as c:
            f = sum_of_squares(c)
            np.testing.assert_array_equal(c.gradient(f, np.ones((2, 3))), 2 * np.ones((2, 3)))
        # A plaintext client cannot reach a TLS server: UNAVAILABLE, retried until the deadline.
        with Client(address, timeout=3) as plain, pytest.raises((Unavailable, DeadlineExceeded)):
            plain.server_info()
    finally:
        server.stop(None)


def test_mutual_tls(pki):
    folder, made = pki
    server, address = started(
        tls_cert=str(folder / "server_cert.pem"),
        tls_key=str(folder / "server_key.pem"),
        tls_client_ca=str(folder / "ca.pem"),
    )
    try:
        anonymous = Client(address, tls=True, root_certificates=made["ca"], timeout=3)
        with anonymous, pytest.raises((Unavailable, DeadlineExceeded)):
            anonymous.server_info()
        with Client(
            address,
            root_certificates=made["ca"],
            certificate_chain=made["client_cert"],
            private_key=made["client_key"],
            timeout=30,
        ) as c:
            assert c.server_info()["backend"] == "cpu"
    finally:
        server.stop(None)


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens") / "tokens.json"
    path.write_text(json.dumps(TOKENS))
    server, address = started(tokens_file=str(path), allow_jax_export=True)
    yield address
    server.stop(None)


def test_calls_without_or_with_a_wrong_token_are_refused(secured):
    with Client(secured, timeout=10) as c, pytest.raises(Unauthenticated, match="Bearer"):
        c.server_info()
    wrong = Client(secured, token="wrong-token-0123456789", timeout=10)
    with wrong, pytest.raises(Unauthenticated, match="missing, repeated or unknown token"):
        sum_of_squares(wrong)


def test_a_good_token_is_served(secured):
    with Client(secured, token=TOKEN, timeout=30) as c:
        f = sum_of_squares(c)
        np.testing.assert_array_equal(c.gradient(f, np.ones((1, 3))), [[2.0, 2.0, 2.0]])


def test_export_needs_the_export_permission(secured):
    def loss(x):
        return (x**2).sum()

    plain = Client(secured, token=TOKEN, timeout=60)
    with plain, pytest.raises(PermissionDenied, match="lacks the 'export' permission"):
        plain.register(loss, {"x": (3,)})
    with Client(secured, token=EXPORT_TOKEN, timeout=60) as c:
        f = c.register(loss, {"x": (3,)})
        np.testing.assert_allclose(c.gradient(f, np.ones((1, 3), np.float32)), [[2.0, 2.0, 2.0]])


def test_concurrent_calls_per_token_are_bounded(secured):
    with Client(secured, token=LIMITED_TOKEN, timeout=120) as c:
        f = c.register("sum(tanh(x)**2) + sum(x**4)", {"x": (300,)}, dtype="float64")
        points = np.random.default_rng(0).normal(size=(16, 300))
        barrier = threading.Barrier(6)

        def call(_):
            barrier.wait()
            try:
                c.spectrum(f, points)
                return "ok"
            except ResourceExhausted as e:
                assert "max_concurrent" in e.message
                return "refused"

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            outcomes = list(pool.map(call, range(6)))
    assert "ok" in outcomes and "refused" in outcomes


def test_health_and_reflection_need_no_token(secured):
    with grpc.insecure_channel(secured) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "hessd.v1.Hessd"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
        names = {s.name for s in reply.list_services_response.service}
        assert {"hessd.v1.Hessd", "grpc.health.v1.Health"} <= names


def test_draining_server_is_not_serving_and_refuses_new_calls():
    server, address = started()
    with Client(address, timeout=10) as c, grpc.insecure_channel(address) as channel:
        f = sum_of_squares(c)
        server.enter_graceful_shutdown()
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="hessd.v1.Hessd"), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(Unavailable, match="shutting down"):
            c.gradient(f, np.ones((1, 3)))
    server.stop(None)


def test_metrics_and_request_log(caplog):
    server, address = started(metrics_port=0, log_requests=True)
    try:
        with caplog.at_level(logging.INFO, logger="hessd.requests"), Client(address) as c:
            f = sum_of_squares(c)
            c.gradient(f, np.full((3, 3), 7.25))
            c.put(np.arange(16.0))
            with pytest.raises(Exception, match="scalar-output"):
                c.gradient(c.register("sin(x)", {"x": (3,)}, dtype="float64"), np.ones((1, 3)))
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read()
        text = text.decode()
    finally:
        server.stop(None)
    assert 'hessd_requests_total{kind="gradient",method="Compute",status="OK"} 1.0' in text
    assert 'status="INVALID_ARGUMENT"' in text
    assert re.search(r"hessd_compiles_total \d", text)
    assert "hessd_request_seconds_bucket" in text and "hessd_compute_seconds_count" in text
    assert "hessd_batch_points_bucket" in text and "hessd_registered_functions" in text
    assert "hessd_resident_tensors 1.0" in text and "hessd_resident_bytes 128.0" in text
    lines = [r.getMessage() for r in caplog.records if r.name == "hessd.requests"]
    ok = [line for line in lines if "kind=gradient" in line and "status=OK" in line]
    assert len(ok) == 1
    assert re.fullmatch(
        r"id=\w{16} method=Compute function=\w{16} kind=gradient points=3 status=OK ms=[\d.]+",
        ok[0],
    )
    assert any("status=INVALID_ARGUMENT" in line for line in lines)
    assert not any("7.25" in line for line in lines)  # no tensor data in logs


def test_unknown_function_is_registered_again_transparently():
    first, a = started()
    second, b = started()
    try:
        with Client(a) as on_a, Client(b) as on_b:
            f = sum_of_squares(on_a)  # known to A only
            np.testing.assert_array_equal(on_b.gradient(f, np.ones((1, 3))), [[2.0, 2.0, 2.0]])
            assert len(second.servicer.registry) == 1
            # Without the spec, NOT_FOUND is the answer.
            with pytest.raises(NotFound, match="register its spec first"):
                on_b.value(dataclasses.replace(f, id="0" * 64, spec=None), np.ones((1, 3)))
    finally:
        first.stop(None)
        second.stop(None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _drain(pipe, compiled: threading.Event) -> None:
    with pipe:
        for line in pipe:
            if "compiled" in line:
                compiled.set()


def serve(port: int, *flags: str) -> subprocess.Popen:
    """`hessd serve` on 127.0.0.1:port, returned once it listens; `proc.compiled` is set
    once the server logs its first compile."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "hessd.tools.cli", "serve", "--host", "127.0.0.1"]
    args += ["--port", str(port), "--compile-cache-dir", "", *flags]
    proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "listening on" in line:
            # Drain the log until the process ends, then close the pipe.
            proc.compiled = threading.Event()  # type: ignore[attr-defined]
            args = (proc.stderr, proc.compiled)  # type: ignore[attr-defined]
            threading.Thread(target=_drain, args=args, daemon=True).start()
            return proc
    raise RuntimeError("server did not start")


def test_sigterm_finishes_calls_in_flight_then_exits_zero():
    port = free_port()
    proc = serve(port, "--grace", "30")
    try:
        with Client(f"127.0.0.1:{port}", timeout=120) as c:
            f = c.register("sum(tanh(x)**2) + sum(x**4)", {"x": (400,)}, dtype="float64")
            x = np.random.default_rng(0).normal(size=(32, 400))
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                slow = pool.submit(c.spectrum, f, x)  # compiles, then 32 eigh of 400x400
                # In flight once its executable is compiled (a sleep raced a loaded machine).
                assert proc.compiled.wait(timeout=120)  # type: ignore[attr-defined]
                proc.send_signal(signal.SIGTERM)
                spectrum = slow.result()
        assert spectrum.eigenvalues.shape == (32, 400)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()


def test_sigterm_exits_after_the_grace_whatever_is_computing():
    """A call that computes far past --grace does not keep the process alive: it exits 0
    within the grace plus a few seconds (it used to keep computing after "stopped")."""
    port = free_port()
    proc = serve(port, "--grace", "1")
    try:
        with Client(f"127.0.0.1:{port}", timeout=300) as c:
            f = c.register("sum(tanh(x)**2) + sum(x**4)", {"x": (2000,)}, dtype="float64")
            x = np.random.default_rng(0).normal(size=(16, 2000))
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                runaway = pool.submit(c.spectrum, f, x)  # minutes of eigh on 2 cores
                assert proc.compiled.wait(timeout=120)  # type: ignore[attr-defined]
                start = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=30) == 0
                assert time.monotonic() - start < 15
                with pytest.raises(HessdError):
                    runaway.result()
    finally:
        proc.kill()
        proc.wait()


def test_three_replicas_share_the_load_and_a_killed_one_costs_no_request():
    ports = [free_port() for _ in range(3)]
    procs = [serve(port) for port in ports]
    try:
        with Client([f"127.0.0.1:{p}" for p in ports], timeout=60) as c:
            ids = {c.server_info()["server_id"] for _ in range(30)}
            assert len(ids) == 3
            f = c.register("sum(x**2)", {"x": (3,)}, dtype="float64")
            x = np.arange(6.0).reshape(2, 3)
            for _ in range(9):
                np.testing.assert_array_equal(c.gradient(f, x), 2 * x)
            procs[0].kill()
            procs[0].wait()
            # Calls that meet the dead replica are retried (UNAVAILABLE) on the others, and
            # a replica that never saw f is given its spec (NOT_FOUND): none fails.
            for _ in range(30):
                np.testing.assert_array_equal(c.gradient(f, x), 2 * x)
            assert len({c.server_info()["server_id"] for _ in range(20)}) == 2
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_client_loop_survives_a_server_restart():
    port = free_port()
    proc = serve(port)
    results = []
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as c:
            f = c.register("sum(x**2)", {"x": (3,)}, dtype="float64")
            for i in range(40):
                if i == 15:  # kill -9 and restart on the same port: the registry is gone
                    proc.kill()
                    proc.wait()
                    proc = serve(port)
                x = np.full((1, 3), float(i))
                results.append(c.gradient(f, x))
                np.testing.assert_array_equal(results[-1], 2 * x)
        assert len(results) == 40
    finally:
        proc.kill()
        proc.wait()
