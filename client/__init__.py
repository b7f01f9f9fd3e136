"""The thin hessd client. Importing it does not import JAX."""

from hessd.client._client import Client, Function
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

__all__ = [
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "Function",
    "HessdError",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
]
