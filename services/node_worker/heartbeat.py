"""The node worker's heartbeat: every node.heartbeat_interval seconds a NodeHeartbeat event says the node is
alive and what it has (cores, free memory, guests running, KVM or TCG, capabilities). `vtorque nodes` shows
them.

It runs in a thread of its own rather than in the consumer's idle hook: the consumer is not idle while a guest
boots, and a node busy booting is exactly the one an operator asks about. It publishes through the worker's own
Publisher (shared/bus.py: each thread that publishes gets its connection there), not a publisher of its own.

Heartbeats also go to the durable queue `vtorque.nodes`, where each one expires after NODES_TTL seconds: a
reader (`vtorque nodes`) gets every live node's latest heartbeat at once, without waiting for the next round,
and takes them without acknowledging, so they stay there for the next reader.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING

from vtorque.shared import messages as m
from vtorque.shared import metrics
from vtorque.shared.logs import log
from vtorque.shared.node_registry import TTL_INTERVALS, nodes_queue

from . import iocm, vrdma

if TYPE_CHECKING:  # the worker these parts serve (services/node_worker/service.py); not imported at run time
    from .service import NodeWorker

LOG = logging.getLogger("vtorque.node_worker.heartbeat")

# -- pure ------------------------------------------------------------------------------------------------

def mem_available_mib(meminfo: str) -> int:
    """MemAvailable from /proc/meminfo's text (kB), in MiB; 0 if absent."""
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


def capabilities(domain_type: str, kernel_boot_images: int, hugepages: bool) -> list[str]:
    caps = ["kvm" if domain_type == "kvm" else "tcg"]
    if kernel_boot_images:
        caps.append("direct-kernel-boot")
    if hugepages:
        caps.append("hugepages")
    return caps


# -- I/O -------------------------------------------------------------------------------------------------

def node_facts(worker: NodeWorker) -> m.NodeHeartbeat:
    config = worker.config
    try:
        meminfo = open("/proc/meminfo", encoding="ascii").read()
    except OSError:
        meminfo = ""
    # This node's guests (another node worker's on a shared test host are not ours to count), and which of them
    # run, from two listings: asking each domain in turn made every beat O(guests) round trips to libvirt.
    down, jobs = "", []
    try:
        mine = {name: meta.get("job", "") for name, meta in worker.hv.vtorque_domains().items()
                if meta.get("node", worker.node) == worker.node}
        running = len(mine.keys() & worker.hv.active_names())
        jobs = sorted({job for job in mine.values() if job})
    except Exception as exc:  # noqa: BLE001 - libvirtd down or restarting: the beat says so, it is not skipped
        # A node that stops beating is taken for a node without a worker and its jobs are refused and requeued;
        # libvirt away for a restart is not that (issue 12 item 8). Boots wait for it (NodeWorker._boot_traced).
        running, down = 0, (str(exc) or type(exc).__name__)[:300]
    hugepages = os.path.exists("/sys/kernel/mm/hugepages") and any(
        _read_int(f"/sys/kernel/mm/hugepages/{d}/free_hugepages") for d in _listdir("/sys/kernel/mm/hugepages"))
    interval = config.node.heartbeat_interval
    return m.NodeHeartbeat.new(
        job_id="", deadline=TTL_INTERVALS * interval, node=worker.node, cores=os.cpu_count() or 1,
        mem_free_mib=mem_available_mib(meminfo), guests_running=running, domain_type=worker.domain_type,
        capabilities=capabilities(worker.domain_type, sum(1 for e in config.images.catalog.values() if e.kernel),
                                  hugepages) + iocm.capabilities() + vrdma.capabilities(vrdma.probe()),
        interval=interval, tunnel_address=config.node.job_network_localaddr, hypervisor_down=down, jobs=jobs)


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _read_int(path: str) -> int:
    try:
        return int(open(path).read().strip() or 0)
    except (OSError, ValueError):
        return 0


class Heartbeat:
    """A daemon thread publishing the node's heartbeat until `stop` is set. `workers` may be several node
    identities of one process (bench/many_nodes.py): one thread and one connection beat for all of them, their
    beats published as one batch (a broker here takes about 830 connections, not one per simulated node)."""

    def __init__(self, workers: NodeWorker | list[NodeWorker] | tuple[NodeWorker, ...], stop: threading.Event):
        self.workers = list(workers) if isinstance(workers, (list, tuple)) else [workers]
        self.worker, self.stop = self.workers[0], stop
        self.interval = max(0.5, float(self.worker.config.node.heartbeat_interval))
        self.publisher = self.worker.publisher
        self.thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        # The first beat goes out before the worker consumes: a node that takes commands is a node the bridge
        # already knows (it plans only onto nodes with a fresh heartbeat).
        self._beat()
        self.publisher.close()  # the caller's thread publishes no more beats: its connection is not kept open
        self.thread.start()
        return self

    def _beat(self) -> bool:
        """One beat; False when it did not go out. A beat is sent again for at most one interval: after that
        the next, fresh one replaces it (the bridge judges a node by its newest beat's time, and a beat resent
        for 30 s would arrive as old as that)."""
        try:
            # The durable queue that keeps every node's latest beat for readers, declared where missing.
            self.publisher.ensure_queues([nodes_queue()])
            beats = [node_facts(worker) for worker in self.workers]
            for beat in beats:
                metrics.set_guests_running(beat.node, beat.guests_running)
            self.publisher.publish_many(beats, patience=self.interval)
            return True
        except Exception as exc:  # noqa: BLE001 - a missed beat must not end the beating
            log(LOG, logging.WARNING, "heartbeat not sent", error=str(exc))
            self.publisher.close(lost=True)
            return False

    def _run(self) -> None:
        sent = True
        # After a beat that did not go out, the next one is made and sent at once (it has waited a whole
        # interval already, in the tries): the node is heard again as soon as the broker takes messages.
        while not self.stop.wait(self.interval if sent else 0.1):
            sent = self._beat()
        self.publisher.close()  # this thread's connection
