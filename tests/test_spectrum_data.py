"""`hessd spectrum` over a data set (--data, --operator, --loss): checkpoints as the points,
the data uploaded once per server, chunks spread over several servers (--concurrency).

The model is softmax regression, logits (C,) = x @ W with W the flat w (P*C,) reshaped to
(P, C), so the Jacobian of the logits in w is Jᵢ = xᵢᵀ ⊗ I_C and the Hessian of the mean
cross-entropy equals its GGN, in closed form

    H = GGN = (1/N) Σᵢ (xᵢ xᵢᵀ) ⊗ (diag pᵢ - pᵢ pᵢᵀ),   pᵢ = softmax(xᵢ @ W).

Eight checkpoints in chunks of 2, so a job makes four requests.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from hessd.client import Client
from hessd.service.config import ServerConfig
from hessd.service.server import create_server
from hessd.tools import spectrum
from hessd.tools.spectrum import _report, _server

P, C, N = 3, 4, 40  # features, classes, examples
NUM_POINTS, CHUNK = 8, 2
RNG = np.random.default_rng(5)
X = RNG.normal(size=(N, P))
LABELS = RNG.integers(0, C, size=N)
CHECKPOINTS = RNG.normal(size=(NUM_POINTS, P * C))
CLIENT_SPECTRUM = Client.spectrum  # the real one, whatever a test has patched in


def closed_form_hessian(w: np.ndarray) -> np.ndarray:
    logits = X @ w.reshape(P, C)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    a = np.einsum("ik,kl->ikl", p, np.eye(C)) - np.einsum("ik,il->ikl", p, p)
    return np.mean([np.kron(np.outer(x, x), ai) for x, ai in zip(X, a, strict=True)], axis=0)


@pytest.fixture
def job(tmp_path):
    """The model's function file, the checkpoints (.npy) and the data set (.npz)."""
    spec = {
        "expression": f"x @ reshape(w, ({P}, {C}))",
        "inputs": {"w": [P * C], "x": [P]},
        "dtype": "float64",
    }
    (tmp_path / "model.json").write_text(json.dumps(spec))
    np.save(tmp_path / "checkpoints.npy", CHECKPOINTS)
    np.savez(tmp_path / "data.npz", x=X, y=LABELS)
    return tmp_path


def argv(folder: Path, addresses, out="out.npz", *extra):
    args = ["--function", folder / "model.json", "--points", folder / "checkpoints.npy"]
    args += ["--out", folder / out, "--chunk-size", CHUNK, "--data", folder / "data.npz"]
    args += ["--loss", "softmax_cross_entropy"]
    for address in [addresses] if isinstance(addresses, str) else addresses:
        args += ["--address", address]
    return [*args, *extra]


def run(args) -> int:
    parser = argparse.ArgumentParser()
    spectrum.add_arguments(parser)
    return spectrum.main(parser.parse_args([str(a) for a in args]))


def load(path):
    with np.load(path, allow_pickle=False) as result:
        return {name: result[name] for name in result.files}


@pytest.fixture(scope="module")
def two_servers():
    servers = []
    for _ in range(2):
        server, port = create_server(ServerConfig(host="127.0.0.1", port=0, workers=4))
        server.start()
        servers.append((server, f"127.0.0.1:{port}"))
    yield [address for _, address in servers]
    for server, _ in servers:
        server.stop(grace=None)


def assert_results_equal(got, want):
    """The same arrays, the floating ones to rounding (another server's sums)."""
    assert list(got) == list(want)
    for name, array in want.items():
        if np.issubdtype(array.dtype, np.floating):
            np.testing.assert_allclose(got[name], array, rtol=1e-12, atol=1e-12)
        else:
            np.testing.assert_array_equal(got[name], array)


def spy(monkeypatch, method):
    """Record the address of every RetryingServer.`method` call."""
    calls: list[str] = []
    real = getattr(_server.RetryingServer, method)

    def recording(self, *args, **kwargs):
        calls.append(self.address)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(_server.RetryingServer, method, recording)
    return calls


def interrupt_at(monkeypatch, call_number):
    calls = []

    def spectrum_call(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == call_number:
            raise KeyboardInterrupt
        return CLIENT_SPECTRUM(self, *args, **kwargs)

    monkeypatch.setattr(Client, "spectrum", spectrum_call)
    return calls


# ---------------------------------------------------------------------------------- results


@pytest.mark.parametrize("operator", ["hessian", "ggn"])
def test_operator_over_data_equals_the_closed_form(job, server_address, operator, capsys):
    assert run(argv(job, server_address, "out.npz", "--operator", operator)) == 0
    result = load(job / "out.npz")
    expected = np.linalg.eigvalsh([closed_form_hessian(w) for w in CHECKPOINTS])
    np.testing.assert_allclose(result["eigenvalues"], expected, atol=1e-12)
    assert result["operator"] == operator
    assert len(str(result["data_sha256"])) == 64
    # Every point has the zero eigenvalues of softmax's shift invariance (P of them).
    assert (result["point_class"] == "degenerate").all()
    name = {"hessian": "Hessian", "ggn": "GGN"}[operator]
    assert f"exact of the {name}, function" in capsys.readouterr().out


def test_fisher_with_mc_samples_is_reproducible(job, server_address):
    extra = ("--operator", "fisher", "--mc-samples", "4", "--seed", "3", "--data-chunk-size", "7")
    assert run(argv(job, server_address, "a.npz", *extra)) == 0
    assert run(argv(job, server_address, "b.npz", *extra[:-1], "40")) == 0
    a, b = load(job / "a.npz"), load(job / "b.npz")
    np.testing.assert_allclose(a["eigenvalues"], b["eigenvalues"], atol=1e-12)
    assert (a["eigenvalues"] > -1e-12).all()  # a Fisher is positive semi-definite


def test_two_servers_at_concurrency_2_equal_one_server(job, two_servers, monkeypatch):
    assert run(argv(job, two_servers[0], "one.npz", "--operator", "ggn")) == 0
    puts, calls = spy(monkeypatch, "put"), spy(monkeypatch, "spectrum")
    both = argv(job, two_servers, "two.npz", "--operator", "ggn", "--concurrency", "2")
    assert run(both) == 0
    assert_results_equal(load(job / "two.npz"), load(job / "one.npz"))
    # The data set (x and y) went to each server once; the chunks went to both.
    assert sorted(puts) == sorted(two_servers * 2)
    assert len(calls) == NUM_POINTS // CHUNK and set(calls) == set(two_servers)


def test_a_figure_names_the_operator(job, server_address):
    args = argv(job, server_address, "out.npz", "--operator", "ggn", "--method", "lanczos")
    assert run([*args, "--k", "2", "--plot", job / "ggn.png"]) == 0
    assert (job / "ggn.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    result = load(job / "out.npz")
    figure = _report.spectrum_figure(result, "lanczos", "0" * 64, "ggn")
    assert figure.axes[0].get_xlabel().startswith("GGN eigenvalue λ")
    assert "of the GGN" in figure.texts[0].get_text()


# ----------------------------------------------------------------------------------- resume


def test_interrupted_job_over_data_resumes(job, two_servers, monkeypatch, capsys):
    both = [*argv(job, two_servers, "out.npz", "--operator", "ggn"), "--concurrency", "2"]
    assert run(argv(job, two_servers[0], "reference.npz", "--operator", "ggn")) == 0
    # One server at a time, so that exactly the chunks before the third call are saved.
    interrupt_at(monkeypatch, 3)
    assert run(argv(job, two_servers[0], "out.npz", "--operator", "ggn")) == 130
    assert "interrupted after 4 of 8 points" in capsys.readouterr().err
    parts = job / "out.npz.parts"
    manifest = json.loads((parts / "manifest.json").read_text())
    assert manifest["options"]["operator"] == "ggn"
    assert manifest["options"]["loss"] == "softmax_cross_entropy"
    assert len(manifest["data_sha256"]) == 64

    calls = interrupt_at(monkeypatch, 0)
    assert run(both) == 0  # resumed on both servers at once
    assert len(calls) == 2
    assert_results_equal(load(job / "out.npz"), load(job / "reference.npz"))
    assert "(4 computed now, 4 resumed from an earlier run)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "change, difference",
    [
        ("data", "data_sha256: '"),
        ("operator", "--operator: 'ggn' there, 'hessian' now"),
        ("reduction", "--reduction: 'mean' there, 'sum' now"),
    ],
)
def test_a_resume_with_other_data_or_operator_is_refused(
    job, server_address, monkeypatch, capsys, change, difference
):
    interrupt_at(monkeypatch, 2)
    assert run(argv(job, server_address, "out.npz", "--operator", "ggn")) == 130
    parts = job / "out.npz.parts"
    before = {p.name: p.read_bytes() for p in parts.iterdir()}
    capsys.readouterr()
    extra = ["--operator", "ggn"]
    if change == "data":
        np.savez(job / "data.npz", x=X[:-1], y=LABELS[:-1])
    elif change == "operator":
        extra = ["--operator", "hessian"]
    else:
        extra += ["--reduction", "sum"]
    calls = interrupt_at(monkeypatch, 0)
    assert run(argv(job, server_address, "out.npz", *extra)) == 2
    assert calls == []
    err = capsys.readouterr().err
    assert "holds the parts of a different job" in err and difference in err
    assert {p.name: p.read_bytes() for p in parts.iterdir()} == before


# ------------------------------------------------------------------------- refused inputs


def write_data(folder: Path, **arrays) -> None:
    (folder / "data.npz").unlink()
    np.savez(folder / "data.npz", **arrays)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"y": LABELS}, "holds no input of the function: give one (N, ...) array per"),
        ({"x": X}, "has no array 'y' of targets for --loss; it holds ['x']"),
        ({"x": X, "y": LABELS, "z": X}, "holds ['z'], which are not inputs of the function"),
        ({"x": X[:, :2], "y": LABELS}, "input 'x' has shape (40, 2); expected (N, 3)"),
        ({"x": X, "y": LABELS[:-1]}, "different numbers of examples: x 40, y 39"),
        ({"x": X[:0], "y": LABELS[:0]}, "holds no examples (N = 0)"),
        ({"x": X, "y": np.int64(3)}, "'y' is a scalar; every array needs a leading"),
        (
            {"x": X, "y": LABELS, "w": CHECKPOINTS[:1].repeat(N, 0)},
            "holds every input of the function (['w', 'x'])",
        ),
    ],
)
def test_a_data_file_without_what_the_function_needs(job, server_address, capsys, data, message):
    write_data(job, **data)
    assert run(argv(job, server_address)) == 2
    err = capsys.readouterr().err
    assert err.startswith("hessd spectrum: data file ") and message in err


def test_missing_and_misnamed_data_files(job, server_address, capsys):
    args = argv(job, server_address)
    missing = [str(job / "absent.npz") if a == job / "data.npz" else a for a in args]
    assert run(missing) == 2
    assert f"cannot load data file {job / 'absent.npz'}" in capsys.readouterr().err
    np.save(job / "data.npy", X)
    npy = [str(job / "data.npy") if a == job / "data.npz" else a for a in args]
    assert run(npy) == 2
    assert "data.npy: name a .npz file with one (N, ...) array" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--operator", "fisher"], "--operator fisher needs the model and its loss given apart"),
        (["--operator", "empirical_fisher", "--mc-samples", "3"], "--mc-samples applies to"),
        (["--target", "labels"], "--target names the targets of --loss; give --loss too"),
    ],
)
def test_objective_flags_that_cannot_apply(job, server_address, capsys, extra, message):
    args = argv(job, server_address)
    loss = args.index("--loss")
    del args[loss : loss + 2]
    assert run([*args, *extra]) == 2
    assert message in capsys.readouterr().err


def test_objective_flags_without_data(job, server_address, capsys):
    args = argv(job, server_address)
    data = args.index("--data")
    del args[data : data + 2]
    assert run([*args, "--operator", "ggn"]) == 2
    err = capsys.readouterr().err
    assert "--operator, --loss apply to an objective over a data set: give --data NPZ" in err


def test_fewer_requests_in_flight_than_servers_is_refused(job, two_servers, capsys):
    assert run(argv(job, two_servers, "out.npz", "--concurrency", "1")) == 2
    err = capsys.readouterr().err
    assert "--concurrency 1 is less than the 2 --address servers" in err


def test_the_servers_refusal_of_the_data_is_printed(job, server_address, capsys):
    write_data(job, x=X, y=LABELS + C)  # labels out of range
    assert run(argv(job, server_address)) == 2
    err = capsys.readouterr().err
    assert err.startswith("hessd spectrum: ") and "label" in err
    assert not (job / "out.npz").exists()
