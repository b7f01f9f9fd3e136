"""`hessd spectrum`, the batch job, against the in-process server.

The function is f(x, c) = ½ xᵀAx + ½ c xᵀx with A = Q diag(-2, -1, 1, 2) Qᵀ, so the Hessian
with respect to x is A + cI at every point, whose spectrum is chosen through c:

    c =  3: (1, 2, 4, 5)      minimum
    c = -3: (-5, -4, -2, -1)  maximum
    c =  0: (-2, -1, 1, 2)    saddle
    c =  2: (0, 1, 3, 4)      degenerate

and ∇ₓf = (A + cI) x, so the points with x = 0 are stationary and the others are not. Every
run sends 12 points in chunks of 4, so the server compiles each method once.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import subprocess
import sys
from pathlib import Path

import certs
import numpy as np
import pytest

from hessd.client import Client, DeadlineExceeded, NotFound, Unavailable
from hessd.service.config import ServerConfig
from hessd.service.server import create_server
from hessd.tools import spectrum
from hessd.tools.spectrum import _job, _report, _server

SPECTRUM = np.array([-2.0, -1.0, 1.0, 2.0])
SHIFTS = {"minimum": 3.0, "maximum": -3.0, "saddle": 0.0, "degenerate": 2.0}
NUM_POINTS, CHUNK = 12, 4
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLIENT_SPECTRUM = Client.spectrum  # the real one, whatever a test has patched in
TOKEN = "spectrum-job-token-0123456789"


def symmetric(spectrum, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(spectrum.size,) * 2))
    a = (q * spectrum) @ q.T
    return (a + a.T) / 2


A = symmetric(SPECTRUM)


@dataclasses.dataclass
class Job:
    """A function file, a points file and what the points are."""

    spec: Path
    points: Path
    x: np.ndarray
    c: np.ndarray | None
    folder: Path

    def argv(self, address, out, *extra):
        files = ["--function", self.spec, "--points", self.points, "--out", self.folder / out]
        return [*files, "--address", address, "--chunk-size", CHUNK, *extra]

    def hessians(self):
        return A + self.c[:, None, None] * np.eye(4)


@pytest.fixture
def shifted(tmp_path):
    """The TOML spec of f(x, c) in float64, A from a .npy beside it; .npz points."""
    np.save(tmp_path / "A.npy", A)
    (tmp_path / "f.toml").write_text(
        'expression = "0.5 * x @ A @ x + 0.5 * c * (x @ x)"\n'
        'dtype = "float64"\n'
        "[inputs]\nx = [4]\nc = []\n"
        '[constants]\nA = "A.npy"\n'
    )
    x = np.random.default_rng(1).normal(size=(NUM_POINTS, 4))
    x[:4] = 0.0  # one stationary point of each class
    c = np.tile(list(SHIFTS.values()), NUM_POINTS // 4)
    np.savez(tmp_path / "points.npz", x=x, c=c)
    return Job(tmp_path / "f.toml", tmp_path / "points.npz", x, c, tmp_path)


@pytest.fixture
def saddle(tmp_path):
    """The JSON spec of ½ xᵀAx in float32, A written inline; .npy points."""
    a32 = A.astype(np.float32)
    spec = {"expression": "0.5 * x @ A @ x", "inputs": {"x": [4]}, "constants": {"A": a32.tolist()}}
    (tmp_path / "f.json").write_text(json.dumps(spec))
    x = np.random.default_rng(2).normal(size=(NUM_POINTS, 4)).astype(np.float32)
    np.save(tmp_path / "points.npy", x)
    return Job(tmp_path / "f.json", tmp_path / "points.npy", x, None, tmp_path)


def run(argv) -> int:
    parser = argparse.ArgumentParser()
    spectrum.add_arguments(parser)
    return spectrum.main(parser.parse_args([str(a) for a in argv]))


def load(path):
    with np.load(path, allow_pickle=False) as result:
        return {name: result[name] for name in result.files}


def summary_rows(stdout):
    """{class or "total": (count, fraction, stationary)} from the summary table."""
    rows = {}
    for line in stdout.splitlines():
        words = line.split()
        if len(words) == 4 and words[0] in (*SHIFTS, "total"):
            rows[words[0]] = (int(words[1]), float(words[2]), int(words[3]))
    return rows


def expected_classes(job):
    names = {v: k for k, v in SHIFTS.items()}
    return np.array([names[c] for c in job.c])


def count_calls(monkeypatch, error=None, at=()):
    """Wrap Client.spectrum to count its calls and raise `error` at the call numbers `at`."""
    calls = []

    def spectrum(self, *args, **kwargs):
        calls.append(len(calls) + 1)
        if len(calls) in at:
            raise error
        return CLIENT_SPECTRUM(self, *args, **kwargs)

    monkeypatch.setattr(Client, "spectrum", spectrum)
    return calls


def count_registrations(monkeypatch):
    registrations = []
    register = Client.register

    def counting_register(self, *args, **kwargs):
        registrations.append(1)
        return register(self, *args, **kwargs)

    monkeypatch.setattr(Client, "register", counting_register)
    return registrations


@pytest.fixture
def instant_backoff(monkeypatch):
    sleeps = []
    monkeypatch.setattr(_server, "_sleep", sleeps.append)
    return sleeps


# ---------------------------------------------------------------------------------- results


def test_exact_toml_spec_classifies_every_point(shifted, server_address, capsys):
    assert run(shifted.argv(server_address, "out.npz")) == 0
    result = load(shifted.folder / "out.npz")
    hessians = shifted.hessians()
    np.testing.assert_allclose(result["eigenvalues"], np.linalg.eigvalsh(hessians), atol=1e-12)
    np.testing.assert_array_equal(result["point_class"], expected_classes(shifted))
    np.testing.assert_array_equal(result["stationary"], np.arange(NUM_POINTS) < 4)
    gradients = np.einsum("bij,bj->bi", hessians, shifted.x)
    np.testing.assert_allclose(result["gradient_norm"], np.linalg.norm(gradients, axis=1))
    assert result["method"] == "exact" and result["method"].shape == ()
    assert len(str(result["function_id"])) == 64
    assert not (shifted.folder / "out.npz.parts").exists()

    out = capsys.readouterr().out
    rows = summary_rows(out)
    for name in SHIFTS:
        assert rows[name] == (3, 0.25, 1)
    assert rows["total"] == (12, 1.0, 4)
    assert "points/s" in out and "s wall" in out


def test_json_spec_npy_points_and_progress_bar(saddle, server_address, capsys):
    assert run(saddle.argv(server_address, "out.npz", "--progress")) == 0
    result = load(saddle.folder / "out.npz")
    assert result["eigenvalues"].dtype == np.float32
    expected = np.broadcast_to(np.linalg.eigvalsh(A), (NUM_POINTS, 4))
    np.testing.assert_allclose(result["eigenvalues"], expected, rtol=1e-5, atol=1e-5)
    assert (result["point_class"] == "saddle").all() and not result["stationary"].any()
    captured = capsys.readouterr()
    assert summary_rows(captured.out)["saddle"] == (12, 1.0, 0)
    assert "12/12" in captured.err and "pt/s" in captured.err


def test_lanczos_finds_the_extreme_eigenvalues(shifted, server_address):
    argv = shifted.argv(server_address, "out.npz", "--method", "lanczos", "--k", "1")
    assert run([*argv, "--plot", shifted.folder / "hist.png"]) == 0
    result = load(shifted.folder / "out.npz")
    exact = np.linalg.eigvalsh(shifted.hessians())
    np.testing.assert_allclose(result["eigenvalues"], exact[:, [0, -1]], atol=1e-10)
    np.testing.assert_array_equal(result["point_class"], expected_classes(shifted))
    assert result["residuals"].shape == (NUM_POINTS, 2)
    assert (shifted.folder / "hist.png").read_bytes().startswith(PNG_SIGNATURE)


def test_density_writes_quadrature_density_and_classes(shifted, server_address, capsys):
    argv = shifted.argv(server_address, "out.npz", "--method", "density", "--num-probes", "2")
    assert run([*argv, "--plot", shifted.folder / "density.png"]) == 0
    result = load(shifted.folder / "out.npz")
    assert result["nodes"].shape == result["weights"].shape == (NUM_POINTS, 2, 4)
    assert result["grid"].shape == result["density"].shape == (NUM_POINTS, 256)
    assert "eigenvalues" not in result
    # num_steps = n: the Ritz values of each probe are the eigenvalues, the weights sum to 1.
    exact = np.linalg.eigvalsh(shifted.hessians())
    nodes = np.broadcast_to(exact[:, None], (NUM_POINTS, 2, 4))
    np.testing.assert_allclose(result["nodes"], nodes, atol=1e-10)
    np.testing.assert_allclose(result["weights"].sum(axis=2), 1.0)
    np.testing.assert_array_equal(result["point_class"], expected_classes(shifted))
    np.testing.assert_array_equal(result["stationary"], np.arange(NUM_POINTS) < 4)
    assert (shifted.folder / "density.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "Ritz values" in capsys.readouterr().out


def test_exact_plot_writes_a_png(saddle, server_address):
    assert run([*saddle.argv(server_address, "out.npz"), "--plot", saddle.folder / "h.png"]) == 0
    assert (saddle.folder / "h.png").read_bytes().startswith(PNG_SIGNATURE)


def test_console_script(saddle, server_address):
    argv = [sys.executable, "-m", "hessd.tools.cli", "spectrum"]
    result = subprocess.run(
        [*argv, *map(str, saddle.argv(server_address, "out.npz"))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress bar where stderr is not a terminal
    assert summary_rows(result.stdout)["saddle"] == (12, 1.0, 0)
    assert load(saddle.folder / "out.npz")["eigenvalues"].shape == (NUM_POINTS, 4)


def test_import_leaves_out_jax_tqdm_matplotlib_and_the_server():
    code = (
        "import sys, hessd.tools.spectrum\n"
        "heavy = sorted(m for m in sys.modules\n"
        "               if m.split('.')[0] in ('jax', 'jaxlib', 'tqdm', 'matplotlib')\n"
        "               or m.startswith('hessd.service'))\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------------- resume


def test_interrupted_run_resumes_without_recomputing(shifted, server_address, monkeypatch, capsys):
    assert run(shifted.argv(server_address, "reference.npz")) == 0

    count_calls(monkeypatch, KeyboardInterrupt, at={3})
    assert run(shifted.argv(server_address, "out.npz")) == 130
    err = capsys.readouterr().err
    assert "interrupted after 8 of 12 points; run the same command again to resume" in err
    parts = shifted.folder / "out.npz.parts"
    assert sorted(p.name for p in parts.iterdir()) == [
        "chunk-00000000.npz",
        "chunk-00000004.npz",
        "manifest.json",
    ]
    manifest = json.loads((parts / "manifest.json").read_text())
    assert manifest["chunk_size"] == CHUNK and manifest["num_points"] == NUM_POINTS
    assert manifest["method"] == "exact" and len(manifest["points_sha256"]) == 64
    assert not (shifted.folder / "out.npz").exists()

    calls = count_calls(monkeypatch)
    assert run(shifted.argv(server_address, "out.npz")) == 0
    assert calls == [1]  # only the chunk at 8
    assert not parts.exists()
    reference, resumed = load(shifted.folder / "reference.npz"), load(shifted.folder / "out.npz")
    assert list(resumed) == list(reference)
    for name in reference:
        assert resumed[name].dtype == reference[name].dtype
        np.testing.assert_array_equal(resumed[name], reference[name])
    assert "(4 computed now, 8 resumed from an earlier run)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "change, difference",
    [
        (["--chunk-size", "6"], "chunk_size: 4 there, 6 now"),
        (["--seed", "7"], "--seed: 0 there, 7 now"),
        (["--points", "other.npz"], "num_points: 12 there, 6 now"),
        (["--method", "lanczos", "--k", "1"], "method: 'exact' there, 'lanczos' now"),
    ],
)
def test_parts_of_another_job_are_refused(
    shifted, server_address, monkeypatch, capsys, change, difference
):
    count_calls(monkeypatch, KeyboardInterrupt, at={2})
    assert run(shifted.argv(server_address, "out.npz")) == 130
    np.savez(shifted.folder / "other.npz", x=shifted.x[:6], c=shifted.c[:6])
    parts = shifted.folder / "out.npz.parts"
    before = {p.name: p.read_bytes() for p in parts.iterdir()}
    capsys.readouterr()

    calls = count_calls(monkeypatch)
    # argparse keeps the last of a repeated flag, so `change` overrides.
    change = [str(shifted.folder / a) if a == "other.npz" else a for a in change]
    assert run([*shifted.argv(server_address, "out.npz"), *change]) == 2
    assert calls == []
    err = capsys.readouterr().err
    assert "holds the parts of a different job" in err and difference in err
    assert "delete the folder to start over, or use another --out" in err
    assert {p.name: p.read_bytes() for p in parts.iterdir()} == before


# ----------------------------------------------------------------------- server failures


def test_unavailable_is_retried_with_backoff(shifted, server_address, monkeypatch, instant_backoff):
    calls = count_calls(monkeypatch, Unavailable("failed to connect to all addresses"), at={1, 2})
    assert run(shifted.argv(server_address, "out.npz")) == 0
    assert instant_backoff == [0.5, 1.0]
    assert len(calls) == 2 + NUM_POINTS // CHUNK
    result = load(shifted.folder / "out.npz")
    np.testing.assert_array_equal(result["point_class"], expected_classes(shifted))


def test_backoff_doubles_up_to_its_cap(monkeypatch, instant_backoff):
    monkeypatch.setattr(Client, "server_info", lambda self, **kwargs: {})  # back at once
    server = _server.RetryingServer("127.0.0.1:1", 1.0, 1e9, spec=None)
    failures = iter(range(8))

    def call():
        if next(failures, None) is not None:
            raise Unavailable("down")
        return "done"

    try:
        assert server._retrying(call) == "done"
    finally:
        server.close()
    assert instant_backoff == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


class Clock:
    """A clock that only the test moves: sleeps and calls advance it."""

    def __init__(self):
        self.now = 0.0
        self.sleeps = []

    def sleep(self, seconds):
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.mark.parametrize("probe_error", [Unavailable, DeadlineExceeded])
def test_retry_seconds_bounds_the_whole_wait(monkeypatch, probe_error):
    """--retry-seconds 3 against a server that never comes back: the backoff sleeps and the
    ServerInfo calls asking whether it is back add up to 3 s, the last of each cut to what
    is left, and nothing is waited after."""
    clock = Clock()
    monkeypatch.setattr(_server, "_clock", lambda: clock.now)
    monkeypatch.setattr(_server, "_sleep", clock.sleep)
    timeouts = []

    def server_info(self, *, timeout=None):
        timeouts.append(timeout)
        clock.now += min(timeout, 2.0)  # gRPC's own retries take a while, then give up
        raise probe_error("still down")

    monkeypatch.setattr(Client, "server_info", server_info)
    server = _server.RetryingServer("127.0.0.1:1", 600.0, 3.0, spec=None)

    def call():
        raise Unavailable("down")

    try:
        with pytest.raises(_server.ServerGone, match=r"waited 3\.0 s .*--retry-seconds 3\)"):
            server._retrying(call)
    finally:
        server.close()
    assert clock.now == pytest.approx(3.0)
    assert clock.sleeps == [0.5, pytest.approx(0.5)]  # 0.5, ServerInfo 2 s, then what is left
    assert timeouts == [pytest.approx(2.5)]
    assert all(t <= 3.0 for t in timeouts)


@pytest.mark.parametrize("retry_seconds, waited", [(3.0, 3.0), (0.0, 1.0)])
def test_a_server_down_at_the_start_is_given_up_within_the_budget(
    monkeypatch, retry_seconds, waited
):
    """The first contact is a ServerInfo call whose deadline is the budget (at least 1 s),
    so the retries gRPC makes inside a call cannot make the job wait longer."""
    clock = Clock()
    monkeypatch.setattr(_server, "_clock", lambda: clock.now)
    monkeypatch.setattr(_server, "_sleep", clock.sleep)
    timeouts = []

    def server_info(self, *, timeout=None):
        timeouts.append(timeout)
        clock.now += timeout  # gRPC retries until the deadline
        raise DeadlineExceeded("Deadline Exceeded")

    monkeypatch.setattr(Client, "server_info", server_info)
    server = _server.RetryingServer("127.0.0.1:1", 600.0, retry_seconds, spec=None)
    try:
        with pytest.raises(_server.ServerGone, match=f"waited {waited:.1f} s"):
            server.connect()
    finally:
        server.close()
    assert clock.now == pytest.approx(waited) and timeouts == [waited]


def test_a_server_back_gets_the_call_with_its_full_timeout(monkeypatch):
    """Only the ServerInfo calls that wait for the server are cut to the budget: a long
    computation on a server that came back is not."""
    clock = Clock()
    monkeypatch.setattr(_server, "_clock", lambda: clock.now)
    monkeypatch.setattr(_server, "_sleep", clock.sleep)
    probes = []
    monkeypatch.setattr(Client, "server_info", lambda self, *, timeout=None: probes.append(timeout))
    server = _server.RetryingServer("127.0.0.1:1", 600.0, 1.0, spec=None)
    attempts = []

    def call():
        attempts.append(server._client.timeout)
        if len(attempts) == 1:
            raise Unavailable("restarting")
        clock.now += 100.0  # computing, long past the retry budget
        return "done"

    try:
        assert server._retrying(call) == "done"
    finally:
        server.close()
    assert attempts == [600.0, 600.0] and probes == [pytest.approx(0.5)]


def test_server_gone_gives_up_and_keeps_the_chunks(
    shifted, server_address, monkeypatch, capsys, instant_backoff
):
    count_calls(monkeypatch, Unavailable("failed to connect to all addresses"), at=range(2, 99))
    argv = shifted.argv(server_address, "out.npz", "--retry-seconds", "0")
    assert run(argv) == 1
    err = capsys.readouterr().err
    assert f"the server at {server_address} stayed unavailable" in err
    assert "4 of 12 points are saved in" in err and "run the same command again" in err
    parts = shifted.folder / "out.npz.parts"
    assert (parts / "chunk-00000000.npz").exists()

    calls = count_calls(monkeypatch)
    assert run(argv) == 0
    assert calls == [1, 2]
    np.testing.assert_array_equal(
        load(shifted.folder / "out.npz")["point_class"], expected_classes(shifted)
    )


def test_a_restarted_server_is_waited_for_and_given_the_function_again(
    shifted, monkeypatch, capsys
):
    # A server of this test's own, stopped after the first chunk and started again on the
    # same port (with an empty registry) during the first backoff wait.
    config = ServerConfig(host="127.0.0.1", port=0, workers=4)
    first, port = create_server(config)
    first.start()
    servers = [first]

    def spectrum(self, *args, **kwargs):
        result = CLIENT_SPECTRUM(self, *args, **kwargs)
        if len(servers) == 1:
            first.stop(grace=None).wait()
        return result

    def restart(seconds):
        if len(servers) == 1:
            servers.append(create_server(dataclasses.replace(config, port=port))[0])
            servers[-1].start()

    monkeypatch.setattr(Client, "spectrum", spectrum)
    monkeypatch.setattr(_server, "_sleep", restart)
    registrations = count_registrations(monkeypatch)
    try:
        assert run(shifted.argv(f"127.0.0.1:{port}", "out.npz")) == 0
    finally:
        for server in servers:
            server.stop(grace=None)
    # The client itself resends the spec inline when the restarted server answers
    # NOT_FOUND, so the job registers only once.
    assert len(servers) == 2 and len(registrations) == 1
    assert capsys.readouterr().err == ""
    result = load(shifted.folder / "out.npz")
    np.testing.assert_array_equal(result["point_class"], expected_classes(shifted))


def test_not_found_registers_again_and_retries(shifted, server_address, monkeypatch):
    calls = count_calls(monkeypatch, NotFound("unknown function id"), at={2})
    registrations = count_registrations(monkeypatch)
    assert run(shifted.argv(server_address, "out.npz")) == 0
    assert len(registrations) == 2 and len(calls) == 1 + NUM_POINTS // CHUNK
    assert load(shifted.folder / "out.npz")["eigenvalues"].shape == (NUM_POINTS, 4)


def test_not_found_twice_is_an_error(shifted, server_address, monkeypatch, capsys):
    count_calls(monkeypatch, NotFound("unknown function id"), at=range(1, 99))
    assert run(shifted.argv(server_address, "out.npz")) == 2
    assert "NOT_FOUND: unknown function id" in capsys.readouterr().err


def test_invalid_argument_prints_the_server_message(shifted, server_address, capsys):
    argv = shifted.argv(server_address, "out.npz", "--method", "lanczos", "--k", "20")
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hessd spectrum: INVALID_ARGUMENT: lanczos finds the k smallest")
    assert "k must be between 1 and 2; got k=20" in err
    assert "Traceback" not in err


def test_invalid_expression_is_refused_at_registration(shifted, server_address, capsys):
    shifted.spec.write_text('expression = "x.shape"\n[inputs]\nx = [4]\nc = []\n')
    assert run(shifted.argv(server_address, "out.npz")) == 2
    assert "attribute access `x.shape` is not allowed" in capsys.readouterr().err


# ------------------------------------------------------------------------- refused inputs


def test_missing_points_file(shifted, server_address, capsys):
    argv = shifted.argv(server_address, "out.npz", "--points", shifted.folder / "nope.npz")
    assert run(argv) == 2
    assert "cannot load points file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("f.json", "{", "is not valid JSON"),
        ("f.toml", "expression = ", "is not valid TOML"),
        ("f.yaml", "", "name a .json or a .toml file"),
        ("f.json", '{"expression": "x"}', "`inputs` must map each input name"),
        ("f.json", '{"expression": "x", "inputs": {"x": [4]}, "A": 1}', "unknown keys ['A']"),
        ("f.json", '{"expression": "x", "inputs": {"x": "4"}}', "a shape is a list"),
        ("f.json", '{"expression": "x", "inputs": {"x": []}, "dtype": "int8"}', "`dtype`"),
        (
            "f.json",
            '{"expression": "x", "inputs": {"x": []}, "constants": {"A": [[1], [1, 2]]}}',
            "not a rectangular nested list",
        ),
        (
            "f.json",
            '{"expression": "x", "inputs": {"x": []}, "constants": {"A": "A.npy"}}',
            "cannot load",
        ),
    ],
)
def test_malformed_function_file(tmp_path, server_address, capsys, name, text, message):
    (tmp_path / name).write_text(text)
    np.save(tmp_path / "points.npy", np.zeros((2, 4)))
    argv = ["--function", tmp_path / name, "--points", tmp_path / "points.npy"]
    assert run([*argv, "--out", tmp_path / "out.npz", "--address", server_address]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_points_of_the_wrong_shape(shifted, server_address, capsys):
    np.savez(shifted.folder / "bad.npz", x=shifted.x[:, :3], c=shifted.c)
    argv = shifted.argv(server_address, "out.npz", "--points", shifted.folder / "bad.npz")
    assert run(argv) == 2
    assert "input 'x' has shape (12, 3); expected (batch, 4)" in capsys.readouterr().err


def test_a_flag_of_another_method_is_refused(shifted, server_address, capsys):
    assert run(shifted.argv(server_address, "out.npz", "--num-probes", "3")) == 2
    assert "--num-probes does not apply to --method exact" in capsys.readouterr().err


def test_lanczos_k_defaults_to_the_servers(shifted, server_address, monkeypatch):
    """No --k: the request leaves k to the server (0), as Client.spectrum does; here
    min(6, n // 2) = 2 for n = 4."""
    sent = []

    def spectrum(self, f, points, method, **options):
        sent.append(options["k"])
        return CLIENT_SPECTRUM(self, f, points, method, **options)

    monkeypatch.setattr(Client, "spectrum", spectrum)
    assert run(shifted.argv(server_address, "out.npz", "--method", "lanczos")) == 0
    assert sent == [0] * (NUM_POINTS // CHUNK)
    exact = np.linalg.eigvalsh(shifted.hessians())
    result = load(shifted.folder / "out.npz")
    np.testing.assert_allclose(result["eigenvalues"], exact, atol=1e-10)


# ------------------------------------------------------------------- tqdm, Ctrl-C, TLS


def test_no_tqdm_is_needed_without_a_progress_bar(saddle, server_address, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` fails
    assert run(saddle.argv(server_address, "out.npz")) == 0


def test_progress_without_tqdm_is_refused_before_any_work(
    saddle, server_address, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    calls = count_calls(monkeypatch)
    assert run(saddle.argv(server_address, "out.npz", "--progress")) == 2
    assert capsys.readouterr().err == (
        "hessd spectrum: --progress needs tqdm: pip install tqdm, or 'hessd[jobs]'\n"
    )
    assert calls == []


def test_ctrl_c_while_connecting_prints_one_line_and_exits_130(
    shifted, server_address, monkeypatch, capsys
):
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Client, "register", interrupted)
    assert run(shifted.argv(server_address, "out.npz")) == 130
    captured = capsys.readouterr()
    assert captured.err == "hessd spectrum: interrupted before any point was computed\n"
    assert captured.out == ""


def test_ctrl_c_while_plotting_keeps_the_result_and_exits_130(
    shifted, server_address, monkeypatch, capsys
):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(_job, "plot", interrupted)
    argv = shifted.argv(server_address, "out.npz", "--plot", shifted.folder / "h.png")
    assert run(argv) == 130
    out = shifted.folder / "out.npz"
    assert capsys.readouterr().err == (
        f"hessd spectrum: interrupted while plotting; the result is in {out}\n"
    )
    assert load(out)["eigenvalues"].shape == (NUM_POINTS, 4)


def test_mutual_tls_and_a_token(saddle, tmp_path):
    """--tls-ca, --tls-cert/--tls-key and --token reach a server that needs all three."""
    for name, pem in certs.make_pki().items():
        (tmp_path / f"{name}.pem").write_bytes(pem)
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tokens": [{"name": "job", "token": TOKEN}]}))
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        tls_cert=str(tmp_path / "server_cert.pem"),
        tls_key=str(tmp_path / "server_key.pem"),
        tls_client_ca=str(tmp_path / "ca.pem"),
        tokens_file=str(tokens),
    )
    server, port = create_server(config)
    server.start()
    tls = ["--tls-ca", tmp_path / "ca.pem", "--tls-cert", tmp_path / "client_cert.pem"]
    tls += ["--tls-key", tmp_path / "client_key.pem"]
    try:
        argv = saddle.argv(f"127.0.0.1:{port}", "out.npz", *tls, "--token", TOKEN)
        assert run(argv) == 0
    finally:
        server.stop(grace=None)
    assert (load(saddle.folder / "out.npz")["point_class"] == "saddle").all()


# ------------------------------------------------------------------------------ the picture


def test_symlog_is_matplotlibs_axis_coordinate():
    from matplotlib.scale import SymmetricalLogTransform

    values = np.array([-3.0, -1e-3, -1e-5, 0.0, 2e-6, 1e-4, 0.5, 40.0])
    linthresh = 1e-4
    theirs = SymmetricalLogTransform(10, linthresh, _report.LINSCALE).transform(values)
    np.testing.assert_allclose(_report.symlog(values, linthresh), theirs / linthresh)
    np.testing.assert_allclose(
        _report.symlog_inverse(_report.symlog(values, linthresh), linthresh), values
    )


def test_histogram_bins_are_equal_on_the_axis_and_one_is_centred_on_zero():
    rng = np.random.default_rng(0)
    values = np.concatenate([-(10.0 ** rng.uniform(-4, 0, 300)), rng.normal(0, 1e-8, 50)])
    values = np.concatenate([values, 10.0 ** rng.uniform(-5, 1, 600)])
    linthresh = _report.symlog_linthresh(values, 1e-6)
    assert linthresh == 1e-5  # the 1st percentile of |λ| > tol is ~1.3e-5
    edges = _report.symlog_edges(values, linthresh)
    t = _report.symlog(edges, linthresh)
    np.testing.assert_allclose(np.diff(t), np.diff(t)[0])
    assert np.any(np.isclose(t[:-1] + t[1:], 0.0, atol=1e-9))  # a bin centred on 0
    assert edges[0] <= values.min() and values.max() <= edges[-1]
    assert 20 <= len(edges) - 1 <= 120


def test_linthresh_without_nonzero_eigenvalues_is_one():
    assert _report.symlog_linthresh(np.zeros((2, 3)), np.zeros(2)) == 1.0


def test_the_picture_is_clipped_to_the_data_and_its_labels_do_not_collide():
    rng = np.random.default_rng(1)
    eigenvalues = np.sort(
        np.concatenate(
            [-(10.0 ** rng.uniform(-6, 0, (5, 300))), 10.0 ** rng.uniform(-7, 0.3, (5, 900))],
            axis=1,
        ),
        axis=1,
    )
    result = {"eigenvalues": eigenvalues, "gradient_norm": np.ones(5), "tol": np.full(5, 1e-9)}
    figure = _report.spectrum_figure(result, "exact", "f" * 64)
    figure.canvas.draw()
    histogram, extremes = figure.axes
    linthresh = _report.symlog_linthresh(eigenvalues, 1e-9)
    lo, hi = _report.symlog(np.array(histogram.get_xlim()), linthresh)
    data_lo, data_hi = _report.symlog(np.array([eigenvalues.min(), eigenvalues.max()]), linthresh)
    margin = 0.05 * (data_hi - data_lo)
    assert data_lo - margin < lo <= data_lo and data_hi <= hi < data_hi + margin
    renderer = figure.canvas.get_renderer()
    for axis in (histogram.xaxis, histogram.yaxis, extremes.xaxis, extremes.yaxis):
        boxes = [
            label.get_window_extent(renderer)
            for label in axis.get_ticklabels()
            if label.get_visible() and label.get_text()
        ]
        assert len(boxes) >= 2
        for a, b in itertools.pairwise(boxes):
            assert not a.overlaps(b), (a, b)
    # The legend stands above the right panel, clear of its data.
    legend = extremes.get_legend().get_window_extent(renderer)
    assert legend.y0 >= extremes.get_window_extent(renderer).y1 - 1


def test_the_extremes_of_points_of_both_signs_share_a_symlog_axis_around_zero():
    eigenvalues = np.array([[1.0, 5.0], [-5.0, -1.0], [-2.0, 2.0], [0.0, 4.0]])
    result = {"eigenvalues": eigenvalues, "gradient_norm": np.ones(4), "tol": np.full(4, 1e-6)}
    figure = _report.spectrum_figure(result, "lanczos", "f" * 64)
    extremes = figure.axes[1]
    assert extremes.get_yscale() == "symlog"
    assert any(np.all(np.asarray(line.get_ydata()) == 0) for line in extremes.get_lines())
