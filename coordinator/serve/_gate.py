"""The daemon's door: sockets counted from accept, and each HTTP request answered before a websocket opens.

- **Sockets.** Every accepted TCP connection counts towards ``[server] max_connections`` from the
  moment it is accepted, whatever it sends (a half-open socket with no or a partial upgrade request
  counts as much as a device), until it closes. A request that arrives while more than
  ``max_connections`` sockets are open is answered HTTP 503; beyond twice the limit a new socket is
  closed at once, unanswered. The upgrade request must come within :data:`HANDSHAKE_TIMEOUT_S` (or
  ``hello_timeout_s`` if shorter; websockets' ``open_timeout``), so a silent socket is held seconds,
  not the Hello's timeout. (With TLS, a socket is counted once its TLS handshake is done; the TLS
  handshake itself is bounded by the same timeout.)
- **Requests**, in order: a header given twice where one is expected (``Authorization``) is answered
  400, never 500; an operator's ``GET /deploy/<device>`` or ``/deployments`` goes to
  :class:`~coordinator.serve._operator.OperatorHTTP`; a missing or unknown bearer token 401; a
  stopping server or too many sockets 503; a device that already has a live connection 409.
- **One connection per device.** The 409 keeps a device's live connection (and its task) safe from a
  second connection with its token: the newcomer is refused, never the device. A device whose old
  connection died without a close gets in once websocket keepalive has closed the old one (ping every
  20 s, 20 s to answer: within about 40 s); the SDK retries a 409 with its backoff.

Refusals are logged at most a few lines a second per peer address (:class:`LogLimiter`).
"""

from __future__ import annotations

import asyncio
import http
import logging

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response
from websockets.protocol import State

from coordinator.federation import LogLimiter, clip
from coordinator.serve._connection import peer
from coordinator.serve._operator import OPERATOR_PATHS, OperatorHTTP
from coordinator.serve._security import TokenTable

__all__ = ["HANDSHAKE_TIMEOUT_S", "SINGLE_HEADERS", "Gate"]

logger = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0  # from accept to the upgrade request answered
SINGLE_HEADERS = ("Authorization",)  # headers that must not be given twice


def _address(connection: ServerConnection) -> str:
    """The peer's address without its port (the rate limit's key)."""
    return peer(connection).rpartition(":")[0] or peer(connection)


class Gate:
    """Counts a server's sockets and answers each HTTP request (websockets' ``process_request``)."""

    def __init__(self, tokens: TokenTable, max_connections: int, operator: OperatorHTTP) -> None:
        self.tokens = tokens
        self.max_connections = max_connections
        self.operator = operator
        self.stopping = False
        self.sockets: set[ServerConnection] = set()  # accepted and not yet closed
        self._admitted: dict[ServerConnection, str] = {}  # passed process_request, handler not started
        self._claims: dict[str, ServerConnection] = {}  # device name -> its live connection
        self._log = LogLimiter(logger)

    def connection_class(self) -> type[ServerConnection]:
        """The websockets connection class whose sockets this gate counts (``serve(create_connection=)``)."""
        gate = self

        class CountedConnection(ServerConnection):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                super().connection_made(transport)
                gate.accepted(self, self.transport)

            def connection_lost(self, exc: Exception | None) -> None:
                gate.sockets.discard(self)
                super().connection_lost(exc)

        return CountedConnection

    def accepted(self, connection: ServerConnection, transport: asyncio.Transport) -> None:
        if len(self.sockets) >= 2 * self.max_connections:
            self._log.warning(
                _address(connection),
                "closed a socket from %s at once: %d sockets open, twice max_connections",
                peer(connection),
                len(self.sockets),
            )
            transport.abort()
            return
        self.sockets.add(connection)

    def abort_all(self) -> None:
        """Cut every socket still open (a stop's last step)."""
        for connection in list(self.sockets):
            connection.transport.abort()

    # ------------------------------------------------------------------------------- requests

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """The answer to an HTTP request, or None to open the websocket (the device is then claimed)."""
        try:
            return self._answer(connection, request)
        except Exception as exc:  # a bug costs one request and a rate-limited line, never a traceback each
            self._log.log(
                "internal",
                logging.ERROR,
                "internal error answering %s from %s: %s",
                clip(request.path, 80),
                peer(connection),
                clip(repr(exc)),
                exc_info=True,
            )
            return connection.respond(http.HTTPStatus.INTERNAL_SERVER_ERROR, "internal error\n")

    def _answer(self, connection: ServerConnection, request: Request) -> Response | None:
        address = _address(connection)
        for header in SINGLE_HEADERS:
            if len(request.headers.get_all(header)) > 1:
                self._log.warning(
                    address, "refused a request from %s: %s given twice (HTTP 400)", peer(connection), header
                )
                return connection.respond(http.HTTPStatus.BAD_REQUEST, f"one {header} header expected\n")
        if request.path.split("?", 1)[0].startswith(OPERATOR_PATHS):
            return self.operator.respond(connection, request)
        name = self.tokens.identify(request.headers.get("Authorization"))
        if name is None:
            self._log.warning(
                address, "refused a connection from %s: missing or unknown bearer token (HTTP 401)", peer(connection)
            )
            response = connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or unknown bearer token\n")
            response.headers["WWW-Authenticate"] = 'Bearer realm="edge-fm"'
            return response
        if self.stopping:
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "the coordinator is stopping\n")
        if len(self.sockets) > self.max_connections:
            self._log.warning(
                address,
                "refused %s from %s: %d connections is the limit (HTTP 503)",
                name,
                peer(connection),
                self.max_connections,
            )
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "too many connections, retry later\n")
        holder = self._claims.get(name)
        if holder is not None and holder.state in (State.CONNECTING, State.OPEN):  # closing: on its way out
            self._log.warning(
                address,
                "refused a second connection for %s from %s: it is connected from %s (HTTP 409)",
                name,
                peer(connection),
                peer(holder),
            )
            return connection.respond(http.HTTPStatus.CONFLICT, "this device is already connected\n")
        self._admitted = {c: n for c, n in self._admitted.items() if c.state is not State.CLOSED}
        self._admitted[connection] = name
        self._claims[name] = connection
        return None

    def claim(self, connection: ServerConnection) -> str | None:
        """The device ``connection`` was admitted as (once, when its handler starts)."""
        return self._admitted.pop(connection, None)

    def release(self, name: str, connection: ServerConnection) -> bool:
        """``connection`` (of device ``name``) is over: the device may connect again. False when a newer
        connection of the device already holds the name."""
        holder = self._claims.get(name)
        if holder is connection:
            del self._claims[name]
        return holder is None or holder is connection
