"""`hessd serve`: says where it listens once it accepts calls, stops cleanly on signals."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from hessd.client import Client


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_listens_then_stops_on_signal(tmp_path, signum):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "hessd.service.cli", "serve", "--host", "127.0.0.1"]
    args += ["--port", "0", "--compile-cache-dir", str(tmp_path / "cache")]
    proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in proc.stderr:
            match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            if match:
                port = int(match.group(1))
                break
        assert port, "the server exited without saying where it listens"
        with Client(f"127.0.0.1:{port}", timeout=60) as c:
            info = c.server_info()
            assert info["backend"] == "cpu" and info["devices"]
            f = c.register("x @ A @ x", {"x": (3,)}, {"A": np.eye(3)}, dtype="float64")
            np.testing.assert_array_equal(c.gradient(f, np.ones((2, 3))), 2 * np.ones((2, 3)))
        proc.send_signal(signum)
        assert proc.wait(timeout=30) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    # The persistent compilation cache was written (CPU compiles are kept: min time 0).
    assert any((tmp_path / "cache").iterdir())
