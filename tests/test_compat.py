"""hessd against the ends of the protobuf and grpcio ranges it declares (pyproject.toml).

Each environment is what pip resolves for `hessd[server]` plus a few pins: the oldest
supported pair (protobuf 6.30.0, grpcio 1.72.1, the floors), the GPU machine's pair
(protobuf 7.36.2, grpcio 1.84.0), the newest releases, and hessd beside tritonclient 2.73
(protobuf <7), the Open Inference Protocol client that tests/test_oip.py drives.

Installing jax into four virtualenvs would cost minutes, so an environment is an overlay:
`pip install --dry-run --report` resolves it (seconds, from the index's metadata), the
packages whose resolved version differs from this interpreter's are installed with
--no-deps into build/compat/<name>/, and that folder goes first on PYTHONPATH. Everything
else (jax, numpy, hessd itself) comes from this virtualenv, at the versions the resolution
agreed to. An overlay is kept while its resolution does not change. Without the index
(offline) the tests skip, saying so.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
OVERLAYS = ROOT / "build" / "compat"

PAIRS = {
    "oldest": ["protobuf==6.30.0", "grpcio==1.72.1"],
    "gpu-machine": ["protobuf==7.36.2", "grpcio==1.84.0"],
    "newest": [],
}
TRITON = ["tritonclient[grpc]==2.73.0"]

# A server and a client in one process: register, a Hessian against its closed form,
# a typed error, health and the Open Inference Protocol's ServerLive; then the versions.
SMOKE = textwrap.dedent(
    """
    import grpc, numpy as np
    import google.protobuf, grpc_health.v1.health_pb2 as hp, grpc_health.v1.health_pb2_grpc as hg
    from hessd.client import Client, InvalidArgument
    from hessd.proto.oip import grpc_predict_v2_pb2 as oip
    from hessd.service.config import ServerConfig
    from hessd.service.server import create_server

    server, port = create_server(ServerConfig(host="127.0.0.1", port=0, workers=4))
    server.start()
    address = f"127.0.0.1:{port}"
    A = np.array([[2.0, 1.0], [0.0, 3.0]])
    with Client(address, timeout=60) as c:
        f = c.register("x @ A @ x", inputs={"x": (2,)}, constants={"A": A}, name="quadratic")
        H = c.hessian(f, np.ones((3, 2)))
        np.testing.assert_allclose(H, np.broadcast_to(A + A.T, (3, 2, 2)))
        try:
            c.gradient(c.register("x * 2", inputs={"x": (2,)}), np.ones((1, 2)))
            raise SystemExit("gradient of a vector function did not fail")
        except InvalidArgument as e:
            assert "scalar-output" in str(e), e
    with grpc.insecure_channel(address) as channel:
        health = hg.HealthStub(channel).Check(hp.HealthCheckRequest(service=""))
        assert health.status == hp.HealthCheckResponse.SERVING
        live = channel.unary_unary(
            "/inference.GRPCInferenceService/ServerLive",
            request_serializer=oip.ServerLiveRequest.SerializeToString,
            response_deserializer=oip.ServerLiveResponse.FromString,
        )(oip.ServerLiveRequest())
        assert live.live
    server.stop(None)
    print(f"ok protobuf {google.protobuf.__version__} grpcio {grpc.__version__}")
    """
)


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=600
    )


def _resolve(requirements: list[str]) -> dict[str, str]:
    """What pip would install for hessd[server] + requirements: {name: version}."""
    result = _pip(
        "install", "--dry-run", "--ignore-installed", "--quiet", "--report", "-",
        "-e", f"{ROOT}[server]", *requirements,
    )  # fmt: skip
    if result.returncode != 0:
        if _pip("index", "versions", "pip").returncode != 0:
            pytest.skip(f"no package index to resolve {requirements} (offline?)")
        pytest.fail(f"pip cannot install hessd[server] with {requirements}:\n{result.stderr}")
    report = json.loads(result.stdout)
    return {
        item["metadata"]["name"]: item["metadata"]["version"]
        for item in report["install"]
        if item["metadata"]["name"] != "hessd"
    }


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def overlay(name: str, requirements: list[str]) -> tuple[pathlib.Path, dict[str, str]]:
    """build/compat/<name>: the packages of the resolution this interpreter lacks or has at
    another version; and the whole resolution."""
    resolved = _resolve(requirements)
    pins = sorted(f"{n}=={v}" for n, v in resolved.items() if _installed(n) != v)
    target = OVERLAYS / name
    marker = target / ".pins.json"
    if not (marker.exists() and json.loads(marker.read_text()) == pins):
        shutil.rmtree(target, ignore_errors=True)
        if pins:
            result = _pip("install", "--no-deps", "--quiet", "--target", str(target), *pins)
            if result.returncode != 0:
                shutil.rmtree(target, ignore_errors=True)
                pytest.fail(f"pip install --no-deps {pins} failed:\n{result.stderr}")
        target.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(pins))
    return target, resolved


def run_in(target: pathlib.Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), str(ROOT / "tests")]))
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
    )


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_protobuf_and_grpcio_pair(pair):
    target, resolved = overlay(pair, PAIRS[pair])
    expected = {r.split("==")[0]: r.split("==")[1] for r in PAIRS[pair]}
    assert {n: resolved[n] for n in expected} == expected
    result = run_in(target, "-c", SMOKE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"ok protobuf {resolved['protobuf']} grpcio {resolved['grpcio']}" in result.stdout


def test_beside_tritonclient_the_open_inference_protocol_suite_passes():
    target, resolved = overlay("tritonclient", TRITON)
    assert resolved["protobuf"].startswith("6."), resolved
    result = run_in(target, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_oip.py")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " skipped" not in result.stdout, result.stdout
