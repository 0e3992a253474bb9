"""The outbox table: its name, its creation, and every statement run on it.

Table names are always quoted as identifiers (``psycopg.sql.Identifier``), so
``Outbox`` and ``outbox`` are two tables and no name can inject SQL. A name
is one identifier, found through the ``search_path``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

DEFAULT_TABLE = "listener_outbox"

_INDEX_SUFFIX = "_pending"
MAX_TABLE_BYTES = 63 - len(_INDEX_SUFFIX)
"""PostgreSQL truncates identifiers beyond 63 bytes: the index name, the
table's name plus a suffix, must fit too."""

_INSTALL_LOCK = "classic_pg_listener_outbox.install"
"""Key of the advisory lock that serialises concurrent ``install()`` calls:
two ``CREATE TABLE IF NOT EXISTS`` racing each other can fail."""


def check_table(table: object) -> str:
    """Refuse, at the caller, a table name PostgreSQL would not keep as given."""
    if not isinstance(table, str) or not table:
        raise ValueError(f"table must be a non-empty str, got {table!r}")
    if "\0" in table:
        raise ValueError(f"table must not contain NUL characters: {table!r}")
    size = len(table.encode("utf-8"))
    if size > MAX_TABLE_BYTES:
        raise ValueError(
            f"table {table!r} is {size} bytes long: at most {MAX_TABLE_BYTES}, so"
            f" that its index name ({table!r} + {_INDEX_SUFFIX!r}) fits in 63"
        )
    return table


def install(conn: psycopg.Connection[Any], table: str = DEFAULT_TABLE) -> None:
    """Create the outbox table and its index, unless they exist.

    Idempotent, and safe to run from several processes at once (an advisory
    lock serialises them). Runs in a transaction of its own, or in a
    savepoint of the caller's current transaction, and commits only what it
    created.

    Columns: ``id`` (identity, the order of messages), ``channel``,
    ``payload`` (text, any length: it never travels in a ``NOTIFY``),
    ``created_at``, ``attempts`` (failed attempts so far),
    ``next_attempt_at`` (retries wait for it), ``last_error`` and ``dead_at``
    (set once a message failed ``max_attempts`` times). Handled messages are
    deleted.
    """
    t = sql.Identifier(check_table(table))
    index = sql.Identifier(table + _INDEX_SUFFIX)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (_INSTALL_LOCK,))
        conn.execute(
            sql.SQL(
                """CREATE TABLE IF NOT EXISTS {t} (
                    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                    channel text NOT NULL,
                    payload text NOT NULL,
                    created_at timestamptz NOT NULL DEFAULT now(),
                    attempts integer NOT NULL DEFAULT 0,
                    next_attempt_at timestamptz NOT NULL DEFAULT now(),
                    last_error text,
                    dead_at timestamptz
                )"""
            ).format(t=t)
        )
        # Claims read one channel in id order, pending messages only: the
        # partial index stays as small as the backlog, dead letters aside.
        conn.execute(
            sql.SQL(
                "CREATE INDEX IF NOT EXISTS {index} ON {t} (channel, id)"
                " WHERE dead_at IS NULL"
            ).format(index=index, t=t)
        )


@dataclass(frozen=True)
class Queries:
    """The statements on one outbox table, composed once."""

    table: str
    send: sql.Composed
    send_many: sql.Composed
    claim: sql.Composed
    claim_ordered: sql.Composed
    complete: sql.Composed
    others_due: sql.Composed
    retry: sql.Composed
    bury: sql.Composed

    @classmethod
    def for_table(cls, table: str) -> Queries:
        t = sql.Identifier(check_table(table))

        def q(text: str) -> sql.Composed:
            return sql.SQL(text).format(t=t)

        # A claim returns the message, and how many seconds until it is due
        # (0 when it is: only an ordered claim sees messages not yet due).
        columns = (
            "id, channel, payload, attempts, created_at,"
            " greatest(extract(epoch FROM next_attempt_at - now()), 0)::float8"
        )
        return cls(
            table=table,
            # The payload of the NOTIFY is the table's name, the same for
            # every message: PostgreSQL folds identical notifications of one
            # transaction into one, so a transaction sending many messages
            # queues one NOTIFY per channel, not one per message.
            send=q(
                "WITH m AS (INSERT INTO {t} (channel, payload) VALUES (%s, %s)"
                " RETURNING id) SELECT m.id, pg_notify(%s, %s) FROM m"
            ),
            send_many=q(
                "WITH m AS (INSERT INTO {t} (channel, payload)"
                " SELECT %s, p FROM unnest(%s::text[]) WITH ORDINALITY AS u(p, n)"
                " ORDER BY n RETURNING id)"
                " SELECT m.id FROM m, (SELECT pg_notify(%s, %s)) AS woken"
                " ORDER BY m.id"
            ),
            claim=q(
                f"SELECT {columns} FROM {{t}}"
                " WHERE channel = %s AND dead_at IS NULL AND next_attempt_at <= now()"
                " ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED"
            ),
            # Under the channel's lock nobody else claims it: no SKIP LOCKED,
            # which would jump over a locked head and break the order.
            claim_ordered=q(
                f"SELECT {columns} FROM {{t}}"
                " WHERE channel = %s AND dead_at IS NULL"
                " ORDER BY id LIMIT %s FOR UPDATE"
            ),
            complete=q("DELETE FROM {t} WHERE id = ANY(%s)"),
            # After a short claim: are due messages left that others hold?
            others_due=q(
                "SELECT EXISTS (SELECT FROM {t} WHERE channel = %s"
                " AND dead_at IS NULL AND next_attempt_at <= now())"
            ),
            retry=q(
                "UPDATE {t} SET attempts = %s, last_error = %s,"
                " next_attempt_at = clock_timestamp() + make_interval(secs => %s)"
                " WHERE id = %s"
            ),
            bury=q(
                "UPDATE {t} SET attempts = %s, last_error = %s,"
                " dead_at = clock_timestamp() WHERE id = %s"
            ),
        )
