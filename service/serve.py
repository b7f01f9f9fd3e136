"""`hessd serve`: a flag per ServerConfig field, logging, and serving until SIGINT or
SIGTERM, then draining. Importing this module needs no JAX (the flags come from the
ServerConfig dataclass); main imports the server, and says what to install if it cannot."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
import typing
from types import FrameType

from hessd.service.config import ServerConfig

__all__ = ["DEFAULT_COMPILE_CACHE", "add_arguments", "main", "serve_forever"]

DEFAULT_COMPILE_CACHE = os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hessd", "jax"
)
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

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
        "--log-level",
        type=str.upper,
        choices=_LOG_LEVELS,
        default="INFO",
        help="(default: %(default)s)",
    )


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
    """Serve with the flags' config; the exit code: 0 stopped by a signal, 1 could not start
    (a port in use, a missing certificate, the server's packages not installed), 130
    interrupted while starting."""
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = ServerConfig(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig)}
    )
    try:
        return serve_forever(config, args.grace)
    except KeyboardInterrupt:  # before the signal handlers are in place: importing JAX
        print("hessd serve: interrupted while starting", file=sys.stderr)
        return 130


def serve_forever(config: ServerConfig, grace: float) -> int:
    """Start a server, wait for SIGINT or SIGTERM, then stop: health says NOT_SERVING and new
    calls get UNAVAILABLE at once, calls in flight have `grace` seconds to finish, and the
    process exits (code 0) right after, whatever is still computing. Returns only when the
    server could not start."""
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
        "listening on %s:%d (%s: %s%s%s)",
        config.host,
        port,
        jax.default_backend(),
        jax.devices(),
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
    stop.wait()
    server.stop(grace).wait()  # NOT_SERVING and UNAVAILABLE at once, in-flight calls finish
    log.info("stopped")
    logging.shutdown()
    sys.stderr.flush()
    # A call still computing past the grace is inside XLA, which cannot be interrupted, and
    # its worker thread would keep the process alive (burning the machine) until it ended:
    # the server has stopped and answered, so leave without waiting for it.
    os._exit(0)
