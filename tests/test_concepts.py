"""docs/concepts.md says when changes are applied and how to catch up: check it.

The catch-up example is run as the page shows it, with a stand-in for the
application's own database work that records what the listener had
acknowledged when the catch-up ran.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from classic.pg.listener import Listener, hookimpl
from classic.pg.listener.testing import WAIT

CONCEPTS = Path(__file__).parent.parent / "docs" / "concepts.md"


def catch_up_example() -> str:
    section = CONCEPTS.read_text("utf-8").split(
        "## Reconnection and missed notifications"
    )[1]
    blocks: list[str] = re.findall(
        r"```python\n(.*?)```", section.split("\n## ")[0], re.S
    )
    (code,) = blocks
    return code


class Recording(Listener):
    """The example's ``Listener``, keeping the futures of its ``add_callback``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.added: list[Future[None]] = []
        super().__init__(*args, **kwargs)

    def add_callback(self, *args: Any, **kwargs: Any) -> Future[None]:
        future = super().add_callback(*args, **kwargs)
        self.added.append(future)
        return future


class Psycopg:
    """Stands in for the example's ``psycopg``: its ``connect()`` is where the
    application's catch-up query would run."""

    def __init__(self) -> None:
        self.namespace: dict[str, Any] = {}
        self.acknowledged: list[bool] = []

    @contextmanager
    def connect(self, dsn: str) -> Iterator[None]:
        listener: Recording = self.namespace["listener"]
        # A resolved add_callback future means the server acknowledged LISTEN.
        self.acknowledged.append(
            bool(listener.added)
            and all(f.done() and f.exception() is None for f in listener.added)
        )
        yield


def test_catch_up_example_waits_for_the_listen(factory):
    psycopg = Psycopg()
    namespace = psycopg.namespace
    namespace.update(psycopg=psycopg, DSN="unused", Listener=Recording, connect=factory)
    exec(catch_up_example(), namespace)
    listener: Listener = namespace["listener"]
    try:
        # The first catch-up runs in the example's own flow: by then the
        # server must have acknowledged the LISTEN, or an event committed
        # between start() and the acknowledgement would be missed.
        assert psycopg.acknowledged[0] is True
    finally:
        listener.stop()
        listener.join(WAIT)


def test_pending_changes_are_applied_before_listener_connected(
    make_listener, channel, hook_waiter
):
    seen: list[tuple[bool, bool]] = []

    class Connected:
        @hookimpl
        def listener_connected(self, listener):
            seen.append((channel in listener.channels, added.done()))

    listener = make_listener(plugins=[Connected(), hook_waiter])
    added = listener.add_callback(lambda notify: None, channel)
    listener.start()
    hook_waiter.wait("listener_connected")
    assert seen == [(True, True)]
