"""The service's path for one workload of throughput.py, piece by piece, in this process
(no gRPC): client encode, server parse / handler / serialize, engine.run, client decode,
and in-process compute and device-to-host copy apart.

The server's pieces run on the servicer of an in-process server built by create_server
as `hessd serve` builds it (not started). They reach into hessd.service:
HessdServer.servicer, its registry and engine, and kinds.make_request for the engine's
request.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np

from hessd.proto import stream
from hessd.proto.kinds import JacobianMode, Kind
from hessd.proto.v1 import hessd_pb2
from hessd.service import fastpath, kinds
from hessd.service.config import ServerConfig
from hessd.service.server import HessdServer, create_server
from hessd.service.servicer import Streamed, compute_response

from _measure import LATENCY_CALLS
from _timing import interleaved, median_ms, warm_up
from _wire import Call, compute_call
from _workloads import MAX_OUTPUT_BYTES, Workload

__all__ = ["phase_server", "phases"]


class _Context:
    """What HessdServicer asks of a grpc.ServicerContext, to run it without gRPC."""

    def is_active(self) -> bool:
        return True

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def time_remaining(self) -> float | None:
        return None

    def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise RuntimeError(f"{code.name}: {message}")


@contextlib.contextmanager
def phase_server() -> Iterator[HessdServer]:
    """An in-process server as `hessd serve --max-output-bytes MAX_OUTPUT_BYTES` builds it,
    bound to a free loopback port and never started; its logger at INFO as `hessd serve`
    sets it, writing to /dev/null (the per-call line is DEBUG unless --log-requests)."""
    server, _ = create_server(
        ServerConfig(host="127.0.0.1", port=0, max_output_bytes=MAX_OUTPUT_BYTES)
    )
    log = logging.getLogger("hessd.requests")
    log.setLevel(logging.INFO)
    handler = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.propagate = False
    try:
        yield server
    finally:
        log.removeHandler(handler)
        handler.close()
        server.stop(None)


def phases(
    w: Workload, server: HessdServer, threshold: int, rounds: int, floor_ms: float
) -> dict[str, float]:
    """Median ms of each piece of one Compute of `w`, timed apart in this process.

    client encode: request built and serialized as gRPC would send it; server parse:
    protobuf parse of those bytes; server handler: HessdServicer.Compute/ComputeStream
    (decode, engine, encode into messages, its log line and metrics); of which engine.run
    (compute + device→host); server serialize; client decode: parse, reassembly, decode
    (and unpack). Also in-process compute alone (block_until_ready) and np.asarray of its
    device result. The sum counts each piece once; in the service some overlap.
    """
    servicer = server.servicer
    call = compute_call(w.function, w.kind, w.points, **w.options)
    streamed = call.streamed(threshold)
    args = [np.asarray(a) for a in call.arrays]
    context = _Context()
    program = servicer.registry.register(w.function.spec)
    task = kinds.make_request(
        program,
        Kind.parse(w.kind),
        mode=JacobianMode.parse(w.options.get("mode", "auto")),
        packed=w.options.get("packed", False),
    )
    state: dict[str, Any] = {}

    def client_encode() -> None:
        fresh: Call = compute_call(w.function, w.kind, w.points, **w.options)
        state["call"] = fresh
        state["request"] = fresh.messages(streamed)

    def server_parse() -> None:
        message = hessd_pb2.StreamMessage if streamed else hessd_pb2.ComputeRequest
        state["parsed"] = [message.FromString(m) for m in state["request"]]

    def server_handler() -> None:
        if streamed:
            # As the server's event loop reads a stream, then the servicer's half.
            header, buffers = stream.receive(iter(state["parsed"]), "compute_request", 1 << 62)
            data = dict(zip((what for what, _ in stream.tensors(header)), buffers, strict=True))
            reply = servicer.ComputeStream(Streamed(header, data), context)
            state["reply"] = list(reply)
        else:
            state["reply"] = [servicer.Compute(state["parsed"][0], context)]

    def fast_path_lookup() -> None:
        # What a repeated unary Compute does before the batcher: key, plan, views.
        request = state["parsed"][0]
        plan = servicer.plans.get(fastpath.key(request))
        state["decoded"] = plan.decode(request) if plan is not None else None

    def server_serialize() -> None:
        state["response"] = [
            m if isinstance(m, bytes) else m.SerializeToString() for m in state["reply"]
        ]

    def client_decode() -> None:
        state["call"].result(state["response"], streamed)

    def compute_only() -> None:
        state["device"] = w.local().block_until_ready()

    pieces: dict[str, Callable[[], object]] = {
        "client encode": client_encode,
        "server parse": server_parse,
        "server handler": server_handler,
        "server serialize": server_serialize,
        "client decode": client_decode,
        "engine.run (in handler)": lambda: servicer.engine.run(program, task, args),
        "of which fast-path key + plan + decode": fast_path_lookup,
        "of which encode response": lambda: compute_response(state["result"]),
        "in-process compute": compute_only,
        "np.asarray(device result)": lambda: np.asarray(state["device"]),
    }
    if streamed:  # the fast path takes unary calls only
        del pieces["of which fast-path key + plan + decode"]
    state["result"] = servicer.engine.run(program, task, args)
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
