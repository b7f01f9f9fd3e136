"""The servers the benchmark scripts measure against, each in a process of its own on a free
loopback port: `hessd serve`, and the transport floor, a raw gRPC echo server.

The echo server answers hessd's own method names (Compute, ComputeStream), so that a
channel configured as the client's (its service config, with retries and their per-call
buffering) treats its calls as hessd's. Each call receives every request message, then
replies with zero bytes in messages of the sizes its `x-response-sizes` metadata lists
(`size*count,...`): the cost of moving the bytes, with no protobuf and no compute. Run as a
script, this file is that server (start_echo_server runs it so).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import importlib.metadata
import os
import re
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent import futures
from typing import Any

import grpc

from hessd.tools._common import event_loop_factory

__all__ = [
    "ECHO_SERVICE",
    "SIZES_KEY",
    "hessd_command",
    "serve_echo",
    "start_echo_server",
    "start_server",
]

ECHO_SERVICE = "hessd.v1.Hessd"
# (size, count) run-lengths of the response's message sizes.
SIZES_KEY = "x-response-sizes"


def start_server(
    *flags: str, command: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> tuple[subprocess.Popen, str, collections.deque]:
    """`hessd serve` on a free loopback port: (process, "host:port", its last log lines).

    command: another `hessd` to run (another checkout's, to measure against), instead of
    this interpreter's; env: variables set for the server alone. Its stderr is drained by
    a thread for the whole run, so the server never blocks on a full pipe. The caller
    terminates the process.
    """
    hessd = hessd_command() if command is None else list(command)
    args = [*hessd, "serve", "--port", "0", "--compile-cache-dir", "", *flags]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True)
    log: collections.deque = collections.deque(maxlen=50)
    for line in proc.stderr:
        log.append(line)
        if match := re.search(r"listening on ([\d.]+:\d+)", line):
            threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
            return proc, match.group(1), log
    raise RuntimeError("the server exited before listening:\n" + "".join(log))


def hessd_command() -> list[str]:
    """The `hessd` command as installed (its console script's entry point), run by this
    interpreter."""
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="hessd")
    return [
        sys.executable,
        "-c",
        f"import sys; from {script.module} import {script.attr} as main; sys.exit(main())",
    ]


def start_echo_server(workers: int, aio: bool = False) -> tuple[subprocess.Popen, str]:
    """The echo server on a free loopback port: (process, "host:port"). The caller
    terminates the process."""
    args = [sys.executable, __file__, "--port", "0", "--workers", str(workers)]
    args += ["--aio"] if aio else []
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("listening on "):
            return proc, line.split()[-1]
    raise RuntimeError("the echo server exited before listening:\n" + "".join(lines))


def serve_echo(port: int, workers: int, aio: bool = False) -> None:
    """Serve the echo on 127.0.0.1:`port` until killed; prints `listening on HOST:PORT` on
    stderr once serving: a grpc.server over a thread pool of `workers` (the faster of the
    two for small calls, measured), or with `aio` a grpc.aio server on hessd's event loop,
    hessd's model; no interceptor and no handler work either way."""

    @functools.cache
    def zeros(size: int) -> bytes:
        return bytes(size)

    def sizes(context: grpc.ServicerContext) -> list[int]:
        runs = dict(context.invocation_metadata())[SIZES_KEY]
        return [
            int(size)
            for run in runs.split(",")
            for size, count in [run.split("*")]
            for _ in range(int(count))
        ]

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        (size,) = sizes(context)
        return zeros(size)

    def bidirectional(
        request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        for _ in request_iterator:
            pass
        for size in sizes(context):
            yield zeros(size)

    if aio:
        # On the loop `hessd serve --event-loop auto` takes; the tools' helper, not the
        # server's, which would bring JAX into the echo.
        with asyncio.Runner(loop_factory=event_loop_factory("auto")) as runner:
            runner.run(_serve_echo_aio(port, zeros, sizes))
        return
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


async def _serve_echo_aio(
    port: int, zeros: Callable[[int], bytes], sizes: Callable[[Any], list[int]]
) -> None:
    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        (size,) = sizes(context)
        return zeros(size)

    async def bidirectional(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for _ in requests:
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
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description="the raw gRPC echo server (transport floor)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--aio", action="store_true", help="a grpc.aio server")
    args = parser.parse_args()
    serve_echo(args.port, args.workers, args.aio)


if __name__ == "__main__":
    main()
