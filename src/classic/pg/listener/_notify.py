"""Send a notification, refused at the call when the server would refuse it.

``pg_notify()`` takes the channel as text: the name is used exactly as given,
as the listener's quoted ``LISTEN`` does (``MixedCase`` stays mixed case), and
both arguments travel as parameters, so nothing is quoted by hand. The server
refuses a payload of 8000 bytes or more, measured in the database's encoding
after conversion; we measure the same way first, so the error names the
payload and its size instead of arriving as a failed statement.
"""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection, Connection, ConnectionInfo

from ._core import python_codec
from ._facade import check_channel

MAX_PAYLOAD_BYTES = 7999
"""PostgreSQL's limit: a payload must be shorter than 8000 bytes (the default
page size, ``NOTIFY_PAYLOAD_MAX_LENGTH``), counted in the server's encoding."""

_STATEMENT = "SELECT pg_notify(%s, %s)"


def _codec(conn_info: ConnectionInfo) -> str:
    """The Python codec of the database's encoding; the client's for
    ``SQL_ASCII`` (the server stores the bytes it receives) or an encoding
    Python does not know."""
    server = python_codec(conn_info.parameter_status("server_encoding"))
    return server if server is not None else conn_info.encoding


def check_payload(payload: object, codec: str) -> str:
    """Refuse what the server would: not text, a NUL, unencodable, too long."""
    if not isinstance(payload, str):
        raise TypeError(f"payload must be a str, got {type(payload).__name__}")
    if "\0" in payload:
        raise ValueError("payload must not contain NUL characters")
    try:
        size = len(payload.encode(codec))
    except UnicodeEncodeError as ex:
        raise ValueError(
            f"payload cannot be sent to a database encoded in {codec}: {ex}"
        ) from ex
    if size > MAX_PAYLOAD_BYTES:
        raise ValueError(
            f"payload is {size} bytes in {codec}: PostgreSQL takes at most"
            f" {MAX_PAYLOAD_BYTES} (fewer than 8000); send a key and keep the"
            " data in a table"
        )
    return payload


def notify(conn: Connection[Any], channel: str, payload: str = "") -> None:
    """Send ``payload`` on ``channel`` with ``pg_notify()``.

    Delivered when the connection's transaction commits: at once on an
    autocommit connection. Bad input raises here, before anything is sent:
    ``InvalidChannel`` (a ``ValueError``) for a channel the listener would
    refuse, ``TypeError`` for a payload that is not a ``str``, ``ValueError``
    for one the server would refuse (8000 bytes or more in the database's
    encoding, a NUL, a character that encoding lacks). Errors of the server
    itself (a full notification queue) are psycopg's.
    """
    codec = _codec(conn.info)
    check_channel(channel, codec)
    check_payload(payload, codec)
    conn.execute(_STATEMENT, (channel, payload))


async def anotify(conn: AsyncConnection[Any], channel: str, payload: str = "") -> None:
    """``notify()`` for an ``AsyncConnection``: the same checks, then awaits it."""
    codec = _codec(conn.info)
    check_channel(channel, codec)
    check_payload(payload, codec)
    await conn.execute(_STATEMENT, (channel, payload))
