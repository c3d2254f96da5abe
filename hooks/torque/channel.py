"""The Torque prologue's channel: shared/hook_channel.py's HookChannel plus two Torque needs: fail early when a
node of the job has no node worker (instead of waiting out the whole deadline), and stop waiting when the job is
cancelled (the cancel watcher's JobEnded) while its guests boot."""

from __future__ import annotations

import functools

import pika
import pika.exceptions

from vtorque.hooks.job_hook import CANCELLED_HEADER
from vtorque.shared import messages as m
from vtorque.shared.hook_channel import (
    BrokerUnreachable,
    HookChannel,
    describe,
    missing_node_workers,
    no_node_worker_reason,
)


class NodeWorkersMissing(BrokerUnreachable):
    pass


class TorqueChannel(HookChannel):
    def __init__(self, url, patterns, attempts=3, timeout=5.0, *, hosts: list[str], require_node_workers: bool,
                 node_worker_grace: float):
        super().__init__(url, patterns, attempts=attempts, timeout=timeout)
        if require_node_workers:
            try:
                missing = missing_node_workers(self.conn, hosts, node_worker_grace)
            except (pika.exceptions.AMQPError, OSError) as exc:
                self.close()
                raise BrokerUnreachable(f"broker unusable: {describe(exc)}") from None
            if missing:
                self.close()
                raise NodeWorkersMissing(no_node_worker_reason(missing))

    def events(self, deadline):
        for event, headers in super().events(deadline):
            if isinstance(event, m.JobEnded):
                yield m.JobRejected.new(job_id=event.job_id, deadline=event.deadline,
                                        reason="the job was cancelled (qdel) while its guests were booting"), {
                    CANCELLED_HEADER: True}
                return
            yield event, headers


def torque_channel_factory(config, hosts: list[str]):
    """What run_prologue opens its channel with: a TorqueChannel for this job's hosts and the site's
    `[torque]` node worker check (run_prologue passes the url, patterns, attempts and timeout)."""
    return functools.partial(TorqueChannel, hosts=hosts, require_node_workers=config.torque.require_node_workers,
                             node_worker_grace=config.torque.node_worker_grace)
