"""The thin hessd client. Importing it does not import JAX."""

from hessd.client._aio import AsyncClient
from hessd.client._client import CHANNEL_OPTIONS, Client
from hessd.client._data import Handle
from hessd.client._errors import (
    Cancelled,
    DeadlineExceeded,
    HessdError,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from hessd.client._requests import Function, Spectrum
from hessd.client._sparse import Sparsity

__all__ = [
    "CHANNEL_OPTIONS",
    "AsyncClient",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "Function",
    "Handle",
    "HessdError",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Sparsity",
    "Spectrum",
    "Unauthenticated",
    "Unavailable",
]
