"""A whole vtorque site in one process, with no broker and no real guest: the real bridge, stager and node
workers (their handlers, checks, planning, staging into a real store, domain XML on libvirt's test driver,
readiness wait, job files, teardown) and the real hooks' prologue and epilogue (run_prologue/run_epilogue),
talking through shared/testing.py's in-memory bus. Used by tests/unit/test_flow_in_memory.py.

What stands in, and where (the narrowest place each):
- the broker: InMemoryBus (routing from shared/topology.py); the hooks get `bus.channel` as their
  channel_factory, the services `bus.publisher()`;
- the machine under each node worker: services/node_worker/instant.py (the test driver, guests that are ready
  at once, disks.prepare and guest_link.start replaced while the site is open, job networks whose `ip`
  commands are taken as done);
- the node worker's image wait: `bus.waiter`, passed in as its `waiter`;
- the scheduler the bridge and the node workers' reconciliation ask (`FakeScheduler`): what Torque would say of
  the job.
- the services' clock: one FakeClock (shared/testing.py) for all of them, `site.clock`, that moves only when a
  test advances it (deadlines, heartbeat ages, walltimes and the reconciler's grace go by it; waits do not).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from pathlib import Path

import msgspec

from vtorque.hooks.job_hook import JobContext, Outcome, run_epilogue, run_prologue
from vtorque.services.image_stager.service import ImageStager
from vtorque.services.node_worker import service as node_service
from vtorque.services.node_worker.instant import InstantGuests, InstantHypervisor, instant_host, instant_segments
from vtorque.services.scheduler_bridge.service import SchedulerBridge
from vtorque.shared import messages as m
from vtorque.shared.config import Config, HooksConfig, ImageEntry, ImagesConfig, NodeConfig, SchedulerConfig
from vtorque.shared.image_store import ImageStore
from vtorque.shared.job_script import JobHeader, parse_header, render_wrapper
from vtorque.shared.scheduler import JobInfo
from vtorque.shared.spec import parse_options, validate
from vtorque.shared.testing import FakeClock, InMemoryBus

OWNER = m.Owner(user="root", uid=0, gid=0, group="root")
PUBKEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFlowFlowFlowFlowFlowFlowFlowFlowFlowFlowFlow flow@test"


class FakeScheduler:
    """The scheduler's word on a job, as the bridge asks it (shared/scheduler.py's interface)."""

    kind = "torque"

    def __init__(self):
        self.jobs: dict[str, JobInfo] = {}

    def job(self, job_id: str) -> JobInfo | None:
        return self.jobs.get(job_id)

    def binary(self, name: str) -> str:
        return f"/nonexistent/{name}"

    def run(self, *argv: str, env=None):
        raise AssertionError(f"the flow asked the scheduler to run {argv}")

    def cluster(self, job_id: str) -> str | None:
        return "torque:flow"

    def submit(self, args: list[str]):
        raise AssertionError(f"the flow asked the scheduler to submit {args}")

    def cancel(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)

    def suspend(self, job_id: str) -> None:
        self.jobs[job_id] = msgspec.structs.replace(self.jobs[job_id], state="suspended", raw_state="S")

    def resume(self, job_id: str) -> None:
        self.jobs[job_id] = msgspec.structs.replace(self.jobs[job_id], state="running", raw_state="R")


class Site:
    def __init__(self, root: Path, nodes: tuple[str, ...] = ("n1",), image: bytes = b"\x00" * 65536,
                 digest: str | None = None):
        self.root = root
        source = root / "tiny.img"
        source.write_bytes(image)
        digest = digest or hashlib.sha256(image).hexdigest()
        self.config = Config(
            state_dir=str(root / "state"),
            images=ImagesConfig(store=str(root / "store"), catalog_file=None, progress_interval=0.0,
                                catalog={"tiny": ImageEntry(source=str(source), sha256=digest, format="raw")}),
            scheduler=SchedulerConfig(kind="torque"),
            node=NodeConfig(name=nodes[0], allow_system_owners=True, boot_timeout=10.0),
            hooks=HooksConfig(epilogue_timeout=5.0))
        self.bus = InMemoryBus()
        self.clock = FakeClock()
        self.scheduler = FakeScheduler()
        self.store = ImageStore(self.config.images.store)
        self.guests = InstantGuests()
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(instant_host(self.guests))
        self.bridge = SchedulerBridge(self.config, self.bus.publisher(), scheduler=self.scheduler, clock=self.clock)
        self.stager = ImageStager(self.config, self.bus.publisher(), store=self.store, clock=self.clock)
        self.workers = {}
        for i, name in enumerate(nodes):
            work = root / name
            work.mkdir()
            node = msgspec.structs.replace(self.config.node, name=name, guest_dir=str(work / "guests"),
                                           ramdisk_dir=str(work / "shm"), job_network_localaddr=f"10.0.0.{i + 1}")
            config = msgspec.structs.replace(self.config, node=node, state_dir=str(work / "state"))
            self.workers[name] = node_service.NodeWorker(
                config, self.bus.publisher(), hypervisor=InstantHypervisor(self.guests, str(work)), store=self.store,
                segments=instant_segments(work), scheduler=self.scheduler, waiter=self.bus.waiter, clock=self.clock)
        for service in (self.bridge, self.stager, *self.workers.values()):
            self.bus.serve(service)
        for name in nodes:  # what each node's heartbeat says of it (the bridge plans only onto known nodes)
            self.bus.publish(
                m.NodeHeartbeat.new(
                    job_id="",
                    deadline=30.0,
                    node=name,
                    cores=64,
                    mem_free_mib=65536,
                    guests_running=0,
                    domain_type="qemu",
                    capabilities=["tcg"],
                    interval=10.0,
                    tunnel_address=f"10.0.0.{nodes.index(name) + 1}",
                )
            )
        self.bus.settle()

    def close(self) -> None:
        self.bus.close()
        self._stack.close()

    # -- a job's life -----------------------------------------------------------------------------------------

    def submit(self, job_id: str, vm: str = "img=tiny", nodes: tuple[str, ...] | None = None,
               owner: str = "root") -> JobContext:
        """vsub's wrapper for `vsub -vm VM`, as the hook reads it back, and the scheduler starting the job."""
        spec = validate(parse_options([vm]), self.config)
        wrapper = render_wrapper("#!/bin/sh\necho hello\n", spec.as_options(), PUBKEY, "/root/.vtorque/keys/k",
                                 None, "/usr/bin/vtorque-launch", submitted_ns=time.time_ns())
        return self.started(job_id, wrapper, nodes, owner)

    def started(self, job_id: str, wrapper: str, nodes: tuple[str, ...] | None = None,
                owner: str = "root") -> JobContext:
        """The scheduler starting the job whose script is `wrapper`: its prologue's JobContext, as the hook reads
        it (the header of the script's leading lines)."""
        header: JobHeader | None = parse_header(wrapper)
        assert header is not None, "not a VM job's wrapper"
        nodes = nodes or tuple(self.workers)
        self.scheduler.jobs[job_id] = JobInfo(job_id=job_id, state="running", raw_state="R", owner=owner,
                                              nodes=nodes)
        return JobContext(scheduler="torque", job_id=job_id, owner=OWNER, header=header,
                          nodes=[m.NodeAllocation(host=n, ncpus=4) for n in nodes], walltime=3600.0)

    def prologue(self, job: JobContext, deadline_s: float = 10.0) -> tuple[Outcome, list[str]]:
        lines: list[str] = []
        return run_prologue(job, self.config, deadline_s, lines.append, channel_factory=self.bus.channel), lines

    def epilogue(self, job: JobContext, exit_status: int = 0) -> tuple[bool, list[str]]:
        lines: list[str] = []
        return run_epilogue(job, self.config, exit_status, lines.append, channel_factory=self.bus.channel), lines

    def domains(self) -> dict[str, dict]:
        """Every node's vtorque domains on its test driver: name → metadata."""
        return {name: meta for w in self.workers.values() for name, meta in w.hv.vtorque_domains().items()}

    def of_type(self, kind: type) -> list[m.Message]:
        return [msg for msg in self.bus.published if isinstance(msg, kind)]
