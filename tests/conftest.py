"""Shared fixtures: one in-process server on a loopback port the OS picks, and a client.

JAX runs with x64 on (the server needs it for float64 specs) and strict dtype promotion,
so a float64 constant leaking into a float32 program fails loudly instead of upcasting.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from hessd.client import Client
from hessd.service.config import ServerConfig
from hessd.service.server import create_server

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")

# Relative tolerances per dtype: against closed forms, and against central finite
# differences (whose truncation error dominates).
RTOL = {np.dtype("float32"): 1e-5, np.dtype("float64"): 1e-12}
FD_RTOL = {np.dtype("float32"): 1e-3, np.dtype("float64"): 1e-6}


def allclose(actual, expected, dtype=np.float64, fd=False, atol=None):
    """Assert closeness with the tolerance for `dtype` (looser for finite differences)."""
    dtype = np.dtype(dtype)
    rtol = (FD_RTOL if fd else RTOL)[dtype]
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol if atol is None else atol)


@pytest.fixture(scope="session")
def server_address():
    server, port = create_server(ServerConfig(host="127.0.0.1", port=0, workers=8))
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture
def client(server_address):
    with Client(server_address, timeout=60.0) as c:
        yield c


@pytest.fixture
def rng():
    return np.random.default_rng(0)
