"""One typed exception per gRPC status code, each carrying `.code` and the server's message."""

from __future__ import annotations

import grpc

__all__ = [
    "Cancelled",
    "DeadlineExceeded",
    "HessdError",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "from_rpc_error",
]


class HessdError(Exception):
    """A call to hessd failed. `code` is the grpc.StatusCode, `message` the server's words."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgument(HessdError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(HessdError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(HessdError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(HessdError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(HessdError):
    code = grpc.StatusCode.CANCELLED


class Unavailable(HessdError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(HessdError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(HessdError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Internal(HessdError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        ResourceExhausted,
        DeadlineExceeded,
        Cancelled,
        Unavailable,
        Unauthenticated,
        PermissionDenied,
        Internal,
    )
}


def from_rpc_error(error: grpc.RpcError) -> HessdError:
    """The typed exception for a failed call; HessdError itself for codes without a class."""
    code = error.code()
    cls = _BY_CODE.get(code, HessdError)
    return cls(error.details() or "", code)
