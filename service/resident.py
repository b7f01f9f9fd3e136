"""Resident tensors: arrays uploaded once (Put) and named by handle in later calls.

A handle is the sha256 of (dtype, shape, little-endian bytes), so the same array has the
same handle on every replica and a client can give it again to whichever one answers. The
store is an LRU bounded in bytes; the arrays are read-only and are never copied when used.
"""

from __future__ import annotations

import collections
import hashlib
import threading

import numpy as np

from hessd.proto import codec
from hessd.service.errors import NotFound, ResourceExhausted

__all__ = ["ResidentStore", "handle_of"]


def handle_of(array: np.ndarray) -> str:
    """The content address of an array: what Put answers, and what the client computes."""
    array = codec.little_endian(np.ascontiguousarray(array))
    digest = hashlib.sha256()
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.reshape(-1).view(np.uint8).data)
    return digest.hexdigest()


class ResidentStore:
    """handle -> array, least recently used evicted first, at most `max_bytes` in all."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._arrays: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._arrays)

    def put(self, array: np.ndarray) -> str:
        """Keep `array` (made read-only) and return its handle; evicts older ones to fit."""
        if array.nbytes > self.max_bytes:
            raise ResourceExhausted(
                f"the tensor is {array.nbytes} bytes, over this server's resident limit of "
                f"{self.max_bytes} bytes (--max-resident-bytes); send it with the call instead"
            )
        handle = handle_of(array)
        array = np.asarray(array)
        array.flags.writeable = False
        with self._lock:
            if handle in self._arrays:
                self._arrays.move_to_end(handle)
                return handle
            self._arrays[handle] = array
            self._bytes += array.nbytes
            while self._bytes > self.max_bytes:
                _, evicted = self._arrays.popitem(last=False)
                self._bytes -= evicted.nbytes
        return handle

    def get(self, handle: str, what: str) -> np.ndarray:
        with self._lock:
            array = self._arrays.get(handle)
            if array is not None:
                self._arrays.move_to_end(handle)
        if array is None:
            raise NotFound(
                f"{what} names resident tensor {handle[:16]}…, which this server does not hold "
                "(evicted, restarted, or another replica): put it again (the client does this "
                "by itself)"
            )
        return array
