"""Sending: insert messages and wake the consumers, in the caller's transaction.

This is the transactional outbox: the message is a row written in the same
transaction as the caller's own writes, so it exists if and only if they
commit. The ``NOTIFY`` is queued in that transaction too, and PostgreSQL
sends it at commit, or never; it is only a wake-up, and consumers find
every message in the table even when no notification reaches them.

Why one ``NOTIFY`` per channel and transaction: PostgreSQL serialises the
commits of all transactions that notified behind one global lock, and each
queued notification costs work under it. Every message of a channel is
announced with the same payload (the table's name), and PostgreSQL keeps one
of identical (channel, payload) pairs queued in a transaction, so a
transaction sending a thousand messages on a channel commits one
notification.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import psycopg

# The core's own check, so that send() refuses exactly what add_callback()
# refuses; it is not public (yet), hence the private module.
from classic.pg.listener import check_channel

from ._schema import DEFAULT_TABLE, Queries


@lru_cache(maxsize=64)
def queries(table: str) -> Queries:
    """The composed statements of a table, made once per name."""
    return Queries.for_table(table)


def _check_payload(payload: object) -> str:
    if not isinstance(payload, str):
        raise TypeError(f"payload must be a str, got {type(payload).__name__}")
    return payload


def send(
    conn: psycopg.Connection[Any],
    channel: str,
    payload: str,
    *,
    table: str = DEFAULT_TABLE,
) -> int:
    """Add a message to the outbox in ``conn``'s current transaction; return its id.

    The message and its wake-up commit or roll back with the rest of the
    transaction. On a connection in autocommit mode the statement is its own
    transaction and commits at once.

    :param conn: the connection of the transaction the message belongs to.
    :param channel: the channel the handler was added for (a channel name:
        non-empty, at most 63 bytes).
    :param payload: any text, of any length (it is stored, not notified).
    :param table: the outbox table, as given to ``install()``.
    """
    check_channel(channel, conn.info.encoding)
    q = queries(table)
    row = conn.execute(q.send, (channel, _check_payload(payload), channel, table))
    result = row.fetchone()
    assert result is not None  # an INSERT ... RETURNING of one row
    return int(result[0])


def send_many(
    conn: psycopg.Connection[Any],
    channel: str,
    payloads: Sequence[str],
    *,
    table: str = DEFAULT_TABLE,
) -> list[int]:
    """Add several messages to one channel in one statement; return their ids.

    As ``send()`` called once per payload, in order (the ids ascend with
    ``payloads``), at the cost of one round trip and one notification.
    """
    check_channel(channel, conn.info.encoding)
    values = [_check_payload(p) for p in payloads]
    if not values:
        return []
    q = queries(table)
    rows = conn.execute(q.send_many, (channel, values, channel, table)).fetchall()
    return [int(row[0]) for row in rows]
