"""The Torque prologue's channel: shared/hook_channel.py's NodeWorkerChannel (fail early when a node of the job
has no node worker, the check both prologues make) plus Torque's own need: stop waiting when the job is cancelled
(the cancel watcher's JobEnded) while its guests boot."""

from __future__ import annotations

import functools

from vtorque.hooks.job_hook import CANCELLED_HEADER
from vtorque.shared import messages as m
from vtorque.shared.hook_channel import NodeWorkerChannel


class TorqueChannel(NodeWorkerChannel):
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
    node worker check (`[torque] require_node_workers`; the grace `[hooks] node_worker_grace`, or `[torque]`'s
    where set); run_prologue passes the url, patterns, attempts and timeout."""
    return functools.partial(TorqueChannel, hosts=hosts if config.torque.require_node_workers else [],
                             grace=config.torque.grace(config.hooks))
