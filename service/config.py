"""Server configuration: every limit in one place, with its default and its help text."""

from __future__ import annotations

import dataclasses
import os
from typing import TypeVar

__all__ = ["ServerConfig"]

MiB = 1 << 20
_T = TypeVar("_T")


def _field(default: _T, help: str) -> _T:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """How a hessd server runs. `hessd serve` has one flag per field (--max-output-bytes …)."""

    host: str = _field("127.0.0.1", "address to bind")
    port: int = _field(50051, "port to bind; 0 lets the OS pick one")
    max_request_bytes: int = _field(
        512 * MiB, "largest request accepted (protobuf caps a message at 2 GiB)"
    )
    max_output_bytes: int = _field(
        1024 * MiB, "largest result of one Compute; refused before any work is done"
    )
    max_batch_bucket: int = _field(
        1024, "batches pad up to powers of two up to this, and run in chunks of it above"
    )
    max_exact_n: int = _field(
        4096, "largest Hessian (n x n) the exact spectrum forms; above it use lanczos"
    )
    batch_max_size: int = _field(
        64,
        "most points one batched device call gathers from concurrent requests; larger "
        "requests run alone",
    )
    batch_max_delay_us: int = _field(
        2000,
        "longest a request waits for others of the same computation to share its device "
        "call (while one of it computes, or, on the asyncio transport, while such calls "
        "keep arriving); 0 turns dynamic batching off",
    )
    batch_max_queue: int = _field(
        4096,
        "most points waiting for or in batched device calls; more are refused with "
        "RESOURCE_EXHAUSTED",
    )
    executable_cache_size: int = _field(256, "compiled executables kept (LRU)")
    log_requests: bool = _field(
        False, "log one line per call on the hessd.requests logger (else at DEBUG level)"
    )
    stream_idle_seconds: float = _field(
        30.0, "a stream whose client sends nothing for this long while it is read is cancelled"
    )
    max_call_seconds: float = _field(
        600.0,
        "bound on every call, client deadline or not: work stops between chunks of points "
        "after this (DEADLINE_EXCEEDED); 0: no bound",
    )
    max_inflight_bytes: int = _field(
        0,
        "bytes of arguments and results all calls computing may hold together; a call that "
        "would pass it is RESOURCE_EXHAUSTED; 0: half the machine's memory",
    )
    max_resident_bytes: int = _field(
        4 << 30, "bytes of resident tensors (Put) kept, least recently used evicted first"
    )
    chunk_bytes: int = _field(
        0,
        "intermediates one pass over a data set may hold per run, which sets the examples "
        "per chunk; 0: an eighth of the device's memory (256 MiB on the CPU)",
    )
    max_functions: int = _field(4096, "registered functions kept (LRU)")
    max_function_bytes: int = _field(
        0,
        "bytes of registered specs (constants, artifacts) kept, least recently used dropped "
        "first; 0: a sixteenth of the machine's memory",
    )
    max_expression_chars: int = _field(20_000, "longest expression source accepted")
    allow_jax_export: bool = _field(
        False, "accept jax_export specs: artifacts that run native code (see README)"
    )
    workers: int = _field(16, "threads serving calls (with --server aio: of each of its two pools)")
    server: str = _field(
        "aio",
        "the transport: aio (grpc.aio on an event loop: health and small calls answer "
        "whatever the threads compute; waiting calls and idle streams hold no thread) or "
        "threads (a grpc.server over --workers threads; health waits once every thread "
        "computes)",
    )
    event_loop: str = _field(
        "auto",
        "the asyncio transport's event loop: uvloop (libuv's, installed with hessd[server] "
        "off Windows; an eighth less server CPU per small call, see README), asyncio (the "
        "standard library's), or auto: uvloop where it is installed",
    )
    reuse_port: bool = _field(
        False,
        "share the port with other processes (SO_REUSEPORT), as --processes does; without "
        "it a port another server holds is an error",
    )
    tls_cert: str | None = _field(None, "PEM certificate chain: serve TLS")
    tls_key: str | None = _field(None, "PEM private key of --tls-cert")
    tls_client_ca: str | None = _field(
        None, "PEM CA certificates: mutual TLS, clients must present a certificate it signed"
    )
    tokens_file: str | None = _field(
        None, "JSON bearer tokens (README); else the HESSD_TOKENS variable; neither: no auth"
    )
    metrics_port: int | None = _field(None, "serve Prometheus metrics on this port")
    max_connection_age_s: int | None = _field(
        None,
        "close client connections after this many seconds (graceful), so that clients "
        "balancing over dns:/// resolve again and find new replicas",
    )
    compile_isolation_lines: int = _field(
        2000,
        "programs of at least this many lines of StableHLO compile first in a supervised "
        "child process (needs --compile-cache-dir); 0: never",
    )
    max_compile_lines: int = _field(
        200_000,
        "programs of more lines of StableHLO (after differentiation) are refused before "
        "compiling: RESOURCE_EXHAUSTED; 0: no bound",
    )
    max_temp_bytes: int = _field(
        0,
        "an executable whose intermediates (XLA's memory analysis) need more bytes is refused "
        "before it runs: RESOURCE_EXHAUSTED; 0: half the device's memory (RAM on the CPU)",
    )
    max_compile_seconds: float = _field(
        300.0, "a supervised compile taking longer is killed: RESOURCE_EXHAUSTED"
    )
    max_compile_bytes: int = _field(
        0,
        "address space of a supervised compile; 0: the machine's memory (XLA reserves far "
        "more address space than it touches, so a tight bound kills sound compiles)",
    )
    compile_cache_dir: str | None = _field(
        None, "JAX persistent compilation cache directory; empty turns it off"
    )


def machine_memory() -> int:
    """The machine's physical memory in bytes: what the memory defaults derive from."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
