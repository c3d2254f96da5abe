"""A heartbeat the broker does not take is sent again for at most one interval, then replaced at once by a fresh
one: the bridge judges a node by its newest beat's time, so a beat resent for longer arrives as old as that (the
rig's fault test c: c2 was heard 14.5 s after its link came back, with a beat made before the cut)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from vtorque.services.node_worker import heartbeat
from vtorque.shared.bus import PublishFailed


class ScriptedPublisher:
    def __init__(self, fail_first: int):
        self.fail_first = fail_first
        self.sent: list[tuple[float, float, list]] = []  # (when, patience, beats)
        self.done = threading.Event()

    def ensure_queues(self, queues):
        pass

    def publish_many(self, beats, patience):
        self.sent.append((time.monotonic(), patience, beats))
        if len(self.sent) <= self.fail_first:
            raise PublishFailed("the broker did not take 1 message(s)")
        self.done.set()

    def close(self, lost=False):
        pass


class RecordingStop(threading.Event):
    """The heartbeat's stop event: records how long each wait between beats was asked to be, and returns at once
    (no test waits out an interval); set once `until` is."""

    def __init__(self, until: threading.Event):
        super().__init__()
        self.until, self.waits = until, []

    def wait(self, timeout=None):
        self.waits.append(timeout)
        if self.until.is_set() and len(self.waits) > 3:
            self.set()
        return self.is_set()


def test_a_beat_not_taken_is_replaced_by_a_fresh_one_at_once_not_an_interval_later(monkeypatch):
    made = iter(range(100))
    monkeypatch.setattr(heartbeat, "node_facts", lambda worker: SimpleNamespace(n=next(made), node="n1",
                                                                               guests_running=0))
    publisher = ScriptedPublisher(fail_first=2)
    worker = SimpleNamespace(config=SimpleNamespace(node=SimpleNamespace(heartbeat_interval=2.0)), publisher=publisher)
    stop = RecordingStop(until=publisher.done)
    beating = heartbeat.Heartbeat(worker, stop)
    beating.thread.start()
    beating.thread.join(10)
    assert not beating.thread.is_alive()
    (_, p1, b1), (_, p2, b2), (_, p3, b3) = publisher.sent[:3]
    assert p1 == p2 == p3 == 2.0  # each beat is tried for one interval at most
    assert [b[0].n for b in (b1, b2, b3)] == [0, 1, 2]  # a new beat each time, not the old one again
    # The waits between beats: a whole interval before the first, next to none after each that failed, a whole
    # interval after the one that went out.
    assert stop.waits[:4] == [2.0, 0.1, 0.1, 2.0], stop.waits
