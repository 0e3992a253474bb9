"""The specification's two examples, run as written with the test server's DSN."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from classic.pg.listener.testing import WAIT, notify, wait_until

EXAMPLE_CONNECT = """\
from classic.pg.listener import Listener
from psycopg import connect, Notify

listener = Listener(
    lambda: connect(
        {params}, autocommit=True,
    )
)

def some_task(notify: Notify):
    print(notify)

listener.add_callback(some_task, 'some_channel')
"""

BLOCKING = EXAMPLE_CONNECT + "listener.run()\n"

BACKGROUND = (
    EXAMPLE_CONNECT
    + """\
listener.start()
print('The main thread is still free!')
listener.stop()
listener.join()  # waits until it has stopped
"""
)


def _params(dsn: str) -> str:
    keys = ("user", "password", "host", "port", "dbname")
    given = conninfo_to_dict(dsn)
    return ", ".join(f"{k}={given[k]!r}" for k in keys if k in given)


def _wait_for_listen(conn: psycopg.Connection[Any], app: str) -> None:
    """Poll the server until the example's session has run its LISTEN."""
    wait_until(
        lambda: (
            conn.execute(
                "SELECT 1 FROM pg_stat_activity"
                " WHERE application_name = %s AND query = %s",
                (app, 'LISTEN "some_channel"'),
            ).fetchone()
            is not None
        ),
        "the example to listen to some_channel",
    )


def test_blocking_example(dsn, conn):
    app = f"example-{uuid.uuid4().hex[:8]}"
    with subprocess.Popen(
        [sys.executable, "-u", "-c", BLOCKING.format(params=_params(dsn))],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PGAPPNAME": app},
    ) as proc:
        lines: queue.Queue[str] = queue.Queue()
        stdout = proc.stdout
        assert stdout is not None
        reader = threading.Thread(target=lambda: list(map(lines.put, stdout)))
        reader.start()
        try:
            _wait_for_listen(conn, app)
            notify(conn, "some_channel", "from the test")
            line = lines.get(timeout=WAIT)
            assert line.startswith(
                "Notify(channel='some_channel', payload='from the test'"
            )
            assert proc.poll() is None, "run() must keep blocking"
        finally:
            proc.terminate()
            proc.wait(WAIT)
            reader.join(WAIT)


def test_background_example(dsn, capsys):
    started = time.perf_counter()
    namespace: dict[str, Any] = {}
    exec(BACKGROUND.format(params=_params(dsn)), namespace)
    elapsed = time.perf_counter() - started
    assert capsys.readouterr().out == "The main thread is still free!\n"
    listener = namespace["listener"]
    assert not listener.is_alive()
    assert listener.exception is None
    assert elapsed < WAIT
