"""What the tools share about running against a server: their two failures, the connection
flags, Ctrl-C, and the lazy import of matplotlib."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hessd.tools._args import positive_float

__all__ = [
    "DEFAULT_ADDRESS",
    "EVENT_LOOPS",
    "TOKEN_VARIABLE",
    "Refused",
    "ServerGone",
    "add_connection_arguments",
    "connection_options",
    "event_loop_factory",
    "interruptible",
    "matplotlib",
    "refuse",
    "run_interruptibly",
]

DEFAULT_ADDRESS = "127.0.0.1:50051"
TOKEN_VARIABLE = "HESSD_TOKEN"


class Refused(Exception):
    """A refused flag, file or request: the tool prints it and exits 2."""


class ServerGone(Exception):
    """No server answered, or it stopped answering for longer than the tool waits: the tool
    prints it and exits 1."""


# --event-loop's choices, as `hessd serve` has them (service/server.py, which the tools do
# not import): auto takes uvloop's loop where it is installed.
EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def event_loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """A client-side --event-loop's loop factory for asyncio.Runner: uvloop's, or None for
    the standard one; Refused for uvloop when it is not installed."""
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if name == "uvloop":
            raise Refused(
                "--event-loop uvloop: uvloop is not installed (pip install uvloop)"
            ) from None
        return None
    return uvloop.new_event_loop


def refuse(tool: str, error: Exception) -> int:
    """Print `error` as the tool's one line and return 2."""
    print(f"{tool}: {error}", file=sys.stderr)
    return 2


def add_connection_arguments(
    parser: argparse.ArgumentParser, *, timeout: float, what: str
) -> argparse._ArgumentGroup:
    """--address, --timeout (`what` it bounds), the bearer token and the TLS flags, in a
    group of their own, which is returned (a tool adds its other timeouts there)."""
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--address",
        default=DEFAULT_ADDRESS,
        help="host:port, or dns:///name:port for every replica the name resolves to "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--timeout",
        type=positive_float,
        default=timeout,
        help=f"seconds {what} (default: %(default)s)",
    )
    group.add_argument(
        "--token",
        default=os.environ.get(TOKEN_VARIABLE),
        help=f"bearer token sent with every call (default: ${TOKEN_VARIABLE}, which keeps it "
        "out of the process list)",
    )
    group.add_argument(
        "--tls", action="store_true", help="connect with TLS, trusting the system's CAs"
    )
    group.add_argument(
        "--tls-ca", metavar="PEM", help="connect with TLS, trusting the CA certificates in PEM"
    )
    group.add_argument(
        "--tls-cert",
        metavar="PEM",
        help="with --tls-key: present this client certificate chain (mutual TLS)",
    )
    group.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    return group


def connection_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of Client and AsyncClient that the connection flags give;
    Refused names a flag whose file cannot be read."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise Refused("--tls-cert and --tls-key go together: give both, or neither")
    options: dict[str, Any] = {}
    if args.token:
        options["token"] = args.token
    if args.tls or args.tls_ca or args.tls_cert:
        options["tls"] = True
    for flag, name in (
        ("tls_ca", "root_certificates"),
        ("tls_cert", "certificate_chain"),
        ("tls_key", "private_key"),
    ):
        path = getattr(args, flag)
        if path is not None:
            try:
                options[name] = Path(path).read_bytes()
            except OSError as e:
                raise Refused(f"--{flag.replace('_', '-')} {path}: cannot read it: {e}") from None
    return options


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt inside, even in a process started with SIGINT
    ignored (a background job, `nohup`, some CI runners), which would otherwise run on
    through every Ctrl-C and every SIGINT a supervisor sends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_interruptibly(tool: str, run: Callable[[], int]) -> int:
    """run()'s exit code, or 130 with one line on standard error if Ctrl-C came between the
    steps where `run` handles it itself (printing a table, say)."""
    with interruptible():
        try:
            return run()
        except KeyboardInterrupt:
            print(f"{tool}: interrupted", file=sys.stderr)
            return 130


def matplotlib() -> tuple[Any, Any]:
    """(Figure, FigureCanvasAgg); Refused if matplotlib is not installed.

    Imported here, and the Agg canvas used directly: no display, no pyplot state, and no
    matplotlib for runs that do not plot."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise Refused("--plot needs matplotlib: pip install 'hessd[jobs]'") from None
    return Figure, FigureCanvasAgg
