"""TCP keepalives on the listener's socket, unless the DSN chose its own.

A listener mostly waits. When the path to the server dies silently (a NAT
gateway or firewall forgets the flow, the server's host vanishes, a VM is
cut off), nothing arrives and nothing fails: with ``ping_period=0``, or
between two pings, the serving thread would wait on a dead socket for hours
(Linux sends the first keepalive probe after two hours of silence, when
libpq turns keepalives on at all). With the values below the kernel reports
the socket broken about a minute after the peer went silent; the serving
thread wakes up on it and reconnects. ``TCP_USER_TIMEOUT`` bounds the other
case, data sent (a ping, a ``LISTEN``) that the peer never acknowledges.

The DSN wins: if it sets any of libpq's keepalive options, libpq applied
what it asked for and nothing is changed.
"""

from __future__ import annotations

import logging
import math
import os
import socket

from psycopg import pq

logger = logging.getLogger("classic.pg.listener")

KEEPALIVE_IDLE = 30
"""Seconds of silence before the first probe (``TCP_KEEPIDLE``)."""
KEEPALIVE_INTERVAL = 10
"""Seconds between unanswered probes (``TCP_KEEPINTVL``)."""
KEEPALIVE_COUNT = 3
"""Unanswered probes after which the connection is dead (``TCP_KEEPCNT``)."""
USER_TIMEOUT_MS = 60_000
"""Milliseconds sent data may stay unacknowledged (``TCP_USER_TIMEOUT``);
with keepalives on, Linux also uses it instead of the probe count."""

DSN_KEYWORDS = (
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
)
"""libpq's options that set keepalives; any of them in the DSN disables ours."""


def detection_bound(
    idle: float | None = None,
    interval: float | None = None,
    count: int | None = None,
    user_timeout_ms: float | None = None,
) -> float:
    """Seconds after which a silent peer is detected, at most (the listener's
    values by default).

    The probes end it after idle + count x interval. On Linux a user timeout,
    when set, replaces the count: the connection ends at the first probe
    sent once that timeout has passed since the peer was last heard.
    """
    idle = KEEPALIVE_IDLE if idle is None else idle
    interval = KEEPALIVE_INTERVAL if interval is None else interval
    count = KEEPALIVE_COUNT if count is None else count
    if user_timeout_ms is None:
        user_timeout_ms = USER_TIMEOUT_MS
    if user_timeout_ms and hasattr(socket, "TCP_USER_TIMEOUT"):
        ticks = max(1, math.ceil((user_timeout_ms / 1000 - idle) / interval))
        return float(idle + ticks * interval)
    return float(idle + interval * count)


def dsn_keepalive_options(pgconn: pq.abc.PGconn) -> dict[str, str]:
    """The keepalive options the connection's conninfo sets, by keyword."""
    found = {}
    for option in pgconn.info:
        keyword = option.keyword.decode()
        if keyword in DSN_KEYWORDS and option.val is not None:
            found[keyword] = option.val.decode()
    return found


def configure_keepalive(pgconn: pq.abc.PGconn, enabled: bool) -> bool:
    """Turn on TCP keepalives and ``TCP_USER_TIMEOUT`` on the connection's socket.

    Does nothing when ``enabled`` is false, when the DSN set keepalive
    options of its own, or on a Unix-domain socket. Returns whether the
    options were applied; a platform that lacks one skips that one.
    """
    if not enabled or dsn_keepalive_options(pgconn):
        return False
    # A duplicate of libpq's descriptor: options set on it apply to the same
    # socket, and closing it leaves libpq's open.
    with socket.socket(fileno=os.dup(pgconn.socket)) as sock:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return False
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for name, value in (
                # macOS calls the idle time TCP_KEEPALIVE.
                ("TCP_KEEPIDLE" if hasattr(socket, "TCP_KEEPIDLE") else "TCP_KEEPALIVE",
                 KEEPALIVE_IDLE),
                ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                ("TCP_KEEPCNT", KEEPALIVE_COUNT),
                ("TCP_USER_TIMEOUT", USER_TIMEOUT_MS),
            ):  # fmt: skip
                option = getattr(socket, name, None)
                if option is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, option, value)
        except OSError as ex:
            logger.warning("could not turn on TCP keepalives: %s", ex)
            return False
    logger.debug(
        "TCP keepalives on: idle %d s, %d probes %d s apart, user timeout %d ms",
        KEEPALIVE_IDLE,
        KEEPALIVE_COUNT,
        KEEPALIVE_INTERVAL,
        USER_TIMEOUT_MS,
    )
    return True
