"""A fault-injecting TCP relay in front of the test server, as in psycopg's suite.

The shared server must never be broken, so network faults are made here, on
loopback, by a relay the test controls:

- ``stop()`` closes every relayed connection and refuses new ones (the
  listening socket is closed: connection refused); ``start()`` listens again
  on the same port.
- ``blackhole()`` keeps every socket open but forwards nothing, new
  connections included: a half-open link, as when a peer vanishes without
  closing TCP. ``restore()`` forwards again, bytes held meanwhile included.

One thread owns every socket; the test thread sends it commands and waits
until they are done, so after ``stop()`` returns a connection is refused.
"""

from __future__ import annotations

import array
import fcntl
import queue
import selectors
import socket
import termios
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

_TIMEOUT = 5.0
"""Seconds a relayed ``send`` may block before the pair is dropped (a peer that
stopped reading must not freeze the relay and its commands)."""


class Proxy:
    """Relays 127.0.0.1:``port`` to ``target``; see the module docstring."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.port = 0
        self.accepted = 0
        self._selector = selectors.DefaultSelector()
        self._listening: socket.socket | None = None
        self._peers: dict[socket.socket, socket.socket] = {}
        self._forwarding = True
        self._commands: queue.Queue[tuple[Callable[[], None], threading.Event]] = (
            queue.Queue()
        )
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._closed = False
        self._listen()  # in this thread: the port is known before the thread runs
        self._thread = threading.Thread(
            target=self._loop, name=f"fix-proxy-{self.port}", daemon=True
        )
        self._thread.start()

    # -- commands, from the test thread ----------------------------------------

    def stop(self) -> None:
        """Close every relayed connection and refuse new ones."""
        self._command(self._do_stop)

    def start(self) -> None:
        """Accept connections again, on the same port."""
        self._command(self._listen)

    def blackhole(self) -> None:
        """Keep every socket open, forward nothing: a half-open link."""
        self._command(lambda: self._set_forwarding(False))

    def restore(self) -> None:
        """Forward again after ``blackhole()``."""
        self._command(lambda: self._set_forwarding(True))

    @property
    def connections(self) -> int:
        """Relayed connections open now."""
        return len(self._peers) // 2

    def held(self) -> int:
        """Bytes received but not forwarded (a blackholed ping shows up here)."""
        total = 0
        for sock in list(self._peers):
            buf = array.array("i", [0])
            try:
                fcntl.ioctl(sock, termios.FIONREAD, buf)
            except OSError:
                continue
            total += buf[0]
        return total

    def close(self) -> None:
        """Stop the relay for good and join its thread."""
        if not self._closed:
            self._command(self._do_stop)
            self._closed = True
            self._wake_w.send(b"q")
            self._thread.join(_TIMEOUT)
            assert not self._thread.is_alive(), "the proxy thread did not end"
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def _command(self, action: Callable[[], None]) -> None:
        done = threading.Event()
        self._commands.put((action, done))
        self._wake_w.send(b"c")
        assert done.wait(_TIMEOUT), "the proxy thread did not answer"

    # -- the relay thread ---------------------------------------------------------

    def _loop(self) -> None:
        while not self._closed:
            for key, _ in self._selector.select():
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._wake_r:
                    sock.recv(4096)
                    self._run_commands()
                elif sock is self._listening:
                    self._accept()
                elif sock in self._peers:  # not dropped earlier in this round
                    self._relay(sock)
        self._run_commands()

    def _run_commands(self) -> None:
        while True:
            try:
                action, done = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                action()
            finally:
                done.set()

    def _listen(self) -> None:
        if self._listening is not None:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self.port = sock.getsockname()[1]
        self._listening = sock
        self._selector.register(sock, selectors.EVENT_READ)

    def _do_stop(self) -> None:
        if self._listening is not None:
            self._selector.unregister(self._listening)
            self._listening.close()
            self._listening = None
        while self._peers:
            self._drop(next(iter(self._peers)))

    def _set_forwarding(self, forwarding: bool) -> None:
        if forwarding == self._forwarding:
            return
        self._forwarding = forwarding
        for sock in self._peers:
            if forwarding:
                self._selector.register(sock, selectors.EVENT_READ)
            else:
                self._selector.unregister(sock)

    def _accept(self) -> None:
        assert self._listening is not None
        client, _ = self._listening.accept()
        try:
            upstream = socket.create_connection(self.target, timeout=_TIMEOUT)
        except OSError:
            client.close()
            return
        self.accepted += 1
        for sock in (client, upstream):
            sock.settimeout(_TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._forwarding:
                self._selector.register(sock, selectors.EVENT_READ)
        self._peers[client] = upstream
        self._peers[upstream] = client

    def _relay(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
            if data:
                self._peers[sock].sendall(data)
                return
        except OSError:
            pass
        self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        peer = self._peers.pop(sock)
        del self._peers[peer]
        for s in (sock, peer):
            if self._forwarding:
                self._selector.unregister(s)
            s.close()


def _check(dsn: str) -> None:
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        conn.execute("SELECT 1")


@pytest.fixture
def proxy(dsn: str) -> Iterator[Proxy]:
    """A relay to the test server, proved to relay, cut and come back before use."""
    params = conninfo_to_dict(dsn)
    target = (str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432))
    proxy = Proxy(target)
    try:
        via = make_conninfo(dsn, host="127.0.0.1", port=proxy.port)
        _check(via)
        proxy.stop()
        with pytest.raises(psycopg.OperationalError, match="refused"):
            _check(via)
        proxy.start()
        _check(via)
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
def proxy_dsn(dsn: str, proxy: Proxy) -> str:
    """The test server's DSN, through ``proxy``."""
    return make_conninfo(dsn, host="127.0.0.1", port=proxy.port)


@pytest.fixture
def proxy_factory(proxy_dsn: str) -> Callable[[], psycopg.Connection[Any]]:
    """A connection factory through ``proxy``; a short connect timeout, because a
    blackholed proxy accepts TCP and then says nothing."""
    return lambda: psycopg.connect(proxy_dsn, autocommit=True, connect_timeout=2)
