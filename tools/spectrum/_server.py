"""The server as the job sees it: a server that is unavailable is waited for, within a
budget; a restarted one that has forgotten the function (or the data) is given it again."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from hessd.client import (
    Client,
    DeadlineExceeded,
    Function,
    Handle,
    NotFound,
    Spectrum,
    Unavailable,
)
from hessd.tools._common import ServerGone
from hessd.tools._function_file import FunctionSpec

__all__ = ["FIRST_BACKOFF_S", "FIRST_CONTACT_S", "MAX_BACKOFF_S", "RetryingServer"]

FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 10.0
# The least the first contact waits, even with --retry-seconds 0: a connection (TLS
# included) takes some milliseconds to set up.
FIRST_CONTACT_S = 1.0
# The clock and the backoff waits go through here, so that tests can make them instant.
_clock = time.monotonic
_sleep = time.sleep

T = TypeVar("T")


@dataclasses.dataclass
class _Backoff:
    """The waiting one call may do: its budget and what is left of it (seconds), and the
    next sleep."""

    budget: float
    left: float
    delay: float = FIRST_BACKOFF_S


class RetryingServer:
    """Calls that fail with UNAVAILABLE are retried with exponential backoff, each time the
    server has answered a ServerInfo call again on a fresh channel; then the call is sent
    again with its full `timeout`, so that a long computation on a server that came back is
    not cut short. `retry_seconds` bounds the waiting per call, over all its outages: the
    sleeps and the ServerInfo calls, the last sleep and each ServerInfo deadline cut to what
    is left of it. When a restarted server has forgotten the function (NOT_FOUND), it is
    registered again and the call retried once.

    Not counted: the retries the client's channel itself makes inside a call before the
    call fails (gRPC's retry policy, a few seconds), which only a deadline could cut, and
    a call's deadline must leave room for its computation. `connect()` first makes the
    start of a job wait within the budget alone."""

    def __init__(
        self,
        address: str,
        timeout: float,
        retry_seconds: float,
        spec: FunctionSpec,
        connection: Mapping[str, Any] | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.retry_seconds = retry_seconds
        self.spec = spec
        self.connection = dict(connection or {})
        self.function: Function | None = None
        self._client = self._connect()

    def connect(self) -> None:
        """Wait for the server to answer ServerInfo, up to `retry_seconds` (at least
        FIRST_CONTACT_S) in all: a server that is down at the start is found so within the
        budget, not after the retries gRPC makes inside the first call."""
        budget = max(self.retry_seconds, FIRST_CONTACT_S)
        backoff = _Backoff(budget=budget, left=budget)
        start = _clock()
        try:
            self._client.server_info(timeout=budget)
        except (Unavailable, DeadlineExceeded) as e:
            backoff.left -= _clock() - start
            self._wait_until_back(backoff, e)

    def register(self) -> Function:
        spec = self.spec
        self.function = self._retrying(
            lambda: self._client.register(spec.expression, spec.inputs, spec.constants, spec.dtype)
        )
        return self.function

    def put(self, array: np.ndarray) -> Handle:
        """Upload an array (the data set's) once; a later call that finds the server
        without it (restarted, evicted) has the client put it again."""
        return self._retrying(lambda: self._client.put(array))

    def spectrum(
        self, points: Mapping[str, np.ndarray], method: str, options: Mapping[str, Any]
    ) -> Spectrum:
        def call() -> Spectrum:
            assert self.function is not None, "register() first"
            return self._client.spectrum(self.function, points, method, **options)

        try:
            return self._retrying(call)
        except NotFound:
            self.register()
            return self._retrying(call)

    def close(self) -> None:
        self._client.close()

    def _connect(self) -> Client:
        return Client(self.address, timeout=self.timeout, **self.connection)

    def _retrying(self, call: Callable[[], T]) -> T:
        backoff = _Backoff(budget=self.retry_seconds, left=self.retry_seconds)
        while True:
            try:
                return call()
            except Unavailable as e:
                self._wait_until_back(backoff, e)

    def _wait_until_back(self, backoff: _Backoff, error: Exception) -> None:
        """Sleep and ask ServerInfo until the server answers; ServerGone once the budget
        is spent."""
        while True:
            if backoff.left <= 0:
                waited = backoff.budget - backoff.left
                raise ServerGone(
                    f"the server at {self.address} stayed unavailable: waited {waited:.1f} s "
                    f"for it (--retry-seconds {self.retry_seconds:g}); last error: {error}"
                )
            now = _clock()
            _sleep(min(backoff.delay, backoff.left))
            backoff.delay = min(2 * backoff.delay, MAX_BACKOFF_S)
            # A fresh channel tries to connect at once; the old one may be in gRPC's own
            # reconnect backoff.
            self._client.close()
            self._client = self._connect()
            backoff.left -= _clock() - now
            if backoff.left <= 0:
                continue
            now = _clock()
            try:
                self._client.server_info(timeout=backoff.left)
                return
            except (Unavailable, DeadlineExceeded) as e:
                error = e
            finally:
                backoff.left -= _clock() - now
