"""Typed failures of the service, each mapped to one gRPC status code at the edge.

Code anywhere in the service raises one of these with a message that says what was
received, what was expected and how to fix it; the servicer turns it into a status.
Any other exception reaching the servicer is a bug and becomes INTERNAL.
"""

from __future__ import annotations

import grpc

__all__ = [
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "ServiceError",
]


class ServiceError(Exception):
    """A failure that the client caused or should know about; carries its status code."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    """Bad spec, shape, dtype, bytes, or a kind this function does not support."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    """An unknown function id."""

    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(ServiceError):
    """A configured limit, or device memory."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PermissionDenied(ServiceError):
    """The server is not configured to allow this request."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Cancelled(ServiceError):
    """The caller went away (cancelled, or its deadline passed) before the work began."""

    code = grpc.StatusCode.CANCELLED


class DeadlineExceeded(ServiceError):
    """A call ran past the server's own bound on a call (--max-call-seconds)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
