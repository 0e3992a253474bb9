"""Dispatch: order per key, catch-up holds, counters, the pool's threads.

The sequencing rules are tested on ``Sequencer`` alone (pure logic, no
threads); what users rely on is tested through the pool and the Listener,
against the real server.
"""

from __future__ import annotations

import logging
import random
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from psycopg import Notify

from classic.pg.listener import Listener, hookimpl
from classic.pg.listener._dispatch import CallbackDone, InlineDispatcher, PoolDispatcher
from classic.pg.listener._sequencing import Delivery, OneChannel, Sequencer, Unit
from classic.pg.listener.hookspecs import Callback
from classic.pg.listener.testing import WAIT, notify, wait_until


def delivery(
    channel: str, payload: str, callbacks: Iterable[Callback] = ()
) -> Delivery:
    return (tuple(callbacks), Notify(channel, payload, 1))


def payloads(units: list[Unit]) -> list[list[str]]:
    return [[n.payload for _, n in unit.deliveries] for unit in units]


# -- Sequencer: the rules, without threads ------------------------------------------


def test_unordered_batch_is_one_unit_that_may_start_at_once():
    sequencer = Sequencer(None)
    batch = [delivery("a", "1"), delivery("b", "2")]
    (unit,) = sequencer.push(batch)
    assert unit.deliveries == batch
    assert unit.key is None
    assert sequencer.finish(unit) == []


def test_same_key_waits_until_the_previous_unit_finished():
    sequencer = Sequencer(lambda n: n.channel)
    (first,) = sequencer.push([delivery("a", "1")])
    assert sequencer.push([delivery("a", "2")]) == []
    assert sequencer.push([delivery("a", "3")]) == []
    assert sequencer.waiting == 2
    (second,) = sequencer.finish(first)
    assert payloads([second]) == [["2", "3"]]  # what waited leaves together
    assert sequencer.finish(second) == []
    assert sequencer.idle


def test_different_keys_may_start_side_by_side():
    sequencer = Sequencer(lambda n: n.payload[0])
    units = sequencer.push(
        [delivery("c", "x1"), delivery("c", "y1"), delivery("c", "x2")]
    )
    assert payloads(units) == [["x1", "x2"], ["y1"]]
    assert [u.key for u in units] == ["x", "y"]


def test_a_key_runs_in_chunks_of_at_most_max_chunk():
    sequencer = Sequencer(lambda n: n.channel, max_chunk=2)
    (first,) = sequencer.push([delivery("a", str(i)) for i in range(5)])
    assert payloads([first]) == [["0", "1"]]
    (second,) = sequencer.finish(first)
    (third,) = sequencer.finish(second)
    assert payloads([second, third]) == [["2", "3"], ["4"]]


def test_a_raising_key_falls_back_logged_and_never_drops(caplog):
    def key(notify: Notify) -> str:
        if notify.payload == "bad":
            raise ValueError("no key")
        return notify.payload

    sequencer = Sequencer(key)
    with caplog.at_level(logging.ERROR, "classic.pg.listener"):
        units = sequencer.push(
            [delivery("c", "ok"), delivery("c", "bad"), delivery("c", "bad")]
        )
    assert payloads(units) == [["ok"], ["bad", "bad"]]  # one fallback key per channel
    assert "order_by key" in caplog.text
    assert "channel 'c'" in caplog.text


def test_an_unhashable_key_falls_back():
    def unhashable(n):  # untyped: mypy knows a list is no Hashable
        return [n.payload]

    sequencer = Sequencer(unhashable)
    (unit,) = sequencer.push([delivery("c", "1"), delivery("c", "2")])
    assert payloads([unit]) == [["1", "2"]]


def test_catch_up_holds_its_channel_and_not_the_others():
    sequencer = Sequencer(None)

    def run():
        pass

    (catch_up,) = sequencer.catch_up("a", run)
    assert catch_up.catch_up is run
    units = sequencer.push([delivery("a", "1"), delivery("b", "2"), delivery("a", "3")])
    assert payloads(units) == [["2"]]
    assert sequencer.waiting == 2
    (released,) = sequencer.finish(catch_up)
    assert payloads([released]) == [["1", "3"]]
    assert sequencer.waiting == 0
    assert sequencer.idle


def test_catch_ups_of_one_channel_run_one_after_the_other():
    sequencer = Sequencer(lambda n: n.channel)
    (first,) = sequencer.catch_up("a", lambda: None)
    assert sequencer.catch_up("a", lambda: None) == []
    (other,) = sequencer.catch_up("b", lambda: None)  # another channel: at once
    assert sequencer.push([delivery("a", "1")]) == []
    (second,) = sequencer.finish(first)
    assert second.catch_up is not None
    (released,) = sequencer.finish(second)
    assert payloads([released]) == [["1"]]
    assert sequencer.finish(other) == []


def test_a_key_keeps_its_order_across_channels_while_one_is_held():
    sequencer = Sequencer(payload_key)
    (catch_up,) = sequencer.catch_up("a", lambda: None)
    units = sequencer.push(
        [delivery("a", "k:1"), delivery("b", "k:2"), delivery("b", "j:3")]
    )
    # k:2 is on a free channel but waits behind k:1, held with channel "a".
    assert payloads(units) == [["j:3"]]
    (released,) = sequencer.finish(catch_up)
    assert payloads([released]) == [["k:1", "k:2"]]


def test_held_deliveries_keep_their_order_behind_a_running_key():
    sequencer = Sequencer(lambda n: n.channel)
    (running,) = sequencer.push([delivery("a", "1")])
    (catch_up,) = sequencer.catch_up("a", lambda: None)
    assert sequencer.push([delivery("a", "2")]) == []
    assert sequencer.finish(catch_up) == []  # "a" is still running "1"
    (after,) = sequencer.finish(running)
    assert payloads([after]) == [["2"]]


@pytest.mark.parametrize(
    ("order_by", "error"),
    [("payload", ValueError), (42, TypeError), ("", ValueError)],
)
def test_a_bad_order_by_is_refused_by_the_constructor(factory, order_by, error):
    with pytest.raises(error, match="order_by"):
        Listener(factory, order_by=order_by)


# -- the pool, driven directly --------------------------------------------------------


def make_pool(
    max_workers: int = 4,
    on_done: Callable[[], CallbackDone | None] | None = None,
    **kwargs: Any,
) -> PoolDispatcher:
    return PoolDispatcher(
        max_workers,
        10_000,
        on_done or (lambda: None),
        lambda: None,
        thread_name_prefix="test-pool",
        **kwargs,
    )


def pool_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("test-pool")]


def test_no_thread_before_the_first_callback_and_daemon_threads_after():
    pool = make_pool()
    try:
        assert pool_threads() == []
        ran = threading.Event()
        pool.dispatch([delivery("a", "1", [lambda n: ran.set()])])
        assert ran.wait(WAIT)
        assert pool_threads()
        assert all(t.daemon for t in pool_threads())
    finally:
        pool.shutdown()
    assert pool_threads() == []


def test_catch_up_holds_its_channel_while_others_flow():
    pool = make_pool(order_by=None)
    release = threading.Event()
    seen: list[str] = []
    caught_up = threading.Event()

    def run():
        assert release.wait(WAIT)
        seen.append("catch-up")
        caught_up.set()

    def callback(n: Notify) -> None:
        seen.append(n.payload)

    pool.catch_up("a", run)
    pool.dispatch([delivery("a", "a1", [callback]), delivery("b", "b1", [callback])])
    wait_until(lambda: "b1" in seen, "the other channel flows")
    assert "a1" not in seen
    release.set()
    wait_until(lambda: "a1" in seen, "the held delivery after the catch-up")
    assert seen.index("catch-up") < seen.index("a1")
    pool.shutdown()


def test_catch_ups_of_different_channels_do_not_wait_for_each_other():
    pool = make_pool()
    barrier = threading.Barrier(2, timeout=WAIT)
    pool.catch_up("a", barrier.wait)  # breaks unless both run at once
    pool.catch_up("b", barrier.wait)
    pool.shutdown()
    assert not barrier.broken


def test_a_raising_catch_up_is_logged_and_delivery_goes_on(caplog):
    pool = make_pool()
    got = threading.Event()

    def run():
        raise RuntimeError("catch-up failed")

    with caplog.at_level(logging.ERROR, "classic.pg.listener"):
        pool.catch_up("a", run)
        pool.dispatch([delivery("a", "1", [lambda n: got.set()])])
        assert got.wait(WAIT)
        pool.shutdown()
    assert "catch-up" in caplog.text
    assert "catch-up failed" in caplog.text


def test_inline_catch_up_runs_at_once_and_a_raising_one_is_logged(caplog):
    inline = InlineDispatcher(lambda: None)
    ran = []
    inline.catch_up("a", lambda: ran.append(1))
    assert ran == [1]
    with caplog.at_level(logging.ERROR, "classic.pg.listener"):
        inline.catch_up("a", lambda: 1 / 0)
    assert "ZeroDivisionError" in caplog.text


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "pool"])
def test_counters_per_channel(inline, caplog):
    dispatcher = InlineDispatcher(lambda: None) if inline else make_pool()

    def fail(n: Notify) -> None:
        raise ValueError(n.payload)

    ok = [lambda n: None]
    with caplog.at_level(logging.CRITICAL, "classic.pg.listener"):
        dispatcher.dispatch(
            [delivery("a", "1", ok), delivery("a", "2", ok), delivery("b", "3", ok)]
        )
        dispatcher.dispatch([delivery("b", "4", [fail, fail]), delivery("a", "5", ok)])
        dispatcher.shutdown()
    assert dispatcher.delivered() == {"a": 3, "b": 2}
    assert dispatcher.errors() == {"b": 2}


def test_a_one_channel_batch_split_between_workers_is_counted_whole():
    pool = make_pool()
    ok = [lambda n: None]
    # More than a worker takes at a time: shares are slices of the batch.
    size = 3 * PoolDispatcher.MAX_TAKE + 1
    pool.dispatch(OneChannel("a", (delivery("a", str(i), ok) for i in range(size))))
    pool.dispatch([delivery("b", "x", ok), delivery("a", "y", ok)])
    pool.shutdown()
    assert pool.delivered() == {"a": size + 1, "b": 1}


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "pool"])
def test_an_empty_batch_is_nothing_to_do(inline):
    dispatcher = InlineDispatcher(lambda: None) if inline else make_pool()
    dispatcher.dispatch([])
    assert dispatcher.backlog == 0
    assert dispatcher.delivered() == {}
    dispatcher.shutdown()
    if not inline:
        assert pool_threads() == []


def test_shutdown_waits_for_accepted_work_which_can_be_awaited_in_steps():
    woken = threading.Event()
    pool = PoolDispatcher(2, 100, lambda: None, woken.set, "test-pool")
    release = threading.Event()
    done: list[str] = []

    def slow(n: Notify) -> None:
        assert release.wait(WAIT)
        done.append(n.payload)

    pool.dispatch([delivery("a", str(i), [slow]) for i in range(4)])
    assert pool.drained(0.01) is False  # still running: the caller may go on
    assert pool.backlog == 4
    release.set()
    pool.shutdown()
    assert sorted(done) == ["0", "1", "2", "3"]
    assert woken.is_set()  # the serving thread is told that the work is done


def test_the_done_hook_is_bound_when_a_chunk_runs_not_when_handed_over():
    calls: list[str] = []

    def record(callback: Callback, n: Notify, took: float, error: object) -> None:
        calls.append(n.payload)

    current: list[CallbackDone | None] = [record]
    pool = make_pool(max_workers=1, on_done=lambda: current[0])
    started, release = threading.Event(), threading.Event()

    def first(n: Notify) -> None:
        started.set()
        assert release.wait(WAIT)

    pool.dispatch([delivery("a", "1", [first])])
    assert started.wait(WAIT)
    pool.dispatch([delivery("a", "2", [lambda n: None])])  # queued behind "1"
    current[0] = None  # the plugin is unregistered meanwhile
    release.set()
    pool.shutdown()
    assert calls == ["1"]


def test_a_blocked_worker_does_not_hold_work_that_another_can_take():
    pool = make_pool(max_workers=2)
    release = threading.Event()
    got = threading.Event()
    pool.dispatch([delivery("a", "1", [lambda n: release.wait(WAIT)])])
    pool.dispatch([delivery("a", "2", [lambda n: got.set()])])
    assert got.wait(WAIT)
    release.set()
    pool.shutdown()


# -- through the Listener, against the server ------------------------------------------


class Tracker:
    """A callback that checks that no two notifications of a key overlap."""

    def __init__(self, key, expected: int, delay: float = 0.0):
        self.key = key
        self.delay = delay
        self.expected = expected
        self.running: dict[object, int] = {}
        self.order: dict[object, list[int]] = {}
        self.overlaps = 0
        self.most_at_once = 0
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._count = 0

    def __call__(self, n: Notify) -> None:
        key = self.key(n)
        with self._lock:
            self.running[key] = self.running.get(key, 0) + 1
            self.overlaps += self.running[key] > 1
            self.most_at_once = max(self.most_at_once, sum(self.running.values()))
            self.order.setdefault(key, []).append(int(n.payload.split(":")[1]))
        time.sleep(self.delay)
        with self._lock:
            self.running[key] -= 1
            self._count += 1
            if self._count == self.expected:
                self.done.set()


def payload_key(n: Notify) -> str:
    return n.payload.split(":")[0]


@pytest.mark.parametrize(
    "order_by", ["channel", payload_key], ids=["channel", "key function"]
)
def test_ordered_pool_keeps_order_per_key_and_runs_keys_side_by_side(
    make_listener, conn, channel, order_by
):
    listener = make_listener(max_workers=8, order_by=order_by)
    channels = [f"{channel}_{i}" for i in range(4)]
    key = (lambda n: n.channel) if order_by == "channel" else payload_key
    tracker = Tracker(key, expected=4 * 30, delay=0.002)
    futures = [listener.add_callback(tracker, ch) for ch in channels]
    listener.start()
    for future in futures:
        future.result(WAIT)
    for i in range(30):
        for k, ch in enumerate(channels):
            # With the key function, each channel carries all four keys.
            notify(conn, ch, f"{ch if order_by == 'channel' else k}:{i}")
    assert tracker.done.wait(WAIT)
    assert tracker.overlaps == 0
    for values in tracker.order.values():
        assert values == sorted(values)
    assert len(tracker.order) == 4
    assert tracker.most_at_once > 1  # keys ran side by side


def test_a_slow_key_does_not_hold_the_others(make_listener, conn, channel):
    listener = make_listener(max_workers=4, order_by=payload_key)
    release = threading.Event()
    others: list[str] = []

    def callback(n: Notify) -> None:
        if n.payload.startswith("slow"):
            assert release.wait(WAIT)
        else:
            others.append(n.payload)

    future = listener.add_callback(callback, channel)
    listener.start()
    future.result(WAIT)
    notify(conn, channel, "slow:0", "slow:1", *(f"k{i}:0" for i in range(20)))
    try:
        wait_until(lambda: len(others) == 20, "the other keys, while slow waits")
    finally:
        release.set()


def test_a_raising_key_function_delivers_under_a_fallback_key(
    make_listener, conn, channel, caplog
):
    def key(n: Notify) -> str:
        raise KeyError(n.payload)

    listener = make_listener(max_workers=2, order_by=key)
    got: list[str] = []
    future = listener.add_callback(lambda n: got.append(n.payload), channel)
    listener.start()
    future.result(WAIT)
    with caplog.at_level(logging.ERROR, "classic.pg.listener"):
        notify(conn, channel, "1", "2", "3")
        wait_until(lambda: len(got) == 3, "all three delivered")
    assert got == ["1", "2", "3"]  # one fallback key per channel: in order
    assert "order_by key" in caplog.text


def test_inline_is_in_order_whatever_order_by_says(make_listener, conn, channel):
    listener = make_listener(max_workers=0, order_by=payload_key)
    got: list[str] = []
    future = listener.add_callback(lambda n: got.append(n.payload), channel)
    listener.start()
    future.result(WAIT)
    sent = [f"{i % 3}:{i}" for i in range(30)]
    notify(conn, channel, *sent)
    wait_until(lambda: len(got) == 30, "all delivered")
    assert got == sent


def test_an_idle_listener_has_no_pool_thread(make_listener, conn, channel):
    listener = make_listener(name="lazy")
    got = threading.Event()
    future = listener.add_callback(lambda n: got.set(), channel)
    listener.start()
    future.result(WAIT)

    def lazy_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("lazy-")]

    assert lazy_threads() == []
    notify(conn, channel)
    assert got.wait(WAIT)
    assert lazy_threads()


class DoneCounter:
    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    def listener_callback_done(self, listener, callback, notify, duration, error):
        self.calls.append(notify.payload)


def test_no_callback_done_hook_of_queued_work_after_unregister_plugin(
    make_listener, conn, channel
):
    plugin = DoneCounter()
    listener = make_listener(max_workers=1, plugins=[plugin])
    started, release = threading.Event(), threading.Event()

    def callback(n: Notify) -> None:
        if n.payload == "first":
            started.set()
            assert release.wait(WAIT)

    future = listener.add_callback(callback, channel)
    listener.start()
    future.result(WAIT)
    notify(conn, channel, "first")
    assert started.wait(WAIT)
    for i in range(5):
        notify(conn, channel, str(i))
    wait_until(lambda: listener.backlog == 6, "five queued behind the first")
    listener.unregister_plugin(listener.plugins[0].name).result(WAIT)
    release.set()
    wait_until(lambda: listener.backlog == 0, "all run")
    assert plugin.calls == ["first"]  # bound when its chunk ran, before


DAEMON_SCRIPT = textwrap.dedent(
    """
    import sys, threading, time
    import psycopg
    from classic.pg.listener import Listener

    dsn, channel = sys.argv[1], sys.argv[2]
    started = threading.Event()

    def slow(notify):
        started.set()
        time.sleep(3)

    listener = Listener(lambda: psycopg.connect(dsn, autocommit=True),
                        max_workers=2, autoload_plugins=False)
    future = listener.add_callback(slow, channel)
    listener.start()
    future.result(10)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(20):
            conn.execute("SELECT pg_notify(%s, %s)", (channel, str(i)))
    started.wait(10)
    listener.stop()
    print("stopping", flush=True)
    """
)


def test_interpreter_exit_does_not_run_the_backlog_of_slow_callbacks(dsn, channel):
    """Issue #10 item 8: pool threads are daemon threads."""
    with subprocess.Popen(
        [sys.executable, "-c", DAEMON_SCRIPT, dsn, channel],
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "stopping"
        stopped = time.monotonic()
        assert process.wait(WAIT) == 0
    # 20 callbacks of 3 s in 2 workers would take 30 s; one running is cut.
    assert time.monotonic() - stopped < 2.5


def test_unit_defaults_hold_no_key():
    assert Unit().key is None


@pytest.mark.parametrize("order_by", [None, "channel", "key"])
@pytest.mark.parametrize("workers", [1, 4])
def test_order_and_holds_survive_random_batches_and_catch_ups(order_by, workers):
    """Random batches, keys, catch-ups and slow callbacks, checked as they run."""
    rnd = random.Random(f"{order_by}{workers}")
    lock = threading.Lock()
    running: dict[object, int] = {}
    last: dict[object, int] = {}
    active: dict[str, set[int]] = {}  # catch-ups called and not finished
    finished: set[int] = set()
    waited_for: dict[int, tuple[int, ...]] = {}  # seq -> catch-ups active then
    problems: list[str] = []

    def key_of(n: Notify) -> object:
        return None if order_by is None else payload_key(n)

    def callback(n: Notify) -> None:
        key, seq = key_of(n), int(n.payload.split(":")[1])
        with lock:
            if key is not None:
                running[key] = running.get(key, 0) + 1
                if running[key] > 1:
                    problems.append(f"{key} ran twice at once")
                if seq < last.get(key, -1):
                    problems.append(f"{key}: {seq} after {last[key]}")
                last[key] = seq
            problems.extend(
                f"{seq} ran before catch-up {c}"
                for c in waited_for[seq]
                if c not in finished
            )
        if rnd.random() < 0.05:
            time.sleep(0.0005)
        with lock:
            if key is not None:
                running[key] -= 1

    pool = make_pool(
        workers, order_by={"key": payload_key}.get(order_by or "", order_by)
    )
    seq = catch_ups = sent = 0
    for _ in range(200):
        batch = []
        for _ in range(rnd.randint(1, 40)):
            channel = f"c{rnd.randint(0, 5)}"
            # "channel": the payload's key is the channel, as order_by sees it.
            key = channel if order_by == "channel" else f"k{rnd.randint(0, 7)}"
            batch.append(delivery(channel, f"{key}:{seq}", [callback]))
            seq += 1
        with lock:
            for _, n in batch:
                waited_for[int(n.payload.split(":")[1])] = tuple(
                    active.get(n.channel, ())
                )
        pool.dispatch(batch)
        sent += len(batch)
        if rnd.random() < 0.1:
            channel, catch_ups = f"c{rnd.randint(0, 5)}", catch_ups + 1
            with lock:
                active.setdefault(channel, set()).add(catch_ups)

            def run(channel: str = channel, number: int = catch_ups) -> None:
                time.sleep(rnd.random() * 0.002)
                with lock:
                    active[channel].discard(number)
                    finished.add(number)

            pool.catch_up(channel, run)
    pool.shutdown()
    assert problems == []
    assert sum(pool.delivered().values()) == sent
    assert pool.backlog == 0
