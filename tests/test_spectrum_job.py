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
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hessd.client import Client, NotFound, Unavailable, spectrum_job
from hessd.service.config import ServerConfig
from hessd.service.server import create_server

SPECTRUM = np.array([-2.0, -1.0, 1.0, 2.0])
SHIFTS = {"minimum": 3.0, "maximum": -3.0, "saddle": 0.0, "degenerate": 2.0}
NUM_POINTS, CHUNK = 12, 4
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLIENT_SPECTRUM = Client.spectrum  # the real one, whatever a test has patched in


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
    spectrum_job.add_arguments(parser)
    return spectrum_job.main(parser.parse_args([str(a) for a in argv]))


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
    monkeypatch.setattr(spectrum_job, "_sleep", sleeps.append)
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
    argv = [sys.executable, "-m", "hessd.service.cli", "spectrum"]
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


def test_import_leaves_out_jax_tqdm_and_matplotlib():
    code = (
        "import sys, hessd.client.spectrum_job\n"
        "heavy = sorted(m for m in sys.modules\n"
        "               if m.split('.')[0] in ('jax', 'jaxlib', 'tqdm', 'matplotlib'))\n"
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
    server = spectrum_job._Server("127.0.0.1:1", 1.0, 1e9, spec=None)
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
    monkeypatch.setattr(spectrum_job, "_sleep", restart)
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
