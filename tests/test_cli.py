"""The `hessd` command line: --version and --help without JAX, `hessd serve` (its flags from
ServerConfig, a clear error without the server's packages, listening and stopping on
signals), and the connection flags the tools share."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from hessd.client import Client
from hessd.service import serve
from hessd.service.config import ServerConfig
from hessd.tools._common import Refused, add_connection_arguments, connection_options

# Imports `jax` fail in the process this starts, as where the server's packages are not
# installed (`pip install hessd`, the thin client only).
WITHOUT_JAX = """
import sys

class NoJax:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("jax", "jaxlib"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoJax())
"""


def hessd(*argv: str, prelude: str = "", check_modules: bool = False):
    """`hessd ARGV` in a fresh interpreter: (exit code, stdout, stderr); with check_modules,
    stderr's last line lists the JAX and hessd.service modules imported."""
    code = prelude + "import sys\nfrom hessd.tools.cli import main\n"
    code += "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
    if check_modules:
        code += (
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib')\n"
            "               or m.startswith('hessd.service'))\n"
            "print('imported:', heavy, file=sys.stderr)\n"
        )
    code += "sys.exit(code)\n"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=120
    )
    return result.returncode, result.stdout, result.stderr


def test_version():
    code, out, _ = hessd("--version")
    assert code == 0
    assert out == f"hessd {importlib.metadata.version('hessd')}\n"


@pytest.mark.parametrize("argv", [["--help"], ["spectrum", "--help"], ["bench", "--help"]])
def test_help_imports_neither_jax_nor_the_server(argv):
    code, out, err = hessd(*argv, check_modules=True)
    assert code == 0 and out.startswith("usage: hessd")
    assert err.splitlines()[-1] == "imported: []"


def test_serve_help_lists_every_config_field_with_its_help_and_default():
    code, out, err = hessd("serve", "--help", check_modules=True)
    assert code == 0
    assert err.splitlines()[-1] == "imported: ['hessd.service', 'hessd.service.config', " + (
        "'hessd.service.serve']"
    )
    text = " ".join(out.split())  # argparse wraps the help
    for field in dataclasses.fields(ServerConfig):
        assert "--" + field.name.replace("_", "-") in text
        assert " ".join(field.metadata["help"].split()) in text
    assert "(default: 50051)" in text and "(default: 536870912)" in text
    assert f"(default: {serve.DEFAULT_COMPILE_CACHE})" in text


def test_serve_without_jax_says_what_to_install():
    code, _, err = hessd("serve", "--port", "0", prelude=WITHOUT_JAX)
    assert code == 1, err
    assert err == (
        "hessd serve: the server needs jax, which is not installed: pip install 'hessd[server]'\n"
    )


def test_spectrum_and_bench_run_without_jax(tmp_path):
    """No server packages needed: a refused flag comes back as the tool's own error."""
    code, _, err = hessd("bench", "--expression", "sum(x)", prelude=WITHOUT_JAX)
    assert code == 2
    assert err == "hessd bench: --expression needs --inputs NAME=SHAPE for each input, e.g. x=256\n"
    argv = ["--function", str(tmp_path / "f.yaml"), "--points", "p.npy", "--out", "o.npz"]
    code, _, err = hessd("spectrum", *argv, prelude=WITHOUT_JAX)
    assert code == 2 and "name a .json or a .toml file" in err


def parse_serve(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args(argv)


def test_serve_flags_parse_to_the_fields_types():
    args = parse_serve(
        "--port", "7", "--metrics-port", "9", "--allow-jax-export", "--tls-cert", "c.pem"
    )
    config = ServerConfig(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig)}
    )
    assert config.port == 7 and config.metrics_port == 9 and config.allow_jax_export is True
    assert config.tls_cert == "c.pem" and config.max_connection_age_s is None
    assert parse_serve().compile_cache_dir == serve.DEFAULT_COMPILE_CACHE
    assert parse_serve("--compile-cache-dir", "").compile_cache_dir == ""  # turns it off
    with pytest.raises(SystemExit):
        parse_serve("--port", "many")


def test_a_field_no_flag_can_parse_fails_when_the_parser_is_built():
    assert serve.flag_type("port", int | None) is int
    assert serve.flag_type("ratio", float) is float
    with pytest.raises(TypeError, match=r"ServerConfig.sizes is annotated tuple\[int, \.\.\.\]"):
        serve.flag_type("sizes", tuple[int, ...])
    with pytest.raises(TypeError, match=r"ServerConfig\.either"):
        serve.flag_type("either", int | str)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_listens_then_stops_on_signal(tmp_path, signum):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "hessd.tools.cli", "serve", "--host", "127.0.0.1"]
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


# ------------------------------------------------------------------- the connection flags


def connection(*argv: str) -> dict:
    parser = argparse.ArgumentParser()
    add_connection_arguments(parser, timeout=5.0, what="per call")
    return connection_options(parser.parse_args(argv))


def test_connection_flags_become_client_options(tmp_path, monkeypatch):
    monkeypatch.delenv("HESSD_TOKEN", raising=False)
    assert connection() == {}
    assert connection("--tls") == {"tls": True}
    (tmp_path / "ca.pem").write_bytes(b"CA")
    (tmp_path / "cert.pem").write_bytes(b"CERT")
    (tmp_path / "key.pem").write_bytes(b"KEY")
    argv = ["--tls-ca", str(tmp_path / "ca.pem"), "--tls-cert", str(tmp_path / "cert.pem")]
    assert connection(*argv, "--tls-key", str(tmp_path / "key.pem"), "--token", "t") == {
        "tls": True,
        "root_certificates": b"CA",
        "certificate_chain": b"CERT",
        "private_key": b"KEY",
        "token": "t",
    }


def test_the_token_defaults_to_the_environment(monkeypatch):
    monkeypatch.setenv("HESSD_TOKEN", "from-the-environment")
    assert connection() == {"token": "from-the-environment"}
    assert connection("--token", "given") == {"token": "given"}


def test_refused_connection_flags(tmp_path):
    with pytest.raises(Refused, match="--tls-cert and --tls-key go together"):
        connection("--tls-cert", "cert.pem")
    with pytest.raises(Refused, match=r"--tls-ca .*missing\.pem: cannot read it"):
        connection("--tls-ca", str(tmp_path / "missing.pem"))
