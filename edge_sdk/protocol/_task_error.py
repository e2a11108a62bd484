"""The text of the Error a device sends when one of its tasks raised: the task, the exception, bounded.

A device answers *any* exception in a task (not only the SDK's own errors) with ``Error(task_failed)``
naming the task, so the coordinator records the failure at once instead of waiting for the round's
deadline. The text is ``"<kind> task <id> failed: <ExceptionType>: <message>"``, cut at a character
boundary to at most :data:`MAX_ERROR_MESSAGE_BYTES` UTF-8 bytes (far below the protocol's
``MAX_TEXT_BYTES`` for a whole control message).
"""

from __future__ import annotations

from typing import Final

__all__ = ["MAX_ERROR_MESSAGE_BYTES", "task_error_message"]

MAX_ERROR_MESSAGE_BYTES: Final = 2000


def task_error_message(kind: str, task_id: str, exc: BaseException) -> str:
    """``"train task t-1 failed: IndexError: ..."`` in at most :data:`MAX_ERROR_MESSAGE_BYTES` bytes."""
    detail = str(exc).strip() or "(no message)"
    text = f"{kind} task {task_id[:256]} failed: {type(exc).__name__}: {detail}"
    raw = text.encode("utf-8")
    if len(raw) <= MAX_ERROR_MESSAGE_BYTES:
        return text
    return raw[: MAX_ERROR_MESSAGE_BYTES - 3].decode("utf-8", errors="ignore") + "..."
