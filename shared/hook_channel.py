"""The hooks' side of the bus, on pika: an exclusive queue bound to the job's events, declared before the
hook publishes, so no answer can be missed; then a bounded wait. (Not direct reply-to: that is at-most-once.)
"""

from __future__ import annotations

import time
import urllib.parse
import uuid
from typing import Iterable, Iterator

import msgspec
import pika
import pika.exceptions

from vtorque.shared import messages as m
from vtorque.shared import tracing
from vtorque.shared.bus import EVENTS


class BrokerUnreachable(Exception):
    pass


class HookChannel:
    def __init__(self, url: str, patterns: Iterable[str], attempts: int = 3, timeout: float = 5.0):
        params = pika.URLParameters(url)
        # kombu reads "amqp://host//" as vhost "/", pika as vhost "": one config URL must mean one vhost.
        path = urllib.parse.urlsplit(url).path
        params.virtual_host = "/" if path in ("", "/", "//") else urllib.parse.unquote(path[1:])
        params.connection_attempts = max(1, attempts)
        params.retry_delay = 1.0
        params.socket_timeout = timeout
        params.blocked_connection_timeout = 30
        params.heartbeat = 30
        params.client_properties = {"connection_name": f"vtorque-hook-{uuid.uuid4().hex[:8]}"}
        try:
            self.conn = pika.BlockingConnection(params)
        except pika.exceptions.AMQPError as exc:
            raise BrokerUnreachable(f"broker unreachable after {attempts} attempts: {exc!r}") from None
        self.channel = self.conn.channel()
        self.channel.exchange_declare(EVENTS.name, exchange_type="topic", durable=True)
        self.queue = self.channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        for pattern in patterns:
            self.channel.queue_bind(self.queue, EVENTS.name, routing_key=pattern)
        self.channel.confirm_delivery()

    def publish(self, event: m.Event) -> None:
        routing_key = event.routing_key()
        with tracing.publish_span(event, EVENTS.name, routing_key) as headers:
            self.channel.basic_publish(
                EVENTS.name, routing_key, m.encode(event),
                pika.BasicProperties(delivery_mode=2, content_type="application/json", message_id=event.message_id,
                                     type=type(event).__name__, headers=headers),
            )

    def events(self, deadline: float) -> Iterator[tuple[m.Message, dict]]:
        """(event, headers) until the monotonic deadline; undecodable events are skipped."""
        while (remaining := deadline - time.monotonic()) > 0:
            for method, props, body in self.channel.consume(self.queue, auto_ack=True,
                                                            inactivity_timeout=min(remaining, 1.0)):
                if method is None:
                    break
                try:
                    yield m.decode(body), dict(props.headers or {})
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue
                if time.monotonic() >= deadline:
                    break

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001 - the hook's answer matters, not a clean close
            pass
