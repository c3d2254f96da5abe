"""Live migration of a running job's guests between nodes of the job (`vtorque migrate`, issue 14 item 3).

The operator's MigrateGuests goes to the source node's worker. For each guest it moves, the source
1. checks again what root acts on: the scheduler says the job runs and holds both nodes (what runs where is
   always allocated there), the guest is the job's and this node's, it has no data disk and no vRDMA;
2. asks the target's worker (PrepareMigration, on the target queue's `migrate.<host>` binding) to make ready:
   the guest's directory, an empty overlay on the same base image (the store is content-addressed: the same
   path on every node), the seed's bytes (read-only, libvirt copies no read-only disk), the guest's ssh link
   for its owner, the job's network (its VXLAN segment, with every other guest's MAC behind its node), and to
   answer MigrationPrepared;
3. has its libvirtd move the guest to the target's, peer to peer (virDomainMigrateToURI3: live, persistent on
   the target, undefined here, the overlay's blocks copied by NBD: VIR_MIGRATE_NON_SHARED_INC; TLS for the
   libvirt connection and for QEMU's stream), the domain's XML for the target saying `node` = the target and
   no pinning of this node's cores; while it runs, libvirt's job statistics every 0.25 s become span events of
   the job's trace (each pre-copy round, with what is left to send); at the end the completed job's statistics
   (downtime, rounds, bytes) are the GuestMigrated event and the span's attributes;
4. on success removes its own side (the guest's directory, its job file) and tells the job's other nodes where
   the guest's MAC now is (JobGuestMoved), so the job's frames follow it.

The target's handler waits, after its answer, for the guest to run on its libvirt (or for MigrationFailed, or
the command's deadline): then writes the launcher's job file for it; if the guest never arrives it removes what
it made. libvirt's migration protocol keeps one running copy at every instant (the target's QEMU resumes only
after the source's stopped for good; a failure before that leaves the source running and the target's QEMU
killed), and both workers keep the moving guest out of reconciliation meanwhile (its name counts as booting).

Pure decisions (`check_*`, `dest_xml`, `target_segment`, `round_events`) are apart from I/O and unit-tested
(tests/unit/test_migrate.py); the attack tests are tests/security/test_migrate_*.py.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import pwd
import re
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vtorque.shared import messages as m
from vtorque.shared import topology, tracing
from vtorque.shared.job_network import guest_mac
from vtorque.shared.logs import log

from . import disks, guest_link, trust
from .domain import METADATA_NS, USER_NET_MAC, parse_metadata
from .hypervisor import HypervisorError
from .job_segment import BRIDGE_PREFIX, FLOOD_MAC, Segment, SegmentError, check_endpoint, vxlan_name

if TYPE_CHECKING:
    from .service import NodeWorker

LOG = logging.getLogger("vtorque.node_worker.migrate")

SEED_MAX_BYTES = 4 << 20  # a NoCloud seed is a few hundred kB; a bigger one is not a seed of ours
ISO_MAGIC_OFFSET, ISO_MAGIC = 0x8001, b"CD001"  # ISO 9660's primary volume descriptor
PREPARE_TIMEOUT = 60.0  # s the source waits for the target's answer
POLL = 0.1  # s between two looks at libvirt's job statistics
ARRIVE_WAIT = 120.0  # s the target waits for a guest it made ready to start arriving

# VIR_MIGRATE_LIVE | PEER2PEER | PERSIST_DEST | UNDEFINE_SOURCE | NON_SHARED_INC (by value: libvirt's python
# binding is not needed to decide); TLS added where [node] migration_tls.
LIVE, PEER2PEER, PERSIST_DEST, UNDEFINE_SOURCE, NON_SHARED_INC, TLS = 1, 2, 8, 16, 128, 65536
MIGRATABLE_XML = 8  # VIR_DOMAIN_XML_MIGRATABLE: the XML as the target may take it (no live-only parts)


class MigrationRefused(Exception):
    pass


# -- pure decisions --------------------------------------------------------------------------------------------

def flags(tls: bool) -> int:
    return LIVE | PEER2PEER | PERSIST_DEST | UNDEFINE_SOURCE | NON_SHARED_INC | (TLS if tls else 0)


def check_migrate(cmd: m.MigrateGuests, node: str, job_state: str | None, allocation: tuple[str, ...]) -> None:
    """Whether this node (the source) acts on a MigrateGuests: raises MigrationRefused with why not."""
    if cmd.node != node:
        raise MigrationRefused(f"MigrateGuests for node {cmd.node} reached node {node}")
    if cmd.target == node:
        raise MigrationRefused(f"the target {cmd.target} is the source")
    if job_state != "running":
        raise MigrationRefused(f"job {cmd.job_id} is not running (the scheduler says {job_state or 'nothing'})")
    if node not in allocation:
        raise MigrationRefused(f"node {node} is not one of job {cmd.job_id}'s nodes ({', '.join(allocation)})")
    if cmd.target not in allocation:
        raise MigrationRefused(f"node {cmd.target} is not one of job {cmd.job_id}'s nodes "
                               f"({', '.join(allocation) or 'none'}): the scheduler gives a job its nodes")
    for name in cmd.guests:
        check_job_guest(name, cmd.job_id)


def check_job_guest(name: str, job_id: str) -> str:
    """A guest name of this job: vt-<job>-<node>-<k> (messages.domain_name), never a path."""
    trust.check_guest_name(name)
    prefix = m.domain_name(job_id, "x", 0).rsplit("-", 2)[0] + "-"
    if not name.startswith(prefix) or not re.fullmatch(r"[A-Za-z0-9_-]+-[0-9]+", name[len(prefix):]):
        raise MigrationRefused(f"guest {name[:80]!r} is not a guest of job {job_id}")
    return name


def check_prepare(cmd: m.PrepareMigration, node: str, job_state: str | None, allocation: tuple[str, ...]) -> None:
    """Whether this node (the target) makes ready for a guest: raises MigrationRefused with why not."""
    if cmd.target != node:
        raise MigrationRefused(f"PrepareMigration for node {cmd.target} reached node {node}")
    if job_state != "running":
        raise MigrationRefused(f"job {cmd.job_id} is not running (the scheduler says {job_state or 'nothing'})")
    for who in (node, cmd.node):
        if who not in allocation:
            raise MigrationRefused(f"node {who} is not one of job {cmd.job_id}'s nodes ({', '.join(allocation)})")
    check_job_guest(cmd.guest, cmd.job_id)
    check_seed(cmd.seed)
    if not 0 < cmd.overlay_bytes <= 1 << 50:
        raise MigrationRefused(f"overlay size {cmd.overlay_bytes} is no disk's")
    for mac, endpoint in cmd.guest_endpoints.items():
        if not re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", mac):
            raise MigrationRefused(f"{mac[:40]!r} is not a MAC address")
        why = check_endpoint(endpoint, "")
        if why:
            raise MigrationRefused(f"job network endpoint {endpoint[:40]!r} {why}")
    for endpoint in cmd.endpoints:
        why = check_endpoint(endpoint, "")
        if why:
            raise MigrationRefused(f"job network endpoint {endpoint[:40]!r} {why}")


def check_seed(seed: bytes) -> None:
    if not seed or len(seed) > SEED_MAX_BYTES:
        raise MigrationRefused(f"a seed of {len(seed)} bytes is none of ours")
    if seed[ISO_MAGIC_OFFSET:ISO_MAGIC_OFFSET + len(ISO_MAGIC)] != ISO_MAGIC:
        raise MigrationRefused("the seed is not an ISO 9660 image")


def dest_xml(xml: str, target: str) -> str:
    """The guest's domain XML for the target: its vtorque metadata says it is the target's (reconciliation and
    teardown there take it as their own, here nobody does), and no pinning to this node's cores remains (the
    target's cores of the job are not this node's)."""
    ET.register_namespace("qemu", "http://libvirt.org/schemas/domain/qemu/1.0")
    root = ET.fromstring(xml)
    meta = root.find(f"metadata/{{{METADATA_NS}}}guest")
    if meta is None:
        raise MigrationRefused("the domain carries no vtorque metadata")
    node = meta.find(f"{{{METADATA_NS}}}node")
    if node is None:
        node = ET.SubElement(meta, f"{{{METADATA_NS}}}node")
    node.text = target
    for tag in ("cputune", "numatune"):
        for el in root.findall(tag):
            root.remove(el)
    return ET.tostring(root, encoding="unicode")


def guest_facts(xml: str) -> dict:
    """What the source sends of a running guest, from its live XML: its job network's VNI and MAC, whether it
    has a data disk (vdc) or vRDMA (shared memory, a host device), its overlay's path."""
    root = ET.fromstring(xml)
    facts: dict = {"vni": None, "mac": None, "overlay": None, "unmovable": ""}
    for disk in root.findall("devices/disk"):
        target, source = disk.find("target"), disk.find("source")
        dev = target.get("dev") if target is not None else None
        if dev == "vda" and source is not None:
            facts["overlay"] = source.get("file")
        elif dev not in ("vda", "vdb"):
            facts["unmovable"] = f"it has a data disk ({dev}): the owner's data stays where the job put it"
    if root.find("devices/shmem") is not None or root.find("devices/hostdev") is not None:
        facts["unmovable"] = "it has vRDMA (shared memory or a host device) bound to this node"
    for nic in root.findall("devices/interface"):
        source, mac = nic.find("source"), nic.find("mac")
        bridge = source.get("bridge", "") if source is not None else ""
        if bridge.startswith(BRIDGE_PREFIX):
            facts["vni"] = int(bridge[len(BRIDGE_PREFIX):], 16)
            facts["mac"] = mac.get("address") if mac is not None else None
    return facts


def target_segment(job_id: str, vni: int, local: str, endpoints: list[str], guest_endpoints: dict[str, str],
                   port: int, mtu: int) -> Segment:
    """The job's segment on the target: floods to every other node of the job, each other guest's MAC to its
    node (what the source knows), none to the target's own address (its guests are on its bridge)."""
    remotes = tuple(sorted({e for e in endpoints if e != local}))
    macs = tuple(sorted((mac, e) for mac, e in guest_endpoints.items() if e != local))
    return Segment(job_id=job_id, vni=vni, local=local, remotes=remotes, remote_macs=macs, port=port, mtu=mtu)


def moved_commands(vxlan: str, mac: str, endpoint: str, local: str, present: set[tuple[str, str]]) -> list[list[str]]:
    """On a node of the job that keeps its segment: the forwarding entries that send the moved guest's frames
    to its new node (none for a guest now on this node's own bridge), and floods to that node."""
    cmds = [["bridge", "fdb", "del", mac, "dev", vxlan, "dst", dst] for m_, dst in sorted(present)
            if m_ == mac and dst != endpoint]
    if endpoint != local:
        cmds.append(["bridge", "fdb", "replace", mac, "dev", vxlan, "dst", endpoint])
        if (FLOOD_MAC, endpoint) not in present:
            cmds.append(["bridge", "fdb", "append", FLOOD_MAC, "dev", vxlan, "dst", endpoint])
    return cmds


@dataclass
class Rounds:
    """libvirt's job statistics over a migration, turned into the trace's events: a new pre-copy round each
    time `memory_iteration` grows."""

    iteration: int = 0
    last: dict | None = None

    def add(self, stats: dict) -> list[tuple[str, dict]]:
        if not stats:
            return []
        self.last = stats
        out = []
        it = int(stats.get("memory_iteration", 0) or 0)
        if it > self.iteration:
            self.iteration = it
            out.append(("pre-copy round", {
                "vtorque.move.round": it,
                "vtorque.move.memory_remaining": int(stats.get("memory_remaining", 0) or 0),
                "vtorque.move.memory_processed": int(stats.get("memory_processed", 0) or 0),
                "vtorque.move.dirty_rate": int(stats.get("memory_dirty_rate", 0) or 0),
                "vtorque.move.disk_remaining": int(stats.get("disk_remaining", 0) or 0)}))
        return out


def summary(stats: dict | None, seconds: float) -> dict:
    """GuestMigrated's figures from the completed job's statistics (libvirt's names)."""
    stats = stats or {}

    def num(key: str):
        value = stats.get(key)
        return None if value is None else value

    downtime = num("downtime")
    return {"seconds": round(seconds, 3), "downtime_ms": float(downtime) if downtime is not None else None,
            "memory_iterations": num("memory_iteration"), "memory_bytes": num("memory_processed"),
            "disk_bytes": num("disk_processed")}


# -- I/O -------------------------------------------------------------------------------------------------------

class Migrator:
    """The node worker's migration handlers (the source's, the target's, the job's other nodes')."""

    def __init__(self, worker: NodeWorker, background: bool = True):
        self.w = worker
        # A move takes seconds to minutes: it runs in a thread of its own, off the node's queue, so the node's
        # teardowns and boots are not held behind it (a TeardownGuests waiting out a move expired on the rig).
        # The attack tests run the handlers inline (background False) to read their answers at once.
        self.background = background
        self.threads: list[threading.Thread] = []
        self._seen: dict[str, None] = {}  # message ids acted on: a redelivered command is not acted on twice
        self._seen_lock = threading.Lock()

    def _once(self, cmd: m.Message) -> bool:
        with self._seen_lock:
            if cmd.message_id in self._seen:
                log(LOG, logging.WARNING, "migration command seen before: not acted on again",
                    command=type(cmd).__name__)
                return False
            self._seen[cmd.message_id] = None
            while len(self._seen) > 1024:
                self._seen.pop(next(iter(self._seen)))
            return True

    def _spawn(self, fn, cmd: m.Message) -> None:
        if not self._once(cmd):
            return
        if not self.background:
            fn(cmd)
            return
        ctx = contextvars.copy_context()  # the consumer's span and the job's trace context go along
        thread = threading.Thread(target=ctx.run, args=(fn, cmd), name=f"migrate-{cmd.job_id}", daemon=True)
        self.threads = [t for t in self.threads if t.is_alive()] + [thread]
        thread.start()

    # the scheduler's word, asked by this node itself: root acts only on what it checked
    def _allocation(self, job_id: str) -> tuple[str | None, tuple[str, ...]]:
        from vtorque.shared.scheduler import SchedulerError

        try:
            info = self.w.scheduler.job(job_id)
        except SchedulerError as exc:
            raise MigrationRefused(f"the scheduler cannot be asked about job {job_id}: {exc}") from None
        if info is None:
            return None, ()
        return info.state, tuple(info.nodes)

    def _publish(self, event: m.Message) -> None:
        self.w.publisher.publish(event)

    # -- the source ----------------------------------------------------------------------------------------

    def on_migrate_guests(self, cmd: m.MigrateGuests) -> None:
        self._spawn(self._migrate_guests, cmd)

    def on_prepare_migration(self, cmd: m.PrepareMigration) -> None:
        self._spawn(self._prepare_migration, cmd)

    def _migrate_guests(self, cmd: m.MigrateGuests) -> None:
        node = self.w.node
        attrs = {tracing.JOB_ID: cmd.job_id, "vtorque.node": node, "vtorque.move.target": cmd.target}
        with tracing.tracer().start_as_current_span("migrate guests", attributes=attrs) as span:
            try:
                state, allocation = self._allocation(cmd.job_id)
                check_migrate(cmd, node, state, allocation)
                names = self._guests_here(cmd)
            except (MigrationRefused, trust.Refused, HypervisorError) as exc:
                tracing.mark_error(span, str(exc))
                log(LOG, logging.ERROR, "migration refused", reason=str(exc), target=cmd.target)
                self._publish(m.MigrationFailed.new(job_id=cmd.job_id, deadline=cmd.deadline, node=node,
                                                    target=cmd.target, guest=",".join(cmd.guests)[:200],
                                                    reason=f"refused by node {node}: {exc}"[:1000]))
                return
            for k, name in enumerate(names):
                self._migrate_one(cmd, name, allocation, remaining=len(names) - k - 1)

    def _guests_here(self, cmd: m.MigrateGuests) -> list[str]:
        domains = self.w.hv.vtorque_domains()
        mine = sorted(n for n, meta in domains.items()
                      if meta.get("job") == cmd.job_id and meta.get("node", self.w.node) == self.w.node)
        if cmd.guests:
            missing = [g for g in cmd.guests if g not in mine]
            if missing:
                raise MigrationRefused(f"no guest {', '.join(missing)} of job {cmd.job_id} runs on {self.w.node}")
            return list(cmd.guests)
        if not mine:
            raise MigrationRefused(f"no guest of job {cmd.job_id} runs on {self.w.node}")
        return mine

    def _migrate_one(self, cmd: m.MigrateGuests, name: str, allocation: tuple[str, ...], remaining: int) -> None:
        # In the job's own trace, a child of the guest's boot span (its traceparent in the launcher's job file,
        # as suspend.py's spans): `vtorque trace JOBID` shows the move beside the boot.
        with tracing.job_trace(cmd.job_id, self._traceparent(cmd.job_id, name)):
            self._migrate_traced(cmd, name, allocation, remaining)

    def _traceparent(self, job_id: str, name: str) -> str | None:
        try:
            doc = json.loads((self.w.config.job_dir(job_id) / f"{name}.json").read_text())
        except (OSError, ValueError):
            return None
        value = doc.get("traceparent")
        return value if isinstance(value, str) else None

    def _migrate_traced(self, cmd: m.MigrateGuests, name: str, allocation: tuple[str, ...], remaining: int) -> None:
        node, w = self.w.node, self.w
        attrs = {tracing.JOB_ID: cmd.job_id, "vtorque.guest": name, "vtorque.node": node,
                 "vtorque.move.target": cmd.target}
        with tracing.tracer().start_as_current_span("migrate guest", attributes=attrs) as span:
            with w._thread_lock:
                w._booting.add(name)  # out of reconciliation's way until it is settled
            try:
                result = self._move(cmd, name, allocation, span)
            except (MigrationRefused, trust.Refused, HypervisorError, SegmentError, OSError) as exc:
                running = self._where(name)
                tracing.mark_error(span, str(exc))
                log(LOG, logging.ERROR, "migration failed", guest=name, target=cmd.target, reason=str(exc),
                    running_on=running)
                self._publish(m.MigrationFailed.new(job_id=cmd.job_id, deadline=cmd.deadline, node=node,
                                                    target=cmd.target, guest=name, reason=str(exc)[:1000],
                                                    running_on=running, remaining=remaining))
                return
            finally:
                with w._thread_lock:
                    w._booting.discard(name)
            for key, value in result.items():
                if value is not None:
                    span.set_attribute(f"vtorque.move.{key}", value)
            log(LOG, logging.INFO, "guest migrated", guest=name, target=cmd.target, **result)
            self._publish(m.GuestMigrated.new(job_id=cmd.job_id, deadline=cmd.deadline, node=node,
                                              target=cmd.target, guest=name, remaining=remaining, **result))

    def _where(self, name: str) -> str:
        try:
            return self.w.node if self.w.hv.is_active(name) else ""
        except HypervisorError:
            return ""

    def _move(self, cmd: m.MigrateGuests, name: str, allocation: tuple[str, ...], span) -> dict:
        w = self.w
        dom = w.hv.lookup(name)
        if dom is None or not w.hv.is_active(name):
            raise MigrationRefused(f"guest {name} does not run on {w.node}")
        xml = w.hv.xml(dom)
        meta = parse_metadata(xml)
        facts = guest_facts(xml)
        if facts["unmovable"]:
            raise MigrationRefused(f"guest {name} cannot move: {facts['unmovable']}")
        gdir = Path(facts["overlay"] or "").parent
        if gdir.name != name or str(gdir.parent) not in w.guest_roots():
            raise MigrationRefused(f"guest {name}'s disk {facts['overlay']!r} is not in a guest directory of ours")
        seed = _read_root_file(gdir / "seed.iso", SEED_MAX_BYTES)
        info = disks_info(Path(facts["overlay"]))
        digest = Path(info.get("backing-filename", "")).name
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise MigrationRefused(f"guest {name}'s overlay has no base image of the store")
        guest_endpoints, endpoints = self._network_view(facts, name)
        prepare = m.PrepareMigration.new(
            job_id=cmd.job_id, deadline=w.config.node.migration_timeout + PREPARE_TIMEOUT, node=w.node,
            target=cmd.target, guest=name, index=int(meta.get("index", "0")), owner=meta.get("owner", ""),
            image_digest=digest, overlay_bytes=int(info["virtual-size"]), seed=seed,
            base_format="raw" if info.get("backing-filename-format") == "raw" else "qcow2",
            vcpus=int(ET.fromstring(xml).findtext("vcpu") or 1),
            fs_type="ramdisk" if str(gdir.parent) == w.config.node.ramdisk_dir else "sharedfs",
            vni=facts["vni"], guest_endpoints=guest_endpoints, endpoints=endpoints)
        waiter = w.waiter(w.config.broker.connection_url(),
                          topology.bindings(topology.MIGRATION_Q, job=m.routing_word(cmd.job_id)))
        try:
            w.publisher.publish(prepare)
            deadline = time.monotonic() + PREPARE_TIMEOUT
            while True:
                event = waiter.next(deadline)
                if event is None:
                    raise MigrationRefused(f"node {cmd.target} did not make ready within {PREPARE_TIMEOUT:.0f}s")
                if isinstance(event, m.MigrationPrepared) and event.guest == name and event.node == cmd.target:
                    if event.reason:
                        raise MigrationRefused(f"node {cmd.target}: {event.reason}")
                    endpoint = event.endpoint
                    break
        finally:
            waiter.close()
        span.add_event("target ready")
        t0 = time.monotonic()
        migratable = w.hv.timed("the domain's migratable XML", dom.XMLDesc, MIGRATABLE_XML)
        stats = self._run_migration(dom, name, cmd.target, dest_xml(migratable, cmd.target), span)
        seconds = time.monotonic() - t0
        self._after_move(cmd, name, facts, allocation, endpoint)
        return summary(stats, seconds)

    def _network_view(self, facts: dict, name: str) -> tuple[dict[str, str], list[str]]:
        """Where the job's other guests are, as this node's segment knows it (its forwarding entries; its own
        guests behind its own address), and every endpoint of the job (floods)."""
        vni, local = facts["vni"], self.w.config.node.job_network_localaddr
        if vni is None:
            return {}, []
        present = self.w.segments._forwarding(vxlan_name(vni))
        where = {mac: dst for mac, dst in present if mac != FLOOD_MAC}
        endpoints = sorted({dst for _, dst in present} | {local})
        for other, meta in self.w.hv.vtorque_domains().items():
            if other != name and meta.get("job") and meta.get("index", "").isdigit():
                if meta.get("node", self.w.node) == self.w.node:
                    where[guest_mac(meta["job"], int(meta["index"]))] = local
        if facts["mac"]:
            where.pop(facts["mac"], None)
        return where, endpoints

    def _run_migration(self, dom, name: str, target: str, xml: str, span) -> dict | None:
        import libvirt

        cfg = self.w.config.node
        uri = cfg.migration_uri.format(node=target)
        params = {libvirt.VIR_MIGRATE_PARAM_DEST_XML: xml, libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: xml,
                  libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS: ["vda"]}
        if cfg.migration_max_downtime_ms:
            # set before the start; libvirt keeps it for this domain's migrations
            dom.migrateSetMaxDowntime(cfg.migration_max_downtime_ms, 0)
        outcome: dict = {}

        def run() -> None:
            try:
                conn = libvirt.open(self.w.config.node.libvirt_uri)  # its own connection: the pool's stay free
                try:
                    conn.lookupByName(name).migrateToURI3(uri, params, flags(cfg.migration_tls))
                finally:
                    conn.close()
            except libvirt.libvirtError as exc:
                outcome["error"] = exc.get_error_message()
            except BaseException as exc:  # noqa: BLE001 - said to the waiting thread
                outcome["error"] = f"{type(exc).__name__}: {exc}"

        thread = threading.Thread(target=run, name=f"migrate-{name}", daemon=True)
        thread.start()
        rounds, end = Rounds(), time.monotonic() + cfg.migration_timeout
        while thread.is_alive():
            thread.join(POLL)
            try:
                for what, attrs in rounds.add(dom.jobStats()):
                    span.add_event(what, attributes=attrs)
            except libvirt.libvirtError:
                pass  # between phases, or over
            if time.monotonic() > end and thread.is_alive():
                try:
                    dom.abortJob()  # libvirt's abort: the guest runs on here, the target's QEMU is killed
                except libvirt.libvirtError:
                    pass
                thread.join(30)
                raise MigrationRefused(f"the move took longer than {cfg.migration_timeout:.0f}s: cancelled")
        if "error" in outcome:
            raise MigrationRefused(f"libvirt: {outcome['error']}")
        completed = self._completed_stats(uri, name) or rounds.last
        if completed and completed.get("downtime") is not None:
            span.add_event("downtime", attributes={"vtorque.move.downtime_ms": float(completed["downtime"])})
        return completed

    @staticmethod
    def _completed_stats(uri: str, name: str) -> dict | None:
        """The completed migration's statistics, kept by the target's libvirtd (the source's domain is gone)."""
        import libvirt

        try:
            conn = libvirt.open(uri)
            try:
                return conn.lookupByName(name).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
            finally:
                conn.close()
        except libvirt.libvirtError:
            return None

    def _after_move(self, cmd: m.MigrateGuests, name: str, facts: dict, allocation: tuple[str, ...],
                    endpoint: str) -> None:
        """This node's side gone (the guest's files and job file), and the job's frames sent after the guest."""
        w = self.w
        w._remove_disks(name)
        jdir = w.config.job_dir(trust.check_job_id(cmd.job_id))
        (jdir / f"{name}.json").unlink(missing_ok=True)
        try:
            jdir.rmdir()
        except OSError:
            pass  # other guests' files are still there
        if facts["vni"] is None or not facts["mac"]:
            return
        if check_endpoint(endpoint, w.config.node.job_network_localaddr):
            log(LOG, logging.WARNING, "job network not moved: the target gave no endpoint", guest=name)
            return
        self.apply_moved(cmd.job_id, facts["vni"], facts["mac"], endpoint)
        for peer in allocation:
            if peer not in (w.node, cmd.target):
                w.publisher.publish(m.JobGuestMoved.new(
                    job_id=cmd.job_id, deadline=60.0, node=w.node, peer=peer, target=cmd.target,
                    mac=facts["mac"], endpoint=endpoint, vni=facts["vni"]))
        try:
            w._remove_job_network(cmd.job_id)  # when its last guest here went
        except (SegmentError, HypervisorError) as exc:
            log(LOG, logging.WARNING, "job network not removed", error=str(exc))

    def apply_moved(self, job_id: str, vni: int, mac: str, endpoint: str) -> None:
        seg = self.w.segments
        if seg.present().get(vni) != job_id:
            return  # no segment of that job here: nothing to follow
        vxlan = vxlan_name(vni)
        for argv in moved_commands(vxlan, mac, endpoint, self.w.config.node.job_network_localaddr,
                                   seg._forwarding(vxlan)):
            seg._must(argv)

    # -- the target ----------------------------------------------------------------------------------------

    def _prepare_migration(self, cmd: m.PrepareMigration) -> None:
        w, name = self.w, cmd.guest
        attrs = {tracing.JOB_ID: cmd.job_id, "vtorque.guest": name, "vtorque.node": w.node,
                 "vtorque.move.source": cmd.node}
        with tracing.tracer().start_as_current_span("receive guest", attributes=attrs) as span:
            with w._thread_lock:
                w._booting.add(name)
                w._booting_jobs[cmd.job_id] = w._booting_jobs.get(cmd.job_id, 0) + 1
            waiter = None
            made = False
            try:
                try:
                    state, allocation = self._allocation(cmd.job_id)
                    check_prepare(cmd, w.node, state, allocation)
                    if w.hv.lookup(name) is not None:
                        raise MigrationRefused(f"a domain {name} is on {w.node} already")
                    waiter = w.waiter(w.config.broker.connection_url(),
                                      topology.bindings(topology.MIGRATION_Q, job=m.routing_word(cmd.job_id)))
                    made = True
                    ssh_socket = self._make_ready(cmd)
                    # Written before the move: a guest that arrives while this worker is down (libvirtd finishes
                    # the move on its own) is a ready guest to the restarted worker's reconciliation, not a boot
                    # that never became ready; a guest that never arrives leaves an orphan file it removes.
                    self.w.write_job_file(cmd.job_id, cmd.guest, cmd.index, cmd.owner, cmd.vcpus, ssh_socket)
                except (MigrationRefused, trust.Refused, disks.DiskError, guest_link.LinkError, SegmentError,
                        HypervisorError, OSError) as exc:
                    tracing.mark_error(span, str(exc))
                    log(LOG, logging.ERROR, "migration not prepared", guest=name, source=cmd.node, reason=str(exc))
                    if made:
                        self._remove_incoming(cmd)
                    self._publish(m.MigrationPrepared.new(job_id=cmd.job_id, deadline=cmd.deadline, node=w.node,
                                                          source=cmd.node, guest=name,
                                                          reason=f"refused by node {w.node}: {exc}"[:1000]))
                    return
                self._publish(m.MigrationPrepared.new(job_id=cmd.job_id, deadline=cmd.deadline, node=w.node,
                                                      source=cmd.node, guest=name,
                                                      endpoint=w.config.node.job_network_localaddr))
                arrived = self._wait_arrival(cmd, waiter)
                if arrived:
                    span.add_event("guest running here")
                    log(LOG, logging.INFO, "guest migrated in", guest=name, source=cmd.node)
                else:
                    tracing.mark_error(span, "the guest did not arrive")
                    log(LOG, logging.WARNING, "migration did not arrive: made-ready files removed", guest=name)
                    self._remove_incoming(cmd)
            finally:
                if waiter is not None:
                    waiter.close()
                with w._thread_lock:
                    w._booting.discard(name)
                    left = w._booting_jobs.get(cmd.job_id, 1) - 1
                    if left:
                        w._booting_jobs[cmd.job_id] = left
                    else:
                        w._booting_jobs.pop(cmd.job_id, None)

    def _make_ready(self, cmd: m.PrepareMigration) -> Path:
        w = self.w
        try:
            pw = pwd.getpwnam(cmd.owner)
        except KeyError:
            raise MigrationRefused(f"owner {cmd.owner[:40]!r} is unknown on this node") from None
        account = trust.check_owner(m.Owner(user=pw.pw_name, uid=pw.pw_uid, gid=pw.pw_gid), w.config)
        if not w.store.has(cmd.image_digest):
            raise MigrationRefused(f"image {cmd.image_digest[:12]} is not in this node's store")
        base = w.store.path(cmd.image_digest)
        root = w.config.node.ramdisk_dir if cmd.fs_type == "ramdisk" else w.config.node.guest_dir
        gdir = prepare_incoming(root, cmd.guest, cmd.job_id, base, cmd.base_format, cmd.overlay_bytes, cmd.seed,
                                store=w.config.images.store, node=w.node)
        if cmd.vni is not None:
            cfg = w.config.node
            w.segments.ensure(target_segment(cmd.job_id, cmd.vni, cfg.job_network_localaddr, cmd.endpoints,
                                             cmd.guest_endpoints, cfg.job_network_port, cfg.job_network_mtu))
            vxlan = vxlan_name(cmd.vni)
            mac = guest_mac(cmd.job_id, cmd.index)
            for argv in moved_commands(vxlan, mac, cfg.job_network_localaddr, cfg.job_network_localaddr,
                                       w.segments._forwarding(vxlan)):
                w.segments._must(argv)  # the guest is on this bridge now, no more behind the source
        guest_link.start(gdir, account.uid, USER_NET_MAC)
        return gdir / guest_link.SSH_SOCKET

    def _remove_incoming(self, cmd: m.PrepareMigration) -> None:
        """What the target made for a guest that did not arrive: its directory (link included: it ends with the
        directory) and its job file; the job's network goes with reconciliation's idle networks."""
        w = self.w
        if w.hv.lookup(cmd.guest) is not None:
            return  # it is here after all (libvirt's word over ours): keep it
        w._remove_disks(cmd.guest)
        jdir = w.config.job_dir(trust.check_job_id(cmd.job_id))
        (jdir / f"{cmd.guest}.json").unlink(missing_ok=True)
        try:
            jdir.rmdir()
        except OSError:
            pass  # other guests' files are still there

    def _wait_arrival(self, cmd: m.PrepareMigration, waiter) -> bool:
        """True once the guest runs here (libvirt resumed it after the move), False when the move failed (the
        source said so, or its domain came and went, or it never came)."""
        import libvirt

        name, seen = cmd.guest, False
        start_by = time.monotonic() + ARRIVE_WAIT
        end = time.monotonic() + self.w.config.node.migration_timeout + ARRIVE_WAIT
        while time.monotonic() < end:
            try:
                dom = self.w.hv.lookup(name)
            except HypervisorError:
                time.sleep(0.25)
                continue
            if dom is not None:
                seen = True
                try:
                    state = self.w.hv.timed("the domain's state", dom.state)[0]
                except (libvirt.libvirtError, HypervisorError):
                    state = None
                if state == libvirt.VIR_DOMAIN_RUNNING:
                    return True
            elif seen or time.monotonic() > start_by:
                return False
            event = None
            try:
                if waiter is not None:
                    event = waiter.next(time.monotonic() + 0.25)
                else:
                    time.sleep(0.25)
            except Exception as exc:  # noqa: BLE001 - the broker lost (this node cut off): libvirt's word is enough
                log(LOG, logging.WARNING, "migration: no more word from the source, watching libvirt alone",
                    guest=name, error=str(exc)[:200])
                waiter, event = None, None
            if isinstance(event, m.MigrationFailed) and event.guest == name:
                return self.w.hv.lookup(name) is not None and self.w.hv.is_active(name)
        return False

    # -- the job's other nodes -----------------------------------------------------------------------------

    def on_job_guest_moved(self, cmd: m.JobGuestMoved) -> None:
        w = self.w
        try:
            if cmd.peer != w.node:
                raise MigrationRefused(f"JobGuestMoved for node {cmd.peer} reached node {w.node}")
            why = check_endpoint(cmd.endpoint, w.config.node.job_network_localaddr)
            if why:
                raise MigrationRefused(f"endpoint {cmd.endpoint[:40]!r} {why}")
            state, allocation = self._allocation(cmd.job_id)
            if state != "running" or cmd.node not in allocation or cmd.target not in allocation:
                raise MigrationRefused(f"nodes {cmd.node} and {cmd.target} are not both job {cmd.job_id}'s")
            if cmd.mac != guest_mac(cmd.job_id, _index_of_mac(cmd.job_id, cmd.mac)):
                raise MigrationRefused(f"{cmd.mac} is no guest MAC of job {cmd.job_id}")
            self.apply_moved(cmd.job_id, cmd.vni, cmd.mac, cmd.endpoint)
        except (MigrationRefused, SegmentError) as exc:
            log(LOG, logging.ERROR, "job network not moved", reason=str(exc), source=cmd.node)


def _index_of_mac(job_id: str, mac: str) -> int:
    """The rank whose job network MAC `mac` is (shared/job_network.py guest_mac), or -1."""
    for index in range(4096):
        if guest_mac(job_id, index) == mac:
            return index
    return -1


def disks_info(overlay: Path) -> dict:
    import subprocess

    done = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(overlay)], capture_output=True,
                          text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise MigrationRefused(f"qemu-img info {overlay.name}: {done.stderr.strip()[:200]}")
    return json.loads(done.stdout)


def _read_root_file(path: Path, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_size > limit:
            raise MigrationRefused(f"{path.name} is {st.st_size} bytes")
        return os.read(fd, limit + 1)
    finally:
        os.close(fd)


def prepare_incoming(root: str, name: str, job_id: str, base: Path, base_format: str, overlay_bytes: int,
                     seed: bytes, store: str | None, node: str) -> Path:
    """The guest's directory on the target as disks.prepare makes it for a boot, but with the source's seed and
    an empty overlay of the source's size on the same base (libvirt's NBD copy fills it). Nothing of it is left
    on a failure. Raises trust.Refused or DiskError."""
    import subprocess

    from vtorque.shared import image_leases as leases

    gdir = disks.guest_dir(root, name)
    trust.secure_dir(root, disks.DIR_MODE)
    if trust.own_entry(Path(root), name) is not None:
        raise trust.Refused(f"{gdir} exists already: a guest of that name is here, or its leftovers")
    try:
        os.mkdir(gdir, disks.DIR_MODE)
    except FileExistsError:
        raise trust.Refused(f"{gdir} exists and is not a guest directory of root's: refusing to use it") from None
    os.chmod(gdir, disks.DIR_MODE)
    try:
        for fname, content in (("job", job_id.encode()), ("node", node.encode()), ("seed.iso", seed),
                               ("console.log", b"")):
            fd = os.open(gdir / fname, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         disks.FILE_MODE)
            with open(fd, "wb") as fh:
                fh.write(content)
        if leases.take(base, gdir, job_id):
            os.chmod(gdir / leases.MARKER, disks.FILE_MODE)
        done = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", base_format, "-b", str(base),
                               str(gdir / "root.qcow2"), str(overlay_bytes)], capture_output=True, text=True,
                              timeout=60, check=False)
        if done.returncode != 0:
            raise disks.DiskError(f"qemu-img create: {done.stderr.strip()[:300]}")
        for fname in ("root.qcow2", "seed.iso"):
            os.chmod(gdir / fname, disks.FILE_MODE)
        return gdir
    except BaseException:
        disks._remove_tree(gdir, store)
        raise
