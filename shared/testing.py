"""An in-memory bus for tests of services and hooks (FastStream's TestRabbitBroker, nameko's worker_factory): no
broker, no network, the real services' handlers.

`InMemoryBus` routes every published message the way RabbitMQ would with vtorque's topology (shared/topology.py):
a command to its target's queue (declared at the first command, as `shared.bus.Publisher` does, so a command
waits for a consumer that is not there yet; a job's BootGuests, published once, to the queue of every node it
names, as the broker does with the Publisher's BCC header), an event to every queue bound to its routing key on
the events exchange (topic patterns, `*` one word, `#` any). Bodies go through `messages.encode`/`decode` on the
way, so a message that would not survive the wire does not survive here either.

- `bus.serve(service)`: consumes the service's queues (`queues()`, `handlers()`, `extra_consumers()`), each
  consumer in a thread of its own, one message at a time, as `vtorque run` does; a handler that raises is
  dead-lettered (`bus.dead`), a command past its deadline answered with CommandExpired.
- `bus.publisher()`: what a service is built with (the shared.bus.Publisher methods).
- `bus.channel(url, patterns, …)`: a private queue bound to `patterns`, with `publish`, `events(deadline)`,
  `next(deadline)`, `close()`: it stands in for the hooks' HookChannel (pass `bus.channel` as a hook's
  `channel_factory`) and for EventWaiter.
- `bus.settle()`: until every served queue is empty and no handler runs.
- `FakeClock`: a service's clock (shared/clock.py) that moves only when the test says (`advance`); a served
  service's commands are judged past their deadline by its own clock, as `vtorque run` does.

Not modelled: sender checks (user_id), the dead-letter exchange's queue, broker failures; the real-broker tests
(tests/integration/test_bus.py) cover those.
"""

from __future__ import annotations

import collections
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgspec

from vtorque.shared import messages as m
from vtorque.shared import topology, tracing
from vtorque.shared.bus import sender_selected
from vtorque.shared.clock import Clock
from vtorque.shared.logs import job_context


class FakeClock:
    """A Clock that stands still until `advance`d: from the real time it was made at (so messages stamped by the
    real clock compare sanely with it), or from `start` (epoch seconds)."""

    def __init__(self, start: float | None = None):
        self._lock = threading.Lock()
        self._wall = time.time() if start is None else float(start)
        self._mono = 1000.0

    def now(self) -> float:
        with self._lock:
            return self._wall

    def monotonic(self) -> float:
        with self._lock:
            return self._mono

    def utcnow(self) -> datetime:
        return datetime.fromtimestamp(self.now(), UTC)

    def advance(self, seconds: float) -> None:
        """Both clocks move on by `seconds` (never back)."""
        if seconds < 0:
            raise ValueError("a clock does not go back")
        with self._lock:
            self._wall += seconds
            self._mono += seconds


@dataclass
class _Queue:
    name: str
    items: collections.deque = field(default_factory=collections.deque)


class InMemoryBus:
    def __init__(self):
        self._cond = threading.Condition()
        self._queues: dict[str, _Queue] = {}
        self._bindings: list[tuple[str, str, str]] = []  # (exchange, pattern, queue)
        self._served: set[str] = set()
        self._busy = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.published: list[m.Message] = []  # every message, in publish order
        self.dead: list[tuple[m.Message | bytes, str]] = []  # (message, reason)
        self.unrouted: list[m.Message] = []  # events no queue was bound to (the broker drops them too)

    # -- the broker's side -----------------------------------------------------------------------------------

    def declare(self, name: str, bindings: Iterable[tuple[str, str]]) -> None:
        """A queue and its (exchange, routing pattern) bindings; declaring it again adds nothing twice."""
        with self._cond:
            self._queues.setdefault(name, _Queue(name))
            for exchange, pattern in bindings:
                if (exchange, pattern, name) not in self._bindings:
                    self._bindings.append((exchange, pattern, name))

    def declare_queue(self, queue) -> str:
        """A kombu Queue as a service names it (shared.bus.kombu_queue): its name and bindings."""
        self.declare(queue.name, [(b.exchange.name, b.routing_key) for b in queue.bindings])
        return queue.name

    def delete(self, name: str) -> None:
        with self._cond:
            self._queues.pop(name, None)
            self._bindings = [b for b in self._bindings if b[2] != name]

    def publish(self, message: m.Message) -> None:
        if isinstance(message, m.Command):
            # A job's BootGuests goes to every node it names, in one publish (shared/bus.py sender_selected).
            specs = topology.command_queues(message)
            for spec in specs:
                self.declare(spec.name, [(spec.exchange, key) for key in spec.bindings])
            exchange, keys = topology.COMMANDS, [spec.bindings[0] for spec in specs]
        else:
            assert isinstance(message, m.Event)  # a Message is a Command or an Event
            exchange, keys = topology.EVENTS, [message.routing_key()]
        body = m.encode(message)
        with self._cond:
            self.published.append(message)
        for key, bcc in sender_selected(keys):
            with tracing.publish_span(message, exchange, key) as headers:
                pass
            self._route(message, body, headers, exchange, [key, *bcc])

    def _route(self, message: m.Message, body: bytes, headers: dict, exchange: str, keys: list[str]) -> None:
        """As the broker routes one publish: to every queue any of its routing keys (its own, then its BCC
        header's) reaches, once each; the BCC header itself is not delivered."""
        with self._cond:
            targets = list(dict.fromkeys(q for key in keys for ex, pattern, q in self._bindings
                                         if ex == exchange and topology.topic_matches(pattern, key)))
            for name in targets:
                self._queues[name].items.append((body, dict(headers), keys[0], exchange))
            if not targets:
                self.unrouted.append(message)
            self._cond.notify_all()

    def _take(self, names: list[str], deadline: float | None) -> tuple | None:
        """The next delivery from any of `names` (None at the deadline, or when the bus stops)."""
        with self._cond:
            while not self._stop.is_set():
                for name in names:
                    queue = self._queues.get(name)
                    if queue is not None and queue.items:
                        return (name, *queue.items.popleft())
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(0.5 if remaining is None else min(remaining, 0.5))
        return None

    # -- a service's side ------------------------------------------------------------------------------------

    def publisher(self) -> _Publisher:
        return _Publisher(self)

    def serve(self, service) -> None:
        """Consume the service's queues with its handlers until `close()`."""
        for queues, handlers in [(service.queues(), service.handlers()), *service.extra_consumers()]:
            names = [self.declare_queue(q) for q in queues]
            with self._cond:
                self._served.update(names)
            thread = threading.Thread(target=self._consume,
                                      args=(names, dict(handlers), service.clock),
                                      name=f"consumer-{service.name}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _consume(self, names: list[str], handlers: dict, clock: Clock) -> None:
        while not self._stop.is_set():
            with self._cond:
                got = self._take(names, None)
                if got is None:
                    return
                self._busy += 1
            try:
                self._deliver(handlers, clock, *got)
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()

    def _deliver(self, handlers: dict, clock: Clock, queue: str, body: bytes, headers: dict, key: str,
                 exchange: str) -> None:
        try:
            message = m.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.dead.append((body, f"undecodable: {exc}"))
            return
        handler = handlers.get(type(message))
        if handler is None:
            self.dead.append((message, f"no handler for {type(message).__name__} here"))
            return
        if isinstance(message, m.Command) and message.expired(clock.utcnow()):
            self.publish(m.CommandExpired.new(job_id=message.job_id, deadline=60.0, command=type(message).__name__,
                                              command_id=message.message_id))
            return
        with job_context(message.job_id), tracing.process_span(message, queue, key, headers, exchange=exchange):
            try:
                handler(message)
            except Exception as exc:  # noqa: BLE001 - dead-lettered with its reason, as ServiceRunner does
                self.dead.append((message, f"handler crashed: {type(exc).__name__}: {exc}"))

    def settle(self, timeout: float = 10.0) -> None:
        """Until every served queue is empty and no handler runs; AssertionError after `timeout` s."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._busy or any(self._queues[n].items for n in self._served if n in self._queues):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError("the in-memory bus did not settle: "
                                         + ", ".join(f"{n}: {len(q.items)}" for n, q in self._queues.items()))
                self._cond.wait(min(remaining, 0.1))

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(5)

    # -- a hook's (or a waiter's) side -----------------------------------------------------------------------

    def channel(self, url: str = "memory://", patterns: Iterable[str] = (), attempts: int = 3, timeout: float = 5.0,
                label: str | None = None, prefix: str = topology.prefix(topology.HOOK_Q)) -> _Channel:
        """HookChannel's and EventWaiter's stand-in: bound before the caller publishes, as they are."""
        return _Channel(self, list(patterns), f"{prefix}{label or 'memory'}.{uuid.uuid4().hex[:12]}")

    def waiter(self, url: str = "memory://", patterns: Iterable[str] = (), timeout: float = 5.0,
               prefix: str = topology.prefix(topology.WAIT_Q)) -> _Channel:
        return self.channel(url, patterns, prefix=prefix)


class _Publisher:
    """shared.bus.Publisher's methods, on the in-memory bus (any thread; nothing to connect or close)."""

    def __init__(self, bus: InMemoryBus):
        self.bus = bus

    def publish(self, message: m.Message) -> None:
        self.bus.publish(message)

    def publish_many(self, messages: Iterable[m.Message]) -> None:
        for message in messages:
            self.bus.publish(message)

    def ensure_queues(self, queues) -> None:
        for queue in queues:
            self.bus.declare_queue(queue)

    def close(self) -> None:
        pass

    def close_all(self) -> None:
        pass


class _Channel:
    def __init__(self, bus: InMemoryBus, patterns: list[str], queue: str):
        self.bus, self.queue = bus, queue
        bus.declare(queue, [(topology.EVENTS, p) for p in patterns])

    def publish(self, event: m.Event) -> None:
        self.bus.publish(event)

    def events(self, deadline: float) -> Iterator[tuple[m.Message, dict]]:
        while (got := self.bus._take([self.queue], deadline)) is not None:
            _, body, headers, _, _ = got
            try:
                event = m.decode(body)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            yield event, headers

    def next(self, deadline: float) -> m.Message | None:
        for event, _ in self.events(deadline):
            return event
        return None

    def close(self) -> None:
        self.bus.delete(self.queue)
