"""The `hessd` command line: `hessd serve`, `hessd spectrum`, `hessd bench`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading

from hessd.client import bench, spectrum_job
from hessd.service.config import ServerConfig

DEFAULT_COMPILE_CACHE = os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hessd", "jax"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hessd", description="a gRPC derivative service")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the server until SIGINT or SIGTERM")
    defaults = ServerConfig()
    for field in dataclasses.fields(ServerConfig):
        default = getattr(defaults, field.name)
        if field.name == "compile_cache_dir":
            default = DEFAULT_COMPILE_CACHE
        flag = "--" + field.name.replace("_", "-")
        if field.type == "bool":
            serve.add_argument(flag, action="store_true", help=field.metadata["help"])
            continue
        serve.add_argument(
            flag,
            type=int if field.type.startswith("int") else str,
            default=default,
            help=field.metadata["help"] + " (default: %(default)s)",
        )
    serve.add_argument("--grace", type=float, default=5.0, help="seconds to finish calls on stop")
    serve.add_argument("--log-level", default="INFO")
    spectrum = commands.add_parser(
        "spectrum", help="the Hessian spectrum at a file of points, against a running server"
    )
    spectrum_job.add_arguments(spectrum)
    load = commands.add_parser(
        "bench", help="load-test a server: throughput and latency per concurrency or request rate"
    )
    bench.add_arguments(load)
    args = parser.parse_args(argv)
    if args.command == "spectrum":
        return spectrum_job.main(args)
    if args.command == "bench":
        return bench.main(args)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = ServerConfig(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig)}
    )
    return serve_forever(config, args.grace)


def serve_forever(config: ServerConfig, grace: float) -> int:
    # Imported here so that `hessd --help` does not wait for JAX.
    import jax

    from hessd.service.server import create_server

    log = logging.getLogger("hessd")
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

    def on_signal(signum, frame):
        log.info("received %s, stopping (grace %.1f s)", signal.Signals(signum).name, grace)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    stop.wait()
    server.stop(grace).wait()  # NOT_SERVING and UNAVAILABLE at once, in-flight calls finish
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
