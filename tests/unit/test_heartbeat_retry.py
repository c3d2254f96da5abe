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


def test_a_beat_not_taken_is_replaced_by_a_fresh_one_at_once_not_an_interval_later(monkeypatch):
    made = iter(range(100))
    monkeypatch.setattr(heartbeat, "node_facts", lambda worker: SimpleNamespace(n=next(made), node="n1",
                                                                               guests_running=0))
    publisher = ScriptedPublisher(fail_first=2)
    worker = SimpleNamespace(config=SimpleNamespace(node=SimpleNamespace(heartbeat_interval=2.0)), publisher=publisher)
    stop = threading.Event()
    beating = heartbeat.Heartbeat(worker, stop)
    beating.thread.start()
    try:
        assert publisher.done.wait(10)
    finally:
        stop.set()
        beating.thread.join(5)
    (t1, p1, b1), (t2, p2, b2), (t3, p3, b3) = publisher.sent[:3]
    assert p1 == p2 == p3 == 2.0  # each beat is tried for one interval at most
    assert [b[0].n for b in (b1, b2, b3)] == [0, 1, 2]  # a new beat each time, not the old one again
    assert t2 - t1 < 0.5 and t3 - t2 < 0.5  # after a failed beat the next goes at once
