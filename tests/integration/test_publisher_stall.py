"""A publisher whose broker connection goes silent (a broker node cut off the network: no FIN, no RST, nothing)
gives up on it within CONFIRM_STALL and sends again on a new connection, instead of waiting for the kernel to
give up on the socket. Found on the rig: a node worker's heartbeat thread, connected to a broker node whose link
had been cut, was silent for ~30 s after the link came back, and the bridge refused a job for a node "not heard
from" (tests/e2e/test_rig_faults.py d).

The silence is a relay on loopback between the publisher and the real broker that stops forwarding the
connections it holds (they stay open), while new connections go through."""

import socket
import threading
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import pytest

from vtorque.shared import bus
from vtorque.shared import messages as m
from vtorque.shared.bus import EventWaiter, Publisher


class FreezableRelay:
    """127.0.0.1:<port> → the broker. `freeze()` stops every connection open now (each keeps its socket, and
    nothing passes either way); connections made afterwards are relayed."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.generation = 0
        self.accepted = 0
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            generation = self.generation
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b, generation), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, generation: int) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                return
            while self.generation != generation:  # frozen: held, never passed on, never closed
                time.sleep(0.05)
                if self.generation < 0:
                    return
            try:
                dst.sendall(data)
            except OSError:
                return

    def freeze(self) -> None:
        self.generation += 1

    def close(self) -> None:
        self.generation = -1
        self.listener.close()
        for s in self.sockets:
            s.close()


@pytest.fixture
def relay(broker_url):
    parts = urlsplit(broker_url)
    relay = FreezableRelay((parts.hostname, parts.port or 5672))
    userinfo = parts.netloc.rsplit("@", 1)[0]
    relay.url = urlunsplit(parts._replace(netloc=f"{userinfo}@127.0.0.1:{relay.port}"))
    yield relay
    relay.close()


def test_a_publisher_on_a_silent_connection_sends_again_on_a_new_one(broker_url, relay):
    job = f"stall-{uuid.uuid4().hex[:8]}"
    waiter = EventWaiter(broker_url, [f"job.{job}.#"])
    publisher = Publisher(relay.url)
    try:
        publisher.publish(m.JobRejected.new(job_id=job, deadline=60.0, reason="before"))
        assert relay.accepted == 1
        relay.freeze()  # the connection the publisher holds goes silent
        t0 = time.monotonic()
        publisher.publish(m.JobRejected.new(job_id=job, deadline=60.0, reason="after"))
        took = time.monotonic() - t0
        assert relay.accepted == 2, "the second message went on a new connection"
        assert took < bus.CONFIRM_STALL + 5, f"publish took {took:.1f} s"
        got = set()
        deadline = time.monotonic() + 20
        while got != {"before", "after"} and (event := waiter.next(deadline)) is not None:
            got.add(event.reason)
        assert got == {"before", "after"}
    finally:
        publisher.close()
        waiter.close()


def test_a_wait_that_hears_nothing_raises_a_timeout_the_publisher_takes_for_a_lost_connection(relay):
    publisher = Publisher(relay.url)
    try:
        local = publisher._ensure()
        relay.freeze()
        local.confirms.sent += 1  # a confirm is owed that the silent broker never sends
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="no publisher confirm"):
            local.confirms.wait(local.conn, stalled_after=0.5)
        assert 0.4 < time.monotonic() - t0 < 3
        assert isinstance(TimeoutError(), OSError)  # what publish_many's retry catches
        t0 = time.monotonic()
        publisher.close(lost=True)  # no close handshake with a broker that does not answer
        assert time.monotonic() - t0 < 1
    finally:
        publisher.close(lost=True)



def test_a_connection_silent_after_its_handshake_fails_its_next_wait_at_the_io_timeout(relay):
    """py-amqp bounds the handshake by connect_timeout, and nothing after it: a channel's open, a declare's
    answer waited without end on a broker node that stopped answering once connected (paused on a partition,
    restarting), and held the rig's c2 heartbeat for a minute after its link returned (fault c). The
    Publisher's connections carry CONFIRM_STALL as their socket's read timeout."""
    conn = bus.connect(relay.url, io_timeout=1.0)
    try:
        relay.freeze()  # connected; from now on the broker says nothing
        t0 = time.monotonic()
        with pytest.raises(OSError):  # socket.timeout, taken by the Publisher for a lost connection
            conn.channel()
        assert time.monotonic() - t0 < 4
    finally:
        bus._release(conn, lost=True)
    publisher = Publisher(relay.url)
    try:
        local = publisher._ensure()
        transport = local.conn.connection.transport  # SO_RCVTIMEO/SO_SNDTIMEO on its socket
        assert transport.read_timeout == transport.write_timeout == bus.CONFIRM_STALL
    finally:
        publisher.close(lost=True)
