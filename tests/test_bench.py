"""`hessd bench`, the load generator, against the in-process server.

Windows are 0.2 s and levels few, so the whole file takes seconds; nothing here asserts on
speed, only on the shape and consistency of what is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import json
import signal
import socket
import subprocess
import sys

import certs
import numpy as np
import pytest

from hessd.client import AsyncClient, ResourceExhausted, Unavailable
from hessd.service.config import ServerConfig
from hessd.service.server import create_server
from hessd.tools import bench
from hessd.tools.bench import _command, _load

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOKEN = "bench-token-0123456789"
SHORT = ["--window-seconds", "0.2", "--max-windows", "4"]
SCALAR = [
    "--expression",
    "sum(tanh(A @ x)**2)",
    "--inputs",
    "x=8",
    "--constant",
    "A=random:8x8",
]


def parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hessd bench")
    bench.add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def run(argv) -> int:
    return bench.main(parse(argv))


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def check_row(row: dict, batch: int) -> None:
    """What holds for every measured row, whatever the speed."""
    assert row["points_per_s"] == pytest.approx(row["requests_per_s"] * batch)
    assert row["requests_per_s"] == pytest.approx(row["completed"] / row["seconds"])
    latencies = [row[f"p{p}_ms"] for p in (50, 90, 95, 99)]
    assert 0 < latencies[0] <= latencies[1] <= latencies[2] <= latencies[3]
    assert 3 <= row["windows"] <= 4
    assert row["status"] in ("stable", "unstable")
    assert row["status"] == "stable" or row["windows"] == 4
    assert len(row["window_stats"]) == row["windows"]


# ------------------------------------------------------------------------------ the sweeps


def test_concurrency_sweep_prints_and_writes_one_row_per_level(server_address, tmp_path, capsys):
    out = tmp_path / "sub" / "bench"
    argv = [*SCALAR, "--address", server_address, "--batch", 3, "--concurrency", "1,4"]
    assert run([*argv, *SHORT, "--out", out]) == 0
    printed = capsys.readouterr()
    table = printed.out.splitlines()
    assert table[0].split()[:3] == ["concurrency", "req/s", "points/s"]
    assert [line.split()[0] for line in table[1:3]] == ["1", "4"]
    assert "concurrency 4:" in printed.err  # a progress line per level

    columns, csv_rows = read_csv(out.with_suffix(".csv"))
    assert tuple(columns) == bench.COLUMNS
    assert [r["concurrency"] for r in csv_rows] == ["1", "4"]
    assert {r["mode"] for r in csv_rows} == {"concurrency"}
    assert {r["request_rate"] for r in csv_rows} == {""}

    document = json.loads(out.with_suffix(".json").read_text())
    rows = document["rows"]
    assert [r["concurrency"] for r in rows] == [1, 4]
    for row, csv_row in zip(rows, csv_rows, strict=True):
        check_row(row, batch=3)
        assert row["errors"] == 0 and row["errors_by_code"] == {}
        assert row["in_flight_max"] <= row["concurrency"]
        assert float(csv_row["requests_per_s"]) == pytest.approx(row["requests_per_s"])
    metadata = document["metadata"]
    assert metadata["args"]["concurrency"] == [1, 4]
    assert metadata["server_info"]["backend"] == "cpu"
    assert metadata["client"]["cpu_count"] >= 1
    # --event-loop auto: uvloop's where it is installed.
    uvloop = importlib.util.find_spec("uvloop") is not None
    assert metadata["client"]["event_loop"] == ("uvloop" if uvloop else "asyncio")
    assert metadata["function"]["output_shape"] == []
    assert metadata["function"]["constants"] == {"A": "random:8x8"}
    assert metadata["outcome"] == "finished"
    assert metadata["started_at"] <= metadata["finished_at"]


@pytest.mark.parametrize("arrivals", ["poisson", "constant"])
def test_request_rate_mode_reports_what_was_sent_and_in_flight(
    server_address, tmp_path, capsys, arrivals
):
    out = tmp_path / "bench"
    argv = [*SCALAR, "--address", server_address, "--request-rate", "50,100"]
    assert run([*argv, "--arrivals", arrivals, *SHORT, "--out", out]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["rate/s", "req/s"]
    assert "sent/s" in table[0] and "in-flight max" in table[0]
    document = json.loads(out.with_suffix(".json").read_text())
    rows = document["rows"]
    assert [(r["mode"], r["request_rate"], r["concurrency"]) for r in rows] == [
        ("request_rate", 50.0, None),
        ("request_rate", 100.0, None),
    ]
    for row in rows:
        check_row(row, batch=1)
        assert row["sent_per_s"] > 0
        assert row["in_flight_max"] >= 1
        assert 1 <= row["in_flight_mean"] <= row["in_flight_max"]
    assert document["metadata"]["args"]["arrivals"] == arrivals


def test_event_loop_asyncio_on_request(server_address, tmp_path):
    out = tmp_path / "bench"
    argv = [*SCALAR, "--address", server_address, "--concurrency", "2", "--event-loop", "asyncio"]
    assert run([*argv, *SHORT, "--out", out]) == 0
    document = json.loads(out.with_suffix(".json").read_text())
    assert document["metadata"]["client"]["event_loop"] == "asyncio"
    assert document["rows"][0]["errors"] == 0


def test_event_loop_uvloop_without_uvloop_exits_2(server_address, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    argv = [*SCALAR, "--address", server_address, "--event-loop", "uvloop"]
    assert run([*argv, *SHORT, "--out", tmp_path / "bench"]) == 2
    assert "--event-loop uvloop: uvloop is not installed" in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


def test_plot_writes_two_pngs(server_address, tmp_path):
    out = tmp_path / "bench"
    argv = [*SCALAR, "--address", server_address, "--concurrency", "1,2", *SHORT]
    assert run([*argv, "--out", out, "--plot"]) == 0
    for suffix in ("-throughput.png", "-latency.png"):
        path = tmp_path / f"bench{suffix}"
        assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_function_file_and_a_vector_kind(server_address, tmp_path):
    np.save(tmp_path / "A.npy", np.eye(4, dtype=np.float64))
    spec = tmp_path / "f.json"
    spec.write_text(
        json.dumps(
            {
                "expression": "0.5 * x @ A @ x + sum(w * x)",
                "inputs": {"x": [4], "w": [4]},
                "constants": {"A": "A.npy"},
                "dtype": "float64",
            }
        )
    )
    out = tmp_path / "bench"
    argv = ["--function", spec, "--address", server_address, "--kind", "hvp", "--wrt", "w"]
    assert run([*argv, "--batch", 2, "--concurrency", "2", *SHORT, "--out", out]) == 0
    document = json.loads(out.with_suffix(".json").read_text())
    assert document["metadata"]["function"]["inputs"] == {"x": [4], "w": [4]}
    assert document["metadata"]["function"]["dtype"] == "float64"
    (row,) = document["rows"]
    check_row(row, batch=2)


def test_failed_requests_are_errors_not_latency(server_address, tmp_path, monkeypatch):
    compute = AsyncClient.compute
    calls = 0

    async def every_third_refused(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls > 1 and calls % 3 == 0:  # the first call (before the sweep) succeeds
            raise ResourceExhausted("refused by the test")
        return await compute(self, *args, **kwargs)

    monkeypatch.setattr(AsyncClient, "compute", every_third_refused)
    out = tmp_path / "bench"
    argv = [*SCALAR, "--address", server_address, "--concurrency", "2", *SHORT]
    assert run([*argv, "--out", out]) == 0
    (row,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert set(row["errors_by_code"]) == {"RESOURCE_EXHAUSTED"}
    assert row["errors"] == row["errors_by_code"]["RESOURCE_EXHAUSTED"] > 0
    # Two successes per failure, give or take the windows' edges.
    assert row["completed"] / row["errors"] == pytest.approx(2, rel=0.25)
    check_row(row, batch=1)
    _, (csv_row,) = read_csv(out.with_suffix(".csv"))
    assert csv_row["errors_by_code"] == f"RESOURCE_EXHAUSTED={row['errors']}"


@contextlib.contextmanager
def serving(**config):
    """The address of a server of its own, with `config` (tokens, TLS)."""
    server, port = create_server(ServerConfig(host="127.0.0.1", port=0, **config))
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def tokens_file(tmp_path):
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tokens": [{"name": "bench", "token": TOKEN}]}))
    return str(tokens)


def test_token_from_the_flag_or_the_environment(tmp_path, monkeypatch, capsys):
    """--token (or $HESSD_TOKEN) goes with every call; the results never hold it."""
    with serving(tokens_file=tokens_file(tmp_path)) as address:
        argv = [*SCALAR, "--address", address, "--concurrency", "1", *SHORT]
        assert run([*argv, "--out", tmp_path / "none"]) == 2
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        assert run([*argv, "--out", tmp_path / "wrong", "--token", "x" * len(TOKEN)]) == 2
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        out = tmp_path / "bench"
        assert run([*argv, "--out", out, "--token", TOKEN]) == 0
        monkeypatch.setenv("HESSD_TOKEN", TOKEN)
        assert run([*argv, "--out", tmp_path / "from-env"]) == 0
    text = out.with_suffix(".json").read_text()
    assert TOKEN not in text
    assert json.loads(text)["metadata"]["args"]["token"] == "(given)"
    (row,) = json.loads(text)["rows"]
    check_row(row, batch=1)
    assert row["errors"] == 0


def test_tls_and_mutual_tls(tmp_path, capsys):
    """--tls-ca reaches a TLS server; --tls-cert and --tls-key add the client certificate
    a server with --tls-client-ca requires (here beside a token, as in production). Without
    them no call gets through: exit 1, nothing measured. The results name the files given,
    never what they hold."""
    pki = certs.make_pki()
    for name, pem in pki.items():
        (tmp_path / f"{name}.pem").write_bytes(pem)
    server_tls = {"tls_cert": str(tmp_path / "server_cert.pem")}
    server_tls["tls_key"] = str(tmp_path / "server_key.pem")
    ca = ["--tls-ca", tmp_path / "ca.pem"]
    client = ["--tls-cert", tmp_path / "client_cert.pem", "--tls-key", tmp_path / "client_key.pem"]
    argv = [*SCALAR, "--concurrency", "1", *SHORT, "--connect-timeout", "1"]

    with serving(**server_tls) as address:
        assert run([*argv, "--address", address, *ca, "--out", tmp_path / "tls"]) == 0
        assert run([*argv, "--address", address, "--out", tmp_path / "plain"]) == 1
    mutual = {**server_tls, "tls_client_ca": str(tmp_path / "ca.pem")}
    with serving(**mutual, tokens_file=tokens_file(tmp_path)) as address:
        argv += ["--address", address, "--token", TOKEN]
        out = tmp_path / "mutual"
        assert run([*argv, *ca, *client, "--out", out]) == 0
        assert run([*argv, *ca, "--out", tmp_path / "no-client-cert"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "hessd bench:" in line]
    assert len(err) == 2 and all("no hessd server answered" in line for line in err), err
    assert err[0].endswith("a server with TLS answers only with --tls or --tls-ca")
    assert err[1].endswith("answers only with --tls-cert and --tls-key")
    assert not (tmp_path / "plain.json").exists()
    assert not (tmp_path / "no-client-cert.json").exists()

    for path in (tmp_path / "tls.json", out.with_suffix(".json")):
        (row,) = json.loads(path.read_text())["rows"]
        check_row(row, batch=1)
        assert row["errors"] == 0
    text = out.with_suffix(".json").read_text()
    for secret in (TOKEN, pki["client_key"].decode(), pki["client_cert"].decode()):
        assert secret not in text
    args = json.loads(text)["metadata"]["args"]
    assert args["tls_cert"] == str(tmp_path / "client_cert.pem")
    assert args["tls_key"] == str(tmp_path / "client_key.pem")


# ------------------------------------------------------------------------------ failures


def test_kind_the_function_does_not_take_exits_2_before_the_sweep(server_address, tmp_path, capsys):
    """The first request goes out before the sweep: gradient of a vector function is
    refused there, with the server's message, and nothing is measured or written."""
    out = tmp_path / "bench"
    argv = ["--expression", "tanh(A @ x)", "--inputs", "x=8", "--constant", "A=random:8x8"]
    assert run([*argv, "--address", server_address, *SHORT, "--out", out]) == 2
    printed = capsys.readouterr()
    assert "INVALID_ARGUMENT: gradient is only defined for scalar-output functions" in (printed.err)
    assert printed.out == ""
    assert not out.with_suffix(".csv").exists()


def test_bad_expression_exits_2(server_address, tmp_path, capsys):
    argv = ["--expression", "x.shape", "--inputs", "x=3", "--address", server_address]
    assert run([*argv, "--out", tmp_path / "bench"]) == 2
    assert "line 1, column 1: attribute access `x.shape` is not allowed" in capsys.readouterr().err


def test_unreachable_server_exits_1(tmp_path, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [*SCALAR, "--address", f"127.0.0.1:{port}", "--connect-timeout", "0.5"]
    assert run([*argv, "--out", tmp_path / "bench"]) == 1
    err = capsys.readouterr().err
    assert f"no hessd server answered at 127.0.0.1:{port} within --connect-timeout 0.5 s" in err
    assert not (tmp_path / "bench.csv").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--inputs", "x=3", "--wrt", "y"], "--wrt y: the function's inputs are ['x']"),
        (["--inputs", "x=3", "--mode", "forward"], "--mode applies to --kind jacobian"),
        (["--inputs", "x=3", "--order", "3"], "--order applies to --kind taylor"),
        (["--inputs", "x=3", "--arrivals", "constant"], "--arrivals applies to --request-rate"),
        (["--inputs", "x=3", "x=4"], "--inputs gives a name twice"),
        (["--inputs", "x=3", "--constant", "x=zeros:3"], "both as an input and as a constant"),
        (["--inputs", "x=3", "--constant", "A=zeros:3", "--constant", "A=zeros:4"], "twice"),
        (["--inputs", "x=3", "--constant", "A=missing.npy"], "cannot load it as a .npy array"),
        (["--inputs", "x=3", "--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
        (["--inputs", "x=3", "--tls-ca", "missing.pem"], "--tls-ca missing.pem: cannot read it"),
        ([], "--expression needs --inputs"),
    ],
)
def test_refused_flags_exit_2(server_address, tmp_path, capsys, argv, message):
    full = ["--expression", "sum(x**2)", *argv, "--address", server_address]
    assert run([*full, *SHORT, "--out", tmp_path / "bench"]) == 2
    assert message in capsys.readouterr().err


def test_function_file_excludes_expression_flags(tmp_path, capsys):
    spec = tmp_path / "f.json"
    spec.write_text(json.dumps({"expression": "sum(x**2)", "inputs": {"x": [3]}}))
    assert run(["--function", spec, "--inputs", "x=3", "--dtype", "float64"]) == 2
    assert "drop --inputs, --dtype" in capsys.readouterr().err
    spec.write_text("{")
    assert run(["--function", spec]) == 2
    assert "is not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--expression", "sum(x)", "--inputs", "x=abc"],
        ["--expression", "sum(x)", "--inputs", "x"],
        ["--expression", "sum(x)", "--inputs", "x=3", "--constant", "A=random:0x3"],
        ["--expression", "sum(x)", "--inputs", "x=3", "--concurrency", "1,0"],
        ["--expression", "sum(x)", "--inputs", "x=3", "--max-windows", "2"],
        ["--expression", "sum(x)", "--inputs", "x=3", "--concurrency", "1", "--request-rate", "5"],
        ["--inputs", "x=3"],  # neither --expression nor --function
    ],
)
def test_malformed_flags_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_server_going_away_mid_sweep_exits_1_with_what_was_measured(
    server_address, tmp_path, monkeypatch, capsys
):
    """A window in which every request failed with UNAVAILABLE ends the sweep. (A killed
    `hessd serve` answers so once its in-flight calls are dropped; simulated here.)"""
    compute = AsyncClient.compute
    gone = []

    async def unavailable_once_gone(self, *args, **kwargs):
        if gone:
            raise Unavailable("connection refused")
        return await compute(self, *args, **kwargs)

    is_stable = _load.is_stable

    def go_after_the_first_window(windows, tolerance):
        gone.append(True)
        return is_stable(windows, tolerance)

    monkeypatch.setattr(AsyncClient, "compute", unavailable_once_gone)
    monkeypatch.setattr(_load, "is_stable", go_after_the_first_window)
    out = tmp_path / "bench"
    argv = [*SCALAR, "--address", server_address, "--concurrency", "2,4", *SHORT]
    assert run([*argv, "--out", out]) == 1
    assert "failed with UNAVAILABLE: the server at" in capsys.readouterr().err
    document = json.loads(out.with_suffix(".json").read_text())
    assert document["metadata"]["outcome"] == "server unavailable"
    (row,) = document["rows"]
    assert row["status"] == "server unavailable"
    assert [w["completed"] > 0 for w in row["window_stats"]][:1] == [True]
    assert "UNAVAILABLE" in row["errors_by_code"]


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_ctrl_c_prints_what_was_measured_and_exits_130(server_address, tmp_path, sigint):
    """Also in a process started with SIGINT ignored (a background job, `nohup`, some CI
    runners): the command restores Ctrl-C itself."""
    out = tmp_path / "bench"
    code = (
        "import argparse, signal, sys\n"
        f"if {sigint == 'ignored'}:\n"
        "    signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "from hessd.tools import bench\n"
        "parser = argparse.ArgumentParser()\n"
        "bench.add_arguments(parser)\n"
        "sys.exit(bench.main(parser.parse_args(sys.argv[1:])))\n"
    )
    argv = [*SCALAR, "--address", server_address, "--concurrency", "1,2,4", "--out", out]
    argv += ["--window-seconds", "0.3", "--max-windows", "3"]
    process = subprocess.Popen(
        [sys.executable, "-c", code, *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Level 1 is done when its progress line appears (gRPC may log lines of its own
        # before); level 2 then runs for 0.9 s or more.
        for line in process.stderr:
            if line.startswith("concurrency 1:"):
                break
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "hessd bench: interrupted" in stderr
    assert "Traceback" not in stderr
    table = stdout.splitlines()
    assert table[1].split()[0] == "1"
    document = json.loads(out.with_suffix(".json").read_text())
    assert document["metadata"]["outcome"] == "interrupted"
    assert document["rows"][0]["status"] in ("stable", "unstable")
    assert all(r["status"] == "interrupted" for r in document["rows"][1:])


def test_ctrl_c_while_connecting_prints_one_line_and_exits_130(
    server_address, tmp_path, monkeypatch, capsys
):
    async def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(AsyncClient, "server_info", interrupted)
    argv = [*SCALAR, "--address", server_address, *SHORT, "--out", tmp_path / "bench"]
    assert run(argv) == 130
    printed = capsys.readouterr()
    assert printed.err == "hessd bench: interrupted before anything was measured\n"
    assert printed.out == ""
    assert not (tmp_path / "bench.json").exists()


def test_ctrl_c_while_plotting_keeps_the_results_and_exits_130(
    server_address, tmp_path, monkeypatch, capsys
):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(_command, "plot", interrupted)
    out = tmp_path / "bench"
    argv = [*SCALAR, "--address", server_address, "--concurrency", "1", *SHORT, "--plot"]
    assert run([*argv, "--out", out]) == 130
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("hessd bench: interrupted while writing the results; wrote ")
    assert json.loads(out.with_suffix(".json").read_text())["metadata"]["outcome"] == "finished"


def test_import_leaves_out_jax_matplotlib_and_the_server():
    code = (
        "import sys, hessd.tools.bench\n"
        "heavy = sorted(m for m in sys.modules\n"
        "               if m.split('.')[0] in ('jax', 'jaxlib', 'matplotlib')\n"
        "               or m.startswith('hessd.service'))\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------ pure parts


def window(requests_per_s: float, p95_ms: float | None, seconds: float = 1.0, errors=None):
    """A window of `requests_per_s` successes whose latencies have that p95."""
    count = 0 if p95_ms is None else round(requests_per_s * seconds)
    latencies = np.full(count, np.nan if p95_ms is None else p95_ms / 1e3)
    return bench.Window(seconds=seconds, latencies=latencies, errors=errors or {})


@pytest.mark.parametrize(
    "windows, stable",
    [
        ([window(100, 5.0)] * 3, True),
        ([window(100, 5.0)] * 2, False),  # fewer than 3 windows
        ([window(95, 5.0), window(100, 5.2), window(105, 4.8)], True),  # within 10% of the mean
        ([window(80, 5.0), window(100, 5.0), window(120, 5.0)], False),  # throughput varies
        ([window(100, 4.0), window(100, 5.0), window(100, 6.0)], False),  # p95 varies
        ([window(10, 50.0), window(100, 5.0), window(100, 5.0), window(100, 5.0)], True),
        ([window(100, 5.0)] * 3 + [window(50, 5.0)], False),  # only the last 3 count
        ([window(0, None, errors={"UNAVAILABLE": 5})] * 3, True),  # failing steadily
        ([window(0, None, errors={"UNAVAILABLE": 5}), *[window(100, 5.0)] * 2], False),
        ([window(0, None)] * 3, False),  # nothing finished: requests longer than a window
    ],
)
def test_is_stable(windows, stable):
    assert bench.is_stable(windows, 0.10) is stable


def test_is_stable_tolerance_is_relative_to_the_mean():
    windows = [window(90, 5.0), window(100, 5.0), window(110, 5.0)]  # ±10% of 100
    assert bench.is_stable(windows, 0.10)
    assert not bench.is_stable(windows, 0.05)


def test_summarize_reports_the_last_three_windows():
    rng = np.random.default_rng(0)
    windows = [
        bench.Window(1.0, rng.exponential(0.5, 10), {"UNAVAILABLE": 7}),  # left out
        *(bench.Window(0.5, rng.exponential(0.002, 400), {"CANCELLED": 1}) for _ in range(3)),
    ]
    row = bench.summarize(windows, batch=8, mode="concurrency", level=4, status="stable")
    assert row.concurrency == 4 and row.request_rate is None
    assert row.completed == 1200 and row.seconds == pytest.approx(1.5)
    assert row.requests_per_s == pytest.approx(800)
    assert row.points_per_s == pytest.approx(6400)
    assert row.errors_by_code == {"CANCELLED": 3} and row.errors == 3
    assert row.p50_ms <= row.p90_ms <= row.p95_ms <= row.p99_ms < 100
    assert row.windows == 4 and len(row.window_stats) == 4


def test_summarize_without_a_success_has_no_latency():
    windows = [bench.Window(0.5, np.zeros(0), {"DEADLINE_EXCEEDED": 4})] * 3
    row = bench.summarize(windows, batch=1, mode="request_rate", level=10.0, status="stable")
    assert row.requests_per_s == 0 and row.p50_ms is None and row.p99_ms is None
    assert row.errors == 12
    assert "DEADLINE_EXCEEDED=12" in bench.format_table([row], batch=1)
