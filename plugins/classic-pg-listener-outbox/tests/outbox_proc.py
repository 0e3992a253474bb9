"""The processes of the multi-process tests (and of bench/outbox.py).

    python outbox_proc.py consume DSN TABLE EFFECTS CHANNEL[,CHANNEL...]
        [--ordered] [--workers N] [--batch-size N] [--trap PAYLOAD]
    python outbox_proc.py send DSN TABLE CHANNEL[,CHANNEL...] N [--per-statement M]

``consume`` runs a Listener and an Outbox whose handler inserts one row per
message into EFFECTS (``create_effects()``), whose primary key is the
message id: a message handled twice would violate it, fail, and end up dead
in the outbox instead of deleted. It prints ``ready`` once every channel is
listened to, and stops on SIGTERM. With ``--trap PAYLOAD`` the handler, on
that payload, prints ``trapped`` and hangs, inside its transaction: the
moment to kill it.

``send`` sends N messages, ``CHANNEL:i`` for i in 0..N-1 spread round-robin
over the channels, with ``send_many()``: M per statement, one transaction
per statement, and prints ``sent`` when done.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any

import psycopg
from classic_pg_listener_outbox import Message, Outbox, send_many
from psycopg import sql

from classic.pg.listener import Listener


def create_effects(conn: psycopg.Connection[Any], effects: str) -> None:
    """The handler's own table: one row per handled message, in commit order."""
    conn.execute(
        sql.SQL(
            "CREATE TABLE {} (id bigint PRIMARY KEY, channel text NOT NULL,"
            " payload text NOT NULL, pid int NOT NULL, seq bigserial)"
        ).format(sql.Identifier(effects))
    )


def consume(args: argparse.Namespace) -> None:
    insert = sql.SQL(
        "INSERT INTO {} (id, channel, payload, pid) VALUES (%s, %s, %s, %s)"
    ).format(sql.Identifier(args.effects))
    pid = os.getpid()

    def handler(message: Message, conn: psycopg.Connection[Any]) -> None:
        # seq is taken when the row is written: in ordered mode, after the
        # previous message of the channel committed.
        conn.execute(insert, (message.id, message.channel, message.payload, pid))
        if message.payload == args.trap:
            print("trapped", flush=True)
            threading.Event().wait()

    listener = Listener(
        lambda: psycopg.connect(args.dsn, autocommit=True),
        max_workers=0,
        autoload_plugins=False,
    )
    outbox = Outbox(
        listener,
        args.dsn,
        table=args.table,
        batch_size=args.batch_size,
        workers=args.workers,
    )
    futures = [
        outbox.add_handler(handler, channel, ordered=args.ordered)
        for channel in args.channels.split(",")
    ]
    signal.signal(signal.SIGTERM, lambda *_: listener.stop())
    listener.start()
    for future in futures:
        future.result(30)
    print("ready", flush=True)
    listener.join()


def send(args: argparse.Namespace) -> None:
    channels = args.channels.split(",")
    payloads: dict[str, list[str]] = {channel: [] for channel in channels}
    for i in range(args.n):
        channel = channels[i % len(channels)]
        payloads[channel].append(f"{channel}:{i}")
    with psycopg.connect(args.dsn) as conn:
        for channel, values in payloads.items():
            for start in range(0, len(values), args.per_statement):
                with conn.transaction():
                    chunk = values[start : start + args.per_statement]
                    send_many(conn, channel, chunk, table=args.table)
    print("sent", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("consume")
    c.add_argument("dsn")
    c.add_argument("table")
    c.add_argument("effects")
    c.add_argument("channels")
    c.add_argument("--ordered", action="store_true")
    c.add_argument("--workers", type=int, default=1)
    c.add_argument("--batch-size", type=int, default=50)
    c.add_argument("--trap")
    s = commands.add_parser("send")
    s.add_argument("dsn")
    s.add_argument("table")
    s.add_argument("channels")
    s.add_argument("n", type=int)
    s.add_argument("--per-statement", type=int, default=5000)
    args = parser.parse_args()
    if args.command == "consume":
        consume(args)
    else:
        send(args)


if __name__ == "__main__":
    sys.exit(main())
