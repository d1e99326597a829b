"""The reason part of an error message: what went wrong, without Python's view of it.

A message names the file, URI or run itself; the reason that follows is the exception's own
text, minus what only a Python programmer reads: object reprs (``<_io.BytesIO object at
0x7f...>``), and the chain of client-library wrappers around a network failure
(``HTTPConnectionPool(host=..., port=...): Max retries exceeded ... (Caused by
NewConnectionError(...))``), which comes down to one OS error: ``[Errno 111] Connection refused``.
"""

from __future__ import annotations

import re
import socket

_OBJECT_REPR = re.compile(r"\s*<[^<>\n]*? at 0x[0-9a-fA-F]+>")
#: The network failures a client library wraps (requests, urllib3, MLflow's REST client).
_NETWORK = (ConnectionError, TimeoutError, socket.gaierror)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what caused it (``raise ... from``, an exception raised while handling
    another, urllib3's ``reason``), outermost first; each once."""
    seen: list[BaseException] = []
    todo: BaseException | None = exc
    while todo is not None and all(todo is not s for s in seen):
        seen.append(todo)
        reason = getattr(todo, "reason", None)
        todo = todo.__cause__ or todo.__context__ or (reason if isinstance(reason, BaseException) else None)
    return seen


def plain_reason(exc: BaseException) -> str:
    """One line saying why ``exc`` happened: for a network failure anywhere in its chain the
    innermost one ('[Errno 111] Connection refused', 'timed out'); otherwise its text
    without object reprs. Never empty: the exception's class name when it has no text."""
    network = [e for e in _chain(exc) if isinstance(e, _NETWORK)]
    cause = network[-1] if network else exc
    text = " ".join(_OBJECT_REPR.sub("", str(cause)).split())
    return text or type(cause).__name__
