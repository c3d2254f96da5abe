"""The scheduler bridge: job events from the hooks become plans and per-node commands.

Stateless: everything it needs is in the event, so any replica can take any message, and a redelivered
event only republishes the same plan (node workers and the stager are idempotent).
"""

from __future__ import annotations

import logging
import uuid

from vtorque.shared import messages as m
from vtorque.shared import topology
from vtorque.shared.bus import Publisher, service_queues, table_queue
from vtorque.shared.clock import SYSTEM_CLOCK, Clock
from vtorque.shared.config import Config, refresh_catalog
from vtorque.shared.logs import log
from vtorque.shared.node_registry import read_heartbeats
from vtorque.shared.scheduler import JobInfo, Scheduler, SchedulerError, scheduler_for
from vtorque.shared.service import Service
from vtorque.shared.spec import SpecError, validate, validate_job

from .capacity import Unfit, check_nodes
from .planning import PlanError, boot_command, plan_guests
from .verification import mismatch, over_allocation

LOG = logging.getLogger("vtorque.bridge")


class SchedulerBridge(Service):
    name = "bridge"

    def __init__(self, config: Config, publisher: Publisher, scheduler: Scheduler | None = None,
                 clock: Clock = SYSTEM_CLOCK):
        self.config, self.publisher = config, publisher
        self.scheduler = scheduler or scheduler_for(config)  # a test passes its own (tests/unit/flow_site.py)
        self.clock = clock  # how old a node's heartbeat is, and when a command is past its deadline
        # The nodes' latest heartbeats: what each node can do. Not job state: every replica keeps its own copy
        # from its own subscription (and the retained ones in vtorque.nodes), so none needs another's.
        self.beats: dict[str, m.NodeHeartbeat] = {}
        self._beats_queue = table_queue(topology.BRIDGE_NODES_Q, tag=uuid.uuid4().hex[:12])

    def queues(self):
        queues = service_queues("bridge")
        if self.config.spec.check_node_capabilities:
            queues.append(self._beats_queue)
        return queues

    def handlers(self):
        return {m.JobStarted: self.on_job_started, m.JobEnded: self.on_job_ended, m.JobQueued: self.on_job_queued,
                m.NodeHeartbeat: self.on_heartbeat}

    def on_heartbeat(self, beat: m.NodeHeartbeat) -> None:
        known = self.beats.get(beat.node)
        if known is None or beat.created_at >= known.created_at:
            self.beats[beat.node] = beat

    def _know_nodes(self, nodes: list[str]) -> None:
        if any(n not in self.beats or not self.beats[n].tunnel_address for n in nodes):
            # A node worker that started moments ago: its first heartbeat is retained in vtorque.nodes.
            try:
                for beat in read_heartbeats(self.config.broker.connection_url(), self.config.broker.connect_timeout):
                    self.on_heartbeat(beat)
            except Exception as exc:  # noqa: BLE001 - then the cache is all there is
                log(LOG, logging.WARNING, "could not read the retained heartbeats", error=str(exc))

    def _unfit(self, spec, job: m.JobStarted) -> Unfit | None:
        if not self.config.spec.check_node_capabilities:
            return None
        self._know_nodes([n.host for n in job.nodes])
        return check_nodes(spec, job.nodes, self.beats, self.config, self.clock.utcnow())

    def _endpoints(self, guests: list[m.GuestPlan]) -> tuple[dict[str, str], Unfit | None]:
        """Each node's job network endpoint, from its heartbeats; a job of one guest needs none."""
        nodes = sorted({g.node for g in guests})
        if len(guests) < 2:
            return {}, None
        self._know_nodes(nodes)
        unknown = [n for n in nodes if n not in self.beats or not self.beats[n].tunnel_address]
        if unknown:
            return {}, Unfit(f"no heartbeat of node {unknown[0]} names its job network address "
                             "(is its node worker running?)", True)
        return {n: self.beats[n].tunnel_address for n in nodes}, None

    def _confirmed(self, job: m.JobStarted) -> tuple[Unfit | None, JobInfo | None]:
        """The scheduler's word on the job event (verification.py); a scheduler that cannot be asked now is
        a failure a requeue can cure."""
        if not self.config.scheduler.verify_jobs:
            return None, None
        try:
            info = self.scheduler.job(job.job_id)
        except SchedulerError as exc:
            return Unfit(f"the scheduler could not confirm job {job.job_id}: {exc}", True), None
        why = mismatch(job, info)
        return (Unfit(why, False) if why else None), info

    def on_job_started(self, job: m.JobStarted) -> None:
        refresh_catalog(self.config)  # an image `vtorque images add`ed since this bridge started
        unconfirmed, info = self._confirmed(job)
        if unconfirmed is not None:
            log(LOG, logging.WARNING, "job event not confirmed by the scheduler", reason=unconfirmed.reason)
            self.publisher.publish(m.JobRejected.new(job_id=job.job_id, deadline=job.deadline,
                                                     reason=unconfirmed.reason, retryable=unconfirmed.retryable))
            return
        try:
            spec, user_metadata = validate_job(job.spec, job.user_metadata, self.config)
            if not job.nodes:
                raise PlanError("the scheduler gave the job no nodes")
            guests = plan_guests(job, spec, self.config, user_metadata)
            too_big = over_allocation(info, guests, self.config.spec)
            if too_big:
                raise PlanError(too_big)
            unfit = self._unfit(spec, job)
            endpoints, no_endpoints = self._endpoints(guests)
            unfit = unfit or no_endpoints
        except (SpecError, PlanError) as exc:
            log(LOG, logging.WARNING, "job rejected", reason=str(exc))
            self.publisher.publish(m.JobRejected.new(job_id=job.job_id, deadline=job.deadline, reason=str(exc)))
            return
        if unfit is not None:
            # Before any guest boots: the plan goes only onto nodes that can run it.
            log(LOG, logging.WARNING, "job rejected", reason=unfit.reason, retryable=unfit.retryable)
            self.publisher.publish(m.JobRejected.new(job_id=job.job_id, deadline=job.deadline, reason=unfit.reason,
                                                     retryable=unfit.retryable))
            return
        # One batch, one wait for the broker's confirms: a confirm per message made the fan-out to 1,024 nodes
        # a round trip per node (docs/benchmarks.md, scale). Still in this order: the plan (so the hook knows
        # how many guests to expect), staging (so it overlaps the node workers' own preparation), the boot: one
        # BootGuests for the whole job, published once and put by the broker in every node's queue (shared/bus.py
        # sender-selected), not one per node each carrying all n peers (n² bytes).
        self.publisher.publish_many([
            m.JobPlanned.new(job_id=job.job_id, deadline=job.deadline, guests=guests),
            m.StageImage.new(job_id=job.job_id, deadline=job.deadline, image=spec.img,
                             digest=guests[0].image_digest),
            boot_command(job, guests, endpoints)])
        log(LOG, logging.INFO, "job planned", guests=len(guests), nodes=[n.host for n in job.nodes])

    def on_job_ended(self, job: m.JobEnded) -> None:
        self.publisher.publish_many([m.TeardownGuests.new(job_id=job.job_id, deadline=job.deadline, node=node)
                                     for node in dict.fromkeys(job.nodes)])
        log(LOG, logging.INFO, "teardown requested", nodes=job.nodes)

    def on_job_queued(self, job: m.JobQueued) -> None:
        """Prefetch: the job waits in the queue; stage its image now. The prologue's own StageImage then finds
        it cached. A spec that does not validate is left to the prologue, which rejects the job with reason."""
        refresh_catalog(self.config)
        try:
            spec = validate(job.spec, self.config)
        except SpecError as exc:
            log(LOG, logging.INFO, "queued job not prefetched", reason=str(exc))
            return
        digest = self.config.images.catalog[spec.img].sha256
        self.publisher.publish(m.StageImage.new(job_id=job.job_id, deadline=job.deadline, image=spec.img,
                                                digest=digest))
        log(LOG, logging.INFO, "image prefetch asked", image=spec.img, digest=digest[:12])
