"""Low descriptor numbers taken, as in a busy service, for the listener's socket.

A service with thousands of connections numbers its sockets above what
``select()`` takes (``FD_SETSIZE``, 1024): the listener must serve a socket
numbered that high.
"""

from __future__ import annotations

import gc
import os
import resource
from collections.abc import Callable, Iterator
from contextlib import contextmanager

ABOVE = 1100


@contextmanager
def descriptors_above_1024() -> Iterator[Callable[[], None]]:
    """Inside, every number up to ``ABOVE`` is taken; the function yielded
    takes again any freed meanwhile: call it just before connecting.

    Garbage collection is held off inside, as it would close the sockets of
    earlier tests' leftovers and free low numbers.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = ABOVE + 100
    assert hard == resource.RLIM_INFINITY or hard >= wanted, (
        f"the hard limit of open files ({hard}) must allow {wanted}"
    )
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    collecting = gc.isenabled()
    gc.collect()
    gc.disable()
    fillers: list[int] = []

    def take_low() -> None:
        while True:  # the lowest free number, each time
            fillers.append(os.open(os.devnull, os.O_RDONLY))
            if fillers[-1] >= ABOVE:
                return

    try:
        take_low()
        yield take_low
    finally:
        for fd in fillers:
            os.close(fd)
        if collecting:
            gc.enable()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
