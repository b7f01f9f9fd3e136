"""Request bytes that do not parse are the client's error: INVALID_ARGUMENT, not INTERNAL.

gRPC Python answers a request its deserializer cannot parse with INTERNAL "Exception
deserializing request!", and INTERNAL is reserved for bugs in hessd. The server's router
(service/handlers.py) gives every handler a lenient deserializer instead: a failure yields
an Unparsable marker rather than raising, and the handler, seeing it, answers
INVALID_ARGUMENT naming the message type.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["Unparsable", "lenient", "refusal"]


class Unparsable:
    """Stands for a message whose bytes did not parse."""

    def __init__(self, error: Exception):
        self.error = error


def lenient(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserialize`, returning an Unparsable instead of raising."""
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as e:  # DecodeError, or anything protobuf raises on bad bytes
            return Unparsable(e)

    return parse


def refusal(method: str, streamed: bool = False) -> str:
    """The message for a request (or, `streamed`, a message of a stream) that did not parse."""
    if streamed:
        return (
            f"a message of the stream does not parse as the message {method} takes; send "
            "messages serialised from hessd's .proto"
        )
    return (
        f"the request's bytes do not parse as the message {method} takes; send a message "
        "serialised from hessd's .proto (proto/v1/hessd.proto)"
    )
