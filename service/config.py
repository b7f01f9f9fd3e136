"""Server configuration: every limit in one place, with its default."""

from __future__ import annotations

import dataclasses

__all__ = ["ServerConfig"]

MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """How a hessd server runs. The CLI sets each field from a flag of the same name."""

    host: str = "127.0.0.1"
    port: int = 50051
    # Largest request gRPC accepts; protobuf caps one message at 2 GiB.
    max_request_bytes: int = 512 * MiB
    # Largest result one Compute may return; refused before any work is done.
    max_output_bytes: int = 1024 * MiB
    # Batches are padded to powers of two up to this, and run in chunks of it above.
    max_batch_bucket: int = 1024
    executable_cache_size: int = 256
    max_functions: int = 4096
    max_expression_chars: int = 20_000
    workers: int = 16
    # JAX's persistent compilation cache; None leaves it off.
    compile_cache_dir: str | None = None
