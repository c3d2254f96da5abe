"""The one way to wait for events, on pika: an exclusive queue bound to some event patterns, declared before
the awaited thing is triggered, so no answer can be missed; then a bounded wait. (Not direct reply-to: that is
at-most-once.) The hooks wait for their job's events through it (`HookChannel`, which also publishes), the node
worker and `vtorque images pull` for an image's staging (`EventWaiter`, also importable from shared/bus.py).
pika, not kombu: the hooks start in a few tens of milliseconds, and this module imports nothing heavier than
pika and the messages (never shared/bus.py).

The queue is named in vtorque's namespace, `<prefix><label>.<random>` (prefix from shared/topology.py: the
hook's `vtorque.hook.`, the node worker's `vtorque.wait.`, the operator's `vtorque.pull.`; label: the job's
routing word, or the first pattern's), not left to the broker (`amq.gen-…`): a broker user limited to its own
names (docs/admin-guide.md §2) may declare it.

Every AMQP failure here, whatever pika calls it (no connection, access refused, a channel the broker closed, a
publish it did not confirm), is raised as BrokerUnreachable: the hooks treat all of them like a broker they
cannot reach (a bounded requeue with a reason for the owner), never as a crash. It is a ConnectionError, so a
service that takes OSError as "the infrastructure failed, retry" (the node worker's boot) takes it so too.
"""

from __future__ import annotations

import logging
import re
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Iterator

import msgspec
import pika
import pika.exceptions

from vtorque.shared import broker_tls, topology, tracing
from vtorque.shared import messages as m

QUEUE_PREFIX = topology.prefix(topology.HOOK_Q)  # shared/topology.py names every queue
EVENTS = topology.EVENTS
LOG = logging.getLogger("vtorque.events")


class BrokerUnreachable(ConnectionError):
    pass


def describe(exc: BaseException) -> str:
    """A one-line account of a pika failure that an owner's reason file can carry."""
    if isinstance(exc, pika.exceptions.ChannelClosedByBroker):
        return f"the broker refused: {exc.reply_code} {exc.reply_text}"
    if isinstance(exc, pika.exceptions.ConnectionClosedByBroker):
        return f"the broker closed the connection: {exc.reply_code} {exc.reply_text}"
    if isinstance(exc, pika.exceptions.ProbableAccessDeniedError):
        return f"the broker refused the login: {exc}"
    return repr(exc)


def queue_name(patterns: list[str], label: str | None = None, prefix: str = QUEUE_PREFIX) -> str:
    """`<prefix><label>.<random>`; the label defaults to the job word of a `job.<word>.…` pattern, else to the
    first pattern's second word (`image.<digest>.#`: the digest)."""
    if label is None:
        label = next((p.split(".")[1] for p in patterns if p.startswith("job.") and p.count(".") >= 2),
                     next((p.split(".")[1] for p in patterns if p.count(".") >= 2), "hook"))
    label = re.sub(r"[^A-Za-z0-9_%-]", "_", label)[:100] or "hook"
    return f"{prefix}{label}.{uuid.uuid4().hex[:12]}"


class EventChannel:
    """A private queue bound to `patterns` on the events exchange, then `events()`/`next()` until a deadline;
    `publish` sends an event on the same connection (confirmed). Every failure is BrokerUnreachable."""

    def __init__(self, url: str, patterns: Iterable[str], attempts: int = 3, timeout: float = 5.0,
                 label: str | None = None, prefix: str = QUEUE_PREFIX):
        patterns = list(patterns)
        # One URL per broker node of a cluster, joined by ';' ([broker] hosts): pika tries them in turn.
        params_list = [self._parameters(one, attempts, timeout) for one in url.split(";")]
        params = params_list[0]
        self.user = params.credentials.username  # sent as user_id: the broker refuses any other
        self.conn = None
        try:
            self.conn = pika.BlockingConnection(params_list)
        except (pika.exceptions.AMQPError, OSError) as exc:
            raise BrokerUnreachable(f"broker unreachable after {attempts} attempts: {describe(exc)}") from None
        try:
            self.channel = self.conn.channel()
            try:
                # Passive first: a broker user whose permissions come from the topology table may not configure
                # the exchange (the administrator's set-up declares it), and checking needs no permission.
                self.channel.exchange_declare(EVENTS, passive=True)
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != 404:
                    raise
                self.channel = self.conn.channel()  # not there yet (a fresh broker): declare it, if allowed
                self.channel.exchange_declare(EVENTS, exchange_type=topology.EXCHANGES[EVENTS], durable=True)
            self.queue = queue_name(patterns, label, prefix)
            self.channel.queue_declare(self.queue, exclusive=True, auto_delete=True)
            for pattern in patterns:
                self.channel.queue_bind(self.queue, EVENTS, routing_key=pattern)
            self.channel.confirm_delivery()
        except (pika.exceptions.AMQPError, OSError) as exc:
            self.close()
            raise BrokerUnreachable(f"broker unusable: {describe(exc)}") from None

    @staticmethod
    def _parameters(url: str, attempts: int, timeout: float) -> pika.URLParameters:
        try:
            params = pika.URLParameters(broker_tls.split(url)[0])
        except ValueError as exc:
            raise BrokerUnreachable(f"broker URL unusable: {exc}") from None
        tls = broker_tls.context(url)
        if tls is not None:  # amqps: the broker's certificate checked against the site's CA and the URL's host
            params.ssl_options = pika.SSLOptions(tls, server_hostname=urllib.parse.urlsplit(url).hostname)
        # kombu reads "amqp://host//" as vhost "/", pika as vhost "": one config URL must mean one vhost.
        path = urllib.parse.urlsplit(url).path
        params.virtual_host = "/" if path in ("", "/", "//") else urllib.parse.unquote(path[1:])
        params.connection_attempts = max(1, attempts)
        params.retry_delay = 1.0
        params.socket_timeout = timeout
        params.blocked_connection_timeout = 30
        params.heartbeat = 30
        params.client_properties = {"connection_name": f"vtorque-hook-{uuid.uuid4().hex[:8]}"}
        return params

    def publish(self, event: m.Event) -> None:
        routing_key = event.routing_key()
        with tracing.publish_span(event, EVENTS, routing_key) as headers:
            try:
                self.channel.basic_publish(
                    EVENTS, routing_key, m.encode(event),
                    pika.BasicProperties(delivery_mode=2, content_type="application/json",
                                         message_id=event.message_id, type=type(event).__name__, headers=headers,
                                         user_id=self.user),  # the bridge checks who sent it
                )
            except (pika.exceptions.AMQPError, OSError) as exc:
                raise BrokerUnreachable(f"publish of {type(event).__name__} failed: {describe(exc)}") from None

    def events(self, deadline: float) -> Iterator[tuple[m.Message, dict]]:
        """(event, headers) until the monotonic deadline; undecodable events are skipped."""
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                for method, props, body in self.channel.consume(self.queue, auto_ack=True,
                                                                inactivity_timeout=min(remaining, 1.0)):
                    if method is None:
                        break
                    try:
                        event = m.decode(body)
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        LOG.warning("ignored an undecodable event while waiting on %s", self.queue)
                        continue
                    yield event, dict(props.headers or {})
                    if time.monotonic() >= deadline:
                        break
        except (pika.exceptions.AMQPError, OSError) as exc:
            raise BrokerUnreachable(f"lost the broker while waiting: {describe(exc)}") from None

    def next(self, deadline: float) -> m.Message | None:
        """The next event, or None when the monotonic `deadline` passes (the consumer stays: a later call
        gets what arrived in between)."""
        for event, _headers in self.events(deadline):
            return event
        return None

    def close(self) -> None:
        try:
            if self.conn is not None:
                self.conn.close()
        except Exception:  # noqa: BLE001 - the hook's answer matters, not a clean close
            pass


HookChannel = EventChannel  # the hooks' name for it (hooks/job_hook.py's default channel)


class NodeWorkersMissing(BrokerUnreachable):
    """A node of the job has no node worker consuming its queue: its guests cannot boot there."""


class NodeWorkerChannel(EventChannel):
    """Both prologues' channel (Torque's and Slurm's): before anything is published, it fails at once (a
    BrokerUnreachable: an infrastructure failure, a bounded requeue) when a node of `hosts` has no node worker
    consuming its queue after up to `grace` s, instead of the job waiting out its whole deadline. No hosts: no
    check (Torque's `[torque] require_node_workers = false`). hooks/torque/channel.py adds Torque's cancel."""

    def __init__(self, url: str, patterns: Iterable[str], attempts: int = 3, timeout: float = 5.0, *,
                 hosts: list[str], grace: float):
        super().__init__(url, patterns, attempts=attempts, timeout=timeout)
        if not hosts:
            return
        try:
            missing = missing_node_workers(self.conn, hosts, grace)
        except (pika.exceptions.AMQPError, OSError) as exc:
            self.close()
            raise BrokerUnreachable(f"cannot ask the broker for the node workers: {describe(exc)}") from None
        if missing:
            self.close()
            raise NodeWorkersMissing(no_node_worker_reason(missing))


def EventWaiter(url: str, patterns: Iterable[str], timeout: float = 5.0,
                prefix: str = topology.prefix(topology.WAIT_Q)) -> EventChannel:
    """A service's or an operator's wait for events (the node worker for an image's staging): the same
    channel under the waiter's queue prefix (`vtorque.wait.`, or `vtorque.pull.` for `vtorque images pull`)."""
    return EventChannel(url, patterns, attempts=3, timeout=timeout, prefix=prefix)


def _node_queue_name(host: str) -> str:
    return topology.queue(topology.NODE_Q, node=host).name


def missing_node_workers(conn, wanted: list[str], grace: float) -> list[str]:
    """The hosts whose node queue has no consumer after up to `grace` s: both hooks ask it before they publish,
    so a node without a node worker fails the job at once instead of at the deadline. Passive declares (no
    right needed) on a pika BlockingConnection; a 404 closes the channel, so a new one is opened for the next
    host; any other refusal (403: the hook's user may not look) is raised: a broker problem, not the node's."""
    end = time.monotonic() + grace
    missing = list(dict.fromkeys(wanted))
    check = None
    while True:
        still = []
        for host in missing:
            if check is None or check.is_closed:
                check = conn.channel()
            try:
                if check.queue_declare(_node_queue_name(host), passive=True).method.consumer_count == 0:
                    still.append(host)
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != 404:
                    raise
                still.append(host)  # 404: no node worker ever declared it
        missing = still
        if not missing or time.monotonic() >= end:
            if check is not None and check.is_open:
                check.close()
            return missing
        conn.sleep(0.5)


def no_node_worker_reason(missing: list[str]) -> str:
    return (f"no node worker is running on {', '.join(missing)} (nothing consumes "
            f"{', '.join(_node_queue_name(h) for h in missing)}); the job's guests cannot boot there")
