"""Building and running a hessd gRPC server: the servicer, authentication, health checking,
reflection, metrics and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent import futures
from typing import Any, TypeVar

import grpc
import jax
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hessd.proto.v1 import hessd_pb2
from hessd.service import curvature, oip, threads
from hessd.service.batcher import Batcher
from hessd.service.compile_guard import CompileGuard
from hessd.service.config import ServerConfig, machine_memory
from hessd.service.engine import Engine
from hessd.service.expression import ExpressionLimits
from hessd.service.handlers import Router, hessd_handlers, threaded_handlers
from hessd.service.metrics import Metrics
from hessd.service.registry import Registry
from hessd.service.resident import ResidentStore
from hessd.service.security import Tokens, server_credentials
from hessd.service.servicer import HessdServicer

__all__ = ["HessdServer", "create_server", "enable_x64"]

logger = logging.getLogger(__name__)

SERVICE_NAME = hessd_pb2.DESCRIPTOR.services_by_name["Hessd"].full_name
T = TypeVar("T")
# What health reports SERVING once started: the server as a whole and each service.
_HEALTH_SERVICES = ("", SERVICE_NAME, oip.SERVICE_NAME)


class HessdServer:
    """A configured server: `start()`, then `stop(grace)` or `enter_graceful_shutdown()`.

    Its transport is --server's: `aio` (AioTransport, the default: health and small calls
    answer whatever the threads compute) or `threads` (ThreadTransport: a call holds a
    thread from start to end). Both serve the same servicer, fast path, router checks and
    health.

    Health (grpc.health.v1) reports SERVING for "" and hessd.v1.Hessd once started, and
    NOT_SERVING from the moment shutdown begins, while new calls get UNAVAILABLE and calls
    in flight finish. Calls still running when the grace ends are cancelled: their clients
    are answered at once, not left waiting for their deadline.
    """

    def __init__(self, config: ServerConfig, tokens: Tokens | None = None):
        self.config = config
        self._draining = threading.Event()
        self._stopped = threading.Event()
        self._stopping = False
        self.tokens = tokens if tokens is not None else Tokens.load(config.tokens_file)
        if config.server not in ("threads", "aio"):
            raise ValueError(f"--server is threads or aio, not {config.server!r}")
        self.event_loop = event_loop_factory(config.event_loop) if config.server == "aio" else None
        if bool(config.tls_cert) != bool(config.tls_key):
            raise ValueError("--tls-cert and --tls-key go together: give both, or neither")
        credentials = None
        if config.tls_cert and config.tls_key:
            credentials = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
        self.metrics = Metrics()
        guard = None
        if config.compile_cache_dir and config.compile_isolation_lines:
            guard = CompileGuard(
                cache_dir=config.compile_cache_dir,
                min_lines=config.compile_isolation_lines,
                max_seconds=config.max_compile_seconds,
                max_bytes=config.max_compile_bytes or machine_memory(),
            )
        engine = Engine(
            max_bucket=config.max_batch_bucket,
            cache_size=config.executable_cache_size,
            guard=guard,
            max_lines=config.max_compile_lines,
            max_temp_bytes=config.max_temp_bytes or curvature.device_memory_bytes() // 2,
        )
        batcher = Batcher(
            engine,
            max_size=config.batch_max_size,
            max_delay_s=config.batch_max_delay_us * 1e-6,
            max_queue=config.batch_max_queue,
            observe_queue=self.metrics.queue.observe,
        )
        functions = Registry(
            config.max_functions,
            ExpressionLimits(max_chars=config.max_expression_chars),
            allow_jax_export=config.allow_jax_export,
            max_bytes=config.max_function_bytes or machine_memory() // 16,
        )
        resident = ResidentStore(config.max_resident_bytes)
        self.metrics.watch(engine, functions, batcher, resident)
        self.servicer = HessdServicer(
            config,
            engine=engine,
            batcher=batcher,
            registry=functions,
            metrics=self.metrics,
            tokens=self.tokens,
            resident=resident,
        )
        self.oip = oip.OipServicer(self.servicer)
        self.metrics_port: int | None = None
        transport = AioTransport if config.server == "aio" else ThreadTransport
        self._transport = transport(self, credentials)
        self.port = self._transport.port
        self.health = self._transport.health

    @property
    def transport_name(self) -> str:
        """The transport and, for aio, its event loop: "aio, uvloop", "threads"."""
        if self.event_loop is None:
            return self.config.server
        loop = "asyncio" if self.event_loop is asyncio.new_event_loop else "uvloop"
        return f"{self.config.server}, {loop}"

    @property
    def active(self) -> int:
        """Calls of hessd.v1 and the Open Inference Protocol in flight."""
        return self._transport.router.active

    def start(self) -> None:
        jax.devices()  # the device is up before health says SERVING
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.config.metrics_port, self.config.host)
        self._transport.start()

    def enter_graceful_shutdown(self) -> None:
        """NOT_SERVING for health, UNAVAILABLE for new calls; calls in flight go on."""
        if not self._draining.is_set():
            self._draining.set()
            self._transport.not_serving()

    def stop(self, grace: float | None) -> threading.Event:
        """Drain, then stop: calls in flight get `grace` seconds to finish (None: none),
        then are cancelled. The event is set once the server has stopped."""
        if not self._stopping:
            self._stopping = True
            self.enter_graceful_shutdown()
            self._transport.stop(grace, self._stopped)
        return self._stopped

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Wait until the server has stopped; True if `timeout` passed first."""
        return not self._stopped.wait(timeout)


def event_loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """--event-loop's loop: uvloop's, the standard library's, or for `auto` uvloop's where
    it is installed. uvloop runs the loop's own work (callbacks, tasks, futures, the socket
    grpc.aio's poller wakes it through) in C: on 2 cores it took hessd's server CPU per
    single-point gradient from ~255 to ~225 µs at 64 in flight (README, Benchmarks)."""
    if name not in ("auto", "uvloop", "asyncio"):
        raise ValueError(f"--event-loop is auto, uvloop or asyncio, not {name!r}")
    if name == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        if name == "uvloop":
            raise ValueError(
                "--event-loop uvloop: uvloop is not installed (pip install uvloop; it has no "
                "Windows build); --event-loop auto falls back to asyncio's"
            ) from None
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def server_options(config: ServerConfig) -> list[tuple[str, Any]]:
    """The channel arguments of either transport's server."""
    options = [
        ("grpc.max_receive_message_length", config.max_request_bytes),
        # Room for the largest output plus its envelope.
        ("grpc.max_send_message_length", config.max_output_bytes + (1 << 20)),
        # gRPC shares ports by default; hessd only when asked (--processes asks).
        ("grpc.so_reuseport", int(config.reuse_port)),
    ]
    if config.max_connection_age_s:
        options.append(("grpc.max_connection_age_ms", 1000 * config.max_connection_age_s))
        # Calls in flight when the age is reached get this long to finish.
        options.append(("grpc.max_connection_age_grace_ms", 1000 * 600))
    return options


def _bind(
    server: grpc.Server | grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None
) -> int:
    try:
        if credentials is not None:
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as e:  # "Failed to bind to address …"
        raise OSError(f"could not bind {address} (in use, or not this host's): {e}") from None
    if port == 0:
        raise OSError(f"could not bind {address} (in use, or not this host's)")
    return port


def _reflect(server: grpc.Server | grpc.aio.Server) -> None:
    # Not the Open Inference Protocol: its messages are not in the default descriptor
    # pool under the protocol's names (see proto/oip/grpc_predict_v2.proto).
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )


class ThreadTransport:
    """--server threads: a grpc.server over `workers` threads (service/threads.py). Each
    call holds a thread while it runs; streams being read take at most half of them, so
    that unary calls and health checks always find one."""

    def __init__(self, owner: HessdServer, credentials: grpc.ServerCredentials | None):
        config = owner.config
        self.health = health.HealthServicer()
        self.router = threads.Router(
            threads.hessd_handlers(owner.servicer)
            | threads.plain_handlers(owner.oip.add_to_server, oip.METHODS),
            owner.tokens,
            owner._draining.is_set,
        )
        self._server = grpc.server(
            futures.ThreadPoolExecutor(config.workers, thread_name_prefix="hessd"),
            handlers=[self.router],
            options=server_options(config),
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        _reflect(self._server)
        self.port = _bind(self._server, f"{config.host}:{config.port}", credentials)

    def start(self) -> None:
        self._server.start()
        for service in _HEALTH_SERVICES:
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    def not_serving(self) -> None:
        self.health.enter_graceful_shutdown()

    def stop(self, grace: float | None, stopped: threading.Event) -> None:
        def drain() -> None:
            # New calls are refused (UNAVAILABLE) by the router while those in flight
            # finish; the server itself stops only then, or when the grace ends.
            end = time.monotonic() + (grace or 0.0)
            while self.router.active and time.monotonic() < end:
                time.sleep(0.02)
            self._server.stop(None).wait()
            stopped.set()

        threading.Thread(target=drain, name="hessd-drain", daemon=True).start()


class AioTransport:
    """--server aio: a grpc.aio server on an event loop of its own (the thread
    `hessd-loop`), the full path's calls on `workers` threads and the fast path's engine
    calls on as many device threads (service/handlers.py). A call waiting for its batch or
    a stream whose client is slow holds no thread."""

    def __init__(self, owner: HessdServer, credentials: grpc.ServerCredentials | None):
        config = owner.config
        self._workers = futures.ThreadPoolExecutor(config.workers, thread_name_prefix="hessd")
        self._device = futures.ThreadPoolExecutor(config.workers, thread_name_prefix="hessd-device")
        handlers = hessd_handlers(owner.servicer, self._workers, self._device)
        handlers.update(threaded_handlers(owner.oip.add_to_server, oip.METHODS, self._workers))
        self.router = Router(handlers, owner.tokens, owner._draining.is_set)
        assert owner.event_loop is not None  # HessdServer chose it for --server aio
        self._loop = owner.event_loop()
        threading.Thread(target=self._run_loop, name="hessd-loop", daemon=True).start()
        try:
            self.port = self._call(self._build(config, credentials))
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._workers.shutdown(wait=False)
            self._device.shutdown(wait=False)
            raise

    def _run_loop(self) -> None:
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def _build(self, config: ServerConfig, credentials: grpc.ServerCredentials | None) -> int:
        """The aio server, built on its loop (grpc.aio objects belong to the loop that made
        them), bound: its port."""
        self._server = grpc.aio.server(options=server_options(config))
        self._server.add_generic_rpc_handlers((self.router,))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        _reflect(self._server)
        return _bind(self._server, f"{config.host}:{config.port}", credentials)

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def start(self) -> None:
        self._call(self._start())

    async def _start(self) -> None:
        await self._server.start()
        for service in _HEALTH_SERVICES:
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    def not_serving(self) -> None:
        self._call(self.health.enter_graceful_shutdown())

    def stop(self, grace: float | None, stopped: threading.Event) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(grace, stopped), self._loop)

    async def _stop(self, grace: float | None, stopped: threading.Event) -> None:
        try:
            # New calls are refused (UNAVAILABLE) from the router while those in flight
            # finish; the server itself stops only then, or when the grace ends, since a
            # stopping grpc.aio server answers even new calls on open connections CANCELLED.
            loop = asyncio.get_running_loop()
            end = loop.time() + (grace or 0.0)
            while self.router.active and loop.time() < end:
                await asyncio.sleep(0.02)
            await self._server.stop(None)  # cancels what is still running
            # Handlers the stop cancelled end here, before the loop does.
            current = asyncio.current_task()
            pending = [task for task in asyncio.all_tasks() if task is not current]
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        finally:
            # Work still on the threads is inside XLA and cannot be interrupted; the calls
            # are answered, so nothing waits for it (hessd serve exits without it).
            self._workers.shutdown(wait=False, cancel_futures=True)
            self._device.shutdown(wait=False, cancel_futures=True)
            stopped.set()
            self._loop.call_soon(self._loop.stop)


def enable_x64() -> None:
    """Let JAX compute in float64. The server computes in whatever dtype a spec declares,
    and without this float64 inputs would run in float32; it is a process-wide switch, so
    it is thrown once, here, before the first array exists."""
    jax.config.update("jax_enable_x64", True)


def create_server(config: ServerConfig = ServerConfig()) -> tuple[HessdServer, int]:
    """A server bound to config.host:config.port (not yet started), and the bound port.

    Pass port 0 to let the OS pick one (tests do). Turns on float64 (enable_x64), and JAX's
    persistent compilation cache when config.compile_cache_dir is set.
    """
    enable_x64()
    if config.compile_cache_dir:
        jax.config.update("jax_compilation_cache_dir", config.compile_cache_dir)
        # CPU compiles take ~0.1 s; without this they would never be written to the cache.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    server = HessdServer(config)
    return server, server.port
