"""Websocket close codes of a federated run, shared by the coordinator and the device SDK.

The protocol's own codes (1002 protocol error, 1003 unsupported data, 1008 policy violation,
1009 message too big, 1011 internal error) live in :mod:`edge_sdk.protocol`; these say why a healthy
connection ends, so that a device knows whether to reconnect.
"""

from __future__ import annotations

__all__ = ["CLOSE_GOING_AWAY", "CLOSE_REJECTED", "CLOSE_REPLACED", "CLOSE_RUN_COMPLETE", "STOP_CODES"]

CLOSE_GOING_AWAY = 1001  # the coordinator is shutting down or restarting: reconnect (with backoff)
CLOSE_RUN_COMPLETE = 4000  # every round is done: the device stops
CLOSE_REPLACED = 4001  # this connection is superseded (older coordinators): the device reconnects
CLOSE_REJECTED = 4003  # the coordinator refuses this device (its budget fits no sub-network, ...)

# A device reconnects after any other close (network loss, restart, a protocol fault, 4001): what
# another connection does never makes a device stop for good.
STOP_CODES = frozenset({CLOSE_RUN_COMPLETE, CLOSE_REJECTED})
