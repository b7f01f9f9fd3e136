"""The `hessd` command line: `hessd serve`, `hessd spectrum`, `hessd bench`.

Only the chosen command's module is imported, to build its flags and run it: `hessd --help`,
`hessd spectrum` and `hessd bench` import neither JAX nor hessd.service; `hessd serve`
dispatches into hessd.service.serve, which imports JAX once it starts the server.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Sequence
from typing import Protocol

__all__ = ["COMMANDS", "main"]

COMMANDS = {
    "serve": "run the server until SIGINT or SIGTERM",
    "spectrum": "the Hessian spectrum at a file of points, against a running server",
    "bench": "load-test a server: throughput and latency per concurrency or request rate",
}


class _Command(Protocol):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def main(self, args: argparse.Namespace) -> int: ...


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: the process's), run the command; its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _run(argv)
    except KeyboardInterrupt:  # importing the command, before it catches Ctrl-C itself
        print("hessd: interrupted", file=sys.stderr)
        return 130


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hessd", description="a gRPC derivative service")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # The top level has no flag that takes a value: the first word is the command.
    chosen = next((word for word in argv if not word.startswith("-")), None)
    command: _Command | None = None
    for name, description in COMMANDS.items():
        subparser = commands.add_parser(name, help=description, description=description)
        if name == chosen:
            command = _command(name)
            command.add_arguments(subparser)
    args = parser.parse_args(argv)
    assert command is not None and args.command == chosen, (chosen, args)
    return command.main(args)


def _command(name: str) -> _Command:
    """The module of a command: its flags (add_arguments) and its run (main)."""
    if name == "serve":
        from hessd.service import serve

        return serve
    if name == "spectrum":
        from hessd.tools import spectrum

        return spectrum
    from hessd.tools import bench

    return bench


def _version() -> str:
    try:
        return importlib.metadata.version("hessd")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


if __name__ == "__main__":
    sys.exit(main())
