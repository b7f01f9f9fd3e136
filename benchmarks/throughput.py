"""Throughput of hessd against in-process JAX and against the raw gRPC transport, in one run.

Each workload is measured three ways, interleaved round by round so that a noisy machine
disturbs them alike, each warmed up first (compiles excluded), median of --repeats rounds:

  service     Client.compute(f, kind, X) against a `hessd serve` subprocess on loopback
  in-process  np.asarray(jax.jit(jax.vmap(kind))(X)) in this process, same jax.numpy
              function, same dtype
  floor       a raw gRPC echo server in another subprocess (this file, --echo-server) that
              takes the very request bytes the client would send and answers as many bytes
              as hessd would, by the transport the client picks: one unary call up to the
              client's stream_threshold (1 MiB), above it a bidirectional stream of the
              same messages hessd's ComputeStream exchanges (a header, then ~1 MiB chunks).
              Raw bytes both ways, no protobuf, no compute: the cost of moving the bytes.
              It answers hessd's method names over a channel configured as the client's,
              so the same service config (retries) applies.

ratio = service / (in-process + floor); a service that only added its transport to JAX
would score 1. Also printed: the mean CPU time per call of this process and of the server
process (from /proc, in 10 ms clock ticks summed over the rounds: coarse for short calls).

The single-point gradient is also driven at concurrency 64 (AsyncClient, 64 calls in
flight, against 64 raw grpc.aio unary calls in flight for the floor). The Hessian and
Jacobian workloads are also timed in-process with PyTorch's torch.func, 2 threads, same
float32 data: vmap(hessian) and vmap(jacrev(jacrev)), vmap(jacrev). A method whose
warm-up call takes over 5 s (torch's vmap(hessian)) is timed in 2 rounds only.

`--phases` adds, per workload, the pieces of the service's path timed one by one in this
process (no gRPC): client encode, server parse / handler / serialize, engine.run, client
decode, and in-process compute and device-to-host copy apart.

    python benchmarks/throughput.py [--repeats 7] [--only hessian] [--phases]
        [--out benchmarks/results/throughput-cpu.json]

The machine should be quiet: the run waits (up to --max-wait seconds) for the 1-minute
load average to fall below --quiet-load, and records the load it ran under.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import functools
import importlib.metadata
import itertools
import json
import logging
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent import futures

import grpc
import jax
import jax.numpy as jnp
import numpy as np

from hessd.client import AsyncClient, Client, Function, _requests
from hessd.client._client import CHANNEL_OPTIONS
from hessd.proto import codec, stream
from hessd.proto.v1 import hessd_pb2
from hessd.service import kinds
from hessd.service.config import ServerConfig
from hessd.service.metrics import Metrics
from hessd.service.servicer import HessdServicer

from _server import start_server

# The echo server answers hessd's own method names, so that the client channel's service
# config (retry policy, with its per-call buffering) applies to the floor's calls as well.
ECHO_SERVICE = "hessd.v1.Hessd"
# (size, count) run-lengths of the response's message sizes, for the echo server.
SIZES_KEY = "x-response-sizes"
EXPRESSION = "sum(tanh(A @ x)**2)"
MAX_OUTPUT_BYTES = 1 << 30  # room for the 256 MiB Jacobian
SERVER_FLAGS = ("--max-output-bytes", str(MAX_OUTPUT_BYTES))  # the rest at their defaults
RATIO_TARGET = 1.25
THROUGHPUT_TARGET = 0.7
CONCURRENCY = 64
CALLS_PER_ROUND = 1280  # concurrency-64 rounds: 20 calls per coroutine
LATENCY_CALLS = 40  # single-point latency: calls per --repeats round
SLOW_SECONDS, SLOW_ROUNDS = 5.0, 2  # torch.func's vmap(hessian) takes ~15 s a call
MLP_SIZES = (784, 1024, 256, 10)
MLP_EXAMPLES = 64
WORKLOADS = (
    "gradient-latency",
    "gradient-c64",
    "gradient-large",
    "hessian",
    "hessian-packed",
    "jacobian",
    "mlp-hvp",
)


# --- the transport floor: a raw gRPC echo server --------------------------------------


def serve_echo(port: int, workers: int) -> None:
    """Answer raw bytes: each call receives every request message, then replies with
    messages of the sizes its `x-response-sizes` metadata lists (`size*count,...`).

    Prints `listening on HOST:PORT` on stderr once serving. Same server model as hessd's
    (grpc.server over a thread pool of `workers`), with no interceptor and no handler work.
    """

    @functools.cache
    def zeros(size: int) -> bytes:
        return bytes(size)

    def sizes(context) -> list[int]:
        runs = dict(context.invocation_metadata())[SIZES_KEY]
        return [
            int(size)
            for run in runs.split(",")
            for size, count in [run.split("*")]
            for _ in range(int(count))
        ]

    def unary(request: bytes, context) -> bytes:
        (size,) = sizes(context)
        return zeros(size)

    def bidirectional(request_iterator, context):
        for _ in request_iterator:
            pass
        for size in sizes(context):
            yield zeros(size)

    handler = grpc.method_handlers_generic_handler(
        ECHO_SERVICE,
        {
            "Compute": grpc.unary_unary_rpc_method_handler(unary),
            "ComputeStream": grpc.stream_stream_rpc_method_handler(bidirectional),
        },
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        handlers=[handler],
        options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)],
    )
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    server.wait_for_termination()


def start_echo_server() -> tuple[subprocess.Popen, str]:
    """This file's --echo-server on a free loopback port: (process, "host:port")."""
    args = [sys.executable, __file__, "--echo-server", "0"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("listening on "):
            return proc, line.split()[-1]
    raise RuntimeError("the echo server exited before listening:\n" + "".join(lines))


@dataclasses.dataclass(frozen=True)
class Wire:
    """What one Compute call moves: the serialized request messages the client sends (one
    for a unary call) and the sizes of the response messages the server sends back."""

    streamed: bool
    request: list[bytes]
    response: list[int]

    @property
    def bytes_in(self) -> int:
        return sum(len(m) for m in self.request)

    @property
    def bytes_out(self) -> int:
        return sum(self.response)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        runs = [f"{size}*{len(list(run))}" for size, run in itertools.groupby(self.response)]
        return ((SIZES_KEY, ",".join(runs)),)


def wire_of(f: Function, kind: str, points, options: dict, out_shape, threshold: int) -> Wire:
    """The messages Client.compute(f, kind, points, **options) exchanges with hessd: built
    by the client's own request code; the response from its shape (batch, *per point)."""

    call = _requests.compute_request(f, kind, points, **options)
    dtype = np.dtype(options.get("output_dtype") or f.dtype)
    response = hessd_pb2.ComputeResponse()
    response.output.dtype = codec.dtype_to_proto(dtype)
    response.output.shape[:] = out_shape
    nbytes = math.prod(out_shape) * dtype.itemsize
    if max(call.input_bytes, call.output_bytes) <= threshold:
        response.output.data = bytes(nbytes)
        return Wire(False, [call.filled().SerializeToString()], [response.ByteSize()])
    request = [
        m.SerializeToString() for m in stream.send("compute_request", call.request, call.arrays)
    ]
    sizes = [hessd_pb2.StreamMessage(compute_response=response).ByteSize()]
    for start in range(0, nbytes, stream.CHUNK_BYTES):
        sizes.append(_data_message_bytes(min(stream.CHUNK_BYTES, nbytes - start)))
    return Wire(True, request, sizes)


@functools.cache
def _data_message_bytes(size: int) -> int:

    return hessd_pb2.StreamMessage(data=bytes(size)).ByteSize()


class Floor:
    """Raw calls to the echo server over a channel configured as the client's."""

    def __init__(self, address: str):

        self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._unary = self._channel.unary_unary(f"/{ECHO_SERVICE}/Compute")
        self._stream = self._channel.stream_stream(f"/{ECHO_SERVICE}/ComputeStream")

    def call(self, wire: Wire) -> int:
        """One exchange of `wire`'s bytes; the number of bytes received."""
        if not wire.streamed:
            return len(self._unary(wire.request[0], metadata=wire.metadata, timeout=600))
        replies = self._stream(iter(wire.request), metadata=wire.metadata, timeout=600)
        return sum(len(m) for m in replies)

    def close(self) -> None:
        self._channel.close()


# --- timing -----------------------------------------------------------------------------


def warm_up(methods: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Call each method once (compiles, first transfers): seconds of each call."""
    seconds = {}
    for name, fn in methods.items():
        start = time.perf_counter()
        fn()
        seconds[name] = time.perf_counter() - start
    return seconds


def interleaved(
    methods: dict[str, Callable[[], object]],
    rounds: dict[str, int],
    servers: dict[str, int] | None = None,
) -> tuple[dict[str, list[float]], dict[str, dict[str, float]]]:
    """Seconds per call of each (warmed-up) method, in rounds that call every method still
    due once, in turn, so that a change in the machine's load falls on all of them; and
    the mean CPU ms per call of this process ("client_cpu_ms") and, for a method in
    `servers` (name -> pid), of its server process ("server_cpu_ms"), read outside the
    timed calls."""
    servers = servers or {}
    times: dict[str, list[float]] = {name: [] for name in methods}
    cpu = {name: collections.Counter() for name in methods}
    for i in range(max(rounds.values())):
        for name, fn in methods.items():
            if i < rounds[name]:
                pid = servers.get(name)
                client, server = cpu_seconds(), cpu_seconds(pid) if pid else 0.0
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
                cpu[name]["client_cpu_ms"] += 1e3 * (cpu_seconds() - client)
                if pid:
                    cpu[name]["server_cpu_ms"] += 1e3 * (cpu_seconds(pid) - server)
    means = {
        name: {key: total / rounds[name] for key, total in counter.items()}
        for name, counter in cpu.items()
    }
    return times, means


def median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def wait_for_quiet(threshold: float, max_wait: float) -> float:
    """Wait until the 1-minute load average is below `threshold` (at most `max_wait` s)."""
    deadline = time.monotonic() + max_wait
    load = os.getloadavg()[0]
    while load > threshold and time.monotonic() < deadline:
        print(f"load average {load:.2f} > {threshold}: waiting", file=sys.stderr, flush=True)
        time.sleep(min(15.0, max(deadline - time.monotonic(), 0.0)))
        load = os.getloadavg()[0]
    return load


# --- the workloads ------------------------------------------------------------------------


@dataclasses.dataclass
class Workload:
    """One Compute call, its in-process JAX twin and optionally its torch.func twin."""

    name: str
    label: str
    function: Function
    kind: str
    points: object  # array, or dict of arrays
    options: dict
    out_shape: tuple[int, ...]  # what travels: (batch, *per point)
    local: Callable[[], jax.Array]  # in-process JAX, result on the device
    torch: dict[str, Callable[[], object]] = dataclasses.field(default_factory=dict)
    large: bool = True

    def service(self, client) -> np.ndarray:
        return client.compute(self.function, self.kind, self.points, **self.options)


def tanh_square(n: int, rng: np.random.Generator):
    a = (rng.normal(size=(n, n)) / np.sqrt(n)).astype(np.float32)
    return a, lambda x: jnp.sum(jnp.tanh(a @ x) ** 2)


def gradient_workload(client, name, n, batch, large=True) -> Workload:
    rng = np.random.default_rng(0)
    a, f = tanh_square(n, rng)
    x = rng.normal(size=(batch, n)).astype(np.float32)
    fn = client.register(EXPRESSION, {"x": (n,)}, {"A": a})
    local = jax.jit(jax.vmap(jax.grad(f)))
    label = f"gradient n={n} batch={batch}"
    return Workload(name, label, fn, "gradient", x, {}, (batch, n), lambda: local(x), large=large)


def hessian_workload(client, name, n, batch, packed: bool) -> Workload:
    """The Hessian of sum(tanh(A x)²); packed: the upper triangle travels and the client
    unpacks it, so the in-process twin is the plain Hessian (the same result in hand)."""
    rng = np.random.default_rng(1)
    a, f = tanh_square(n, rng)
    x = rng.normal(size=(batch, n)).astype(np.float32)
    fn = client.register(EXPRESSION, {"x": (n,)}, {"A": a})
    local = jax.jit(jax.vmap(jax.hessian(f)))
    out_shape = (batch, n * (n + 1) // 2) if packed else (batch, n, n)
    options = {"packed": True} if packed else {}
    label = f"hessian n={n} batch={batch}" + (" packed" if packed else "")
    peers = {} if packed else torch_peers("hessian", a, x)
    return Workload(name, label, fn, "hessian", x, options, out_shape, lambda: local(x), peers)


def jacobian_workload(client, name, n, batch) -> Workload:
    rng = np.random.default_rng(2)
    a = (rng.normal(size=(n, n)) / np.sqrt(n)).astype(np.float32)
    x = rng.normal(size=(batch, n)).astype(np.float32)
    fn = client.register("tanh(A @ x)", {"x": (n,)}, {"A": a})
    local = jax.jit(jax.vmap(jax.jacrev(lambda x: jnp.tanh(a @ x))))
    label = f"jacobian n={n} batch={batch}"
    options = {"mode": "reverse"}
    return Workload(
        name,
        label,
        fn,
        "jacobian",
        x,
        options,
        (batch, n, n),
        lambda: local(x),
        torch_peers("jacobian", a, x),
    )


def mlp_layout(sizes=MLP_SIZES) -> dict[str, tuple[int, int, tuple[int, ...]]]:
    """name -> (start, stop, shape) of each weight and bias inside the flat vector w."""
    layout, start = {}, 0
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes), 1):
        for name, shape in ((f"W{i}", (fan_in, fan_out)), (f"b{i}", (fan_out,))):
            layout[name] = (start, start + math.prod(shape), shape)
            start += math.prod(shape)
    return layout


def mlp_expression(sizes=MLP_SIZES) -> str:
    """Mean softmax cross-entropy of a tanh MLP of the flat parameters w, on constants
    X (examples, d) and one-hot Y (examples, classes)."""
    lines = []
    for name, (start, stop, shape) in mlp_layout(sizes).items():
        piece = f"w[{start}:{stop}]"
        lines.append(
            f"{name} = reshape({piece}, {shape})" if len(shape) > 1 else f"{name} = {piece}"
        )
    layers = len(sizes) - 1
    h = "X"
    for i in range(1, layers):
        lines.append(f"h{i} = tanh({h} @ W{i} + b{i})")
        h = f"h{i}"
    lines.append(f"logits = {h} @ W{layers} + b{layers}")
    lines.append("mean(logsumexp(logits, axis=1) - sum(logits * Y, axis=1))")
    return "\n".join(lines)


def mlp_loss(w, x, y, sizes=MLP_SIZES):
    """mlp_expression in jax.numpy."""
    p = {name: w[a:b].reshape(shape) for name, (a, b, shape) in mlp_layout(sizes).items()}
    h = x
    layers = len(sizes) - 1
    for i in range(1, layers):
        h = jnp.tanh(h @ p[f"W{i}"] + p[f"b{i}"])
    logits = h @ p[f"W{layers}"] + p[f"b{layers}"]
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.sum(logits * y, axis=1))


def mlp_hvp_workload(client, name) -> Workload:
    """H v of a tanh MLP's loss on a fixed batch of examples, at one parameter vector."""
    rng = np.random.default_rng(3)
    d, classes = MLP_SIZES[0], MLP_SIZES[-1]
    x = rng.normal(size=(MLP_EXAMPLES, d)).astype(np.float32)
    y = np.eye(classes, dtype=np.float32)[rng.integers(classes, size=MLP_EXAMPLES)]
    layout = mlp_layout()
    p = max(stop for _, stop, _ in layout.values())
    w = np.zeros((1, p), np.float32)
    for start, stop, shape in layout.values():
        if len(shape) > 1:
            w[0, start:stop] = rng.normal(size=stop - start) / np.sqrt(shape[0])
    v = rng.normal(size=(1, p)).astype(np.float32)
    fn = client.register(mlp_expression(), {"w": (p,)}, {"X": x, "Y": y})

    def hvp(w, v):
        return jax.jvp(jax.grad(lambda w: mlp_loss(w, x, y)), (w,), (v,))[1]

    local = jax.jit(jax.vmap(hvp))
    label = f"hvp MLP {'-'.join(map(str, MLP_SIZES))} p={p} batch=1"
    return Workload(name, label, fn, "hvp", w, {"vector": v}, (1, p), lambda: local(w, v))


def torch_peers(kind: str, a: np.ndarray, x: np.ndarray) -> dict[str, Callable[[], object]]:
    """torch.func twins on the same float32 data, by formulation: for the Hessian
    vmap(hessian) (forward over reverse, as hessd and jax.hessian) and vmap(jacrev(jacrev))
    (faster in torch on the CPU); for the Jacobian vmap(jacrev). Empty without torch."""
    try:
        import torch
        from torch import func
    except ImportError:
        return {}
    torch.set_num_threads(2)
    a_t, x_t = torch.from_numpy(a), torch.from_numpy(x)
    if kind == "hessian":

        def f(x):
            return torch.sum(torch.tanh(a_t @ x) ** 2)

        formulations = {
            "vmap(hessian)": func.vmap(func.hessian(f)),
            "vmap(jacrev(jacrev))": func.vmap(func.jacrev(func.jacrev(f))),
        }
    else:
        formulations = {"vmap(jacrev)": func.vmap(func.jacrev(lambda x: torch.tanh(a_t @ x)))}
    return {name: functools.partial(fn, x_t) for name, fn in formulations.items()}


# --- measuring --------------------------------------------------------------------------


def check_close(name: str, got: np.ndarray, want: np.ndarray) -> float:
    """Max |got - want| / max |want|; warns above float32 rounding."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    error = float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))
    if not error < 1e-4:
        print(f"warning: {name} differs from in-process JAX by {error:.1e}", file=sys.stderr)
    return error


def measure(w: Workload, client, floor: Floor, servers: dict[str, int], rounds: int) -> dict:
    """Service, in-process, floor and torch times of one workload, interleaved.

    The warm-up calls also check the service's and torch's results against in-process
    JAX. A method whose warm-up took over SLOW_SECONDS runs SLOW_ROUNDS rounds at most.
    """
    wire = wire_of(w.function, w.kind, w.points, w.options, w.out_shape, client.stream_threshold)
    methods = {
        "in_process": lambda: np.asarray(w.local()),
        "service": lambda: w.service(client),
        "floor": lambda: floor.call(wire),
    }
    plain = None
    if w.options.get("packed"):
        plain_shape = (w.out_shape[0], *[math.isqrt(2 * w.out_shape[1])] * 2)
        plain = wire_of(w.function, w.kind, w.points, {}, plain_shape, client.stream_threshold)
        methods["floor_plain"] = lambda: floor.call(plain)
    for name, fn in w.torch.items():
        methods[f"torch {name}"] = fn
    warm, errors, reference = {}, {}, None
    for name, fn in methods.items():
        start = time.perf_counter()
        result = fn()
        warm[name] = time.perf_counter() - start
        if name == "in_process":
            reference = result
        elif not name.startswith("floor"):
            result = result.numpy() if name.startswith("torch") else result
            errors[name] = check_close(f"{w.label} ({name})", result, reference)
        del result
    del reference
    base = rounds if w.large else rounds * LATENCY_CALLS
    repeats = {n: base if s < SLOW_SECONDS else min(base, SLOW_ROUNDS) for n, s in warm.items()}
    load = os.getloadavg()[0]
    # The server process each method talks to, for its CPU time.
    pids = {
        name: servers["floor" if name.startswith("floor") else "service"]
        for name in methods
        if name == "service" or name.startswith("floor")
    }
    times, cpu = interleaved(methods, repeats, pids)
    row = {
        "name": w.name,
        "workload": w.label,
        "transport": "stream" if wire.streamed else "unary",
        "bytes_in": wire.bytes_in,
        "bytes_out": wire.bytes_out,
        "load_1min": load,
        "repeats": repeats,
        "max_rel_error": errors,
        **{f"{name}_ms": median_ms(t) for name, t in times.items()},
        "cpu_ms_per_call": cpu,
    }
    row["ratio"] = row["service_ms"] / (row["in_process_ms"] + row["floor_ms"])
    if plain is not None:
        row["plain_bytes_out"] = plain.bytes_out
        row["ratio_vs_plain_floor"] = row["service_ms"] / (
            row["in_process_ms"] + row["floor_plain_ms"]
        )
    row["target"] = verdict(row["ratio"], RATIO_TARGET, lower_is_better=True) if w.large else "-"
    if w.torch:
        fastest = min(row[f"torch {name}_ms"] for name in w.torch)
        row["service_over_fastest_torch"] = row["service_ms"] / fastest
    return row


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system, every thread) of process `pid`, or of this one; NaN where
    /proc cannot tell."""
    if pid is None:
        return time.process_time()
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def concurrent_rates(
    address: str, echo: str, pids: dict[str, int], w: Workload, wire: Wire, rounds: int
) -> dict[str, dict[str, list[float]]]:
    """Per method ("service": AsyncClient against hessd, "floor": raw grpc.aio unary calls
    against the echo server, pids[method] its server's process): requests/s and CPU µs per
    call of the client process and of the server process, with CONCURRENCY calls in flight,
    CALLS_PER_ROUND calls per round, rounds alternated."""

    async def closed_loop(call, server_pid: int) -> dict[str, float]:
        remaining = CALLS_PER_ROUND

        async def caller():
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await call()

        client_cpu, server_cpu = cpu_seconds(), cpu_seconds(server_pid)
        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(CONCURRENCY)))
        seconds = time.perf_counter() - start
        return {
            "per_s": CALLS_PER_ROUND / seconds,
            "client_cpu_us": 1e6 * (cpu_seconds() - client_cpu) / CALLS_PER_ROUND,
            "server_cpu_us": 1e6 * (cpu_seconds(server_pid) - server_cpu) / CALLS_PER_ROUND,
        }

    async with (
        AsyncClient(address, timeout=600) as client,
        grpc.aio.insecure_channel(echo, options=CHANNEL_OPTIONS) as channel,
    ):
        unary = channel.unary_unary(f"/{ECHO_SERVICE}/Compute")
        methods = {
            "service": lambda: client.compute(w.function, w.kind, w.points, **w.options),
            "floor": lambda: unary(wire.request[0], metadata=wire.metadata, timeout=600),
        }
        found = {name: collections.defaultdict(list) for name in methods}
        for name, call in methods.items():
            await closed_loop(call, pids[name])  # warm-up
        for _ in range(rounds):
            for name, call in methods.items():
                for key, value in (await closed_loop(call, pids[name])).items():
                    found[name][key].append(value)
    return found


def measure_concurrent(
    w: Workload, address: str, echo: str, pids: dict[str, int], threshold: int, rounds: int
) -> dict:
    wire = wire_of(w.function, w.kind, w.points, w.options, w.out_shape, threshold)
    load = os.getloadavg()[0]
    found = asyncio.run(concurrent_rates(address, echo, pids, w, wire, rounds))
    row = {
        "name": w.name,
        "workload": f"{w.label}, {CONCURRENCY} in flight",
        "transport": "unary",
        "bytes_in": wire.bytes_in,
        "bytes_out": wire.bytes_out,
        "load_1min": load,
        "repeats": rounds,
        "calls_per_round": CALLS_PER_ROUND,
        **{
            f"{name}_{key}": statistics.median(values)
            for name, measured in found.items()
            for key, values in measured.items()
        },
    }
    row["ratio"] = row["service_per_s"] / row["floor_per_s"]
    row["target"] = verdict(row["ratio"], THROUGHPUT_TARGET, lower_is_better=False)
    return row


def verdict(value: float, target: float, lower_is_better: bool) -> str:
    """ "meets", or by how much `value` misses `target` ("misses by 12%")."""
    if value <= target if lower_is_better else value >= target:
        return "meets"
    miss = value / target - 1 if lower_is_better else 1 - value / target
    return f"misses by {100 * miss:.0f}%"


# --- phases: the service's path, piece by piece, in this process --------------------------


class _Context:
    """What HessdServicer asks of a grpc.ServicerContext, to run it without gRPC."""

    def is_active(self) -> bool:
        return True

    def invocation_metadata(self):
        return ()

    def abort(self, code, message):
        raise RuntimeError(f"{code.name}: {message}")


def phases(
    w: Workload, servicer: HessdServicer, threshold: int, rounds: int, floor_ms: float
) -> dict:
    """Median ms of each piece of one Compute of `w`, timed apart in this process.

    client encode: request built and serialized as gRPC would send it; server parse:
    protobuf parse of those bytes; server handler: HessdServicer.Compute/ComputeStream
    (decode, engine, encode into messages, its log line and metrics); of which engine.run
    (compute + device→host); server serialize; client decode: parse, reassembly, decode
    (and unpack). Also in-process compute alone (block_until_ready) and np.asarray of its
    device result. The sum counts each piece once; in the service some overlap.
    """
    options = dict(w.options)
    call = _requests.compute_request(w.function, w.kind, w.points, **options)
    streamed = max(call.input_bytes, call.output_bytes) > threshold
    context = _Context()
    program = servicer.registry.register(w.function.spec)
    task = kinds.make_request(
        program,
        kinds.Kind(w.kind),
        mode=kinds.JacobianMode(options.get("mode", "auto")),
        packed=options.get("packed", False),
    )
    args = [np.asarray(a) for a in call.arrays]
    state: dict = {}

    def client_encode():
        call = _requests.compute_request(w.function, w.kind, w.points, **options)
        state["call"] = call
        if streamed:
            state["request"] = [
                m.SerializeToString()
                for m in stream.send("compute_request", call.request, call.arrays)
            ]
        else:
            state["request"] = [call.filled().SerializeToString()]

    def server_parse():
        message = hessd_pb2.StreamMessage if streamed else hessd_pb2.ComputeRequest
        state["parsed"] = [message.FromString(m) for m in state["request"]]

    def server_handler():
        if streamed:
            state["reply"] = list(servicer.ComputeStream(iter(state["parsed"]), context))
        else:
            state["reply"] = [servicer.Compute(state["parsed"][0], context)]

    def server_serialize():
        state["response"] = [m.SerializeToString() for m in state["reply"]]

    def client_decode():
        if streamed:
            messages = [hessd_pb2.StreamMessage.FromString(m) for m in state["response"]]
            header, buffers = stream.receive(messages, "compute_response", max_bytes=1 << 62)
            state["call"].result(header, buffers)
        else:
            state["call"].result(hessd_pb2.ComputeResponse.FromString(state["response"][0]))

    def compute_only():
        state["device"] = w.local().block_until_ready()

    pieces = {
        "client encode": client_encode,
        "server parse": server_parse,
        "server handler": server_handler,
        "server serialize": server_serialize,
        "client decode": client_decode,
        "engine.run (in handler)": lambda: servicer.engine.run(program, task, args),
        "in-process compute": compute_only,
        "np.asarray(device result)": lambda: np.asarray(state["device"]),
    }
    warm_up(pieces)
    times, _ = interleaved(
        pieces, dict.fromkeys(pieces, rounds if w.large else rounds * LATENCY_CALLS)
    )
    result = {name: median_ms(t) for name, t in times.items()}
    result["transport floor"] = floor_ms
    own = ("client encode", "server parse", "server handler", "server serialize", "client decode")
    result["sum (pieces + floor)"] = sum(result[p] for p in own) + floor_ms
    state.clear()
    return result


def phase_servicer() -> HessdServicer:
    """An in-process HessdServicer with the server's metrics and per-call log line (to
    /dev/null, formatted and at INFO as `hessd serve` logs by default)."""
    servicer = HessdServicer(ServerConfig(max_output_bytes=MAX_OUTPUT_BYTES))
    servicer.metrics = Metrics(servicer.engine, servicer.registry)
    log = logging.getLogger("hessd.requests")
    log.setLevel(logging.INFO)
    handler = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.propagate = False
    return servicer


# --- output -------------------------------------------------------------------------------


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def targets(rows: list[dict], rates: list[dict]) -> list[dict[str, str]]:
    """Each target this run can judge: what it asks, and "meets" or "misses by X%"."""
    found = []
    for r in rows:
        if r["target"] != "-":
            what = f"{r['workload']}: service / (in-process + floor) = {r['ratio']:.2f}"
            found.append({"target": f"{what} <= {RATIO_TARGET}", "verdict": r["target"]})
    for r in rates:
        what = f"{r['workload']}: service / raw unary rate = {r['ratio']:.2f}"
        found.append({"target": f"{what} >= {THROUGHPUT_TARGET}", "verdict": r["target"]})
    for r in rows:
        if r["name"] == "hessian" and "service_over_fastest_torch" in r:
            over = r["service_over_fastest_torch"]
            what = f"{r['workload']}: hessd / fastest torch.func = {over:.2f}"
            found.append({"target": f"{what} < 1", "verdict": verdict(over, 1.0, True)})
    return found


def print_tables(rows: list[dict], rates: list[dict], phase_rows: dict) -> None:
    print(
        f"{'workload':<42}{'transport':>10}{'bytes in':>11}{'bytes out':>11}{'service ms':>12}"
        f"{'in-proc ms':>12}{'floor ms':>10}{'ratio':>7}  target (ratio <= {RATIO_TARGET})"
    )
    for r in rows:
        print(
            f"{r['workload']:<42}{r['transport']:>10}{human_bytes(r['bytes_in']):>11}"
            f"{human_bytes(r['bytes_out']):>11}{r['service_ms']:>12.2f}{r['in_process_ms']:>12.2f}"
            f"{r['floor_ms']:>10.2f}{r['ratio']:>7.2f}  {r['target']}"
        )
    for r in rows:
        if "ratio_vs_plain_floor" in r:
            print(
                f"  {r['workload']}: against the plain floor ({human_bytes(r['plain_bytes_out'])} "
                f"out, {r['floor_plain_ms']:.2f} ms) the ratio is {r['ratio_vs_plain_floor']:.2f}"
            )
    if rows:
        print()
        print(
            f"{'CPU ms per call (mean)':<42}{'service: client':>16}{'server':>8}"
            f"{'floor: client':>15}{'server':>8}{'in-process':>12}"
        )
        for r in rows:
            cpu = r["cpu_ms_per_call"]
            print(
                f"{r['workload']:<42}{cpu['service']['client_cpu_ms']:>16.2f}"
                f"{cpu['service']['server_cpu_ms']:>8.2f}{cpu['floor']['client_cpu_ms']:>15.2f}"
                f"{cpu['floor']['server_cpu_ms']:>8.2f}{cpu['in_process']['client_cpu_ms']:>12.2f}"
            )
    if rates:
        print()
        print(
            f"{'workload':<42}{'bytes in':>11}{'bytes out':>11}{'service /s':>12}{'floor /s':>10}"
            f"{'ratio':>7}  target (ratio >= {THROUGHPUT_TARGET})"
        )
        for r in rates:
            print(
                f"{r['workload']:<42}{human_bytes(r['bytes_in']):>11}"
                f"{human_bytes(r['bytes_out']):>11}{r['service_per_s']:>12.0f}"
                f"{r['floor_per_s']:>10.0f}{r['ratio']:>7.2f}  {r['target']}"
            )
            print(
                f"  CPU µs per call, client + server process: service "
                f"{r['service_client_cpu_us']:.0f} + {r['service_server_cpu_us']:.0f}, "
                f"floor {r['floor_client_cpu_us']:.0f} + {r['floor_server_cpu_us']:.0f}"
            )
    peers = [r for r in rows if "service_over_fastest_torch" in r]
    if peers:
        print()
        print(
            f"{'workload':<30}{'torch.func':>22}{'torch ms':>10}{'hessd ms':>10}{'JAX ms':>10}"
            f"{'hessd / torch':>15}"
        )
        for r in peers:
            names = [k[len("torch ") : -len("_ms")] for k in r if k.startswith("torch ")]
            for name in names:
                torch_ms = r[f"torch {name}_ms"]
                print(
                    f"{r['workload']:<30}{name:>22}{torch_ms:>10.1f}{r['service_ms']:>10.1f}"
                    f"{r['in_process_ms']:>10.1f}{r['service_ms'] / torch_ms:>15.2f}"
                )
    for label, pieces in phase_rows.items():
        print()
        print(f"phases of {label} (ms, median)")
        for name, ms in pieces.items():
            print(f"  {name:<28}{ms:>10.2f}")
    print()
    print("targets")
    for t in targets(rows, rates):
        print(f"  {t['verdict']:<18}{t['target']}")


def versions() -> dict[str, str]:
    names = ("hessd", "jax", "jaxlib", "grpcio", "protobuf", "numpy", "torch")
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


# --- main -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="rounds per workload (median)")
    parser.add_argument("--only", action="append", choices=WORKLOADS, help="repeatable")
    parser.add_argument("--phases", action="store_true", help="also time the pieces")
    parser.add_argument("--out", type=pathlib.Path)
    parser.add_argument("--quiet-load", type=float, default=1.5)
    parser.add_argument("--max-wait", type=float, default=240.0, help="seconds")
    parser.add_argument("--echo-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--echo-workers", type=int, default=16, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server is not None:
        serve_echo(args.echo_server, args.echo_workers)
        return
    selected = args.only or list(WORKLOADS)

    backend = jax.default_backend()
    out = args.out or pathlib.Path(__file__).parent / "results" / f"throughput-{backend}.json"
    load_start = wait_for_quiet(args.quiet_load, args.max_wait)
    started = time.perf_counter()
    proc, address, _ = start_server(*SERVER_FLAGS)
    echo_proc, echo = start_echo_server()
    floor = Floor(echo)
    servicer = phase_servicer() if args.phases else None
    rows, rates, phase_rows = [], [], {}
    try:
        with Client(address, timeout=600) as client:
            info = client.server_info()
            builders: dict[str, Callable[[], Workload]] = {
                "gradient-latency": lambda: gradient_workload(
                    client, "gradient-latency", 8, 1, False
                ),
                "gradient-c64": lambda: gradient_workload(client, "gradient-c64", 8, 1, False),
                "gradient-large": lambda: gradient_workload(client, "gradient-large", 256, 1024),
                "hessian": lambda: hessian_workload(client, "hessian", 256, 512, packed=False),
                "hessian-packed": lambda: hessian_workload(
                    client, "hessian-packed", 256, 512, packed=True
                ),
                "jacobian": lambda: jacobian_workload(client, "jacobian", 256, 1024),
                "mlp-hvp": lambda: mlp_hvp_workload(client, "mlp-hvp"),
            }
            for name in WORKLOADS:
                if name not in selected:
                    continue
                print(f"measuring {name}", file=sys.stderr, flush=True)
                w = builders[name]()
                if name == "gradient-c64":
                    pids = {"service": proc.pid, "floor": echo_proc.pid}
                    rates.append(
                        measure_concurrent(
                            w, address, echo, pids, client.stream_threshold, args.repeats
                        )
                    )
                    continue
                servers = {"service": proc.pid, "floor": echo_proc.pid}
                rows.append(measure(w, client, floor, servers, args.repeats))
                if servicer is not None:
                    phase_rows[w.label] = phases(
                        w, servicer, client.stream_threshold, args.repeats, rows[-1]["floor_ms"]
                    )
    finally:
        floor.close()
        for p in (proc, echo_proc):
            p.terminate()
            p.wait(timeout=30)

    device = info["devices"][0]["kind"]
    print(
        f"backend {backend} ({device}), {os.cpu_count()} CPUs, median of --repeats {args.repeats}"
    )
    print_tables(rows, rates, phase_rows)
    meta = {
        "backend": backend,
        "device": device,
        "versions": versions(),
        "cpus": os.cpu_count(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "repeats": args.repeats,
        "latency_calls_per_round": LATENCY_CALLS,
        "concurrency": CONCURRENCY,
        "calls_per_concurrency_round": CALLS_PER_ROUND,
        "seconds": time.perf_counter() - started,
        "server_flags": SERVER_FLAGS,
        "echo_server_workers": args.echo_workers,
        "torch_threads": 2,
        "slow_method": {"seconds": SLOW_SECONDS, "rounds": SLOW_ROUNDS},
        "targets": {
            "ratio_at_most": RATIO_TARGET,
            "concurrency_throughput_ratio_at_least": THROUGHPUT_TARGET,
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "meta": meta,
        "rows": rows,
        "concurrency": rates,
        "targets": targets(rows, rates),
        "phases": phase_rows,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
