"""A durable transactional outbox for classic-pg-listener.

``send()`` writes a message in the caller's transaction; ``Outbox`` handles
each message exactly once, in however many processes run it, woken by a
``Listener`` and polling in case a wake-up was missed::

    from classic_pg_listener_outbox import Outbox, install, send

    install(conn)                                  # once: table and index
    with conn.transaction():
        conn.execute("INSERT INTO orders ...")
        send(conn, "orders", '{"id": 42}')         # commits with the order

    outbox = Outbox(listener, "dbname=app")
    outbox.add_handler(handle_order, "orders")     # handle_order(message, conn)
    listener.start()
"""

from __future__ import annotations

from ._batch import DeadCallback, Handler, Message
from ._outbox import Outbox
from ._schema import DEFAULT_TABLE, install
from ._send import send, send_many

__all__ = [
    "DEFAULT_TABLE",
    "DeadCallback",
    "Handler",
    "Message",
    "Outbox",
    "install",
    "send",
    "send_many",
]
