"""What the Open Inference Protocol costs beside hessd.v1: the same calls both ways.

One `hessd serve` subprocess on loopback; two workloads registered under names (a
one-point gradient, n=10: per-call overhead; a Hessian, n=64 at batch 32, 512 KiB of
float32 out: bytes); each driven, warmed up first, by

  hessd.v1      hessd's own Client (Client.compute)
  oip           a bare gRPC stub of inference.GRPCInferenceService/ModelInfer over hessd's
                proto/oip messages, raw_input_contents / raw_output_contents
  tritonclient  tritonclient.grpc's InferenceServerClient.infer (when importable: it
                needs protobuf <7, so run this script in test_compat's overlay, below)

at concurrency 1 (sequential calls, median latency) and 64 (64 threads, each with its own
client, calls in flight for --seconds: calls/s and median latency). Results are checked
equal across protocols before timing. Prints a table, writes JSON.

    PYTHONPATH=build/compat/tritonclient .venv/bin/python benchmarks/oip.py \\
        [--seconds 5] [--repeats 200] [--out benchmarks/results/oip-cpu.json]

(build/compat/tritonclient is made by `pytest tests/test_compat.py`.)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import importlib.metadata
import os
import pathlib
import platform
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np

from hessd.client import Client
from hessd.proto.oip import grpc_predict_v2_pb2 as oip_pb2

from _servers import start_server
from _timing import timed, write_json

try:
    import tritonclient.grpc as tritonclient_grpc
except ImportError:  # protobuf 7 here: see the docstring
    tritonclient_grpc = None

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
DATATYPES = {np.dtype("float32"): "FP32", np.dtype("float64"): "FP64"}
WORKLOADS: dict[str, dict[str, Any]] = {
    "gradient n=10 b=1": dict(
        expr="sum(tanh(x) ** 2)", n=10, batch=1, kind="gradient", name="bench-gradient"
    ),
    "hessian n=64 b=32": dict(
        expr="sum(tanh(x) ** 2)", n=64, batch=32, kind="hessian", name="bench-hessian"
    ),
}

Call = Callable[[], np.ndarray]


def hessd_v1(address: str, f: Any, kind: str, x: np.ndarray) -> tuple[Call, Callable[[], None]]:
    client = Client(address, timeout=60.0)
    return (lambda: client.compute(f, kind, x)), client.close


def oip_stub(address: str, name: str, kind: str, x: np.ndarray) -> tuple[Call, Callable[[], None]]:
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 1 << 30)])
    infer = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=oip_pb2.ModelInferRequest.SerializeToString,
        response_deserializer=oip_pb2.ModelInferResponse.FromString,
    )

    def call() -> np.ndarray:
        request = oip_pb2.ModelInferRequest(model_name=name, model_version=kind)
        request.inputs.add(name="x", datatype=DATATYPES[x.dtype], shape=x.shape)
        request.raw_input_contents.append(x.tobytes())
        response = infer(request, timeout=60.0)
        (out,) = response.outputs
        dtype = {v: k for k, v in DATATYPES.items()}[out.datatype]
        data = response.raw_output_contents[0]
        return np.frombuffer(data, dtype).reshape(tuple(out.shape))

    return call, channel.close


def triton(address: str, name: str, kind: str, x: np.ndarray) -> tuple[Call, Callable[[], None]]:
    assert tritonclient_grpc is not None
    client = tritonclient_grpc.InferenceServerClient(url=address)
    item = tritonclient_grpc.InferInput("x", list(x.shape), DATATYPES[x.dtype])
    item.set_data_from_numpy(x)

    def call() -> np.ndarray:
        result = client.infer(name, [item], model_version=kind, client_timeout=60.0)
        return result.as_numpy(kind)

    return call, client.close


def concurrent_rate(make: Callable[[], tuple[Call, Callable[[], None]]], threads: int,
                    seconds: float) -> dict[str, float]:  # fmt: skip
    """`threads` threads, each with its own client, calling for `seconds`."""
    clients = [make() for _ in range(threads)]
    for call, _ in clients:
        call()  # connected and warm
    latencies: list[list[float]] = [[] for _ in clients]
    stop = threading.Event()

    def loop(index: int) -> None:
        call = clients[index][0]
        while not stop.is_set():
            start = time.perf_counter()
            call()
            latencies[index].append(time.perf_counter() - start)

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        running = [pool.submit(loop, i) for i in range(threads)]
        time.sleep(seconds)
        stop.set()
        for r in running:
            r.result()
        elapsed = time.perf_counter() - start
    for _, close in clients:
        close()
    every = [t for per in latencies for t in per]
    return {"calls_per_s": len(every) / elapsed, "median_ms": 1e3 * statistics.median(every)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per concurrency-64 run")
    parser.add_argument("--repeats", type=int, default=200, help="sequential calls timed")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "oip-cpu.json")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    proc, address, _ = start_server("--workers", "16")
    rows = []
    try:
        with Client(address, timeout=60.0) as c:
            functions = {
                label: c.register(w["expr"], inputs={"x": (w["n"],)}, name=w["name"])
                for label, w in WORKLOADS.items()
            }
        rng = np.random.default_rng(0)
        for label, w in WORKLOADS.items():
            x = rng.normal(size=(w["batch"], w["n"])).astype(np.float32)
            makers: dict[str, Callable[[], tuple[Call, Callable[[], None]]]] = {
                "hessd.v1": functools.partial(hessd_v1, address, functions[label], w["kind"], x),
                "oip": functools.partial(oip_stub, address, w["name"], w["kind"], x),
            }
            if tritonclient_grpc is not None:
                makers["tritonclient"] = functools.partial(triton, address, w["name"], w["kind"], x)
            reference = None
            for protocol, make in makers.items():
                call, close = make()
                result = timed(call, args.repeats)
                close()
                if reference is None:
                    reference = result.result
                np.testing.assert_array_equal(result.result, reference)
                many = concurrent_rate(make, 64, args.seconds)
                rows.append({
                    "workload": label, "protocol": protocol,
                    "c1_median_ms": 1e3 * result.median,
                    "c64_calls_per_s": many["calls_per_s"], "c64_median_ms": many["median_ms"],
                })  # fmt: skip
                print_row(rows[-1])
    finally:
        proc.terminate()
        proc.wait(30)
    write_json(args.out, {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_before": load_before, "load_after": os.getloadavg()[0]},
        "versions": {p: _version(p) for p in ("hessd", "grpcio", "protobuf", "tritonclient")},
        "seconds": args.seconds, "repeats": args.repeats, "rows": rows,
    })  # fmt: skip
    print(f"wrote {args.out}")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


_printed_header = False


def print_row(row: dict[str, Any]) -> None:
    global _printed_header
    if not _printed_header:
        print(f"{'workload':<20}{'protocol':<14}{'c=1 median ms':>15}{'c=64 calls/s':>14}"
              f"{'c=64 median ms':>16}")  # fmt: skip
        _printed_header = True
    print(f"{row['workload']:<20}{row['protocol']:<14}{row['c1_median_ms']:>15.2f}"
          f"{row['c64_calls_per_s']:>14.0f}{row['c64_median_ms']:>16.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
