"""The node worker: boots a job's guests on this node, says when they are ready, and removes them at the end.

Idempotent per guest: a redelivered BootGuests (the job's one command, whose part for this node the worker
expands itself: shared/job_boot.py) for a guest that already runs re-announces it instead of booting it twice;
a TeardownGuests for a job with nothing left here just confirms.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import json
import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vtorque.shared import job_boot, topology, tracing
from vtorque.shared import messages as m
from vtorque.shared.bus import EventWaiter, Publisher, node_queue
from vtorque.shared.clock import SYSTEM_CLOCK, Clock
from vtorque.shared.config import Config, refresh_catalog
from vtorque.shared.domain_type import detect_domain_type
from vtorque.shared.image_store import ImageStore
from vtorque.shared.job_boot import NodeBoot
from vtorque.shared.job_network import guest_mac
from vtorque.shared.logs import log
from vtorque.shared.scheduler import Scheduler, scheduler_for
from vtorque.shared.service import Service
from vtorque.shared.spec import parse_size_mib, ramdisk_mib
from vtorque.shared.user_files import UserFileRefused

from . import checkpoint, disks, guest_link, iocm, job_cgroup, numa, suspend, trust, vrdma, warm_boot, warm_pool
from .domain import USER_NET_MAC, BootSource, GuestMetadata, JobNic, domain_xml, parse_metadata
from .hypervisor import Hypervisor, HypervisorError
from .job_segment import JobSegments, SegmentError, bridge_name, segment_for
from .migrate import Migrator
from .readiness import BootFailed, Readiness, ssh_banner, wait_ready
from .seed import seed_files

LOG = logging.getLogger("vtorque.node_worker")
REMOVE_ATTEMPTS = 3
REMOVE_RETRY_DELAY = 2.0
KILLED = "killed"  # _stop_domain: the guest's QEMU has exited; its domain is undefined after the answer


class NodeWorker(Service):
    name = "node-worker"

    def __init__(self, config: Config, publisher: Publisher, hypervisor: Hypervisor | None = None,
                 store: ImageStore | None = None, segments: JobSegments | None = None,
                 scheduler: Scheduler | None = None, waiter=EventWaiter, clock: Clock = SYSTEM_CLOCK):
        self.config, self.publisher = config, publisher
        # What the worker and its background tasks decide time by (shared/clock.py): the time left to a command's
        # deadline, a guest past its walltime and the reconciler's grace. Its waits on libvirt, sockets and the
        # guest keep the real clock.
        self.clock = clock
        # What reconciliation asks of the site's scheduler, and how a boot waits for its image's staging
        # (shared/hook_channel.py's EventWaiter: url, patterns): a test passes its own (tests/unit/flow_site.py).
        self.scheduler = scheduler or scheduler_for(config)
        self.waiter = waiter
        self.node = config.node.node_name()
        self.hv = hypervisor or Hypervisor(config.node.libvirt_uri)
        self.store = store or ImageStore(config.images.store)
        self.domain_type = detect_domain_type(config.node.domain_type)
        self.segments = segments or JobSegments(config.node.job_network_port)
        self._thread_lock = threading.Lock()
        self._booting: set[str] = set()
        self._booting_jobs: dict[str, int] = {}  # job → boots under way here (its network must stay)
        self._idle_segments: set[int] = set()  # job networks the last reconcile round found unused
        self._accounts: dict[tuple[str, str], trust.OwnerAccount] = {}  # (job, guest) → checked owner
        self.teardown_threads: list[threading.Thread] = []  # removing files after a teardown's answer
        self.suspender = suspend.Suspender(self)  # guests of jobs the scheduler suspends (suspend.py)
        self.migrator = Migrator(self)  # live migration, `vtorque migrate` (migrate.py)
        self.checkpoints = checkpoint.Checkpoints(self)  # -vm checkpoint=: across a requeue (checkpoint.py)

    def queues(self):
        return [node_queue(self.node)]

    def handlers(self):
        return {m.BootGuests: self.on_boot_guests, m.TeardownGuests: self.on_teardown_guests,
                # live migration (migrate.py): the source's, the target's, the job's other nodes'
                m.MigrateGuests: self.migrator.on_migrate_guests,
                m.PrepareMigration: self.migrator.on_prepare_migration,
                m.JobGuestMoved: self.migrator.on_job_guest_moved}

    def start(self, stop: threading.Event) -> None:
        from .heartbeat import Heartbeat
        from .reconcile import Reconciler, scheduler_states

        # IOcm: moves running guests' I/O cores between iocm_min_cores and iocm_max_cores with their load.
        iocm.start(self, stop)  # first: a bad IOcm configuration is said before anything runs
        job_cgroup.start(self, stop)  # guests into their job's cgroup once it exists (and a bad layout said)
        Heartbeat(self, stop).start()  # NodeHeartbeat events for `vtorque nodes` and the bridge
        # At start and on a timer: nothing outlives its job, even when a hook or this worker died mid-way; and the
        # guests of a job the scheduler suspended are paused (or saved), and brought back when it resumes.
        states = scheduler_states(self.config, self.scheduler)
        Reconciler(self, stop, self.config.node.reconcile_interval, states=states).start()
        warm_pool.pool_of(self).start(stop)  # `[node] warm_pool`: restored, paused guests kept ahead of demand

    # -- boot -------------------------------------------------------------------------------------------

    def on_boot_guests(self, cmd: m.BootGuests) -> None:
        # One command for the whole job, the same body on every node of it: this node's guests, the job's peers
        # and network are expanded from it (shared/job_boot.py) by the checks.
        if cmd.guest.image not in self.config.images.catalog:
            refresh_catalog(self.config)  # added by `vtorque images add` since we started
        try:
            # Root acts only on what it has checked itself: anyone who could publish this wrote it.
            boot, accounts = trust.check_boot(cmd, self.node, self.config)
        except trust.Refused as exc:
            reason = f"refused by node {self.node}: {exc}"
            names: list[str | None] = [*job_boot.names_on(cmd, self.node, trust.MAX_GUESTS)] or [None]
            for name in names:
                self.publisher.publish(self._fail(cmd, name, reason, False, ""))
            return
        mine = boot.guests
        with self._thread_lock:
            self._accounts.update({(cmd.job_id, n): a for n, a in accounts.items()})
        refused = vrdma.check_boot(self, boot, mine)
        if refused:
            # Before any guest boots: a node without the vRDMA the job asked for fails it for good.
            with self._thread_lock:
                for guest in mine:
                    self._accounts.pop((cmd.job_id, guest.name), None)
            for guest in mine:
                self.publisher.publish(self._fail(cmd, guest.name, refused, False, ""))
            return
        with self._thread_lock:
            self._booting_jobs[cmd.job_id] = self._booting_jobs.get(cmd.job_id, 0) + 1
        try:
            failed = self._join_network(boot)
            if failed:
                for guest in mine:
                    self.publisher.publish(self._fail(cmd, guest.name, failed, True, ""))
                return
            # The node's guests boot side by side (each mostly waits for its kernel); the answers are published
            # from this thread, which owns the publisher's connection.
            with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(mine)),
                                                       thread_name_prefix="boot") as pool:
                futures = [pool.submit(contextvars.copy_context().run, self._boot, boot, guest) for guest in mine]
                for future in futures:
                    self.publisher.publish(future.result())
        finally:
            with self._thread_lock:
                left = self._booting_jobs.pop(cmd.job_id) - 1
                if left:
                    self._booting_jobs[cmd.job_id] = left

    def _join_network(self, cmd: NodeBoot) -> str | None:
        """The job's network on this node, before its guests here boot onto it; why not, or None."""
        if cmd.network is None:
            return None
        node = self.config.node
        try:
            with _phase("job network"):
                self.segments.ensure(segment_for(cmd, self.node, node.job_network_localaddr, node.job_network_port,
                                                 node.job_network_mtu))
        except SegmentError as exc:
            return str(exc)
        return None

    def _boot(self, cmd: NodeBoot, guest: m.GuestPlan) -> m.Event:
        with self._thread_lock:
            self._booting.add(guest.name)
        try:
            return self._boot_traced(cmd, guest)
        finally:
            with self._thread_lock:
                self._booting.discard(guest.name)
                self._accounts.pop((cmd.job_id, guest.name), None)

    def booting_now(self) -> set[str]:
        with self._thread_lock:
            return set(self._booting)

    def _boot_traced(self, cmd: NodeBoot, guest: m.GuestPlan) -> m.Event:
        attrs = {tracing.JOB_ID: cmd.job_id, "vtorque.guest": guest.name, "vtorque.node": self.node,
                 "vtorque.image.digest": guest.image_digest}
        with tracing.tracer().start_as_current_span("boot guest", attributes=attrs) as span:
            started = time.monotonic()
            try:
                self._wait_for_hypervisor(cmd)
                again = self._reannounce(cmd, guest)
                if again is not None:
                    return again
                timings, ssh_socket = self._boot_fresh(cmd, guest, started)
                if guest.checkpoint is not None:
                    self._note_checkpointing(cmd, guest, ssh_socket.parent)
            except BootFailed as exc:
                tracing.mark_error(span, exc.reason)
                return self._fail(cmd, guest, exc.reason, exc.retryable, exc.console_tail)
            except (trust.Refused, UserFileRefused) as exc:
                tracing.mark_error(span, exc)
                return self._fail(cmd, guest, f"refused by node {self.node}: {exc}", False, "")
            except (HypervisorError, disks.DiskError, OSError) as exc:
                tracing.mark_error(span, exc)
                return self._fail(cmd, guest, str(exc), True, "")
            self._write_job_file(cmd.job_id, guest, ssh_socket)
            log(LOG, logging.INFO, "guest ready", guest=guest.name, ready_s=round(timings.ready, 2))
            # The guest's sshd is a unix socket on this node, not a port (guest_link.py): ssh_port 0.
            return m.GuestReady.new(job_id=cmd.job_id, deadline=cmd.deadline, guest=guest.name, node=self.node,
                                    index=guest.index, address=str(ssh_socket), ssh_port=0, timings=timings)

    def _note_checkpointing(self, cmd: NodeBoot, guest: m.GuestPlan, gdir: Path) -> None:
        """A guest whose job asked for checkpoints: what its teardown needs to tell a requeue (checkpoint.py)."""
        try:
            self.checkpoints.note_boot(cmd, guest, gdir)
        except OSError as exc:
            log(LOG, logging.ERROR, "guest will not be checkpointed", guest=guest.name, error=str(exc))

    def _time_left(self, cmd: NodeBoot) -> float:
        """Seconds until the command's deadline by the worker's clock; what a boot may wait, at most, on the real
        monotonic clock it waits by."""
        return (cmd.deadline - self.clock.utcnow()).total_seconds()

    def _boot_deadline(self, cmd: NodeBoot) -> float:
        """When a boot gives up, on the monotonic clock: the command's deadline, never past boot_timeout."""
        return time.monotonic() + min(self.config.node.boot_timeout, self._time_left(cmd))

    def _wait_for_hypervisor(self, cmd: NodeBoot, poll: float = 1.0) -> None:
        """libvirt answering, or waited for within the boot's deadline: a libvirtd restart (seconds) is not a
        failed boot and a requeued job (issue 12 item 8). Raises BootFailed (retryable) past the deadline."""
        deadline = self._boot_deadline(cmd)
        why = self.hv.unavailable()
        if why:
            log(LOG, logging.WARNING, "libvirt not answering: the boot waits for it", error=why)
        while why:
            if time.monotonic() + poll > deadline:
                raise BootFailed(f"libvirt on {self.node} did not answer before the boot's deadline: {why}", True)
            time.sleep(poll)
            why = self.hv.unavailable()

    def _reannounce(self, cmd: NodeBoot, guest: m.GuestPlan) -> m.GuestReady | None:
        dom = self.hv.lookup(guest.name)
        if dom is None:
            return None
        meta = parse_metadata(self.hv.xml(dom))
        if meta.get("job") != cmd.job_id or meta.get("node", self.node) != self.node:
            # Never touch a domain of another job (or another node worker's) a command happens to name.
            raise trust.Refused(f"a domain named {guest.name} exists and is not this job's")
        # Only a guest directory root made, in a root still root's alone (never a planted tree).
        gdir = next((Path(r) / guest.name for r in self._roots()
                     if trust.is_safe_dir(r) is None and trust.own_entry(Path(r), guest.name)), None)
        if self.hv.is_active(guest.name) and meta.get("job") == cmd.job_id and gdir is not None:
            # Redelivered (the worker died, or its ack was lost): this guest already runs; never boot it twice.
            started = time.monotonic()
            ssh_socket = gdir / guest_link.SSH_SOCKET
            if not ssh_banner(ssh_socket):
                console = gdir / "console.log"
                if not console.is_file() or console.is_symlink():
                    raise BootFailed("a running guest without its files", True)
                log(LOG, logging.INFO, "guest already booting, waiting for it", guest=guest.name)
                deadline = started + max(1.0, self._time_left(cmd))
                wait_ready(console, ssh_socket, lambda: self.hv.is_active(guest.name),
                           min(deadline, started + self.config.node.boot_timeout))
            log(LOG, logging.INFO, "guest already running, announcing it again", guest=guest.name)
            waited = time.monotonic() - started
            zero = m.PhaseTimings(image=0, disks=0, define=0, start=0, kernel_up=None, ready=waited)
            self._write_job_file(cmd.job_id, guest, ssh_socket)
            return m.GuestReady.new(job_id=cmd.job_id, deadline=cmd.deadline, guest=guest.name, node=self.node,
                                    index=guest.index, address=str(ssh_socket), ssh_port=0, timings=zero)
        # A half-booted leftover of an earlier attempt: start over from nothing.
        self.hv.remove(guest.name)
        self._remove_disks(guest.name)
        return None

    def _roots(self) -> list[str]:
        return [self.config.node.guest_dir, self.config.node.ramdisk_dir]

    def _root(self, guest: m.GuestPlan) -> str:
        return self.config.node.ramdisk_dir if guest.fs_type == "ramdisk" else self.config.node.guest_dir

    def _remove_disks(self, name: str) -> int:
        self.suspender.remove(name)  # a suspended guest's record and saved memory (the owner's data) go with it
        return sum(disks.remove(root, name, store=self.config.images.store) for root in self._roots())

    def _user_image(self, cmd: NodeBoot, guest: m.GuestPlan, deadline: float) -> disks.UserImage | None:
        """The owner's own disk image, copied in as the owner (disks.prepare → shared/user_files.py)."""
        if not guest.disk or not guest.disk.image:
            return None
        account = self._accounts.get((cmd.job_id, guest.name)) or trust.check_owner(guest.owner, self.config)
        return disks.UserImage(path=guest.disk.image, uid=account.uid, gid=account.gid, home=account.home,
                               user_dirs=tuple(self.config.spec.user_dirs),
                               max_bytes=parse_size_mib(self.config.spec.max_disk) << 20,
                               timeout=max(5.0, min(600.0, deadline - time.monotonic())))

    def _boot_fresh(self, cmd: NodeBoot, guest: m.GuestPlan, t0: float) -> tuple[m.PhaseTimings, Path]:
        deadline = self._boot_deadline(cmd)
        entry = self.config.images.catalog.get(guest.image)
        if (entry is None or entry.sha256 != guest.image_digest) and refresh_catalog(self.config):
            entry = self.config.images.catalog.get(guest.image)  # added by `vtorque images add` since we started
        if entry is None or entry.sha256 != guest.image_digest:
            raise BootFailed(f"image {guest.image} is not in this node's catalog", False)
        with _phase("wait for image"):
            base = self._wait_for_image(cmd, guest.image_digest, deadline)
        t_image = time.monotonic()
        mac = guest_mac(cmd.job_id, guest.index) if cmd.network else None
        job_nic = JobNic(bridge_name(cmd.network.vni), mac, self.config.node.job_network_mtu) \
            if cmd.network and mac else None
        # A requeued job's checkpoint (checkpoint.py), a pooled guest (warm_pool.py), else a restore from the warm
        # image (warm_boot.py), else cold below.
        if guest.checkpoint is not None:
            restored = self.checkpoints.try_restore(cmd, guest, entry, base, job_nic, deadline, t0)
            if restored is not None:
                return restored  # the boot span's vtorque.boot.path says so, or vtorque.checkpoint.why why not
        pooled, pool_why = warm_pool.pool_of(self).claim_for(cmd, guest, entry, job_nic, deadline, t0)
        if pooled is not None:
            return pooled
        restored = warm_boot.try_restore(self, cmd, guest, entry, base, job_nic, deadline, t0, pool_why)
        if restored is not None:
            return restored  # from a warm image (warm_boot.py); else booted cold below, the span says why
        with _phase("prepare disks"):
            files = disks.prepare(self._root(guest), guest.name, cmd.job_id, base, entry.format,
                                  seed_files(guest, cmd.job_id, cmd.peers, cmd.network, mac,
                                             self.config.node.guest_mounts),
                                  data_size_mib=guest.disk.size_mib if guest.disk else None,
                                  user_image=self._user_image(cmd, guest, deadline),
                                  store=self.config.images.store, node=self.node,
                                  memory_cap_mib=ramdisk_mib(guest.fs_type, guest.disk.size_mib if guest.disk else None,
                                                             bool(guest.disk and guest.disk.image),
                                                             self.config.spec) or None)
        t_disks = time.monotonic()
        try:
            gdir = Path(files.overlay).parent
            try:
                # The guest's ssh path, before QEMU starts and joins it (guest_link.py).
                guest_link.start(gdir, guest.owner.uid, USER_NET_MAC)
            except (guest_link.LinkError, OSError) as exc:
                raise BootFailed(str(exc), True) from None
            ssh_socket = gdir / guest_link.SSH_SOCKET
            meta = GuestMetadata(job_id=cmd.job_id, owner=guest.owner.user, deadline=cmd.deadline,
                                 index=guest.index, node=self.node, end_by=guest.end_by)
            # The host channel (identity_channel.py): its clock after a resume from a suspension (suspend.py).
            xml = domain_xml(guest, files, BootSource(entry.kernel, entry.initrd, entry.cmdline), meta,
                             self.domain_type, job_nic, vrdma_choice=vrdma.for_guest(self, cmd, guest),
                             numa_topology=numa.host_topology(), host_channel=True)
            with _phase("define domain"):
                dom = self.hv.define(xml)
            t_define = time.monotonic()
            with _phase("start domain"):
                job_cgroup.start_guest(self, dom, cmd.job_id, guest)  # paused, into the job's cgroup, run
            t_start = time.monotonic()
            with _phase("wait until ready") as span:
                ready: Readiness = wait_ready(files.console_log, ssh_socket,
                                              lambda: self.hv.is_active(guest.name), deadline)
                if ready.kernel_up:
                    span.add_event(
                        "kernel up", timestamp=time.time_ns() - int((time.monotonic() - ready.kernel_up) * 1e9)
                    )
        except BaseException:
            self.hv.remove(guest.name)
            self._remove_disks(guest.name)
            raise
        timings = m.PhaseTimings(
            image=t_image - t0, disks=t_disks - t0, define=t_define - t0, start=t_start - t0,
            kernel_up=(ready.kernel_up - t0) if ready.kernel_up else None, ready=ready.ready - t0)
        return timings, ssh_socket

    def _wait_for_image(self, cmd: NodeBoot, digest: str, deadline: float) -> Path:
        if self.store.has(digest):
            return self.store.path(digest)
        waiter = self.waiter(self.config.broker.connection_url(), topology.bindings(topology.WAIT_Q, digest=digest))
        try:
            # Subscribed first, then looked again: a staging that finished in between is not missed.
            if self.store.has(digest):
                return self.store.path(digest)
            # And asked again: a staging that already failed before we listened answers again (the stager is
            # single-flight, so this never copies twice). The publisher gives this boot thread a connection of its
            # own, closed once sent: the thread ends with its boot, and an open connection per boot would pile up.
            image = next(g.image for g in cmd.guests if g.image_digest == digest)
            try:
                self.publisher.publish(m.StageImage.new(job_id=cmd.job_id, deadline=cmd.deadline, image=image,
                                                        digest=digest))
            finally:
                self.publisher.close()
            while True:
                event = waiter.next(deadline)
                if event is None:
                    raise BootFailed(f"image {digest[:12]}… was not staged in time", True)
                if isinstance(event, m.ImageStaged) and self.store.has(digest):
                    return self.store.path(digest)
                if isinstance(event, m.ImageStageFailed):
                    raise BootFailed(f"image staging failed: {event.reason}", False)
        finally:
            waiter.close()

    def _write_job_file(self, job_id: str, guest: m.GuestPlan, ssh_socket: Path) -> None:
        self.write_job_file(job_id, guest.name, guest.index, guest.owner.user, guest.vcpus, ssh_socket,
                            checkpoint=guest.checkpoint is not None)

    def write_job_file(self, job_id: str, guest: str, index: int, user: str, vcpus: int, ssh_socket: Path,
                       checkpoint: bool | None = None) -> None:
        """What the job's launcher (running as the owner) reads to reach its guests: the guest's ssh socket
        (only the owner and root may connect to it, guest_link.py), on this node (a boot, or a guest that moved
        here: migrate.py)."""
        jdir = trust.secure_dir(self.config.job_dir(trust.check_job_id(job_id)), 0o755)
        doc = {"job_id": job_id, "guest": guest, "index": index, "node": self.node,
               "ssh_socket": str(ssh_socket), "user": user, "vcpus": vcpus,
               # The job's trace, for what the node does to the guest later (suspend.py's pause and resume spans).
               "traceparent": tracing.current_traceparent()}
        if checkpoint is not None:
            # Whether a requeue checkpoints the guest: the launcher then leaves the job's script running when the
            # scheduler kills the batch step, else it passes the signal on to the script (cli/launcher.py).
            doc["checkpoint"] = checkpoint
        # Named after the guest's domain (its directory): a pooled guest's keeps its pool name (warm_pool.py).
        domain = trust.check_guest_name(ssh_socket.parent.name)
        tmp = jdir / f".{domain}.json.tmp"
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with open(fd, "w") as fh:
            fh.write(json.dumps(doc))
        os.chmod(tmp, 0o644)
        os.rename(tmp, jdir / f"{domain}.json")

    def _fail(self, cmd: m.BootGuests | NodeBoot | m.TeardownGuests, guest: m.GuestPlan | str | None, reason: str,
              retryable: bool, tail: str) -> m.GuestFailed:
        name = (guest if isinstance(guest, str) else guest.name if guest else "")[:200]
        reason = reason[:1000]  # never a 100 kB value echoed whole
        log(LOG, logging.ERROR, "guest failed", guest=name, reason=reason, retryable=retryable)
        return m.GuestFailed.new(job_id=cmd.job_id[:200], deadline=cmd.deadline, guest=name, node=self.node,
                                 reason=reason, retryable=retryable, console_tail=tail[-4000:])

    # -- teardown ---------------------------------------------------------------------------------------

    def on_teardown_guests(self, cmd: m.TeardownGuests) -> None:
        try:
            trust.check_teardown(cmd)
        except trust.Refused as exc:
            self.publisher.publish(self._fail(cmd, None, f"refused by node {self.node}: {exc}", False, ""))
            return
        # Answered as soon as the job's domains are gone (nothing of the job runs here any more): the scheduler
        # keeps the job in its queue until the epilogue has every node's answer. The files follow the answer;
        # a worker that dies in between has its command redelivered, and reconciliation removes what is left
        # (guest directories without a domain, orphan job files, idle job networks: reconcile.py).
        try:
            # A requeue: the job's guests here checkpointed first (when it asked); an end for good: its
            # checkpoints go (checkpoint.py). Before the answer: the requeued job may start at once.
            self.checkpoints.at_teardown(cmd.job_id)
        except (HypervisorError, OSError, trust.Refused) as exc:
            log(LOG, logging.ERROR, "checkpoint at teardown failed", job_id=cmd.job_id, error=str(exc))
        try:
            with _phase("destroy guests"):
                result = self.destroy_job(cmd.job_id)
            reason = "; ".join(f"{n}: {why}" for n, why in sorted(result.failed.items()))
        except HypervisorError as exc:
            # libvirtd down or wedged: the epilogue hears so now (not after its deadline), reconciliation retries.
            result, reason = Teardown(removed=[], disks_removed=0, failed={}), f"libvirt: {exc}"
        thread, answered = None, threading.Event()
        if result.undefine:
            # Killed guests' domains: libvirt's destroy waits for their QEMUs to be reaped (seconds here), so off
            # the node's queue: the next job's boot does not wait for this one's clean-up. Listed and started
            # before the answer goes out (whoever hears the answer finds it among teardown_threads and can join
            # it: a thread not yet started cannot be joined); it waits for the answer to be out before it
            # touches a file, so the answer never waits for the files.
            thread = threading.Thread(target=contextvars.copy_context().run,
                                      args=(self._files_after_answer, answered, cmd.job_id, result),
                                      name="teardown-files", daemon=True)
            with self._thread_lock:
                self.teardown_threads = [t for t in self.teardown_threads if t.is_alive()] + [thread]
            thread.start()
        try:
            self.publisher.publish(m.GuestsTornDown.new(
                job_id=cmd.job_id, deadline=cmd.deadline, node=self.node, guests=result.removed,
                disks_removed=result.disks_removed, not_removed=sorted(result.failed), reason=reason[:1000]))
        finally:
            answered.set()
        if thread is None:
            self._files_after(cmd.job_id, result)  # unlinks and rmdirs: milliseconds

    def _files_after_answer(self, answered: threading.Event, job_id: str, result: Teardown) -> None:
        answered.wait()
        self._files_after(job_id, result)

    def _files_after(self, job_id: str, result: Teardown) -> None:
        with _phase("remove guest files"):
            self.remove_job_files(job_id, result)

    def _remove_job_shmem(self, job_id: str) -> None:
        """The job's ivshmem region on this node (QEMU leaves it in /dev/shm), once its guests here are gone."""
        try:
            vrdma.remove_shmem(vrdma.shmem_name(job_id, vrdma.node_secret(self.config.state_dir)))
        except OSError as exc:
            log(LOG, logging.WARNING, "shared memory not removed", error=str(exc))

    def _remove_job_network(self, job_id: str) -> None:
        """The job's network on this node, once no guest of the job is left on this host's libvirt (two node
        workers of a test host share its bridge)."""
        if any(meta.get("job") == job_id for meta in self.hv.vtorque_domains().values()):
            return
        for vni, holder in self.segments.present().items():
            if holder == job_id and not self.segments.remove(vni, job_id):
                log(LOG, logging.WARNING, "job network not removed yet: a tap is still on it", vni=vni)

    def remove_idle_networks(self) -> list[int]:
        """Reconciliation's part: job networks with no guest of their job on this host and no boot of it under
        way, removed once two rounds in a row found them so (another node worker of a test host may be between
        making one and starting its guest)."""
        with self._thread_lock:
            booting = set(self._booting_jobs)
        jobs_here = {meta.get("job") for meta in self.hv.vtorque_domains().values()} | booting
        try:
            present = self.segments.present()
        except SegmentError as exc:
            log(LOG, logging.WARNING, "reconcile: job networks not looked at", error=str(exc))
            return []
        idle = {vni for vni, job in present.items() if job not in jobs_here and not self.segments.ports(vni)}
        removed = [vni for vni in sorted(idle & self._idle_segments) if self.segments.remove(vni, present[vni])]
        self._idle_segments = idle - set(removed)
        for vni in removed:
            log(LOG, logging.WARNING, "reconcile: removed a job network no guest uses", vni=vni, job=present[vni])
        return removed

    def guest_roots(self) -> list[str]:
        return self._roots()

    def remove_guest(self, name: str, job_id: str | None) -> None:
        """Reconciliation's removal of one guest: domain, files, and the launcher's file for it."""
        self.hv.remove(name)
        self._remove_disks(name)
        if job_id and trust.JOB_ID.match(job_id) and ".." not in job_id:
            jdir = self.config.job_dir(job_id)
            (jdir / f"{name}.json").unlink(missing_ok=True)
            try:
                jdir.rmdir()
            except OSError:
                pass  # gone already, or other guests' files are still there

    def remove_orphan_job_files(self) -> None:
        """The launcher's guest files of this node whose guest is gone (e.g. removed while this worker was down)."""
        jobs = Path(self.config.state_dir) / "jobs"
        if trust.is_safe_dir(jobs):
            return
        alive = set(self.hv.vtorque_domains()) | self.booting_now()
        for job_file in jobs.glob("*/*.json") if jobs.exists() else []:
            if job_file.stem not in alive and self._is_mine(job_file):
                job_file.unlink(missing_ok=True)
                try:
                    job_file.parent.rmdir()
                except OSError:
                    pass  # other guests' files are still there

    def _is_mine(self, job_file: Path) -> bool:
        try:
            return json.loads(job_file.read_text()).get("node") == self.node
        except (OSError, ValueError):
            return False

    def teardown_job(self, job_id: str) -> Teardown:
        """The whole teardown of the job's guests here, files included (what the handler does around its answer)."""
        result = self.destroy_job(job_id)
        self.remove_job_files(job_id, result)
        return result

    def destroy_job(self, job_id: str) -> Teardown:
        """Stop the job's guests on this node, side by side: each QEMU is killed and waited for (Hypervisor.kill,
        milliseconds), or, where that cannot be done, destroyed and undefined through libvirt (which takes a
        while per QEMU). A killed guest's domain is undefined after the answer (`remove_job_files`). Then its
        ivshmem region goes when no guest of the job is left on this host (an unlink; reconciliation could not
        tell whose a region is, its name being keyed). Which files are to go is in the answer; a guest whose
        domain could not be removed keeps its disks (QEMU may have them open)."""
        domains = self.hv.vtorque_domains()
        names = [name for name, meta in domains.items()
                 if meta.get("job") == job_id and meta.get("node", self.node) == self.node]
        with concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, len(names)), thread_name_prefix="destroy"
        ) as pool:
            outcomes = dict(zip(names, pool.map(self._stop_domain, names), strict=True))
        failed = {name: why for name, why in outcomes.items() if why and why != KILLED}
        removed = sorted(name for name in names if name not in failed)
        named = {name for name in names if trust.GUEST_NAME.match(name)}  # only such names are paths of ours
        leftovers = {name for root in self._roots() for name in disks.guests_of_job(root, job_id)
                     if _node_of(Path(root) / name) in (self.node, None)}
        files = ((named & set(removed)) | leftovers) - set(failed)
        if not failed and not any(meta.get("job") == job_id and name not in names for name, meta in domains.items()):
            self._remove_job_shmem(job_id)
        return Teardown(removed=removed, disks_removed=len(leftovers & files), failed=failed,
                        files=frozenset(files), job_files=frozenset((named | leftovers) - set(failed)),
                        undefine=frozenset(n for n, why in outcomes.items() if why == KILLED))

    def _stop_domain(self, name: str) -> str:
        """KILLED when the guest's QEMU was killed and has exited (its domain is still to be undefined), '' once
        the domain is gone through libvirt, else why not."""
        return KILLED if self.hv.kill(name) else self._remove_domain(name)

    def remove_job_files(self, job_id: str, result: Teardown) -> None:
        """After the answer: the disks and guest directories, the launcher's job files, and the job network when
        its last guest on this host is gone; first the domains of the guests that were killed (libvirt's destroy
        then finds their QEMU gone and only cleans up). A failure is logged; reconciliation retries (reconcile.py):
        a domain whose job is over, guest directories without a domain, orphan job files, idle job networks."""
        names = sorted(result.undefine)
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(names)),
                                                   thread_name_prefix="undefine") as pool:
            failed = {n: why for n, why in zip(names, pool.map(self._remove_domain, names), strict=True) if why}
        removed_disks = 0
        for name in sorted(result.files - set(failed)):
            try:
                removed_disks += self._remove_disks(name)
            except OSError as exc:
                failed[name] = f"its files: {exc}"
        jdir = self.config.job_dir(job_id)
        for name in result.job_files - set(failed):
            (jdir / f"{name}.json").unlink(missing_ok=True)
        try:
            if jdir.exists() and not any(jdir.iterdir()):
                jdir.rmdir()
        except OSError:
            pass  # a guest file of another node worker of this host appeared meanwhile
        try:
            self._remove_job_network(job_id)
        except (SegmentError, HypervisorError) as exc:
            log(LOG, logging.WARNING, "job network not removed", error=str(exc))
        log(LOG, logging.INFO if not (failed or result.failed) else logging.ERROR, "guests removed",
            guests=result.removed, disks=removed_disks, not_removed=sorted({*result.failed, *failed}))

    def _remove_domain(self, name: str) -> str:
        """'' once the domain is gone, else why not. libvirt's destroy fails now and then on a QEMU slow to die
        (SIGKILL not yet reaped: 'Device or resource busy'), so it is asked again before giving up."""
        why = ""
        for attempt in range(REMOVE_ATTEMPTS):
            try:
                self.hv.remove(name)
                return ""
            except HypervisorError as exc:
                why = str(exc)
                log(LOG, logging.WARNING, "guest not removed", guest=name, attempt=attempt + 1, error=why)
                if attempt + 1 < REMOVE_ATTEMPTS:
                    time.sleep(REMOVE_RETRY_DELAY)
        return why


@dataclass(frozen=True)
class Teardown:
    removed: list[str]
    disks_removed: int  # guest directories (disks) of the job here, removed right after the answer
    failed: dict[str, str]  # guest → why it is still there
    files: frozenset[str] = frozenset()  # guests whose directories go after the answer
    job_files: frozenset[str] = frozenset()  # guests whose launcher's job files go after the answer
    undefine: frozenset[str] = frozenset()  # guests killed before the answer, their domains undefined after it


def _node_of(gdir: Path) -> str | None:
    text = disks.read_small(gdir, "node")
    return text.strip() if text is not None else None


@contextmanager
def _phase(name: str):
    with tracing.tracer().start_as_current_span(name) as span:
        yield span
