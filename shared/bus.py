"""The bus on kombu: the whole broker topology in one place, a confirming publisher, and the consumer runtime.

Delivery is at-least-once: persistent messages, publisher confirms, manual ack only after the handler's
effect (including the messages it publishes) is done, prefetch 1. The handler runs in a worker thread while
the consuming thread keeps the connection's heartbeats going, so a five-minute guest boot does not get the
consumer disconnected. A body that does not decode, or an unexpected handler crash, is dead-lettered with
its reason in the `x-vtorque-reason` header; a command past its deadline is dropped with a CommandExpired
event.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import amqp.exceptions
import amqp.spec
import kombu
import msgspec
from kombu import Connection, Exchange, Queue, binding

from vtorque.shared import broker_tls, hook_channel, topology, tracing
from vtorque.shared import messages as m
from vtorque.shared.clock import SYSTEM_CLOCK, Clock
from vtorque.shared.logs import job_context, log

LOG = logging.getLogger("vtorque.bus")

# Exchanges and queues are built from the one topology table (shared/topology.py); nothing here names one.
EVENTS = Exchange(topology.EVENTS, type=topology.EXCHANGES[topology.EVENTS], durable=True)
COMMANDS = Exchange(topology.COMMANDS, type=topology.EXCHANGES[topology.COMMANDS], durable=True)
DEAD = Exchange(topology.DEAD, type=topology.EXCHANGES[topology.DEAD], durable=True)
_EXCHANGES = {e.name: e for e in (EVENTS, COMMANDS, DEAD)}


# -- topology ---------------------------------------------------------------------------------------------

def kombu_queue(spec: topology.QueueSpec) -> Queue:
    """The kombu Queue of one (rendered) entry of the table. Declaring it declares its exchange passively
    (kombu declares a queue's exchange first): a service's user has no right to configure exchanges."""
    known = _EXCHANGES[spec.exchange]
    exchange = Exchange(known.name, type=known.type, durable=True, passive=True)
    private = spec.kind == "private"
    return Queue(spec.name, exchange=exchange, durable=not private, exclusive=private, auto_delete=private,
                 queue_arguments=spec.queue_arguments or None,
                 bindings=[binding(exchange, routing_key=key) for key in spec.bindings])


def table_queue(name: str, **names: str) -> Queue:
    return kombu_queue(topology.queue(name, **names))


def service_queues(role: topology.Role, **names: str) -> list[Queue]:
    """The durable queues a service consumes, from the table (private ones are made by their owners)."""
    return [kombu_queue(q.render(**names)) for q in topology.queues_of(role) if q.kind != "private"
            and ("{node}" not in q.name or "node" in names)]


DEAD_QUEUE = table_queue(topology.DEAD_QUEUE)


def bridge_queue() -> Queue:
    return table_queue(topology.BRIDGE_Q)


def stager_queue() -> Queue:
    return table_queue(topology.STAGER_Q)


def node_queue(host: str) -> Queue:
    return table_queue(topology.NODE_Q, node=host)


def command_route(command: m.Command) -> tuple[Queue, str]:
    spec = topology.command_queue(command)
    return kombu_queue(spec), spec.bindings[0]


def _exists(channel, kind: str, name: str, exchange_type: str = "") -> bool:
    """A passive declare on a channel of its own (a NotFound closes the channel it happens on); needs no
    permission at all, so any broker user can check what the administrator's set-up made."""
    probe = channel.connection.channel()
    try:
        if kind == "exchange":
            probe.exchange_declare(name, exchange_type, durable=True, passive=True)
        else:
            probe.queue_declare(name, passive=True)
        return True
    except amqp.exceptions.NotFound:
        return False
    finally:
        if probe.is_open:
            probe.close()


def declare_topology(channel, queues: Iterable[Queue] = ()) -> None:
    """Checks the exchanges (`vtorque broker setup` made them); where they are missing and this user may create
    them (a test's own vhost), creates them and the dead-letter queue. Then declares `queues`: the caller's
    own, which its broker user may configure (shared/topology.py)."""
    if not all(_exists(channel, "exchange", e.name, e.type) for e in (EVENTS, COMMANDS, DEAD)):
        for exchange in (EVENTS, COMMANDS, DEAD):
            exchange(channel).declare()
        DEAD_QUEUE(channel).declare()
    for queue in queues:
        queue(channel).declare()


def ensure_queue(channel, queue: Queue) -> None:
    """Someone else's queue (a command's target, the heartbeat store): used as it is when it exists, since
    this user may not configure it; declared only where it is missing (a node worker not started yet: the
    command then waits for it), which needs the right to."""
    ensure_queues(channel, [queue])


PROBE_BATCH = 256  # passive declares in flight at once on the probe channel


def ensure_queues(channel, queues: Iterable[Queue]) -> None:
    """ensure_queue for many: their passive declares sent a batch at a time, then the batch's answers read, so
    the queues of a 1,024-node job cost a few round trips, not 1,024 (a bridge's first job on a connection). A
    NotFound closes the probe channel: that queue is declared, and probing goes on after it on a new channel
    (the broker drops whatever came after the failed declare on the closed channel)."""
    pending = list(queues)
    probe = None
    try:
        while pending:
            if probe is None or not probe.is_open:
                probe = channel.connection.channel()
            batch = pending[:PROBE_BATCH]
            for queue in batch:  # what Channel.queue_declare(passive=True) sends, without its wait
                probe.send_method(amqp.spec.Queue.Declare, "BsbbbbbF",
                                  (0, queue.name, True, False, False, False, False, {}))
            done = 0
            try:
                for _ in batch:
                    probe.wait(amqp.spec.Queue.DeclareOk, returns_tuple=True)
                    done += 1
            except amqp.exceptions.NotFound:
                batch[done](channel).declare()
                done += 1
            pending = pending[done:]
    finally:
        if probe is not None and probe.is_open:
            probe.close()


def connect(url: str, heartbeat: int = 0, timeout: float = 5.0, confirm_publish: bool = True,
            io_timeout: float | None = None) -> Connection:
    """`confirm_publish`: each publish waits for its confirm (py-amqp's way). The Publisher turns it off and
    counts confirms itself (`Confirms`), so that a batch waits once. `io_timeout`: any read or write on the
    socket that waits longer raises TimeoutError (the AMQP handshake, a channel's open, a declare's answer):
    without it a broker node that accepts the connection but stops answering (paused on a partition, restarting)
    held a node worker's heartbeat for a minute and more on the rig."""
    options: dict = {"confirm_publish": confirm_publish}
    if io_timeout is not None:
        options.update(read_timeout=io_timeout, write_timeout=io_timeout)
    conn = Connection(broker_tls.split(url)[0], heartbeat=heartbeat, connect_timeout=timeout,
                      ssl=broker_tls.kombu_ssl(url), transport_options=options)
    conn.ensure_connection(max_retries=3, interval_start=0.2, interval_step=0.5, timeout=timeout)
    return conn


# What a lost or refused broker connection raises: socket errors, kombu's, and every AMQP error the broker
# sends (541 INTERNAL_ERROR when a consumer races a quorum queue that is still being created on a broker that
# is starting, 320 CONNECTION_FORCED on a graceful broker shutdown, 404/405 on a queue that went away).
BROKER_ERRORS: tuple[type[BaseException], ...] = (OSError, ConnectionError, kombu.exceptions.KombuError,
                                                  amqp.exceptions.AMQPError)
RECONNECT_MAX_DELAY = 2.0  # seconds; back at work within a few seconds of the broker's return
CONFIRM_STALL = 3.0  # seconds without a confirm (or anything else) from the broker: the connection is taken for lost
# (a confirm takes milliseconds; 5 s kept a node that came back unheard for 10.2 s on the rig, fault test c)
PUBLISH_PATIENCE = 30.0  # seconds a publish is sent again for (lost connections, nacks) before its caller hears


class PublishFailed(ConnectionError):
    """The broker did not take a publish within PUBLISH_PATIENCE. A handler that fails so is not at fault:
    its message goes back to its queue (redelivered, bounded by the quorum queues' delivery limit), not to
    the dead letters."""


# What the broker may do for a while and then not (a node stopping, lost, electing leaders): sent again. A
# channel error (a missing exchange, a refused user_id) is not among them: sent again it fails again.
PUBLISH_TRANSIENT: tuple[type[BaseException], ...] = (
    OSError, ConnectionError, kombu.exceptions.OperationalError, amqp.exceptions.RecoverableConnectionError,
    amqp.exceptions.MessageNacked)


def broker_user_of(url: str) -> str | None:
    import urllib.parse

    user = urllib.parse.urlsplit(url).username
    return urllib.parse.unquote(user) if user else None


# -- publishing -------------------------------------------------------------------------------------------

# Sender-selected distribution (https://www.rabbitmq.com/docs/sender-selected): a message published with routing
# keys in its BCC header is routed with each of them as well as its own routing key, stored once, and put in every
# queue they reach; the broker removes the BCC header before delivery. A job's one BootGuests reaches every node
# of the job so (topology.command_queues). The header travels in one AMQP frame (131,072 bytes at most, the
# broker's default frame_max), so a longer list is sent as several publishes of the same body.
BCC = "BCC"
BCC_BYTES = 32_768  # of routing keys in one publish's BCC header


def sender_selected(keys: list[str], budget: int = BCC_BYTES) -> list[tuple[str, list[str]]]:
    """(routing key, BCC keys) per publish that reaches every queue of `keys` once: the first key of each
    group routes it, the rest of the group rides in its BCC header, each group's keys within `budget` bytes."""
    groups: list[list[str]] = []
    size = budget
    for key in keys:
        cost = len(key.encode()) + 5  # a field-table array's long string: type octet, 4-byte length
        if size + cost > budget:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += cost
    return [(group[0], group[1:]) for group in groups]


class Confirms:
    """Publisher confirms on one channel, counted. In confirm mode the broker numbers the channel's messages 1,
    2, … and acks (or nacks) each, or all up to one at once (`multiple`); so a sender may publish many and then
    wait once until every one is settled, instead of a round trip per message (1,024 commands to 1,024 queues
    took 1.7 s with a wait per message here, ../shared/reference/rabbitmq-on-this-machine.md)."""

    def __init__(self, channel):
        self.sent = 0
        self._upto = 0  # every tag up to this one is settled
        self._above: set[int] = set()  # tags settled one by one above it
        self._nacked = 0
        channel.events["basic_ack"].add(self._ack)
        channel.events["basic_nack"].add(self._nack)
        channel.confirm_select()

    def _ack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple)

    def _nack(self, tag: int, multiple: bool) -> None:
        self._nacked += 1
        self._settle(tag, multiple)

    def _settle(self, tag: int, multiple: bool) -> None:
        if multiple:
            self._upto = max(self._upto, tag)
            self._above = {t for t in self._above if t > self._upto}
        else:
            self._above.add(tag)
        while self._upto + 1 in self._above:
            self._upto += 1
            self._above.discard(self._upto)

    @property
    def pending(self) -> int:
        return self.sent - self._upto

    def wait(self, conn: Connection, stalled_after: float = CONFIRM_STALL) -> None:
        """Until the broker has settled everything sent; a nack raises MessageNacked (as py-amqp's own wait).

        A wait that hears nothing for `stalled_after` seconds raises TimeoutError (an OSError: the Publisher
        takes it for a lost connection, reconnects and sends again). Publishers' connections carry no AMQP
        heartbeat, so a broker node cut off the network (no FIN, no RST) would otherwise hold the wait until the
        kernel gives up on the socket: on the rig a node worker's heartbeat thread stayed in it for 30 s after
        its broker node's link came back, and the bridge refused a job for a node "not heard from"."""
        while self._upto < self.sent:
            try:
                conn.drain_events(timeout=stalled_after)
            except TimeoutError:  # socket.timeout: nothing came in that time
                raise TimeoutError(f"no publisher confirm from the broker in {stalled_after:g} s") from None
        if self._nacked:
            nacked, self._nacked = self._nacked, 0
            raise amqp.exceptions.MessageNacked(f"the broker refused {nacked} message(s)")


class Publisher:
    """The one way to publish, from any thread: one Publisher per process part is shared by every thread that
    publishes (handlers in worker threads, the stager's concurrent consumers, the node worker's boot threads,
    the heartbeat), and needs no lock and no second Publisher. py-amqp connections are not thread-safe, so
    each thread gets a connection of its own, opened at its first publish; `close()` closes the calling
    thread's (after an error, or when a thread is done publishing), `close_all()` every thread's."""

    def __init__(self, url: str, timeout: float = 5.0):
        self.url, self.timeout = url, timeout
        # Every message carries its sender's broker user as user_id: the broker refuses one that is not the
        # connection's own, so consumers can trust it (shared/topology.py may_publish).
        self.user = broker_user_of(url)
        self._local = threading.local()
        self._open: set[Connection] = set()  # every thread's, for close_all()
        self._open_lock = threading.Lock()

    def _thread(self):
        local = self._local
        if not hasattr(local, "declared"):
            local.conn = local.producer = local.confirms = None
            local.declared = set()
        return local

    def _ensure(self):
        local = self._thread()
        if local.producer is None:
            local.conn = connect(self.url, heartbeat=0, timeout=self.timeout, confirm_publish=False,
                                 io_timeout=CONFIRM_STALL)
            with self._open_lock:
                self._open.add(local.conn)
            channel = local.conn.channel()
            declare_topology(channel)
            local.confirms = Confirms(channel)
            local.producer = kombu.Producer(channel)
        return local

    def ensure_queues(self, queues: Iterable[Queue]) -> None:
        """Someone else's queues that this thread's messages must reach (the heartbeat's `vtorque.nodes`),
        declared where missing (ensure_queues), on this thread's connection (no connection of its own), once
        per connection, as a command's queue is."""
        try:
            local = self._ensure()
            missing = [q for q in queues if q.name not in local.declared]
            if missing:
                ensure_queues(local.producer.channel, missing)
                local.declared.update(q.name for q in missing)
        except BaseException:
            self.close(lost=True)
            raise

    def publish(self, message: m.Message) -> None:
        self.publish_many([message])

    def publish_many(self, messages: Iterable[m.Message], patience: float = PUBLISH_PATIENCE) -> None:
        """Every message, in order, then one wait for all their confirms. Returns once the broker has all of
        them. A connection lost on the way, or a nack, sends the whole batch again on a new connection (the
        next broker node of the URL list), which may duplicate some (consumers are idempotent), for up to
        `PUBLISH_PATIENCE` seconds: a broker node that stops or is lost takes its quorum queues' leaders with it,
        and they nack until a new leader is elected (a few seconds on the rig), so a handler whose publish was
        nacked once would otherwise crash and its message be dead-lettered (fault test a). `patience`: less for
        a message that a newer one replaces (a heartbeat)."""
        messages = list(messages)
        give_up = time.monotonic() + patience
        delay = 0.1
        while True:
            try:
                self._publish_once(messages)
                return
            except PUBLISH_TRANSIENT as exc:
                self.close(lost=True)
                if time.monotonic() + delay > give_up:
                    raise PublishFailed(f"the broker did not take {len(messages)} message(s) in "
                                        f"{patience:g} s: {type(exc).__name__}: {exc}") from exc
                log(LOG, logging.WARNING, "publish failed, sending again", error=f"{type(exc).__name__}: {exc}",
                    retry_in_s=delay)
                time.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_DELAY)
            except BaseException:
                self.close(lost=True)  # a channel error (say a 404) leaves the channel unusable
                raise

    def _publish_once(self, messages: list[m.Message]) -> None:
        local = self._ensure()
        producer = local.producer
        routes: list[tuple[str, list[str]]] = []
        missing: dict[str, Queue] = {}
        for message in messages:
            if isinstance(message, m.Command):
                specs = topology.command_queues(message)
                for spec in specs:
                    if spec.name not in local.declared:
                        missing.setdefault(spec.name, kombu_queue(spec))
                routes.append((COMMANDS.name, [spec.bindings[0] for spec in specs]))
            else:
                assert isinstance(message, m.Event)  # a Message is a Command or an Event
                routes.append((EVENTS.name, [message.routing_key()]))
        if missing:
            # A command waits in its queue for a consumer that has not started yet: never dropped unrouted.
            ensure_queues(producer.channel, missing.values())
            local.declared.update(missing)
        for message, (exchange, keys) in zip(messages, routes, strict=True):
            body = m.encode(message)
            for routing_key, bcc in sender_selected(keys):
                with tracing.publish_span(message, exchange, routing_key) as headers:
                    producer.publish(
                        body, exchange=exchange, routing_key=routing_key,
                        headers={**headers, BCC: bcc} if bcc else headers,
                        delivery_mode=2, content_type="application/json", content_encoding="utf-8",
                        message_id=message.message_id, type=type(message).__name__, retry=False,
                        user_id=self.user,
                    )
                local.confirms.sent += 1
        local.confirms.wait(local.conn)

    def publish_raw(self, body: bytes, exchange: str, headers: dict, content_type: str) -> None:
        """Republish a body as it came (dead-lettering keeps what could not be decoded, byte for byte)."""
        local = self._ensure()
        try:
            local.producer.publish(body, exchange=exchange, routing_key="", headers=headers, delivery_mode=2,
                                   content_type=content_type, retry=False, user_id=self.user)
            local.confirms.sent += 1
            local.confirms.wait(local.conn)
        except BaseException:
            self.close(lost=True)
            raise

    def close(self, lost: bool = False) -> None:
        """Close this thread's connection; the next publish from this thread opens a new one. `lost`: after an
        error, the socket is dropped without AMQP's close handshake, whose wait for the broker's close-ok has no
        end on a connection that went silent (tests/integration/test_publisher_stall.py)."""
        local = self._thread()
        if local.conn is not None:
            with self._open_lock:
                self._open.discard(local.conn)
            _release(local.conn, lost)
        local.conn = local.producer = local.confirms = None
        local.declared.clear()

    def close_all(self) -> None:
        """Close every thread's connection, once no thread publishes any more (the end of the process part:
        threads that are gone cannot close their own)."""
        with self._open_lock:
            conns, self._open = list(self._open), set()
        for conn in conns:
            _release(conn)
        self.close()


def _release(conn: Connection, lost: bool = False) -> None:
    try:
        if lost:
            conn.collect()  # the socket closed, nothing sent or awaited
        else:
            conn.release()
    except Exception:  # noqa: BLE001 - closing a broken connection must not mask the real error
        pass


# The one wait for events is shared/hook_channel.py's (on pika, so the hooks need not import kombu); services
# and the cli take it from here as well.
EventWaiter = hook_channel.EventWaiter


# -- consuming --------------------------------------------------------------------------------------------

Handler = Callable[[m.Message], None]


@dataclass
class _Pending:
    raw: kombu.Message
    future: concurrent.futures.Future
    started: float = field(default_factory=time.monotonic)


class ServiceRunner:
    """Consumes a service's queues and runs its typed handlers one message at a time."""

    def __init__(self, url: str, queues: list[Queue], handlers: Mapping[type, Handler], *,
                 heartbeat: int = 30, prefetch: int = 1,
                 on_idle: Callable[[], None] | None = None, user_prefix: str = topology.USER_PREFIX,
                 clock: Clock = SYSTEM_CLOCK, publisher: Publisher | None = None):
        self.url, self.queues, self.handlers = url, queues, dict(handlers)
        self.clock = clock  # the service's (shared/clock.py): whether a command is past its deadline
        # The service's own (run_service passes it): a Publisher keeps a connection per thread, so the
        # consuming thread's CommandExpired and dead letters go on a connection of their own through it.
        self.publisher = publisher or Publisher(url)
        self.heartbeat, self.prefetch = heartbeat, prefetch
        self.on_idle = on_idle
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="handler")
        self._pending: _Pending | None = None
        self._backlog: collections.deque[kombu.Message] = collections.deque()
        self._queue_by_tag: dict[str, str] = {}
        self._consuming = False
        # A service that runs as one of vtorque's broker users (a deployment with one user per service) checks
        # every sender against the topology table; under any other user (a test's own vhost and user) it cannot
        # tell senders apart, and says so once at start.
        self.user_prefix = user_prefix
        self.check_senders = topology.role_of(self.publisher.user, user_prefix)[0] is not None
        if not self.check_senders:
            log(LOG, logging.WARNING, "broker user is not one of vtorque's: senders are not checked",
                user=self.publisher.user)

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> None:
        delay = 0.1
        while not self.stop_event.is_set():
            self._consuming = False
            try:
                self._run_connection()
            except BROKER_ERRORS as exc:
                if self.stop_event.is_set():
                    break
                if self._consuming:  # it was working: the first retry comes at once
                    delay = 0.1
                log(LOG, logging.WARNING, "broker connection lost, reconnecting", error=f"{type(exc).__name__}: {exc}",
                    retry_in_s=delay)
                self._wait_pending()
                self.publisher.close()  # its connection is as dead as ours
                self.stop_event.wait(delay)
                delay = min(delay * 2, RECONNECT_MAX_DELAY)
        self._pool.shutdown(wait=True)
        self.publisher.close()

    def _wait_pending(self) -> None:
        # The delivery's channel is gone, so it will be redelivered; let the handler finish so its effect is
        # visible to the redelivery (handlers are idempotent). The backlog is redelivered too, unhandled.
        if self._pending is not None:
            concurrent.futures.wait([self._pending.future])
            self._pending = None
        self._backlog.clear()

    def _run_connection(self) -> None:
        with Connection(broker_tls.split(self.url)[0], heartbeat=self.heartbeat, connect_timeout=5,
                        ssl=broker_tls.kombu_ssl(self.url)) as conn:
            conn.ensure_connection(max_retries=1)
            channel = conn.channel()
            declare_topology(channel, self.queues)
            consumer = kombu.Consumer(channel, queues=self.queues, on_message=self._on_message, no_ack=False,
                                      prefetch_count=self.prefetch)
            with consumer:
                # Which queue a delivery came from, for its span and lag metric: kombu tags one consumer per queue.
                self._queue_by_tag = {tag: name for name, tag in consumer._active_tags.items()}
                self.ready.set()
                self._consuming = True
                # what services.sh and operators wait for: said once connected, not when the process starts
                log(LOG, logging.INFO, "consuming", queues=",".join(q.name for q in self.queues))
                while not self.stop_event.is_set():
                    # While a handler runs, wait for it rather than for the socket, so its delivery is acked
                    # (and the next one let in) the moment it returns, not up to half a second later; the
                    # socket is still read every half second for heartbeats.
                    pending = self._pending
                    if pending is not None:
                        concurrent.futures.wait([pending.future], timeout=0.5)
                        # Acked before the socket is read: with prefetch 1 the next delivery comes only after
                        # the ack, so reading first cost every message a 1 ms read timeout (the bridge took
                        # 380 heartbeats/s; docs/benchmarks.md).
                        self._settle()
                    try:
                        conn.drain_events(timeout=0.001 if pending is not None else 0.5)
                    except TimeoutError:
                        pass
                    conn.heartbeat_check()
                    self._settle()
                    if self._pending is None and self.on_idle is not None:
                        self.on_idle()
                self._wait_pending()

    def _on_message(self, raw: kombu.Message) -> None:
        # Prefetch is per consumer: with several queues, a second delivery can arrive while one is handled.
        # Handlers run one at a time, in arrival order.
        if self._pending is not None:
            self._backlog.append(raw)
            return
        self._start(raw)

    def _start(self, raw: kombu.Message) -> None:
        queue = self._queue_by_tag.get(raw.delivery_info.get("consumer_tag", ""), "")
        routing_key = raw.delivery_info.get("routing_key", "")
        try:
            message = m.decode(raw.body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._dead_letter(raw, f"undecodable: {exc}")
            return
        handler = self.handlers.get(type(message))
        if handler is None:
            self._dead_letter(raw, f"no handler for {type(message).__name__} here")
            return
        if self.check_senders:
            refused = topology.may_publish((raw.properties or {}).get("user_id"), message, self.user_prefix)
            if refused:
                self._dead_letter(raw, f"refused sender: {refused}")
                return
        if isinstance(message, m.Command) and message.expired(self.clock.utcnow()):
            with job_context(message.job_id):
                log(LOG, logging.WARNING, "command past its deadline, dropped", command=type(message).__name__)
                self.publisher.publish(m.CommandExpired.new(
                    job_id=message.job_id, deadline=60.0, command=type(message).__name__,
                    command_id=message.message_id))
            raw.ack()
            return
        future = self._pool.submit(self._handle, handler, message, raw.delivery_info, dict(raw.headers or {}),
                                   routing_key, queue or ",".join(q.name for q in self.queues))
        self._pending = _Pending(raw, future)

    def _handle(self, handler: Handler, message: m.Message, info: dict, headers: dict, routing_key: str,
                queue: str) -> None:
        with job_context(message.job_id), tracing.process_span(
                message, queue, routing_key, headers, exchange=info.get("exchange", "")) as span:
            try:
                handler(message)
            except Exception as exc:
                tracing.mark_error(span, exc)
                raise

    def _settle(self) -> None:
        pending = self._pending
        if pending is None or not pending.future.done():
            return
        self._pending = None
        exc = pending.future.exception()
        if exc is None:
            pending.raw.ack()
        elif isinstance(exc, PublishFailed):
            log(LOG, logging.WARNING, "handler's messages not taken by the broker; its message goes back to the "
                "queue", error=str(exc)[:500])
            try:
                pending.raw.requeue()
            except BROKER_ERRORS:
                pass  # the connection is gone: the broker redelivers what was not acked
        else:
            LOG.error("handler crashed", exc_info=exc)
            self._dead_letter(pending.raw, f"handler crashed: {type(exc).__name__}: {exc}")
        while self._pending is None and self._backlog:
            self._start(self._backlog.popleft())

    def _dead_letter(self, raw: kombu.Message, reason: str) -> None:
        log(LOG, logging.ERROR, "dead-lettering a message", reason=reason[:500])
        headers = dict(raw.headers or {})
        headers.update({"x-vtorque-reason": reason[:1000],
                        "x-vtorque-sender": str((raw.properties or {}).get("user_id") or ""),
                        "x-vtorque-routing-key": raw.delivery_info.get("routing_key", ""),
                        "x-vtorque-exchange": raw.delivery_info.get("exchange", "")})
        self.publisher.publish_raw(raw.body, DEAD.name, headers, raw.content_type or "application/json")
        raw.ack()
