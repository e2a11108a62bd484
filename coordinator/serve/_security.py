"""Who may connect: per-device bearer tokens, checked before the websocket opens; TLS contexts."""

from __future__ import annotations

import hashlib
import hmac
import ssl
from collections.abc import Mapping
from pathlib import Path

from edge_sdk._errors import ConfigError

__all__ = ["TokenTable", "server_ssl_context"]

_BEARER = "bearer "


class TokenTable:
    """Device name by bearer token; lookups compare sha256 digests in constant time."""

    def __init__(self, tokens: Mapping[str, str]) -> None:
        self._by_digest = {self._digest(token): name for name, token in tokens.items()}

    @staticmethod
    def _digest(token: str) -> bytes:
        return hashlib.sha256(token.encode("utf-8")).digest()

    def identify(self, authorization: str | None) -> str | None:
        """The device an ``Authorization: Bearer <token>`` header belongs to, or None."""
        if not authorization or not authorization.lower().startswith(_BEARER):
            return None
        presented = self._digest(authorization[len(_BEARER) :].strip())
        found = None
        for digest, name in self._by_digest.items():  # every entry compared: no early exit
            if hmac.compare_digest(digest, presented):
                found = name
        return found

    def __len__(self) -> int:
        return len(self._by_digest)


def server_ssl_context(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """A TLS server context (TLS 1.2 or newer) from a PEM certificate chain and its private key."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS certificate {cert} / key {key}: {exc}") from None
    return context
