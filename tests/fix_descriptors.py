"""Low descriptor numbers taken, as in a busy service, for the listener's socket.

A service with thousands of connections numbers its sockets above what
``select()`` takes (``FD_SETSIZE``, 1024): the listener must serve a socket
numbered that high.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator
from contextlib import contextmanager

ABOVE = 1100


@contextmanager
def descriptors_above_1024() -> Iterator[None]:
    """Inside, the next descriptor opened is numbered above 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = ABOVE + 100
    assert hard == resource.RLIM_INFINITY or hard >= wanted, (
        f"the hard limit of open files ({hard}) must allow {wanted}"
    )
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    fillers: list[int] = []
    try:
        while not fillers or fillers[-1] < ABOVE:  # the lowest free numbers
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
