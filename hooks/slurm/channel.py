"""The Slurm prologue's channel: shared/hook_channel.py's HookChannel that fails at once when a node of the job
has no node worker consuming its queue (see slurm_channel_factory in this package)."""

from __future__ import annotations

import pika.exceptions

from vtorque.shared.hook_channel import BrokerUnreachable, HookChannel, missing_node_workers, no_node_worker_reason


class SlurmChannel(HookChannel):
    def __init__(self, url, patterns, attempts=3, timeout=5.0, *, hosts: list[str], grace: float):
        super().__init__(url, patterns, attempts=attempts, timeout=timeout)
        try:
            missing = missing_node_workers(self.conn, hosts, grace)
        except pika.exceptions.AMQPError as exc:
            self.close()
            raise BrokerUnreachable(f"cannot ask the broker for the node workers: {exc!r}") from None
        if missing:
            self.close()
            raise BrokerUnreachable(no_node_worker_reason(missing))
