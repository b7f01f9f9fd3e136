"""What dynamic batching buys: throughput and latency of single-point requests by delay.

In one process (no gRPC), `concurrency` threads each issue single-point gradient requests
of sum(tanh(A @ x)**2) back to back, straight into Batcher.run on an in-process Engine, for
`--seconds` per cell, at every max_delay_s (0 = batching off). Prints, per n:

    concurrency  delay_us  req/s  p50 ms  p95 ms  points/batch

and first the engine's own cost per call by batch size, which sets max_size: past the
size where the per-point cost stops falling, larger batches only add latency.

    python benchmarks/batching.py [--seconds 0.8] [--out benchmarks/results/batching-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import threading
import time

import jax
import numpy as np

from hessd.proto import codec
from hessd.proto.v1 import hessd_pb2
from hessd.service import kinds
from hessd.service.batcher import Batcher
from hessd.service.engine import Engine
from hessd.service.program import Program, build_program
from hessd.service.server import enable_x64

EXPRESSION = "sum(tanh(A @ x)**2)"
SIZES = (8, 256)
CONCURRENCY = (1, 8, 32, 64)
DELAYS_S = (0.0, 0.0002, 0.0005, 0.001, 0.002)
ENGINE_BATCHES = (1, 4, 16, 64, 256)
MAX_SIZE = 64


def gradient_program(n: int, rng: np.random.Generator) -> tuple[Program, kinds.Request]:
    a = (rng.normal(size=(n, n)) / np.sqrt(n)).astype(np.float32)
    spec = hessd_pb2.FunctionSpec(
        expression=hessd_pb2.Expression(source=EXPRESSION),
        inputs=[hessd_pb2.InputSpec(name="x", shape=[n], dtype=hessd_pb2.FLOAT32)],
        constants=[hessd_pb2.NamedTensor(name="A", tensor=codec.encode(a))],
    )
    program = build_program(spec)
    return program, kinds.make_request(program, kinds.Kind.GRADIENT)


def engine_cost(
    engine: Engine,
    program: Program,
    request: kinds.Request,
    n: int,
    rng: np.random.Generator,
    repeats: int = 50,
) -> list[dict]:
    """Median time of one engine.run by batch size (executables already compiled)."""
    rows = []
    for batch in ENGINE_BATCHES:
        x = rng.normal(size=(batch, n)).astype(np.float32)
        engine.run(program, request, [x])
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            engine.run(program, request, [x])
            times.append(time.perf_counter() - start)
        ms = 1e3 * statistics.median(times)
        rows.append({"n": n, "batch": batch, "call_ms": ms, "us_per_point": 1e3 * ms / batch})
    return rows


def load(
    batcher: Batcher,
    program: Program,
    request: kinds.Request,
    n: int,
    concurrency: int,
    seconds: float,
    rng: np.random.Generator,
) -> dict:
    """`concurrency` threads issuing one-point requests for `seconds`; latencies in s."""
    points = rng.normal(size=(concurrency, 64, 1, n)).astype(np.float32)
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    start_line = threading.Barrier(concurrency + 1)

    def client(i: int) -> None:
        mine = latencies[i]
        start_line.wait()
        stop = time.perf_counter() + seconds
        k = 0
        while (now := time.perf_counter()) < stop:
            batcher.run(program, request, [points[i, k % 64]])
            mine.append(time.perf_counter() - now)
            k += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    before = (batcher.stats.batches, batcher.stats.points)
    start_line.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    every = sorted(x for mine in latencies for x in mine)
    batches = batcher.stats.batches - before[0]
    return {
        "requests_per_s": len(every) / elapsed,
        "p50_ms": 1e3 * every[len(every) // 2],
        "p95_ms": 1e3 * every[int(len(every) * 0.95)],
        "points_per_batch": (batcher.stats.points - before[1]) / max(batches, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.8, help="length of each cell")
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    enable_x64()  # as the server runs the engine
    backend = jax.default_backend()
    out = args.out or pathlib.Path(__file__).parent / "results" / f"batching-{backend}.json"
    rng = np.random.default_rng(0)
    engine = Engine()
    costs, cells = [], []
    for n in SIZES:
        program, request = gradient_program(n, rng)
        # Compile every bucket a batch of up to MAX_SIZE points can use, outside the timing.
        for bucket in (1, 2, 4, 8, 16, 32, 64):
            engine.run(program, request, [np.zeros((bucket, n), np.float32)])
        costs += engine_cost(engine, program, request, n, rng)
        for concurrency in CONCURRENCY:
            for delay in DELAYS_S:
                batcher = Batcher(engine, max_size=MAX_SIZE, max_delay_s=delay, max_queue=1 << 16)
                cell = load(batcher, program, request, n, concurrency, args.seconds, rng)
                cells.append({"n": n, "concurrency": concurrency, "delay_us": 1e6 * delay, **cell})
                print(
                    f"n={n:<4} c={concurrency:<3} delay={1e6 * delay:>5.0f} us "
                    f"{cell['requests_per_s']:>8.0f} req/s  p50 {cell['p50_ms']:.2f} ms  "
                    f"p95 {cell['p95_ms']:.2f} ms  {cell['points_per_batch']:.1f} points/batch",
                    flush=True,
                )

    print(f"\nbackend {backend}, {os.cpu_count()} CPUs; engine.run by batch size (median)")
    print(f"{'n':>4}{'batch':>7}{'call ms':>10}{'us/point':>10}")
    for r in costs:
        print(f"{r['n']:>4}{r['batch']:>7}{r['call_ms']:>10.3f}{r['us_per_point']:>10.2f}")
    print(f"\none-point gradient requests, {args.seconds} s per cell, max_size {MAX_SIZE}")
    print(
        f"{'n':>4}{'conc':>6}{'delay us':>10}{'req/s':>9}{'p50 ms':>8}{'p95 ms':>8}"
        f"{'pts/batch':>11}"
    )
    for c in cells:
        print(
            f"{c['n']:>4}{c['concurrency']:>6}{c['delay_us']:>10.0f}{c['requests_per_s']:>9.0f}"
            f"{c['p50_ms']:>8.2f}{c['p95_ms']:>8.2f}{c['points_per_batch']:>11.1f}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "backend": backend,
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "seconds_per_cell": args.seconds,
        "max_size": MAX_SIZE,
    }
    out.write_text(json.dumps({"meta": meta, "engine": costs, "cells": cells}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
