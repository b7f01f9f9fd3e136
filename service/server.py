"""Building and running a hessd gRPC server."""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
import jax

from hessd.proto.v1 import hessd_pb2_grpc
from hessd.service.config import ServerConfig
from hessd.service.servicer import HessdServicer

__all__ = ["create_server"]

logger = logging.getLogger(__name__)


def create_server(config: ServerConfig = ServerConfig()) -> tuple[grpc.Server, int]:
    """A server bound to config.host:config.port (not yet started), and the bound port.

    Pass port 0 to let the OS pick one (tests do). Call `server.start()` to serve and
    `server.stop(grace)` to stop.
    """
    if config.compile_cache_dir:
        jax.config.update("jax_compilation_cache_dir", config.compile_cache_dir)
        # CPU compiles take ~0.1 s; without this they would never be written to the cache.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    servicer = HessdServicer(config)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="hessd"),
        options=[
            ("grpc.max_receive_message_length", config.max_request_bytes),
            # Room for the largest output plus its envelope.
            ("grpc.max_send_message_length", config.max_output_bytes + (1 << 20)),
        ],
    )
    hessd_pb2_grpc.add_HessdServicer_to_server(servicer, server)
    address = f"{config.host}:{config.port}"
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    return server, port
