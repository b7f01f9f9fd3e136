"""`hessd serve --processes N`: N servers on one port (SO_REUSEPORT) under a supervisor that
restarts one that dies, stops them all on SIGTERM and exits 0, and exits 1 when they cannot
start. Real processes on 127.0.0.1, port 0; each server imports JAX (a few seconds)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from hessd.client import Client
from hessd.proto.v1 import hessd_pb2, hessd_pb2_grpc
from hessd.service import serve
from hessd.service.config import ServerConfig


class Supervised:
    """`hessd serve --processes N --port 0` with its stderr (its servers' too) read by a
    thread into `lines`; leaving the `with` block stops it (SIGTERM, then SIGKILL)."""

    def __init__(self, processes: int, *flags: str):
        args = [sys.executable, "-m", "hessd.tools.cli", "serve", "--host", "127.0.0.1"]
        args += ["--port", "0", "--processes", str(processes), "--compile-cache-dir", ""]
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([*args, *flags], env=env, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.done = False
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        with self.proc.stderr:
            for line in self.proc.stderr:
                with self.changed:
                    self.lines.append(line)
                    self.changed.notify_all()
        with self.changed:
            self.done = True
            self.changed.notify_all()

    def wait_for(self, pattern: str, start: int = 0, timeout: float = 60.0) -> re.Match:
        """The first line from `start` on that matches `pattern`, once it is logged."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for line in self.lines[start:]:
                    if match := re.search(pattern, line):
                        return match
                start = len(self.lines)
                left = deadline - time.monotonic()
                if self.done or left <= 0:
                    raise AssertionError(f"no line matched {pattern!r}:\n" + "".join(self.lines))
                self.changed.wait(left)

    def address(self, processes: int) -> str:
        match = self.wait_for(rf"listening on (127\.0\.0\.1:\d+) with {processes} processes")
        return match.group(1)

    def pids(self) -> dict[int, int]:
        """The pid of each server, by index, as the supervisor last reported it."""
        with self.changed:
            found = (re.search(r"process (\d+) serving \(pid (\d+)\)", s) for s in self.lines)
            return {int(m.group(1)): int(m.group(2)) for m in found if m}

    def __enter__(self) -> Supervised:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(timeout=30)  # until every server has closed its stderr


@pytest.fixture(scope="module")
def two():
    with Supervised(2, "--grace", "2") as supervised:
        supervised.address(2)
        yield supervised


def server_ids(address: str, want: int, connections: int = 32) -> set[str]:
    """ServerInfo's server_id over up to `connections` new connections (each channel its
    own: a local subchannel pool), until `want` distinct ids have answered."""
    ids: set[str] = set()
    for _ in range(connections):
        options = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(address, options=options) as channel:
            stub = hessd_pb2_grpc.HessdStub(channel)
            ids.add(stub.ServerInfo(hessd_pb2.ServerInfoRequest(), timeout=30).server_id)
        if len(ids) == want:
            break
    return ids


def alive(pid: int) -> bool:
    """Whether `pid` is a hessd process still running (not a zombie, not a reused pid)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline") as cmdline:
            return state != "Z" and "hessd" in cmdline.read()
    except FileNotFoundError:
        return False


def connection_owners(port: int, pids: list[int]) -> list[int]:
    """Those of `pids` holding an established TCP connection on local port `port` (gRPC's
    sockets are IPv6 ones, IPv4 addresses mapped)."""
    rows = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name) as table:
            rows += [line.split() for line in table.readlines()[1:]]
    sockets = {
        f"socket:[{r[9]}]" for r in rows if int(r[1].split(":")[1], 16) == port and r[3] == "01"
    }
    owners = []
    for pid in pids:
        links = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(FileNotFoundError):  # closed since listed
                links.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        if links & sockets:
            owners.append(pid)
    return owners


def test_two_processes_answer_on_one_port(two):
    assert len(server_ids(two.address(2), want=2)) == 2


def test_a_killed_process_loses_no_call_and_is_restarted(two):
    address = two.address(2)
    port = int(address.rpartition(":")[2])
    before = server_ids(address, want=2)
    a = np.array([[2.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 4.0]])
    x = np.random.default_rng(0).normal(size=(4, 3))
    with Client(address, timeout=30) as c:
        f = c.register("x @ A @ x", {"x": (3,)}, {"A": a}, dtype="float64")
        c.gradient(f, x)  # the client's one connection is open
        deadline = time.monotonic() + 10
        while len(owners := connection_owners(port, list(two.pids().values()))) != 1:
            assert time.monotonic() < deadline, f"connections held by {owners}"
            time.sleep(0.1)
        (victim,) = owners
        (index,) = [i for i, pid in two.pids().items() if pid == victim]

        results: list[np.ndarray] = []
        errors: list[Exception] = []
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                try:
                    results.append(c.gradient(f, x))
                except Exception as e:  # every failure is the test's finding
                    errors.append(e)

        caller = threading.Thread(target=loop)
        caller.start()
        try:
            while len(results) < 20 and caller.is_alive():
                time.sleep(0.01)
            mark = len(two.lines)
            os.kill(victim, signal.SIGKILL)
            pattern = rf"process {index} \(pid {victim}\) exited unexpectedly \(killed by SIGKILL\)"
            two.wait_for(pattern, start=mark)
            after_kill = len(results)
            new_pid = int(two.wait_for(rf"process {index} serving \(pid (\d+)\)", mark).group(1))
            while len(results) < after_kill + 20 and caller.is_alive():
                time.sleep(0.01)
        finally:
            stop.set()
            caller.join()
    assert errors == []
    for g in results:
        np.testing.assert_allclose(g, x @ (a + a.T), rtol=1e-12)
    assert new_pid != victim and alive(new_pid) and not alive(victim)
    after = server_ids(address, want=2)
    assert len(after) == 2 and after != before  # the restarted server answers


def test_sigterm_stops_every_process_and_exits_0():
    with Supervised(2) as supervised:
        supervised.address(2)
        pids = supervised.pids()
        assert len(pids) == 2 and all(alive(pid) for pid in pids.values())
        supervised.proc.send_signal(signal.SIGTERM)
        assert supervised.proc.wait(timeout=30) == 0
    assert not any(alive(pid) for pid in pids.values())
    assert "".join(supervised.lines).count("stopped") == 3  # two servers and the supervisor


def test_servers_stop_when_the_supervisor_is_killed():
    """SIGKILL cannot be forwarded: each server sees its socket to the supervisor close."""
    with Supervised(2) as supervised:
        supervised.address(2)
        pids = list(supervised.pids().values())
        supervised.proc.kill()
        supervised.proc.wait()
        try:
            deadline = time.monotonic() + 30
            while any(alive(pid) for pid in pids):
                assert time.monotonic() < deadline, "a server outlived its supervisor"
                time.sleep(0.1)
        finally:
            for pid in pids:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
    assert "the supervisor has gone, stopping" in "".join(supervised.lines)


def test_a_server_that_cannot_start_fails_the_supervisor(tmp_path):
    missing = str(tmp_path / "missing.pem")
    with Supervised(2, "--tls-cert", missing, "--tls-key", missing) as supervised:
        assert supervised.proc.wait(timeout=60) == 1
        supervised.wait_for(r"cannot start: .*missing\.pem")
        supervised.wait_for(r"process \d could not start \(exit code 1\)")


def test_a_port_in_use_fails_before_any_server_starts():
    with socket.socket() as taken:  # no SO_REUSEPORT: nothing else may bind it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = [sys.executable, "-m", "hessd.tools.cli", "serve", "--port", str(port)]
        result = subprocess.run(
            [*args, "--processes", "2"], capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 1
    assert f"cannot start: 127.0.0.1:{port}: [Errno 98] Address already in use" in result.stderr
    assert "serving" not in result.stderr


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args(argv)


def test_each_server_gets_the_supervisors_flags_and_its_own_metrics_port():
    flags = ["--processes", "3", "--port", "0", "--metrics-port", "9100", "--allow-jax-export"]
    args = parse([*flags, "--log-requests", "--tls-cert", "c.pem", "--grace", "7.5"])
    child = parse(serve.child_argv(args, 2, 50123, 9)[4:])  # past `python -m ... serve`
    assert (child.processes, child.port, child.metrics_port) == (1, 50123, 9102)
    assert (child.supervisor_fd, child.grace, child.log_level) == (9, 7.5, "INFO")
    assert child.reuse_port and not args.reuse_port  # the one port, shared on purpose
    for field in dataclasses.fields(ServerConfig):
        if field.name not in ("port", "metrics_port", "reuse_port"):
            assert getattr(child, field.name) == getattr(args, field.name), field.name
    assert parse(serve.child_argv(parse([]), 1, 1, 1)[4:]).metrics_port is None
    with pytest.raises(SystemExit):
        parse(["--processes", "0"])


def test_each_server_gets_a_share_of_gpu_memory_unless_the_user_set_it(monkeypatch):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    assert serve.child_environment(4)["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.225"
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    assert serve.child_environment(4)["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5"


def test_a_single_server_does_not_share_a_port_another_holds():
    """gRPC sets SO_REUSEPORT by default, so a second server on a held port would quietly
    share it; hessd shares only with --reuse-port (which --processes gives its servers)."""
    from hessd.service.server import create_server

    first, port = create_server(ServerConfig(host="127.0.0.1", port=0))
    try:
        with pytest.raises(OSError, match="could not bind"):
            create_server(ServerConfig(host="127.0.0.1", port=port))
    finally:
        first.stop(None)
    sharing = ServerConfig(host="127.0.0.1", port=0, reuse_port=True)
    first, port = create_server(sharing)
    second, _ = create_server(dataclasses.replace(sharing, port=port))
    first.stop(None)
    second.stop(None)
