"""classic.pg.listener.notify(): refused at the call when the server would refuse."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest

from classic.pg.listener import (
    MAX_PAYLOAD_BYTES,
    AsyncListener,
    InvalidChannel,
    anotify,
    notify,
)
from classic.pg.listener.testing import WAIT, Recorder


def test_notify_reaches_the_listener(recorder, conn, channel):
    notify(conn, channel, "hello")
    notify(conn, channel)
    assert [n.payload for n in recorder.wait(2)] == ["hello", ""]
    assert recorder.notifies[0].pid == conn.info.backend_pid


@pytest.mark.parametrize("name", ["MixedCase", "with space", 'quote"inside', "it's"])
def test_channel_names_are_taken_as_given(listener, conn, name):
    """Sent as a parameter of pg_notify(), the name matches the listener's
    quoted LISTEN: no case folding, nothing to escape."""
    name = f"{name}_{uuid.uuid4().hex[:6]}"
    got = Recorder()
    listener.add_callback(got, name).result(WAIT)
    notify(conn, name, "'; DROP TABLE x; --")
    assert got.wait(1)[0].payload == "'; DROP TABLE x; --"


def test_payload_limit_is_the_servers(conn, channel):
    """The constant is the server's: one byte more and it refuses."""
    conn.execute("SELECT pg_notify(%s, %s)", (channel, "x" * MAX_PAYLOAD_BYTES))
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="too long"):
        conn.execute(
            "SELECT pg_notify(%s, %s)", (channel, "x" * (MAX_PAYLOAD_BYTES + 1))
        )


def test_payload_at_the_limit_is_sent(recorder, conn, channel):
    payload = "é" * (MAX_PAYLOAD_BYTES // 2) + "x"  # 7999 bytes in UTF-8
    notify(conn, channel, payload)
    assert recorder.wait(1)[0].payload == payload


@pytest.mark.parametrize("payload", ["x" * 8000, "é" * 4000, "€" * 2667])
def test_payload_too_long_raises_before_sending(conn, channel, payload):
    with pytest.raises(ValueError, match=r"payload is \d+ bytes in utf-8") as caught:
        notify(conn, channel, payload)
    assert "at most 7999" in str(caught.value)
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_bad_arguments_raise_at_the_call(conn, channel):
    with pytest.raises(TypeError, match="payload must be a str"):
        notify(conn, channel, b"bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NUL"):
        notify(conn, channel, "a\0b")
    with pytest.raises(InvalidChannel):
        notify(conn, "", "x")
    with pytest.raises(InvalidChannel):
        notify(conn, "c" * 64, "x")


@pytest.fixture
def latin1_dsn(throwaway):
    """A LATIN1 database, on the throwaway server: DROP DATABASE on a shared
    one waits for every backend of the cluster, stuck ones included."""
    name = f"test_latin1_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(throwaway.dsn, autocommit=True) as admin:
        admin.execute(
            f"CREATE DATABASE {name} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C'"
            " TEMPLATE template0"
        )
    return psycopg.conninfo.make_conninfo(throwaway.dsn, dbname=name)


def test_size_is_measured_in_the_database_encoding(latin1_dsn, make_listener, channel):
    """8000 bytes of UTF-8 are 4000 in a LATIN1 database: the server takes them."""
    got = Recorder()
    listener = make_listener(lambda: psycopg.connect(latin1_dsn, autocommit=True))
    listener.start()
    listener.add_callback(got, channel).result(WAIT)
    utf8 = psycopg.conninfo.make_conninfo(latin1_dsn, client_encoding="utf8")
    with psycopg.connect(utf8, autocommit=True) as sender:
        assert sender.info.encoding == "utf-8"  # the server converts to LATIN1
        notify(sender, channel, "é" * 4000)
        assert got.wait(1)[0].payload == "é" * 4000
        with pytest.raises(ValueError, match="iso8859-1"):
            notify(sender, channel, "€")
        with pytest.raises(ValueError, match="8000 bytes in iso8859-1"):
            notify(sender, channel, "é" * 8000)


def test_notify_inside_a_transaction_is_sent_at_commit(recorder, dsn, channel):
    with psycopg.connect(dsn) as sender:
        notify(sender, channel, "after commit")
        assert recorder.notifies == []  # not yet sent: would show below if so
        sender.commit()
    assert recorder.wait(1)[0].payload == "after commit"


def test_anotify(recorder, dsn, channel):
    async def send() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
            await anotify(aconn, channel, "async")
            with pytest.raises(ValueError, match="8000 bytes"):
                await anotify(aconn, channel, "x" * 8000)

    asyncio.run(send())
    assert recorder.wait(1)[0].payload == "async"
    assert recorder.payloads == ["async"]


def test_anotify_reaches_an_async_listener(dsn, channel):
    """The async pair: anotify() from an AsyncConnection, an AsyncListener
    receiving, and a Recorder as its (plain) callback."""
    got = Recorder()

    async def main() -> None:
        listener = AsyncListener(
            lambda: psycopg.AsyncConnection.connect(dsn, autocommit=True),
            autoload_plugins=False,
        )
        async with listener:
            await asyncio.wait_for(listener.add_callback(got, channel), WAIT)
            async with await psycopg.AsyncConnection.connect(
                dsn, autocommit=True
            ) as aconn:
                await anotify(aconn, channel, "é" * 3999)
                await anotify(aconn, channel, "done")
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, got.wait, 2)

    asyncio.run(main())
    assert got.payloads == ["é" * 3999, "done"]
