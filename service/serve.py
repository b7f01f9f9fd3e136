"""`hessd serve`: a flag per ServerConfig field, logging, and serving until SIGINT or
SIGTERM, then draining; with --processes N, a supervisor of N such servers on one port.
Importing this module needs no JAX (the flags come from the ServerConfig dataclass); main
imports the server, and says what to install if it cannot."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import typing
from types import FrameType

from hessd.service.config import ServerConfig

__all__ = ["DEFAULT_COMPILE_CACHE", "Supervisor", "add_arguments", "main", "serve_forever"]

DEFAULT_COMPILE_CACHE = os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hessd", "jax"
)
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# The GPU memory all processes of --processes N preallocate together (JAX's own default for
# one process is 0.75): room is left for the N CUDA contexts.
GPU_MEMORY_SHARED = 0.9

log = logging.getLogger("hessd")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ServerConfig field (--max-output-bytes …) with its help and default,
    then --grace and --log-level."""
    defaults = ServerConfig()
    hints = typing.get_type_hints(ServerConfig)
    for field in dataclasses.fields(ServerConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        if field.name == "compile_cache_dir":
            default = DEFAULT_COMPILE_CACHE
        value_type = flag_type(field.name, hints[field.name])
        if value_type is bool:
            action = argparse.BooleanOptionalAction if default else "store_true"
            parser.add_argument(flag, action=action, default=default, help=field.metadata["help"])
            continue
        parser.add_argument(
            flag,
            type=value_type,
            default=default,
            help=field.metadata["help"] + " (default: %(default)s)",
        )
    parser.add_argument(
        "--grace",
        type=float,
        default=5.0,
        help="seconds calls in flight have to finish on stop (default: %(default)s)",
    )
    parser.add_argument(
        "--processes",
        type=_at_least_one,
        default=1,
        help="server processes on one port (SO_REUSEPORT: the kernel spreads connections over "
        "them), each with its own JAX client and dynamic batching; a supervisor restarts one "
        "that dies. Process i serves metrics on --metrics-port + i. On a GPU each gets "
        f"XLA_PYTHON_CLIENT_MEM_FRACTION={GPU_MEMORY_SHARED}/N unless it is set "
        "(default: %(default)s)",
    )
    # Set by the supervisor in each of its servers: the server's end of a socket pair, on
    # which it says it is serving, and whose closing tells it that the supervisor has gone.
    parser.add_argument("--supervisor-fd", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=_LOG_LEVELS,
        default="INFO",
        help="(default: %(default)s)",
    )


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def flag_type(name: str, hint: object) -> type:
    """What a field's flag parses to: its type, None left out of an optional one. TypeError
    for any type but bool, int, float and str, so that a field no flag can parse fails
    when the parser is built instead of becoming a flag that reads text."""
    members = typing.get_args(hint)
    if type(None) in members:
        rest = [m for m in members if m is not type(None)]
        if len(rest) == 1:
            hint = rest[0]
    if hint in (bool, int, float, str):
        return typing.cast(type, hint)
    raise TypeError(
        f"ServerConfig.{name} is annotated {hint!r}; `hessd serve` makes flags of bool, int, "
        "float and str fields (or one of them | None) only"
    )


def main(args: argparse.Namespace) -> int:
    """Serve with the flags' config (with --processes N, supervise N servers); the exit
    code: 0 stopped by a signal, 1 could not start (a port in use, a missing certificate,
    the server's packages not installed), 130 interrupted while starting."""
    # A supervised server's lines name its pid: N of them share the supervisor's stderr.
    name = "%(name)s[%(process)d]" if args.supervisor_fd is not None else "%(name)s"
    logging.basicConfig(
        level=args.log_level, format=f"%(asctime)s %(levelname)s {name}: %(message)s"
    )
    if args.processes > 1:
        return Supervisor(args).run()
    config = ServerConfig(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig)}
    )
    supervisor = None
    if args.supervisor_fd is not None:
        supervisor = socket.socket(fileno=args.supervisor_fd)
        supervisor.set_inheritable(False)  # not into the compile guard's children
    try:
        return serve_forever(config, args.grace, supervisor=supervisor)
    except KeyboardInterrupt:  # before the signal handlers are in place: importing JAX
        print("hessd serve: interrupted while starting", file=sys.stderr)
        return 130


def serve_forever(
    config: ServerConfig, grace: float, *, supervisor: socket.socket | None = None
) -> int:
    """Start a server, wait for SIGINT or SIGTERM, then stop: health says NOT_SERVING and new
    calls get UNAVAILABLE at once, calls in flight have `grace` seconds to finish, and the
    process exits (code 0) right after, whatever is still computing. Returns only when the
    server could not start. With `supervisor` (a socket to the Supervisor), the server
    says there that it is serving, and stops as on a signal when the socket closes."""
    # Imported here so that the flags (and `hessd --help`) need no JAX.
    try:
        import jax

        from hessd.service.server import create_server
    except ModuleNotFoundError as e:
        if e.name is None or e.name.partition(".")[0] == "hessd":
            raise
        print(
            f"hessd serve: the server needs {e.name.partition('.')[0]}, which is not "
            "installed: pip install 'hessd[server]'",
            file=sys.stderr,
        )
        return 1
    try:
        server, port = create_server(config)
    except (OSError, ValueError) as e:  # a port in use, a missing certificate, bad tokens
        log.error("cannot start: %s", e)
        return 1
    server.start()
    log.info(
        "listening on %s:%d (%s: %s; %s%s%s)",
        config.host,
        port,
        jax.default_backend(),
        jax.devices(),
        server.transport_name,
        ", TLS" if config.tls_cert else "",
        ", tokens" if server.tokens.enabled else "",
    )
    if server.metrics_port is not None:
        log.info("metrics on http://%s:%d/metrics", config.host, server.metrics_port)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, stopping (grace %.1f s)", signal.Signals(signum).name, grace)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if supervisor is not None:
        with contextlib.suppress(OSError):  # gone already: the thread below sees it closed
            supervisor.sendall(b"ready\n")
        threading.Thread(
            target=_stop_when_closed, args=(supervisor, stop), name="hessd-supervisor", daemon=True
        ).start()
    stop.wait()
    server.stop(grace).wait()  # NOT_SERVING and UNAVAILABLE at once, in-flight calls finish
    log.info("stopped")
    logging.shutdown()
    sys.stderr.flush()
    # A call still computing past the grace is inside XLA, which cannot be interrupted, and
    # its worker thread would keep the process alive (burning the machine) until it ended:
    # the server has stopped and answered, so leave without waiting for it.
    os._exit(0)


def _stop_when_closed(supervisor: socket.socket, stop: threading.Event) -> None:
    """Set `stop` once the supervisor's end of the socket closes: it exited, even by SIGKILL,
    which it could not forward, and a server left behind would hold the port."""
    with contextlib.suppress(OSError):
        while supervisor.recv(64):
            pass
    if not stop.is_set():
        log.warning("the supervisor has gone, stopping")
        stop.set()


# ---------------------------------------------------------------- --processes N: the supervisor


@dataclasses.dataclass
class _Slot:
    """Server process `index` of the supervisor's N: the one running, if any."""

    index: int
    proc: subprocess.Popen | None = None
    channel: socket.socket | None = None  # the supervisor's end of the socket pair
    ready_at: float | None = None  # monotonic time it said it was serving
    failures: int = 0  # deaths in a row soon after starting
    restart_at: float = 0.0


class Supervisor:
    """`hessd serve --processes N`: N `hessd serve --processes 1` subprocesses on one port.

    Subprocesses rather than multiprocessing: each server is exactly what `hessd serve` runs
    (its flags, logging, signal handling and final os._exit), starts in a fresh interpreter
    that never shared a JAX client or threads with anything, and shows in ps with its flags.

    gRPC's C core sets SO_REUSEPORT on the sockets it listens on (channel arg
    grpc.so_reuseport, 1 by default on Linux), so N servers bind one host:port and the
    kernel hashes each new connection to one of them. The supervisor first binds the port
    itself with SO_REUSEPORT, without listening (the kernel only hands connections to
    listening sockets): that picks the port for --port 0, fails fast if it is taken, and
    keeps it while every server restarts.

    It logs "listening on HOST:PORT with N processes" once all are serving, forwards
    SIGTERM and SIGINT to them and returns 0 once they have exited (they drain within
    --grace; any still alive KILL_AFTER seconds later is killed), and restarts one that dies
    with a backoff that doubles while it keeps dying soon after starting. If a server cannot
    start at all at first (bad flags, a missing certificate), the others are stopped and
    run() returns 1: its error is on the shared stderr.
    """

    BACKOFF_S = 0.5  # the first restart's delay, doubled per death in a row...
    MAX_BACKOFF_S = 30.0
    HEALTHY_S = 30.0  # ...unless the dead one served at least this long
    KILL_AFTER_S = 5.0
    POLL_S = 0.2

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.slots = [_Slot(i) for i in range(args.processes)]
        self.selector = selectors.DefaultSelector()
        self.signals: list[int] = []
        self.port = 0

    def run(self) -> int:
        n = len(self.slots)
        try:
            reservation, self.port = reserve_port(self.args.host, self.args.port)
        except OSError as e:
            log.error("cannot start: %s:%d: %s", self.args.host, self.args.port, e)
            return 1
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        with reservation:
            for slot in self.slots:
                self._start(slot)
            while not self.signals and any(s.ready_at is None for s in self.slots):
                self._read_channels()
                for slot in self.slots:
                    assert slot.proc is not None
                    if slot.ready_at is None and slot.proc.poll() is not None:
                        log.error(
                            "process %d could not start (%s)",
                            slot.index,
                            _exit_status(slot.proc.returncode),
                        )
                        self._stop_all(signal.SIGTERM)
                        return 1
            if not self.signals:
                log.info("listening on %s:%d with %d processes", self.args.host, self.port, n)
            while not self.signals:
                self._read_channels()
                self._restart_the_dead()
            self._stop_all(self.signals[0])
        log.info("stopped")
        return 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.signals:
            log.info(
                "received %s, stopping %d processes", signal.Signals(signum).name, len(self.slots)
            )
        self.signals.append(signum)

    def _start(self, slot: _Slot) -> None:
        ours, theirs = socket.socketpair()
        with theirs:
            slot.proc = subprocess.Popen(
                child_argv(self.args, slot.index, self.port, theirs.fileno()),
                env=child_environment(len(self.slots)),
                pass_fds=(theirs.fileno(),),
            )
        slot.channel, slot.ready_at = ours, None
        self.selector.register(ours, selectors.EVENT_READ, slot)

    def _read_channels(self) -> None:
        """Wait up to POLL_S for a server to say it is serving (or to close its end)."""
        for key, _ in self.selector.select(self.POLL_S):
            slot: _Slot = key.data
            self.selector.unregister(key.fileobj)
            assert slot.proc is not None and slot.channel is not None
            try:
                said = slot.channel.recv(64)
            except OSError:
                said = b""
            if said.startswith(b"ready"):
                slot.ready_at = time.monotonic()
                log.info("process %d serving (pid %d)", slot.index, slot.proc.pid)

    def _restart_the_dead(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.proc is None:
                if now >= slot.restart_at:
                    self._start(slot)
                continue
            code = slot.proc.poll()
            if code is None:
                continue
            served = now - slot.ready_at if slot.ready_at is not None else 0.0
            slot.failures = 0 if served >= self.HEALTHY_S else slot.failures + 1
            delay = min(self.MAX_BACKOFF_S, self.BACKOFF_S * 2 ** max(slot.failures - 1, 0))
            log.warning(
                "process %d (pid %d) exited unexpectedly (%s), restarting in %.1f s",
                slot.index,
                slot.proc.pid,
                _exit_status(code),
                delay,
            )
            self._close_channel(slot)
            slot.proc, slot.restart_at = None, now + delay

    def _close_channel(self, slot: _Slot) -> None:
        if slot.channel is not None:
            if slot.channel in self.selector.get_map():  # not yet heard from
                self.selector.unregister(slot.channel)
            slot.channel.close()
            slot.channel = None

    def _stop_all(self, signum: int) -> None:
        """Send `signum` to every server, wait for them to drain, kill any past the grace."""
        running = [s for s in self.slots if s.proc is not None and s.proc.poll() is None]
        for slot in running:
            assert slot.proc is not None
            slot.proc.send_signal(signum)
        deadline = time.monotonic() + self.args.grace + self.KILL_AFTER_S
        for slot in running:
            assert slot.proc is not None
            try:
                slot.proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                log.warning(
                    "process %d (pid %d) did not stop: killing it", slot.index, slot.proc.pid
                )
                slot.proc.kill()
                slot.proc.wait()
        for slot in self.slots:
            self._close_channel(slot)


def reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """A socket bound to host:port (the first address host resolves to) with SO_REUSEPORT,
    not listening, and its port: the one the OS picked for port 0."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock, sock.getsockname()[1]


def child_argv(args: argparse.Namespace, index: int, port: int, fd: int) -> list[str]:
    """The `hessd serve` command line of server `index`: the supervisor's flags, with
    --processes 1, the shared port, metrics on --metrics-port + index (0: each its own pick)
    and the supervisor's socket."""
    argv = [sys.executable, "-m", "hessd.tools.cli", "serve"]
    defaults = ServerConfig()
    for field in dataclasses.fields(ServerConfig):
        flag = "--" + field.name.replace("_", "-")
        value = getattr(args, field.name)
        if field.name == "port":
            value = port
        elif field.name == "reuse_port":
            value = True
        elif field.name == "metrics_port" and value:
            value += index
        if isinstance(value, bool):  # --flag, or --no-flag where the default is on
            if value or getattr(defaults, field.name):
                argv.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            argv.append(f"{flag}={value}")
    argv += [f"--grace={args.grace}", f"--log-level={args.log_level}", "--processes=1"]
    return [*argv, f"--supervisor-fd={fd}"]


def child_environment(processes: int) -> dict[str, str]:
    """This environment, with each server's share of GPU memory unless the user chose it."""
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{GPU_MEMORY_SHARED / processes:.3g}")
    return env


def _exit_status(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:  # a real-time signal has no name
            return f"killed by signal {-code}"
    return f"exit code {code}"
