"""Who may call: bearer tokens (checked by the server's router, service/handlers.py), TLS
and mutual TLS credentials.

Tokens come from a JSON file (--tokens-file) or the HESSD_TOKENS environment variable, in
the same format:

    {"tokens": [{"name": "pipeline", "token": "…", "permissions": ["export"],
                 "max_concurrent": 16}]}

A call carries `authorization: Bearer <token>` metadata. Without a token, or with one that
matches none, it is refused UNAUTHENTICATED; every comparison is constant-time and all
tokens are compared, so timing says nothing about which. The "export" permission allows
registering jax_export specs (PERMISSION_DENIED otherwise); max_concurrent bounds the calls
one token has in flight (RESOURCE_EXHAUSTED beyond it). Health checks and reflection need
no token, so probes and grpcurl work.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import os
import threading
from collections.abc import Mapping, Sequence

import grpc

__all__ = ["UNAUTHENTICATED", "InFlight", "Principal", "Tokens", "server_credentials"]

EXPORT = "export"
PERMISSIONS = frozenset({EXPORT})


@dataclasses.dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    name: str
    permissions: frozenset[str] = frozenset()
    max_concurrent: int | None = None


ANONYMOUS = Principal("anonymous", PERMISSIONS)


class Tokens:
    """The known tokens. Empty means authentication is off: every caller is ANONYMOUS."""

    def __init__(self, entries: Sequence[tuple[str, Principal]] = ()):
        self._entries = [(token.encode(), principal) for token, principal in entries]

    @classmethod
    def load(cls, path: str | None = None, environ: Mapping[str, str] = os.environ) -> Tokens:
        """From the file at `path`, else HESSD_TOKENS, else none. ValueError if malformed."""
        if path:
            with open(path, encoding="utf-8") as f:
                text, source = f.read(), path
        elif "HESSD_TOKENS" in environ:
            text, source = environ["HESSD_TOKENS"], "HESSD_TOKENS"
        else:
            return cls()
        try:
            document = json.loads(text)
            entries = []
            for item in document["tokens"]:
                permissions = frozenset(item.get("permissions", ()))
                if unknown := permissions - PERMISSIONS:
                    raise ValueError(f"unknown permissions {sorted(unknown)}")
                if len(item["token"]) < 16:
                    raise ValueError(f"token of {item['name']!r} is shorter than 16 characters")
                limit = item.get("max_concurrent")
                entries.append((item["token"], Principal(item["name"], permissions, limit)))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: not a valid tokens document ({e})") from None
        return cls(entries)

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def identify(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Principal | None:
        """The principal of `authorization: Bearer <token>` metadata; None if unknown."""
        if not self.enabled:
            return ANONYMOUS
        offered = b""
        if sum(key == "authorization" for key, _ in metadata or ()) > 1:
            return None  # two tokens: which one is meant is not ours to guess
        for key, value in metadata or ():
            if key == "authorization":
                text = value.decode() if isinstance(value, bytes) else value
                scheme, _, given = text.partition(" ")
                if scheme.lower() == "bearer":
                    offered = given.strip().encode()
        found = None
        for token, principal in self._entries:
            # Compare against every token, constant-time each: no early exit to time.
            if hmac.compare_digest(token, offered) and offered:
                found = principal
        return found


class InFlight:
    """The calls each token has in flight, against its max_concurrent."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def enter(self, principal: Principal) -> str | None:
        """Count one more call of `principal`; the reason it is refused, or None."""
        limit = principal.max_concurrent
        with self._lock:
            count = self._counts.get(principal.name, 0)
            if limit is not None and count >= limit:
                return (
                    f"token {principal.name!r} already has {limit} calls in flight, its "
                    "max_concurrent; wait for one to finish"
                )
            self._counts[principal.name] = count + 1
        return None

    def leave(self, principal: Principal) -> None:
        with self._lock:
            self._counts[principal.name] -= 1


UNAUTHENTICATED = (
    "missing, repeated or unknown token: send one metadata 'authorization: Bearer <token>' "
    "(Client(..., token=...))"
)


def server_credentials(cert: str, key: str, client_ca: str | None = None) -> grpc.ServerCredentials:
    """TLS with the PEM certificate chain and key at these paths; with `client_ca`, mutual
    TLS: clients must present a certificate that CA signed."""
    with open(cert, "rb") as f:
        chain = f.read()
    with open(key, "rb") as f:
        private_key = f.read()
    root = None
    if client_ca:
        with open(client_ca, "rb") as f:
            root = f.read()
    return grpc.ssl_server_credentials(
        [(private_key, chain)], root_certificates=root, require_client_auth=root is not None
    )
