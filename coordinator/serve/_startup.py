"""What ``serve`` checks and binds before it loads the model.

A run's inputs that can be checked without the model are checked first (:func:`check_run`: the
model folder, the validation data, the TLS files, a run folder that already holds a run), then the
port is bound (:func:`bind_listener`), so a port in use or a typo in a path costs a second, not a
model load. From the bind on, devices' connections are accepted by the kernel and wait in its
backlog until the server takes them (their opening handshake is bounded on their side).
"""

from __future__ import annotations

import errno
import logging
import socket
from pathlib import Path

from coordinator.federation import (
    RunConfig,
    ServerConfig,
    check_data_file,
    check_model_folder,
    latest_checkpoint,
)
from coordinator.serve._security import server_ssl_context
from edge_sdk._errors import ConfigError

__all__ = ["bind_listener", "check_run"]

logger = logging.getLogger(__name__)

BACKLOG = 128


def check_run(config: RunConfig, *, resume: bool = False) -> None:
    """ConfigError for anything in ``config`` that would stop the run, found without loading the model."""
    val = config.validation
    tokenizer = val is not None and val.tokenizer is None and not Path(val.data).is_dir()
    check_model_folder(config.model.name, tokenizer=tokenizer)
    if val is not None:
        if val.tokenizer is not None and not (val.tokenizer / "tokenizer.json").is_file():
            raise ConfigError(f"[validation]: {val.tokenizer} has no tokenizer.json: set [validation] tokenizer = DIR")
        count = check_data_file(
            val.data, "[validation] data", limit=val.limit, data_format=val.format, task=config.model.task
        )
        logger.debug("[validation] data: %d examples in %s", count, val.data)
    if config.server.tls_cert is not None and config.server.tls_key is not None:
        server_ssl_context(config.server.tls_cert, config.server.tls_key)
    latest = latest_checkpoint(config.run.dir)
    if latest is not None and not resume:
        raise ConfigError(
            f"{config.run.dir} already holds a run (checkpoint {latest.name}): pass --resume to continue it,"
            " or set another [run] dir"
        )


def _addresses(host: str, port: int) -> list[tuple[int, tuple[object, ...]]]:
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"[server] host {host!r}: cannot be resolved ({exc.strerror})") from None
    out: list[tuple[int, tuple[object, ...]]] = []
    for family, _type, _proto, _name, address in infos:
        if (family, address) not in out:
            out.append((family, address))
    return out


def _bind(family: int, address: tuple[object, ...], config: ServerConfig) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's servers do
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        where = f"{config.host or '*'}:{config.port}"
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"[server] port {config.port} is already in use on {config.host or 'all interfaces'}: stop what"
                " listens there, or set another [server] port (0: any free port)"
            ) from None
        if exc.errno == errno.EACCES:
            raise ConfigError(f"[server] cannot listen on {where}: permission denied") from None
        raise ConfigError(f"[server] cannot listen on {where}: {exc.strerror or exc}") from None
    return sock


def bind_listener(config: ServerConfig) -> socket.socket | None:
    """The server's listening socket, bound and listening now (ConfigError if the port is taken).

    A host that resolves to several addresses (``localhost``: IPv4 and IPv6) is only checked here: each
    address is bound and released, and the server binds them all when it starts (None is returned).
    """
    addresses = _addresses(config.host, config.port)
    if len(addresses) != 1:
        for family, address in addresses:
            _bind(family, address, config).close()
        return None
    sock = _bind(*addresses[0], config)
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock
