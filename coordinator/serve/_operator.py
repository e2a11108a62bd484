"""The operator's HTTP requests on the daemon's port: on-demand deploys and their records.

``GET /deploy/<device>`` starts a deploy to one connected device (202, with its task id; 404 if the
device is not connected, 409 if it cannot take one now) and ``GET /deployments`` lists the records
(200). Both need ``Authorization: Bearer <[deploy] operator_token>`` (401 otherwise); without an
operator token, or with deploys off, both are 404.
"""

from __future__ import annotations

import asyncio
import http
import logging
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from coordinator.serve._connection import json_response, peer
from coordinator.serve._deploys import DeployService, deploy_task_id
from coordinator.serve._security import TokenTable

__all__ = ["OPERATOR_PATHS", "OperatorHTTP"]

logger = logging.getLogger(__name__)

OPERATOR_PATHS = ("/deploy/", "/deployments")


class OperatorHTTP:
    """Answers an operator's requests (before any websocket opens) for one server's deploys."""

    def __init__(self, deploys: DeployService, token: str | None) -> None:
        self.deploys = deploys
        self._tokens = TokenTable({"operator": token}) if token else None
        self._running: set[asyncio.Future[Any]] = set()

    def cancel(self) -> None:
        """Cancel the deploys operators started (the server is stopping)."""
        for running in list(self._running):
            running.cancel()

    def respond(self, connection: ServerConnection, request: Request) -> Response:
        """The response to ``GET /deploy/<device>`` or ``GET /deployments``."""
        if self._tokens is None or not self.deploys.enabled:
            return json_response(
                connection,
                http.HTTPStatus.NOT_FOUND,
                {"error": "on-demand deploys are off: set [deploy] operator_token (and enabled = true)"},
            )
        if self._tokens.identify(request.headers.get("Authorization")) is None:
            logger.warning("refused an operator request from %s: missing or wrong operator token", peer(connection))
            response = json_response(connection, http.HTTPStatus.UNAUTHORIZED, {"error": "bad operator token"})
            response.headers["WWW-Authenticate"] = 'Bearer realm="edge-fm operator"'
            return response
        path = request.path.split("?", 1)[0].rstrip("/")
        if path == "/deployments":
            records = [d.to_json() for d in self.deploys.records]
            return json_response(connection, http.HTTPStatus.OK, {"deployments": records})
        device_id = path[len("/deploy/") :] if path.startswith("/deploy/") else ""
        if not device_id or "/" in device_id:
            return json_response(
                connection, http.HTTPStatus.NOT_FOUND, {"error": "use GET /deploy/<device> or GET /deployments"}
            )
        return self._start(connection, device_id)

    def _start(self, connection: ServerConnection, device_id: str) -> Response:
        refusal = self.deploys.refusal(device_id)
        if refusal is not None:
            status = http.HTTPStatus.NOT_FOUND if refusal == "not connected" else http.HTTPStatus.CONFLICT
            return json_response(connection, status, {"device": device_id, "error": refusal})
        round_ = self.deploys.engine.round
        task_id = deploy_task_id(round_, device_id)
        running = asyncio.ensure_future(self.deploys.deploy(device_id, task_id=task_id))
        self._running.add(running)
        running.add_done_callback(self._running.discard)
        logger.info("operator at %s asked for a deploy to %s: %s", peer(connection), device_id, task_id)
        return json_response(
            connection,
            http.HTTPStatus.ACCEPTED,
            {"device": device_id, "task_id": task_id, "round": round_, "status": "started"},
        )
