"""Issue 14's attacks at once, against one `hessd serve` process: a compile bomb, a runaway
computation past its deadline and 16 streams that send a header and wait. The server must
survive all three, stop the runaway's work within the stated slack (one chunk of points:
here one 600×600 eigh, well under a second), and keep answering a health check and another
client's small calls within 1 s throughout.

The bombs are scaled to the suite's minutes on 2 cores: the mechanism, not the size, is
what is tested (test_robustness.py has a test per mechanism).
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hessd.client import Client, HessdError, ResourceExhausted
from hessd.proto import codec
from hessd.proto.v1 import hessd_pb2, hessd_pb2_grpc

SLACK_S = 3.0  # after a deadline, the chunk in flight ends and the work stops
TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of the process itself (not of the children it compiles in)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _chain(bindings: int) -> str:
    lines = ["y0 = x"]
    lines += [f"y{i} = tanh(y{i - 1} @ W) + sin(y{i - 1})" for i in range(1, bindings + 1)]
    return "\n".join([*lines, f"sum(y{bindings})"])


@pytest.fixture(params=["aio"])
def server(tmp_path, request):
    """A `hessd serve` process. The asyncio transport only: the threaded one (--server
    threads) answers health on its worker threads, which these attacks may all hold."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "hessd.tools.cli", "serve", "--port", str(port),
            "--workers", "4", "--max-batch-bucket", "1", "--stream-idle-seconds", "5",
            "--compile-cache-dir", str(tmp_path), "--compile-isolation-lines", "500",
            "--max-compile-seconds", "4", "--server", request.param]  # fmt: skip
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    reader = threading.Thread(target=proc.stderr.read, daemon=True)
    try:
        for line in proc.stderr:
            if "listening on" in line:
                break
        reader.start()  # the log, read so that the server never blocks writing it
        yield proc, f"127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()
        if reader.ident is not None:
            reader.join(timeout=10)
        proc.stderr.close()


def test_one_server_survives_a_compile_bomb_a_runaway_and_idle_streams(server):
    proc, address = server
    release = threading.Event()
    stop_probing = threading.Event()
    probes: list[float] = []

    def probe(client: Client, small, channel: grpc.Channel) -> None:
        health = health_pb2_grpc.HealthStub(channel)
        while not stop_probing.wait(0.2):
            start = time.monotonic()
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert client.value(small, np.ones((1, 3)), timeout=1)[0] == 3.0
            probes.append(time.monotonic() - start)

    with (
        Client(address, timeout=120) as attacker,
        Client(address, timeout=10) as bystander,
        grpc.insecure_channel(address) as channel,
        concurrent.futures.ThreadPoolExecutor(24) as pool,
    ):
        small = bystander.register("sum(x**2)", {"x": (3,)}, dtype="float64")
        bystander.value(small, np.ones((1, 3)))  # compiled
        slow = attacker.register("sum(tanh(x)**2) + sum(x**4)", {"x": (600,)}, dtype="float64")
        x = np.random.default_rng(0).normal(size=(400, 600))  # minutes of eigh
        attacker.spectrum(slow, x[:1])  # compiled
        inputs = {"x": (16,), "W": (16, 16)}
        bomb = attacker.register(_chain(25), inputs, dtype="float64")  # compiles for ~20 s
        bomb_points = {"x": np.full((1, 16), 0.1), "W": 0.1 * np.eye(16)[None]}

        # 16 streams that send a header and wait.
        header = hessd_pb2.ComputeRequest(function_id=small.id, kind=hessd_pb2.VALUE)
        codec.encode(np.ones((1, 3)), out=header.inputs.add(name="x").tensor, data=False)

        def idle():
            yield hessd_pb2.StreamMessage(compute_request=header)
            release.wait(30)

        stub = hessd_pb2_grpc.HessdStub(channel)
        streams = [stub.ComputeStream(idle(), timeout=30) for _ in range(16)]
        compile_bomb = pool.submit(attacker.hessian, bomb, bomb_points)
        start = time.monotonic()
        runaway = pool.submit(attacker.spectrum, slow, x, timeout=2.0)
        prober = pool.submit(probe, bystander, small, channel)
        try:
            with pytest.raises(HessdError) as late:
                runaway.result(timeout=30)
            assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            with pytest.raises(ResourceExhausted, match="--max-compile-seconds"):
                compile_bomb.result(timeout=60)
            # The runaway's deadline is 2 s after its start: past the slack, its work has
            # stopped and the server idles but for the probes.
            time.sleep(max(0.0, start + 2.0 + SLACK_S - time.monotonic()))
            before = _cpu_seconds(proc.pid)
            time.sleep(2.0)
            busy = _cpu_seconds(proc.pid) - before
        finally:
            stop_probing.set()
            release.set()
        prober.result(timeout=30)  # every probe answered within 1 s, or it raised
        codes = []
        for call in streams:
            with pytest.raises(grpc.RpcError) as info:
                list(call)
            codes.append(info.value.code().name)
        assert set(codes) <= {"CANCELLED", "RESOURCE_EXHAUSTED"}, codes
        assert busy < 0.5, f"the server used {busy:.2f} s of CPU in 2 s after the deadline"
        assert len(probes) >= 10 and max(probes) < 1.0, probes
        assert proc.poll() is None  # survived
        assert bystander.value(small, np.ones((1, 3)))[0] == 3.0
