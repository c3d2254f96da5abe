"""A publish the broker does not take at once (a connection lost, a nack while a quorum queue elects a new leader)
is sent again for up to PUBLISH_PATIENCE; a channel error is not; a handler whose publish never got through puts
its message back in the queue instead of dead-lettering it (rig fault test a: a broker node stopped mid-job nacked
the bridge's plan and the job's JobStarted was dead-lettered)."""

from __future__ import annotations

import concurrent.futures

import amqp.exceptions
import pytest

from vtorque.shared import bus
from vtorque.shared import messages as m
from vtorque.shared.bus import Publisher, PublishFailed, ServiceRunner, _Pending

URL = "amqp://vtorque-bridge:secret@127.0.0.1:1/vtorque"  # never connected to: _publish_once is scripted


def _heartbeat() -> m.NodeHeartbeat:
    return m.NodeHeartbeat.new(job_id="", deadline=30.0, node="n1", cores=4, mem_free_mib=1024, guests_running=0,
                               domain_type="qemu")


@pytest.fixture
def scripted(monkeypatch):
    """A Publisher whose sends fail as scripted (an exception, or None for a send that is confirmed)."""
    publisher = Publisher(URL)
    script: list[BaseException | None] = []
    calls: list[int] = []
    closed: list[bool] = []
    sleeps: list[float] = []

    def publish_once(messages):
        calls.append(len(messages))
        outcome = script.pop(0)
        if outcome is not None:
            raise outcome

    monkeypatch.setattr(publisher, "_publish_once", publish_once)
    monkeypatch.setattr(publisher, "close", lambda lost=False: closed.append(lost))
    monkeypatch.setattr(bus.time, "sleep", sleeps.append)
    return publisher, script, calls, closed, sleeps


def test_nacks_and_lost_connections_are_sent_again_until_taken(scripted):
    publisher, script, calls, closed, sleeps = scripted
    script[:] = [amqp.exceptions.MessageNacked("refused"), ConnectionResetError(104, "reset"),
                 amqp.exceptions.ConnectionForced("broker shutting down"), None]
    publisher.publish_many([_heartbeat(), _heartbeat()])
    assert calls == [2, 2, 2, 2]  # the whole batch each time
    assert closed == [True, True, True]  # each failed connection dropped, a new one for the next try
    assert sleeps == [0.1, 0.2, 0.4]  # backing off


def test_a_broker_that_never_takes_it_fails_after_the_patience(scripted, monkeypatch):
    publisher, script, calls, closed, sleeps = scripted
    clock = [0.0]
    monkeypatch.setattr(bus.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(bus.time, "sleep", lambda s: (sleeps.append(s), clock.__setitem__(0, clock[0] + s)))
    script[:] = [amqp.exceptions.MessageNacked("refused")] * 100
    with pytest.raises(PublishFailed, match=r"did not take 1 message\(s\) in 30 s: MessageNacked"):
        publisher.publish(_heartbeat())
    assert sum(sleeps) <= bus.PUBLISH_PATIENCE and max(sleeps) == bus.RECONNECT_MAX_DELAY
    assert isinstance(PublishFailed("x"), OSError)  # what callers that catch broker errors already catch


def test_a_channel_error_is_not_sent_again(scripted):
    publisher, script, calls, closed, sleeps = scripted
    script[:] = [amqp.exceptions.NotFound("no exchange 'vtorque.events'"), None]
    with pytest.raises(amqp.exceptions.NotFound):
        publisher.publish(_heartbeat())
    assert calls == [1] and closed == [True] and sleeps == []


class _Raw:
    body, content_type, headers, properties, delivery_info = b"{}", "application/json", {}, {}, {}

    def __init__(self):
        self.settled: list[str] = []

    def ack(self):
        self.settled.append("ack")

    def requeue(self):
        self.settled.append("requeue")


def _settled(exc: BaseException, monkeypatch) -> tuple[list[str], list[str]]:
    runner = ServiceRunner(URL, [], {})
    dead: list[str] = []
    monkeypatch.setattr(runner, "_dead_letter", lambda raw, reason: dead.append(reason))
    future: concurrent.futures.Future = concurrent.futures.Future()
    future.set_exception(exc)
    raw = _Raw()
    runner._pending = _Pending(raw=raw, future=future)
    runner._settle()
    return raw.settled, dead


def test_a_handler_whose_publish_never_got_through_puts_its_message_back(monkeypatch):
    settled, dead = _settled(PublishFailed("the broker did not take 3 message(s) in 30 s"), monkeypatch)
    assert settled == ["requeue"] and dead == []


def test_a_handler_that_fails_otherwise_is_still_dead_lettered_with_its_reason(monkeypatch):
    settled, dead = _settled(FileNotFoundError(2, "No such file", "/var/lib/vtorque/x"), monkeypatch)
    assert settled == []
    assert dead == ["handler crashed: FileNotFoundError: [Errno 2] No such file: '/var/lib/vtorque/x'"]
