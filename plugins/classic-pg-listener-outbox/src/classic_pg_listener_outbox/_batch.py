"""One batch: claim messages of a channel, run the handler on each, complete them.

Everything happens in one transaction on one worker connection:

1. claim up to ``batch_size`` pending messages of the channel, in id order,
   ``FOR UPDATE SKIP LOCKED``: rows another process claimed are skipped, so
   N processes share the work and never hold the same message;
2. for each message, run ``handler(message, conn)`` under a savepoint: if it
   raises (or leaves the transaction failed), only its own writes are rolled
   back, and the message's failure is recorded instead;
3. delete the handled messages and commit: a handler's writes and the
   completion of its message are one commit, hence exactly-once effects.

A process that dies at any point (SIGKILL included) has its transaction
rolled back by the server: its messages are unlocked, untouched, and
claimable again, and its handlers' writes never happened.

Savepoints cost one round trip per message (``RELEASE`` and the next
``SAVEPOINT`` go in one simple query). Each savepoint that writes takes a
subtransaction id, and PostgreSQL caches at most 64 per transaction before
every snapshot in the server gets slower: keep ``batch_size`` at most 64.

``ordered`` channels are claimed under a transaction-scoped advisory lock
(``pg_try_advisory_xact_lock``) keyed by the table and the channel: one
transaction in the whole server holds a channel at a time, it takes the
lowest ids first without skipping any, and stops at the first failure, so
messages of the channel are handled one after the other in id order. A
process that does not get the lock leaves the channel to the one that holds
it, which drains it to the end before it lets go, and tries again
``BUSY_RECHECK`` seconds later, in case the holder died.
"""

from __future__ import annotations

import dataclasses
import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from ._schema import Queries

logger = logging.getLogger("classic.pg.listener")

BUSY_RECHECK = 1.0
"""Seconds after which a worker looks again at messages another transaction
held (an ordered channel's lock, or rows ``SKIP LOCKED`` jumped): the delay
before the work of a consumer that died is taken over."""

_LOCK_CHANNEL = "SELECT pg_try_advisory_xact_lock(hashtext(%s), hashtext(%s))"
_SAVEPOINT = "SAVEPOINT outbox_message"
_NEXT_SAVEPOINT = "RELEASE SAVEPOINT outbox_message; SAVEPOINT outbox_message"
_ROLLBACK_TO = "ROLLBACK TO SAVEPOINT outbox_message"


@dataclass(frozen=True)
class Message:
    """A message of the outbox, as a handler receives it."""

    id: int
    """Its place in the outbox: ids ascend in the order messages were inserted."""
    channel: str
    payload: str
    attempts: int
    """Failed attempts before this one (0 the first time)."""
    created_at: datetime
    """When the sending transaction started (``now()`` in it)."""


Handler = Callable[[Message, "psycopg.Connection[Any]"], object]
"""``handler(message, conn)``: its writes on ``conn`` commit with the message."""

DeadCallback = Callable[[Message, str], object]
"""``on_dead(message, error)``: ``message.attempts`` counts every attempt."""


@dataclass(frozen=True)
class Route:
    """What the outbox does with a channel."""

    handler: Handler
    ordered: bool


@dataclass(frozen=True)
class Policy:
    """How failures are retried."""

    max_attempts: int
    retry_delay: float
    max_retry_delay: float

    def delay(self, attempts: int) -> float:
        """Seconds before attempt ``attempts + 1``: doubling, capped."""
        return float(min(self.retry_delay * 2 ** (attempts - 1), self.max_retry_delay))


@dataclass
class Outcome:
    """What a batch did, for the worker's bookkeeping."""

    handled: int = 0
    more: bool = False
    """The channel may hold more due messages right now."""
    due_in: float | None = None
    """Seconds until a message this batch could not take becomes due."""
    dead: list[tuple[Message, str]] = dataclasses.field(default_factory=list)
    """Messages that failed for the last time, committed as dead."""


def error_text(ex: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(ex), ex)).strip()


def run_batch(
    conn: psycopg.Connection[Any],
    queries: Queries,
    channel: str,
    route: Route,
    batch_size: int,
    policy: Policy,
) -> Outcome:
    """Claim, handle and complete one batch of ``channel`` in one transaction."""
    outcome = Outcome()
    with conn.transaction():
        if route.ordered:
            locked = conn.execute(_LOCK_CHANNEL, (queries.table, channel)).fetchone()
            if not (locked and locked[0]):
                # Another transaction holds the channel. Look again soon: if
                # its process died, nothing else would say the channel is free.
                outcome.due_in = BUSY_RECHECK
                return outcome
            claim = queries.claim_ordered
        else:
            claim = queries.claim
        rows = conn.execute(claim, (channel, batch_size)).fetchall()
        outcome.more = len(rows) == batch_size
        if not rows:
            _check_others(conn, queries, channel, route, outcome)
            return outcome
        conn.execute(_SAVEPOINT, prepare=False)
        done: list[int] = []
        failed: list[tuple[Message, Exception]] = []
        for id_, channel_, payload, attempts, created_at, due_in in rows:
            if due_in > 0:  # ordered only: the head waits for its retry
                outcome.due_in = due_in
                outcome.more = False
                break
            message = Message(id_, channel_, payload, attempts, created_at)
            try:
                route.handler(message, conn)
                # Fails if the handler left the transaction failed.
                conn.execute(_NEXT_SAVEPOINT, prepare=False)
            except Exception as ex:
                # The savepoint stays, empty, for the next message.
                conn.execute(_ROLLBACK_TO, prepare=False)
                failed.append((message, ex))
                if route.ordered:
                    break  # the next message must wait for this one
            else:
                done.append(id_)
        # Last, so that no later rollback to the savepoint undoes them.
        if done:
            conn.execute(queries.complete, (done,))
        for message, error in failed:
            _record_failure(conn, queries, message, error, policy, outcome)
        if route.ordered and failed:
            # Tried again once the retry is due, or at once if it is dead.
            outcome.more = outcome.due_in is None
        outcome.handled = len(done)
        _check_others(conn, queries, channel, route, outcome)
    return outcome


def _check_others(
    conn: psycopg.Connection[Any],
    queries: Queries,
    channel: str,
    route: Route,
    outcome: Outcome,
) -> None:
    """After a short unordered claim, look again soon if others hold due messages.

    ``SKIP LOCKED`` hid them. Their holder will most likely complete them;
    if its process died instead, nothing would say they are free again
    before the poll.
    """
    if route.ordered or outcome.more:
        return
    row = conn.execute(queries.others_due, (channel,)).fetchone()
    if row and row[0]:
        due = BUSY_RECHECK
        outcome.due_in = due if outcome.due_in is None else min(outcome.due_in, due)


def _record_failure(
    conn: psycopg.Connection[Any],
    queries: Queries,
    message: Message,
    ex: Exception,
    policy: Policy,
    outcome: Outcome,
) -> None:
    attempts = message.attempts + 1
    text = error_text(ex)
    if attempts >= policy.max_attempts:
        conn.execute(queries.bury, (attempts, text, message.id))
        outcome.dead.append((dataclasses.replace(message, attempts=attempts), text))
        return
    delay = policy.delay(attempts)
    conn.execute(queries.retry, (attempts, text, delay, message.id))
    outcome.due_in = delay if outcome.due_in is None else min(outcome.due_in, delay)
    logger.warning(
        "outbox %s: handler for message %d on channel %r failed (attempt %d of %d);"
        " retry in %.2f s",
        queries.table,
        message.id,
        message.channel,
        attempts,
        policy.max_attempts,
        delay,
        exc_info=ex,
    )
