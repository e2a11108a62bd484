"""The status port: ``GET /`` (the page), ``GET /status.json``, ``GET /metrics``, behind the operator token.

Every route answers 401 without the token. A client shows it as ``Authorization: Bearer <token>``
(scripts, Prometheus), or as the page's cookie: a browser gets it by posting the login form the 401
page holds (``POST /login``), or by opening ``/?token=<token>`` once (redirected to the same path
without the token). The cookie is HttpOnly, SameSite=Strict, and holds an HMAC of the token, never
the token itself (which also allows deploys).

Why the standard library's ``ThreadingHTTPServer`` in a thread of its own, and not the websocket
server's ``process_request`` or an asyncio handler: the status page is on its own port, its HTTP
(a POSTed form, cookies) is more than the websocket library's handshake parser takes (GET only),
and a slow or hostile client then costs a thread with a socket timeout, never the event loop that
runs the rounds. What the page shows is read on the event loop (the connections are the loop's):
the request's thread hands the snapshot over with ``run_coroutine_threadsafe``, bounded by
``SNAPSHOT_TIMEOUT_S`` (503 past it). Requests are bounded: ``MAX_BODY_BYTES`` of form,
``SOCKET_TIMEOUT_S`` per socket read, ``MAX_CONCURRENT`` requests served at once (503 beyond).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import hmac
import http
import json
import logging
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import TYPE_CHECKING, Any

from coordinator.federation import StatusConfig
from coordinator.serve._connection import start_thread
from coordinator.serve._metrics import CONTENT_TYPE, watch_loop_lag
from coordinator.serve._status import StatusBoard
from edge_sdk._errors import ConfigError

if TYPE_CHECKING:
    from coordinator.serve._server import CoordinatorServer

__all__ = ["COOKIE", "MAX_BODY_BYTES", "StatusHTTP", "StatusService", "open_status"]

logger = logging.getLogger(__name__)

COOKIE = "edge_fm_status"
MAX_BODY_BYTES = 4096  # a login form
MAX_CONCURRENT = 16
SOCKET_TIMEOUT_S = 10.0
SNAPSHOT_TIMEOUT_S = 5.0
_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self';"
    " img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_LOGIN = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>edge-fm status: sign in</title>
<style>body{{font:15px system-ui,sans-serif;margin:4em auto;max-width:26em;color:#222}}
input{{font:inherit;padding:.4em;width:100%;box-sizing:border-box;margin:.5em 0}}
button{{font:inherit;padding:.4em 1.2em}}.e{{color:#b00}}</style></head>
<body><h1>edge-fm status</h1><p>This page needs the coordinator's operator token
(<code>[deploy] operator_token</code>).</p>{error}
<form method="post" action="/login"><label>Operator token
<input type="password" name="token" autocomplete="current-password" autofocus></label>
<button type="submit">Sign in</button></form></body></html>
"""


def _page() -> bytes:
    return resources.files("coordinator.serve").joinpath("_status_page.html").read_bytes()


class StatusHTTP:
    """The status port of one server (see the module docstring); ``start`` binds, ``close`` stops."""

    def __init__(self, board: StatusBoard, token: str, host: str, port: int) -> None:
        self.board = board
        self._token_digest = hashlib.sha256(token.encode("utf-8")).digest()
        self._cookie = hmac.new(token.encode("utf-8"), b"edge-fm status page", hashlib.sha256).hexdigest()
        self._host, self._requested_port = host, port
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots = threading.BoundedSemaphore(MAX_CONCURRENT)
        self._page = _page()
        self.port: int | None = None

    def start(self) -> int:
        """Bind and serve in a daemon thread (call on the event loop); returns the bound port."""
        self._loop = asyncio.get_running_loop()
        handler = type("Handler", (_Handler,), {"status": self})
        httpd = ThreadingHTTPServer((self._host, self._requested_port), handler)
        httpd.daemon_threads = True
        self._httpd = httpd
        self.port = int(httpd.server_address[1])
        self._thread = threading.Thread(target=httpd.serve_forever, name="edge-fm-status", daemon=True)
        self._thread.start()
        logger.info("status page on http://%s:%d/ (operator token required)", self._host, self.port)
        return self.port

    def close(self) -> None:
        """Stop serving (blocks up to the server's poll interval: call off the event loop, or at exit)."""
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()

    # ----------------------------------------------------------------- used by request threads

    def authorized(self, authorization: str | None, cookie: str | None) -> bool:
        """The request shows the operator token (bearer) or the page's cookie."""
        ok = False
        if authorization and authorization.lower().startswith("bearer "):
            ok = self.token_ok(authorization[7:].strip())
        if cookie:
            for part in cookie.split(";")[:32]:
                name, _, value = part.strip().partition("=")
                if name == COOKIE and hmac.compare_digest(value.encode("utf-8", "replace"), self._cookie.encode()):
                    ok = True
        return ok

    def token_ok(self, token: str) -> bool:
        presented = hashlib.sha256(token.encode("utf-8", "replace")).digest()
        return hmac.compare_digest(presented, self._token_digest)

    def cookie_header(self) -> str:
        return f"{COOKIE}={self._cookie}; HttpOnly; SameSite=Strict; Path=/"

    def snapshot(self) -> dict[str, Any]:
        """The board's snapshot, taken on the event loop; TimeoutError past ``SNAPSHOT_TIMEOUT_S``."""
        assert self._loop is not None

        async def take() -> dict[str, Any]:
            return self.board.snapshot()

        future = asyncio.run_coroutine_threadsafe(take(), self._loop)
        try:
            return future.result(SNAPSHOT_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError("no snapshot within the bound") from None


class StatusService:
    """A server's status port and its event-loop lag probe; ``await close()`` stops both."""

    def __init__(self, http_server: StatusHTTP) -> None:
        self.http = http_server
        self._lag = asyncio.ensure_future(watch_loop_lag(http_server.board.metrics))

    @property
    def port(self) -> int | None:
        return self.http.port

    async def close(self) -> None:
        self._lag.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._lag
        await start_thread(self.http.close)  # shutdown() waits for the serving thread's poll


def open_status(server: CoordinatorServer, config: StatusConfig, token: str | None) -> StatusService | None:
    """Open ``server``'s status port if ``config`` enables it (call on the event loop); None when off.

    ConfigError if the port cannot be bound (taken, or a host this machine does not have)."""
    if not config.enabled:
        return None
    if not token:
        logger.warning("the status page is off: it needs an operator token ([deploy] operator_token)")
        return None
    status = StatusHTTP(server.status, token, config.host, config.port)
    try:
        status.start()
    except OSError as exc:
        raise ConfigError(f"[status]: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from None
    return StatusService(status)


class _Handler(BaseHTTPRequestHandler):
    status: StatusHTTP
    timeout = SOCKET_TIMEOUT_S
    server_version = "edge-fm-status"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("status %s: " + format, self.client_address[0], *args)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        if not self.status._slots.acquire(blocking=False):
            self._send(http.HTTPStatus.SERVICE_UNAVAILABLE, b"busy\n", "text/plain; charset=utf-8")
            return
        try:
            self._route(method)
        except ValueError:  # more query or form fields than parse_qs takes (max_num_fields)
            self._send(http.HTTPStatus.BAD_REQUEST, b"bad request\n", "text/plain; charset=utf-8")
        except Exception:  # a bug costs this request, never the status server
            logger.exception("status page: internal error")
            self._send(http.HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error\n", "text/plain; charset=utf-8")
        finally:
            self.status._slots.release()

    def _route(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        path = url.path
        if method == "POST":
            if path != "/login":
                self._send(http.HTTPStatus.METHOD_NOT_ALLOWED, b"use GET\n", "text/plain; charset=utf-8")
                return
            self._login()
            return
        query = urllib.parse.parse_qs(url.query, max_num_fields=8)
        token = query.get("token", [""])[0]
        if token and self.status.token_ok(token):  # a link with the token: set the cookie, drop the token
            self._redirect(path or "/")
            return
        if not self.status.authorized(self.headers.get("Authorization"), self.headers.get("Cookie")):
            self._unauthorized()
            return
        if path == "/":
            self._send(http.HTTPStatus.OK, self.status._page, "text/html; charset=utf-8")
        elif path == "/status.json":
            self._snapshot(lambda snap: (json.dumps(snap).encode(), "application/json"))
        elif path == "/metrics":
            self._snapshot(lambda snap: (self.status.board.metrics.render(), CONTENT_TYPE))
        else:
            self._send(http.HTTPStatus.NOT_FOUND, b"not found: use /, /status.json or /metrics\n", "text/plain")

    def _snapshot(self, render: Any) -> None:
        try:
            body, kind = render(self.status.snapshot())
        except TimeoutError:  # the loop did not answer in time (or is gone)
            self._send(http.HTTPStatus.SERVICE_UNAVAILABLE, b"the coordinator is busy\n", "text/plain")
            return
        self._send(http.HTTPStatus.OK, body, kind)

    def _login(self) -> None:
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            self._send(http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE, b"form too large\n", "text/plain")
            return
        form = urllib.parse.parse_qs(self.rfile.read(int(length)).decode("utf-8", "replace"), max_num_fields=8)
        if self.status.token_ok(form.get("token", [""])[0]):
            self._redirect("/")
        else:
            self._unauthorized('<p class="e">Wrong token.</p>')

    def _unauthorized(self, error: str = "") -> None:
        page = _LOGIN.format(error=error).encode()
        self._send(http.HTTPStatus.UNAUTHORIZED, page, "text/html; charset=utf-8", authenticate=True)

    def _redirect(self, where: str) -> None:
        self.send_response(http.HTTPStatus.SEE_OTHER)
        self.send_header("Location", where if where.startswith("/") and not where.startswith("//") else "/")
        self.send_header("Set-Cookie", self.status.cookie_header())
        self.send_header("Content-Length", "0")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()

    def _send(self, status: http.HTTPStatus, body: bytes, kind: str, *, authenticate: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", _CSP)
        if authenticate:
            self.send_header("WWW-Authenticate", 'Bearer realm="edge-fm status"')
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
