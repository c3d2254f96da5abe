"""Checkpoint across a requeue (issue 14 item 2): a VM job that asked for it (`-vm checkpoint=requeue` or an
interval, or the site's `[spec] default_checkpoint`) restarts from a checkpoint of its guests, memory and disks,
when the scheduler requeues or preempts it, instead of from the start.

- **When.** At the job's teardown (the epilogue's TeardownGuests), before its guests are stopped, the node worker
  asks the scheduler whether this end is a requeue (`is_requeue`: the job is queued again, or Slurm's Restarts
  grew past the count the job booted with: Slurm counts a requeue at once, while the job is still COMPLETING).
  If it is, the job's guests here are checkpointed; if the job ended for good, its checkpoints are removed. A
  node that fails cannot checkpoint then: for that, a job with an interval is checkpointed every so often while
  it runs (its guests stop for the save and restore), by the reconciler.
- **Consistent across the job's guests.** All the job's guests here are paused first, then each is saved
  (virDomainSave: its memory; QEMU exits, so its disks are as at the pause) and its overlay and data disk copied;
  no guest runs between its pause and its save, so the job's guests on every node together are one consistent
  cut (what one sent before its pause the other received before its own, or TCP sends again after the restore).
  Each guest's part ends with its record (`<rank>.json`, synced after its memory and disks were): a checkpoint
  (an *epoch*, `r<restarts>` for a requeue — the same word on every node of the job — or `p<time>` for a periodic
  one) is complete only when every rank of the job has its record, and a half-written one is never restored.
- **Where.** `[node] checkpoint_dir` (default `<state_dir>/checkpoints`; on a cluster, storage every compute node
  sees: a requeued job may start elsewhere), keyed by job and rank, never by node: `<dir>/<job>/<epoch>/<rank>
  .{save,qcow2,data,json}`. Root's alone (0700 directories, 0600 files): the owner's data; a directory that is not
  root's alone (a user's, or others may write it), a link, a file not root's, a record of another job or owner is
  never read, written into or restored.
- **Restore.** The requeued job's BootGuests restores each guest from the newest complete checkpoint whose part
  for its rank has this job's owner and the guest's shape (image, vCPUs, RAM, the job's guest count); else it
  boots cold and the boot span (`vtorque.checkpoint.why`) and log say why. The restored guest gets this boot's
  name, directory and metadata (save_image.py, warm_boot.restore_xml), its clock over its channel, and is ready
  once its sshd answers; its programs carry on where they were.
- **Gone** when the job ends for good: its teardown on any node removes the job's checkpoints; reconciliation
  removes those of a job the scheduler says ended or forgot, on the node that wrote rank 0 (`job.json`), so one
  node asks, not all; an older checkpoint goes once a newer one is complete.

The decisions (`is_requeue`, `complete`, `choose`, `periodic_due`, the records) are pure; `Checkpoints` does the
I/O for its node worker.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import re
import shutil
import subprocess
import time
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path

import libvirt
from opentelemetry import trace

from vtorque.shared import messages as m
from vtorque.shared import tracing
from vtorque.shared.config import ImageEntry
from vtorque.shared.job_network import guest_mac
from vtorque.shared.logs import log
from vtorque.shared.scheduler import JobInfo, SchedulerError
from vtorque.shared.spec import ramdisk_mib

from . import disks, guest_link, job_cgroup, numa, root_files, suspend, trust
from .domain import USER_NET_MAC, BootSource, GuestMetadata, JobNic, domain_xml
from .hypervisor import HypervisorError
from .readiness import BootFailed, ssh_banner
from .save_image import SaveImageError, copy_with_xml, read_header
from .seed import seed_files
from .warm_boot import PATH, RESTORE_COPY, RestoreFailed, restore_xml

LOG = logging.getLogger("vtorque.node_worker.checkpoint")
SAVE, DISK, DATA, RECORD = ".save", ".qcow2", ".data", ".json"
JOB_RECORD = "job.json"  # in the job's directory: who reconciles it (the node of its rank 0)
NOTE = "checkpoint.json"  # in the guest's directory: what its boot knew (the job's request, its restarts then)
WHY = "vtorque.checkpoint.why"
EPOCH = re.compile(r"^[rpt][0-9]{1,20}$")
ENDED = frozenset({"completed", "failed", "cancelled"})  # the scheduler's words for a job that will not run again
PARALLEL = 8
BANNER_POLL = 0.1


# -- records (pure) -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Part:
    """One guest's part of a checkpoint, as its record says (written last, after its files were on disk)."""

    job_id: str
    epoch: str
    index: int  # the guest's rank
    count: int  # the job's guests in all
    uid: int  # the owner's
    user: str
    digest: str  # image
    vcpus: int
    ram_mib: int
    saved_dir: str  # the guest's directory when it was saved (its paths in the saved XML)
    save_size: int
    disk_size: int
    data_name: str | None  # the data disk's file name in the guest's directory (data.qcow2, data.raw), if any
    data_size: int
    node: str
    taken: float  # wall clock


@dataclass(frozen=True)
class Note:
    """What a checkpointing guest's boot recorded in its directory."""

    job_id: str
    index: int
    count: int
    interval: int  # 0: on a requeue only; N: also every N s
    restarts: int | None  # the scheduler's count when the job booted (None: it could not be asked)
    last: float  # wall clock of the boot or the last periodic checkpoint
    uid: int  # the owner, as the boot checked it (trust.check_owner)
    user: str
    digest: str  # the guest's shape: image, vCPUs, RAM
    vcpus: int
    ram_mib: int


def encode(record: Part | Note) -> bytes:
    return json.dumps(asdict(record), sort_keys=True).encode()


def _typed(cls, doc: object):
    """`cls` from a JSON object whose every field has its declared type, else None (never a guess)."""
    if not isinstance(doc, dict) or set(doc) != set(cls.__dataclass_fields__):
        return None
    for name, field in cls.__dataclass_fields__.items():
        value, kind = doc[name], str(field.type)
        if kind.endswith("| None") and value is None:
            continue
        want = (int,) if kind.startswith("int") else (int, float) if kind.startswith("float") else (str,)
        if isinstance(value, bool) or not isinstance(value, want):
            return None
    return cls(**doc)


def decode_part(data: bytes | None) -> Part | None:
    try:
        return _typed(Part, json.loads(data)) if data is not None else None
    except ValueError:
        return None


def decode_note(data: bytes | None) -> Note | None:
    try:
        return _typed(Note, json.loads(data)) if data is not None else None
    except ValueError:
        return None


# -- decisions (pure) ---------------------------------------------------------------------------------------

def is_requeue(info: JobInfo | None, restarts_at_boot: int | None) -> bool:
    """Whether the job whose guests are torn down will run again: the scheduler has it queued again (a requeue,
    a preemption that requeues, Torque's qrerun), or its restart count grew since it booted (Slurm counts the
    requeue at once: the job is COMPLETING while its epilogue runs). A job the scheduler no longer knows, or one
    that ended, will not."""
    if info is None:
        return False
    if info.state == "queued":
        return True
    if info.state in ENDED:
        return False
    return info.restarts is not None and restarts_at_boot is not None and info.restarts > restarts_at_boot


def requeue_epoch(info: JobInfo | None, now: float) -> str:
    """The checkpoint's name at a requeue: `r<restarts>`, the same on every node of the job (the scheduler's count);
    `t<time>` when the scheduler gives no count (each node's parts then differ: only a one-node job's is complete)."""
    if info is not None and info.restarts is not None:
        return f"r{info.restarts}"
    return f"t{int(now)}"


def periodic_due(note: Note, now: float) -> bool:
    return note.interval > 0 and now - note.last >= note.interval


def complete(parts: list[Part]) -> bool:
    """Every rank of the job has its part, all of one job, owner and size."""
    if not parts:
        return False
    first = parts[0]
    same = all((p.job_id, p.uid, p.count, p.epoch) == (first.job_id, first.uid, first.count, first.epoch)
               for p in parts)
    return same and sorted(p.index for p in parts) == list(range(first.count))


def newest_complete(epochs: dict[str, list[Part]]) -> str | None:
    done = [(max(p.taken for p in parts), epoch) for epoch, parts in epochs.items() if complete(parts)]
    return max(done)[1] if done else None


def why_not(guest: m.GuestPlan) -> str | None:
    """Why this guest cannot be checkpointed at all, or None."""
    if guest.vrdma:
        return "a guest with vRDMA devices cannot be saved"
    return None


def choose(epochs: dict[str, list[Part]], job_id: str, guest: m.GuestPlan, count: int) -> tuple[Part | None, str]:
    """This guest's part of the newest complete checkpoint of its job, or None and why (for the boot's span and
    log). A part of another job or owner, of another shape, or of a checkpoint not complete is never taken."""
    if not epochs:
        return None, f"no checkpoint of job {job_id}"
    epoch = newest_complete(epochs)
    if epoch is None:
        saved = {e: sorted(p.index for p in parts) for e, parts in epochs.items()}
        return None, f"no complete checkpoint of job {job_id} (ranks saved: {saved}, of {count})"
    part = next((p for p in epochs[epoch] if p.index == guest.index), None)
    if part is None:
        return None, f"checkpoint {epoch} has no part for rank {guest.index}"
    if part.job_id != job_id or part.epoch != epoch:
        return None, f"checkpoint {epoch} is not job {job_id}'s"
    if (part.uid, part.user) != (guest.owner.uid, guest.owner.user):
        return None, f"checkpoint {epoch} is not {guest.owner.user}'s"
    want = (guest.image_digest, guest.vcpus, guest.ram_mib, count, guest.disk is not None)
    have = (part.digest, part.vcpus, part.ram_mib, part.count, part.data_name is not None)
    if want != have:
        return None, (f"checkpoint {epoch} is of another shape (image {part.digest[:12]}, {part.vcpus} vCPUs, "
                      f"{part.ram_mib} MiB, {part.count} guests; this boot: {guest.image_digest[:12]}, "
                      f"{guest.vcpus}, {guest.ram_mib}, {count})")
    return part, f"checkpoint {epoch}"


# -- the node's checkpoints (I/O) ---------------------------------------------------------------------------

class Checkpoints:
    """`worker`: the NodeWorker (its hypervisor, config, scheduler, clock and guest directories)."""

    def __init__(self, worker):
        self.worker = worker
        self._told: set[str] = set()  # jobs whose periodic checkpoint was said to be impossible

    @property
    def root(self) -> Path:
        node = self.worker.config.node
        return Path(node.checkpoint_dir or Path(self.worker.config.state_dir) / "checkpoints")

    def job_dir(self, job_id: str) -> Path:
        return self.root / m.routing_word(trust.check_job_id(job_id))

    def _safe(self, path: Path) -> bool:
        return trust.is_safe_dir(path) is None and os.stat(path).st_mode & 0o077 == 0

    def epochs(self, job_id: str) -> dict[str, list[Part]]:
        """Every part root wrote of the job's checkpoints, by epoch, each checked against its files (a part
        whose memory or disk is missing, a link, not root's or not the size the record says is left out)."""
        try:
            jdir = self.job_dir(job_id)
        except trust.Refused:
            return {}
        if not jdir.exists() or trust.is_safe_dir(self.root) or not self._safe(jdir):
            return {}
        found: dict[str, list[Part]] = {}
        for entry in os.scandir(jdir):
            if not EPOCH.match(entry.name) or not trust.own_entry(jdir, entry.name) or not self._safe(Path(entry.path)):
                continue
            for record in Path(entry.path).glob(f"*{RECORD}"):
                part = decode_part(root_files.read_small(record))
                if part is None or str(part.index) != record.stem or part.epoch != entry.name \
                        or part.job_id != job_id or not self._files_whole(Path(entry.path), part):
                    continue
                found.setdefault(entry.name, []).append(part)
        return found

    @staticmethod
    def _files_whole(edir: Path, part: Part) -> bool:
        sizes = {SAVE: part.save_size, DISK: part.disk_size}
        if part.data_name is not None:
            sizes[DATA] = part.data_size
        for kind, size in sizes.items():
            st = root_files.root_file(edir / f"{part.index}{kind}")
            if st is None or st.st_size != size:
                return False
        return True

    # -- at boot ------------------------------------------------------------------------------------------

    def note_boot(self, cmd, guest: m.GuestPlan, gdir: Path) -> None:
        """A checkpointing guest's record of its boot: its request, and the scheduler's restart count now (what
        tells a requeue at its teardown). One scheduler question, for such jobs only."""
        restarts = None
        try:
            info = self.worker.scheduler.job(cmd.job_id)
            restarts = info.restarts if info is not None else None
        except SchedulerError as exc:
            log(LOG, logging.WARNING, "scheduler not answering: the job's restart count is not known", error=str(exc))
        note = Note(job_id=cmd.job_id, index=guest.index, count=len(cmd.peers), interval=guest.checkpoint or 0,
                    restarts=restarts, last=self.worker.clock.now(), uid=guest.owner.uid, user=guest.owner.user,
                    digest=guest.image_digest, vcpus=guest.vcpus, ram_mib=guest.ram_mib)
        root_files.write_atomic(gdir / NOTE, encode(note))

    def try_restore(self, cmd, guest: m.GuestPlan, entry: ImageEntry, base: Path, job_nic: JobNic | None,
                    deadline: float, t0: float) -> tuple[m.PhaseTimings, Path] | None:
        """The guest restored from its job's newest complete checkpoint and answering, or None (the caller boots
        it another way) with why in the span and the log."""
        span = trace.get_current_span()
        part, why = (None, why_not(guest) or "") if why_not(guest) else choose(self.epochs(cmd.job_id), cmd.job_id,
                                                                            guest, len(cmd.peers))
        if part is None:
            span.set_attributes({WHY: why[:500]})
            log(LOG, logging.INFO, "not restored from a checkpoint", guest=guest.name, why=why)
            return None
        try:
            result = self._restore(cmd, guest, entry, base, part, job_nic, deadline, t0)
        except (RestoreFailed, BootFailed, SaveImageError, HypervisorError, disks.DiskError, guest_link.LinkError,
                trust.Refused, OSError, libvirt.libvirtError, subprocess.SubprocessError) as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            log(LOG, logging.WARNING, "restore from a checkpoint failed: booting without it", guest=guest.name,
                epoch=part.epoch, error=reason)
            span.set_attributes({WHY: f"restore from checkpoint {part.epoch} failed: {reason}"[:500]})
            return None
        span.set_attributes({PATH: "checkpoint", WHY: why})
        log(LOG, logging.INFO, "guest restored from a checkpoint", guest=guest.name, epoch=part.epoch)
        if guest.index == 0:
            self._write_job_record(cmd.job_id, guest.owner.uid)  # this node reconciles the job's checkpoints now
        return result

    def _restore(self, cmd, guest: m.GuestPlan, entry: ImageEntry, base: Path, part: Part, job_nic: JobNic | None,
                 deadline: float, t0: float) -> tuple[m.PhaseTimings, Path]:
        w, hv = self.worker, self.worker.hv
        edir = self.job_dir(cmd.job_id) / part.epoch
        t_image = time.monotonic()
        mac = guest_mac(cmd.job_id, guest.index) if cmd.network else None
        seed = seed_files(guest, cmd.job_id, cmd.peers, cmd.network, mac, w.config.node.guest_mounts)
        root = w.config.node.ramdisk_dir if guest.fs_type == "ramdisk" else w.config.node.guest_dir
        cap = ramdisk_mib(guest.fs_type, guest.disk.size_mib if guest.disk else None,
                          bool(guest.disk and guest.disk.image), w.config.spec) or None
        files = disks.prepare(root, guest.name, cmd.job_id, base, entry.format, seed, store=w.config.images.store,
                              node=w.node, memory_cap_mib=cap)
        try:
            gdir = Path(files.overlay).parent
            # Its disks as they were at the checkpoint, on this node's copy of the image.
            os.unlink(files.overlay)
            root_files.copy_atomic(edir / f"{part.index}{DISK}", Path(files.overlay))
            disks._run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", entry.format, "-b", str(base),
                        files.overlay])
            if part.data_name is not None:
                root_files.copy_atomic(edir / f"{part.index}{DATA}", gdir / part.data_name)
            t_disks = time.monotonic()
            guest_link.start(gdir, guest.owner.uid, USER_NET_MAC)
            meta = GuestMetadata(job_id=cmd.job_id, owner=guest.owner.user, deadline=cmd.deadline,
                                 index=guest.index, node=w.node, end_by=guest.end_by)
            fresh = domain_xml(guest, files, BootSource(entry.kernel, entry.initrd, entry.cmdline), meta,
                               w.domain_type, job_nic, numa_topology=numa.host_topology(), host_channel=True)
            save = edir / f"{part.index}{SAVE}"
            # Saved on this node as this very guest: its paths are this directory's already (nothing to move).
            moved_from = part.saved_dir if part.saved_dir != str(gdir) else "\0"
            xml = restore_xml(read_header(save).xml, fresh, moved_from, str(gdir))
            copy = gdir / RESTORE_COPY
            copy_with_xml(save, copy, xml)
            t_define = time.monotonic()
            try:
                hv.timed("restore", lambda: hv.conn.restoreFlags(str(copy), None, libvirt.VIR_DOMAIN_SAVE_PAUSED),
                         timeout=hv.start_timeout)
            finally:
                copy.unlink(missing_ok=True)  # a copy of the owner's memory: not kept
            dom = hv.lookup(guest.name)
            if dom is None:
                raise RestoreFailed("the restored domain is not there")
            if w.config.node.job_cgroup:
                try:
                    job_cgroup.adopt(w.config.node.job_cgroup, w.config.node.job_cgroup_root, guest.name,
                                     cmd.job_id, guest.owner.uid, w.node)
                except OSError as exc:  # the watcher tries again, as for a cold guest
                    log(LOG, logging.WARNING, "guest not moved into its job's cgroup", guest=guest.name,
                        error=str(exc))
            hv.resume(dom)
            t_start = time.monotonic()
            clock = suspend.set_clock(w, guest.name)
            ssh_socket = gdir / guest_link.SSH_SOCKET
            while not ssh_banner(ssh_socket, timeout=1.0):
                if time.monotonic() > deadline or not hv.is_active(guest.name):
                    raise BootFailed("the restored guest's sshd did not answer", True)
                time.sleep(BANNER_POLL)
            log(LOG, logging.INFO, "restored guest answering", guest=guest.name, clock=clock)
        except BaseException:
            try:
                hv.remove(guest.name)
            finally:
                w._remove_disks(guest.name)
            raise
        now = time.monotonic()
        return m.PhaseTimings(image=t_image - t0, disks=t_disks - t0, define=t_define - t0, start=t_start - t0,
                              kernel_up=None, ready=now - t0), ssh_socket

    # -- taking one ---------------------------------------------------------------------------------------

    def _guests_of(self, job_id: str) -> list[tuple[str, Path, Note]]:
        """The job's guests on this node that asked for checkpoints: (domain, directory, its boot's note)."""
        w = self.worker
        out = []
        for name, meta in w.hv.vtorque_domains().items():
            if meta.get("job") != job_id or meta.get("node", w.node) != w.node:
                continue
            gdir = suspend.guest_dir_of(w, name)
            note = decode_note(root_files.read_small(gdir / NOTE)) if gdir else None
            if gdir is not None and note is not None and note.job_id == job_id:
                out.append((name, gdir, note))
        return sorted(out, key=lambda g: g[2].index)

    def take(self, job_id: str, epoch: str, guests: list[tuple[str, Path, Note]], resume: bool = False
             ) -> dict[str, str]:
        """A checkpoint `epoch` of the job's `guests` here: all paused, then each saved with its disks, its record
        last. `resume`: each restored and running again after (a periodic checkpoint); else they stay shut off
        (a teardown follows). Returns guest → why not, for those that could not be saved."""
        hv = self.worker.hv
        edir = root_files.private_dir(self.job_dir(job_id))
        edir = root_files.private_dir(edir / epoch)
        doms = {}
        for name, _, _ in guests:
            dom = hv.lookup(name)
            if dom is None:
                continue
            state = hv.timed(f"the state of {name}", dom.state)[0]
            if state == libvirt.VIR_DOMAIN_RUNNING:
                hv.timed("suspend", dom.suspend, timeout=hv.change_timeout)  # first: one consistent moment
            if state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED):
                doms[name] = dom
        failed = {name: "its domain is not running" for name, _, _ in guests if name not in doms}

        def one(g: tuple[str, Path, Note]) -> str:
            name, gdir, note = g
            try:
                self._save_part(job_id, epoch, edir, name, doms[name], gdir, note)
            except (HypervisorError, libvirt.libvirtError, OSError, SaveImageError, trust.Refused) as exc:
                log(LOG, logging.ERROR, "guest not checkpointed", guest=name, job_id=job_id, epoch=epoch,
                    error=str(exc))
                return str(exc)
            return ""

        todo = [g for g in guests if g[0] in doms]
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(len(todo), PARALLEL)),
                                                   thread_name_prefix="checkpoint") as pool:
            outcomes = list(pool.map(one, todo))
        failed |= {g[0]: why for g, why in zip(todo, outcomes, strict=True) if why}
        if any(g[2].index == 0 for g in todo):
            self._write_job_record(job_id, todo[0][2].uid)
        if resume:
            for name, _, _ in todo:
                self._back(name, edir / f"{next(g[2].index for g in todo if g[0] == name)}{SAVE}")
        self._drop_older(job_id)
        return failed

    def _save_part(self, job_id: str, epoch: str, edir: Path, name: str, dom, gdir: Path, note: Note) -> None:
        w = self.worker
        i = note.index
        (edir / f"{i}{RECORD}").unlink(missing_ok=True)  # this rank's part is not complete until written again
        save = edir / f"{i}{SAVE}"
        suspend.save_guest(w, name, dom, save)
        root_files.sync_file(save)
        # QEMU has exited: its disks are as they were at the pause.
        disk_size = root_files.copy_atomic(gdir / "root.qcow2", edir / f"{i}{DISK}")
        data_name, data_size = None, 0
        for candidate in ("data.qcow2", "data.raw"):
            if os.path.isfile(gdir / candidate) and not os.path.islink(gdir / candidate):
                data_name, data_size = candidate, root_files.copy_atomic(gdir / candidate, edir / f"{i}{DATA}")
        read_header(save)  # a save file libvirt wrote whole, or SaveImageError
        part = Part(job_id=job_id, epoch=epoch, index=i, count=note.count, uid=note.uid, user=note.user,
                    digest=note.digest, vcpus=note.vcpus, ram_mib=note.ram_mib, saved_dir=str(gdir),
                    save_size=save.stat().st_size, disk_size=disk_size, data_name=data_name,
                    data_size=data_size, node=w.node, taken=w.clock.now())
        root_files.write_atomic(edir / f"{i}{RECORD}", encode(part), sync=True)  # last: the part is complete
        log(LOG, logging.INFO, "guest checkpointed", guest=name, job_id=job_id, epoch=epoch,
            memory_bytes=part.save_size, disk_bytes=disk_size + data_size)

    def _back(self, name: str, save: Path) -> None:
        """After a periodic checkpoint: the guest restored from it and running, its clock set."""
        w = self.worker
        try:
            suspend.restore_guest(w, name, save, paused=True)
            dom = w.hv.lookup(name)
            if dom is not None:
                w.hv.resume(dom)
            suspend.set_clock(w, name)
        except (HypervisorError, libvirt.libvirtError, OSError) as exc:
            log(LOG, logging.ERROR, "guest not running again after its checkpoint", guest=name, error=str(exc))

    def _write_job_record(self, job_id: str, uid: int) -> None:
        doc = {"job_id": job_id, "node": self.worker.node, "uid": uid}
        root_files.write_atomic(root_files.private_dir(self.job_dir(job_id)) / JOB_RECORD,
                                json.dumps(doc).encode())

    def _drop_older(self, job_id: str) -> None:
        """Once a checkpoint is complete, every older one of the job goes (complete or not)."""
        epochs = self.epochs(job_id)
        newest = newest_complete(epochs)
        if newest is None:
            return
        taken = max(p.taken for p in epochs[newest])
        jdir = self.job_dir(job_id)
        for entry in os.scandir(jdir):
            if entry.name == newest or not EPOCH.match(entry.name) or not trust.own_entry(jdir, entry.name):
                continue
            parts = epochs.get(entry.name, [])
            if not parts or max(p.taken for p in parts) < taken:
                _rmtree(Path(entry.path))

    def remove_job(self, job_id: str) -> bool:
        """Every checkpoint of the job: it ended for good. True if there was one."""
        if trust.is_safe_dir(self.root):
            return False
        try:
            jdir = self.job_dir(job_id)
        except trust.Refused:
            return False
        if not trust.own_entry(self.root, jdir.name):
            return False
        _rmtree(jdir)
        log(LOG, logging.INFO, "checkpoints removed: the job ended", job_id=job_id)
        return True

    # -- the teardown, and the reconciler's rounds ---------------------------------------------------------

    def at_teardown(self, job_id: str) -> dict[str, str]:
        """Before the job's guests here are stopped: checkpointed when this end is a requeue, or the job's
        checkpoints removed when it ended for good. Nothing (not even a scheduler question) for a job that never
        asked for checkpoints. Returns guest → why not, for guests that should have been and were not saved."""
        guests = self._guests_of(job_id)
        if not guests and not os.path.lexists(self.job_dir(job_id)):
            return {}
        try:
            info = self.worker.scheduler.job(job_id)
            known = True
        except SchedulerError as exc:
            info, known = None, False
            log(LOG, logging.WARNING, "scheduler not answering at teardown: checkpointing to be safe", job_id=job_id,
                error=str(exc))
        restarts = min((g[2].restarts for g in guests if g[2].restarts is not None), default=None)
        if guests and (not known or is_requeue(info, restarts)):
            epoch = requeue_epoch(info, self.worker.clock.now())
            log(LOG, logging.INFO, "the job is requeued: checkpointing its guests", job_id=job_id, epoch=epoch,
                guests=[g[0] for g in guests], restarts=info.restarts if info else None)
            with tracing.tracer().start_as_current_span(
                    "checkpoint guests", attributes={tracing.JOB_ID: job_id, "vtorque.node": self.worker.node,
                                                     "vtorque.checkpoint.epoch": epoch}) as span:
                failed = self.take(job_id, epoch, guests)
                if failed:
                    tracing.mark_error(span, "; ".join(f"{n}: {why}" for n, why in sorted(failed.items()))[:500])
                return failed
        # An end for good: the scheduler says the job ended or forgot it, or its guests here end without a requeue.
        # A teardown that finds no guest of a job the scheduler still has (one redelivered after the requeued job
        # started again) removes nothing.
        if known and (info is None or info.state in ENDED or guests):
            self.remove_job(job_id)
        return {}

    def reconcile(self, guests: dict[str, str], state_of) -> None:
        """One round: the periodic checkpoints that are due (jobs the scheduler says run), and the checkpoints of
        jobs that ended, of which this node wrote rank 0."""
        self._periodic(set(guests.values()), state_of)
        self._orphans(state_of)

    def _periodic(self, jobs: set[str], state_of) -> None:
        now = self.worker.clock.now()
        for job_id in sorted(jobs):
            guests = self._guests_of(job_id)
            if not guests or not any(periodic_due(g[2], now) for g in guests) or state_of(job_id) != "running":
                continue
            if len(guests) != guests[0][2].count:
                if job_id not in self._told:
                    self._told.add(job_id)
                    log(LOG, logging.WARNING, "no periodic checkpoint of a job on several nodes (not consistent "
                        "without the other nodes pausing too): it is checkpointed when it is requeued",
                        job_id=job_id)
                continue
            self.take(job_id, f"p{int(now)}", guests, resume=True)
            for _, gdir, note in guests:
                root_files.write_atomic(gdir / NOTE, encode(Note(**{**asdict(note), "last": now})))

    def _orphans(self, state_of) -> None:
        if not self.root.exists() or trust.is_safe_dir(self.root):
            return
        for entry in os.scandir(self.root):
            if not trust.own_entry(self.root, entry.name):
                continue
            job_id = self._reconciled_here(Path(entry.path))
            if job_id is None:
                continue
            state = state_of(job_id)
            if state in ENDED or state == "gone":
                log(LOG, logging.WARNING, "reconcile: removing the checkpoints of a job that ended", job_id=job_id,
                    state=state)
                self.remove_job(job_id)

    def _reconciled_here(self, jdir: Path) -> str | None:
        """The job whose checkpoints `jdir` holds, when this node is the one to judge them: the node of its rank 0
        (job.json), else, without that record (rank 0's node died before it wrote it), a node that wrote a part."""
        try:
            doc = json.loads(root_files.read_small(jdir / JOB_RECORD) or b"null")
        except ValueError:
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("job_id"), str):
            job_id, mine = doc["job_id"], doc.get("node") == self.worker.node
        else:
            job_id = urllib.parse.unquote(jdir.name)  # messages.routing_word's escapes undone
            mine = None
        try:
            if self.job_dir(job_id).name != jdir.name:
                return None
        except trust.Refused:
            return None
        if mine is None:
            mine = any(p.node == self.worker.node for parts in self.epochs(job_id).values() for p in parts)
        return job_id if mine else None


def _rmtree(path: Path) -> None:
    assert shutil.rmtree.avoids_symlink_attacks
    shutil.rmtree(path, ignore_errors=True)
