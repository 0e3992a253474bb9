"""Turning the notifications libpq parsed into deliveries: the hot path.

Every notification a listener receives passes through ``Reader.deliveries``
once, whichever listener and dispatcher serve it, so its cost per
notification is most of what the library adds to psycopg's own.

Most reads hold the notifications of one channel. Those are turned into
``Notify`` tuples and paired with their callbacks by C-level iterators
(``map``, ``zip``, ``itemgetter``), not by a Python loop: per notification,
that is a third of the loop's instructions. Anything else (several
channels, a ``listener_notification`` hook to call for each, bytes the
encoding cannot decode) takes the loop, which does the same work one
notification at a time.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence
from functools import partial
from itertools import repeat
from operator import countOf, itemgetter
from typing import Any

from psycopg import Notify

from ._sequencing import Delivery, OneChannel
from .hookspecs import Callback

Route = tuple[str, tuple[Callback, ...]]
"""A channel's name and the callbacks registered for it."""

_tuple_new = tuple.__new__
_relname_of = itemgetter(0)
_pid_of = itemgetter(1)
_extra_of = itemgetter(2)


def _decoder(encoding: str) -> Callable[[bytes], str]:
    # bytes.decode() without an argument skips the codec's lookup by name.
    if codecs.lookup(encoding).name == "utf-8":
        return bytes.decode
    return partial(bytes.decode, encoding=encoding)


class Reader:
    """Routes and decodes notifications for one registry of callbacks.

    A channel's name is decoded once and kept with its callbacks, by the
    bytes libpq gives, until ``forget_routes()`` (the registry changed) or
    ``use_encoding()`` (a new connection).
    """

    def __init__(self, entries_of: Callable[[str], tuple[Callback, ...]]):
        self._entries_of = entries_of
        self._routes: dict[bytes, Route] = {}
        self.use_encoding("utf-8")

    def use_encoding(self, encoding: str) -> None:
        self._encoding = encoding
        self._decode = _decoder(encoding)
        self._routes.clear()

    def forget_routes(self) -> None:
        self._routes.clear()

    def route(self, relname: bytes) -> Route:
        route = self._routes.get(relname)
        if route is not None:
            return route
        channel = relname.decode(self._encoding, "surrogateescape")
        callbacks = self._entries_of(channel)
        if callbacks:  # only listened channels come: the routes stay few
            self._routes[relname] = (channel, callbacks)
        return channel, callbacks

    def deliveries(
        self,
        pgnotifies: Sequence[Any],
        on_notification: Callable[..., object] | None,
        listener: object,
    ) -> list[Delivery]:
        """``(callbacks, notify)`` for each of ``pgnotifies`` (libpq's
        ``PGnotify``) whose channel has callbacks, in order; the hook, if
        given, is called with every notification, listened to or not."""
        if on_notification is None:
            relname = pgnotifies[0][0]
            if countOf(map(_relname_of, pgnotifies), relname) == len(pgnotifies):
                channel, callbacks = self.route(relname)
                if not callbacks:
                    return []
                try:
                    return OneChannel(
                        channel,
                        zip(
                            repeat(callbacks),
                            map(
                                _tuple_new,
                                repeat(Notify),
                                zip(
                                    repeat(channel),
                                    map(self._decode, map(_extra_of, pgnotifies)),
                                    map(_pid_of, pgnotifies),
                                ),
                            ),
                        ),
                    )
                except UnicodeDecodeError:
                    pass  # the loop decodes what it can and escapes the rest
        return self._each(pgnotifies, on_notification, listener)

    def _each(
        self,
        pgnotifies: Sequence[Any],
        on_notification: Callable[..., object] | None,
        listener: object,
    ) -> list[Delivery]:
        routes, decode, encoding = self._routes, self._decode, self._encoding
        batch: list[Delivery] = []
        for relname, pid, extra in pgnotifies:
            route = routes.get(relname) or self.route(relname)
            try:
                payload = decode(extra)
            except UnicodeDecodeError:
                # Never fatal, nothing lost: bytes the encoding cannot decode
                # (a SQL_ASCII database) come through as lone surrogates, and
                # payload.encode(encoding, "surrogateescape") gives them back.
                payload = extra.decode(encoding, "surrogateescape")
            # tuple.__new__, as namedtuple's own _make() does, skips the
            # Python-level Notify.__new__.
            notify: Notify = _tuple_new(Notify, (route[0], payload, pid))
            if on_notification is not None:
                on_notification(listener=listener, notify=notify)
            if route[1]:
                batch.append((route[1], notify))
        return batch
