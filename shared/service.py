"""The one shape of a vtorque service, and how `vtorque run NAME` runs any of them.

A service is a small class (nameko's model): built from its config and a publisher (its other dependencies
— hypervisor, store, scheduler, clock — are keyword arguments with real defaults, so a test passes its own), it
names the queues it consumes (each from the topology table, shared/topology.py), maps each message type it
handles to a typed handler, and owns its background tasks (`start`, stopped by the event it is given). Nothing
here knows which services exist: cli/main.py names them.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Mapping
from typing import ClassVar

from kombu import Queue

from vtorque.shared import messages as m
from vtorque.shared.bus import Publisher, ServiceRunner
from vtorque.shared.clock import SYSTEM_CLOCK, Clock
from vtorque.shared.config import Config

Handler = Callable[[m.Message], None]
LOG = logging.getLogger("vtorque")


class Service:
    name: ClassVar[str]
    # What it decides time by (shared/clock.py): a command's deadline, a heartbeat's age, a grace. A service
    # takes `clock=` as it takes its other dependencies; a test passes shared.testing.FakeClock.
    clock: Clock = SYSTEM_CLOCK

    def __init__(self, config: Config, publisher: Publisher):
        self.config, self.publisher = config, publisher

    def queues(self) -> list[Queue]:
        raise NotImplementedError

    def handlers(self) -> Mapping[type, Handler]:
        raise NotImplementedError

    def extra_consumers(self) -> list[tuple[list[Queue], Mapping[type, Handler]]]:
        """More consumers in the same process, each one at a time on its own connection (the stager's
        concurrent stagings); none by default."""
        return []

    def start(self, stop: threading.Event) -> None:
        """Start the background tasks this service owns; they end when `stop` is set. Raises ValueError for a
        configuration they cannot run with (said before any message is taken)."""


def run_service(service: Service, config: Config) -> None:
    """Consume the service's queues until SIGTERM/SIGINT; its extra consumers and background tasks with it."""
    url = config.broker.connection_url()
    runners = [ServiceRunner(url, queues, handlers, heartbeat=config.broker.heartbeat,
                             user_prefix=config.broker.user_prefix, clock=service.clock, publisher=service.publisher)
               for queues, handlers in [(service.queues(), service.handlers()), *service.extra_consumers()]]
    main, extra = runners[0], runners[1:]
    def stop_all(*_) -> None:
        for r in runners:
            r.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop_all)
    threads = [threading.Thread(target=r.run, name=f"consumer-{i}", daemon=True) for i, r in enumerate(extra)]
    service.start(main.stop_event)
    for thread in threads:
        thread.start()
    LOG.info("%s starting; its queues: %s", service.name, ", ".join(q.name for q in service.queues()))
    try:
        main.run()
    finally:
        for r in extra:
            r.stop()
        for thread in threads:
            thread.join(60)
