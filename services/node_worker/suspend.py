"""Suspend and resume through the scheduler (issue 14 item 1): the scheduler is the one source of truth.

Nothing here is asked for by a message. Each reconcile round (reconcile.py) asks the scheduler for the job of
every guest on this node; a job it says is suspended (Slurm `scontrol suspend`, Torque `qsig -s suspend`, which
only their operators may ask: `vtorque suspend` asks them, never a node worker) has its guests here
- paused (`[node] suspend = "pause"`, the default): virDomainSuspend, QEMU runs no guest instruction, its memory
  stays where it is, a resume takes milliseconds; or
- saved (`"save"`): virDomainSave into `<suspend_dir>/<guest>.save`, QEMU exits and the node's memory is free;
and once the scheduler says the job runs again, resumed or restored, then given the host's clock over the
guest's host-only channel (identity_channel.py: a paused or saved guest's clock stood still). So a user can make
root pause or resume nothing the scheduler's operators did not: the node worker acts on the scheduler's answer
alone, for the job's own guests (their domain metadata), in its own root-owned files.

What root keeps of a suspension: `<suspend_dir>/<guest>.json` (how the guest was suspended, since when, and for
how long in all before: reconcile.py moves the job's walltime end by that much, as the scheduler stops the job's
walltime clock while it is suspended) and, in save mode, `<guest>.save` (the guest's memory: the owner's data).
Both root's, 0600, in a directory of root's alone (0700, trust.secure_dir), removed with the guest (teardown
and reconciliation: `remove`), and a file whose guest is gone is removed by reconciliation (`remove_orphans`).

`action` is pure (what to do with one guest, given the scheduler's word, the domain's state and the record);
`Suspender` does the I/O.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import libvirt

from vtorque.shared import tracing
from vtorque.shared.logs import log

from . import root_files, trust
from .domain import IDENTITY_SOCKET
from .guest_link import LINK_SOCKET, SAVED_MARK, SSH_SOCKET  # while saved, the link waits for the restored QEMU
from .hypervisor import HypervisorError
from .identity_channel import CLOCK_OK, ChannelError, IdentityChannel

LOG = logging.getLogger("vtorque.node_worker.suspend")
Mode = Literal["pause", "save"]
DomainState = Literal["running", "paused", "saved", "other"]
Action = Literal["none", "pause", "save", "resume", "restore", "settle"]
RECORD, SAVE = ".json", ".save"
CLOCK_TIMEOUT = 5.0  # s for a guest to take its clock after a resume (its init looks at its port every 0.25 s)
SMALL = 4096
PARALLEL = 8  # guests acted on at once (the libvirt calls themselves go through the hypervisor's own pool)


@dataclass(frozen=True)
class Suspension:
    """Root's record of one guest's suspensions on this node."""

    job_id: str
    mode: Mode = "pause"
    since: float | None = None  # wall clock when its current suspension began; None while it runs
    total: float = 0.0  # seconds it was suspended before the current suspension


def action(job_state: str | None, domain: DomainState, record: Suspension | None, mode: Mode) -> Action:
    """What to do with one guest of a job the scheduler says is `job_state` (None: it could not be asked), whose
    domain is `domain` ("saved": shut off with its save file here), given this node's record of it.

    Only the scheduler's "suspended" suspends, and only its "running" brings back, and only what this node
    suspended (a record with `since`): a guest paused by anything else (a pooled guest, a boot that starts its
    guest paused) is never resumed from here. Any other word (queued, exiting, ended, unknown) changes nothing:
    reconciliation removes the guests of a job that ended, suspended or not."""
    suspended_here = record is not None and record.since is not None
    if job_state == "suspended":
        return mode if domain == "running" else "none"
    if job_state == "running" and suspended_here:
        return {"paused": "resume", "saved": "restore", "running": "settle"}.get(domain, "none")  # type: ignore[return-value]
    return "none"


def suspended_seconds(record: Suspension | None, now: float) -> float:
    """How long the guest has been suspended in all, the current suspension included: the scheduler stopped the
    job's walltime clock that long, so the job ends that much later than start + walltime."""
    if record is None:
        return 0.0
    return record.total + (max(0.0, now - record.since) if record.since is not None else 0.0)


def started(record: Suspension | None, job_id: str, mode: Mode, now: float) -> Suspension:
    """The record of a suspension beginning now."""
    return Suspension(job_id=job_id, mode=mode, since=now, total=record.total if record else 0.0)


def ended(record: Suspension, now: float) -> Suspension:
    """The record once the guest runs again: the suspension's time added to the total."""
    return Suspension(job_id=record.job_id, mode=record.mode, since=None, total=suspended_seconds(record, now))


def encode(record: Suspension) -> bytes:
    return json.dumps({"job_id": record.job_id, "mode": record.mode, "since": record.since,
                       "total": record.total}).encode()


def decode(data: bytes) -> Suspension | None:
    try:
        doc = json.loads(data)
        mode: Mode = "save" if doc.get("mode") == "save" else "pause"
        since = doc.get("since")
        return Suspension(job_id=str(doc["job_id"]), mode=mode,
                          since=float(since) if since is not None else None, total=float(doc.get("total", 0.0)))
    except (ValueError, KeyError, TypeError):
        return None


def domain_state(libvirt_state: int, saved: bool) -> DomainState:
    if libvirt_state == libvirt.VIR_DOMAIN_RUNNING:
        return "running"
    if libvirt_state == libvirt.VIR_DOMAIN_PAUSED:
        return "paused"
    if libvirt_state == libvirt.VIR_DOMAIN_SHUTOFF and saved:
        return "saved"
    return "other"


class Suspender:
    """The node's suspended guests: their records and save files, and the libvirt calls that pause, save, resume
    and restore them. `worker` is the NodeWorker (its hypervisor, config, guest roots and job files)."""

    def __init__(self, worker):
        self.worker = worker

    # -- files -------------------------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        node = self.worker.config.node
        return Path(node.suspend_dir or Path(self.worker.config.state_dir) / "suspended")

    def directory(self) -> Path:
        """The directory, made root's, 0700, if it is not there; UnsafeDir if it is not root's alone."""
        return root_files.private_dir(self.root)

    def path(self, name: str, kind: str) -> Path:
        return self.root / f"{trust.check_guest_name(name)}{kind}"

    def record(self, name: str) -> Suspension | None:
        """The guest's record, when root wrote it in a directory still root's alone (never through a link)."""
        if trust.is_safe_dir(self.root):
            return None
        try:
            data = root_files.read_small(self.path(name, RECORD), SMALL)
        except trust.Refused:
            return None
        return decode(data) if data is not None else None

    def _write(self, name: str, record: Suspension) -> None:
        root_files.write_atomic(self.directory() / f"{trust.check_guest_name(name)}{RECORD}", encode(record))

    def has_save(self, name: str) -> bool:
        try:
            st = os.lstat(self.path(name, SAVE))
        except (OSError, trust.Refused):
            return False
        return stat.S_ISREG(st.st_mode) and st.st_uid == 0

    def remove(self, name: str) -> None:
        """The guest's record and save file (its memory), with the guest: teardown and reconciliation."""
        if trust.is_safe_dir(self.root):
            return
        for kind in (SAVE, RECORD):
            try:
                path = self.path(name, kind)
            except trust.Refused:
                return
            path.unlink(missing_ok=True)
            root_files.temp_of(path).unlink(missing_ok=True)  # a save or write cut short

    def remove_orphans(self, domains: set[str]) -> list[str]:
        """Records and save files of guests with no domain on this node (removed while this worker was down,
        or by hand): the owner's memory is not kept for a guest that is gone."""
        if trust.is_safe_dir(self.root):
            return []
        gone = []
        for entry in os.scandir(self.root):
            base = entry.name
            if base.startswith(".") and base.endswith(".tmp"):
                base = base[1:-4]  # a save or write cut short (the worker died in it): the owner's memory too
            name, dot, kind = base.rpartition(".")
            if not dot or f".{kind}" not in (RECORD, SAVE) or name.startswith(".") or name in domains:
                continue
            try:
                trust.check_guest_name(name)
            except trust.Refused:
                continue
            os.unlink(entry.path)
            gone.append(entry.name)
        for name in gone:
            log(LOG, logging.WARNING, "reconcile: removed a suspended guest's file without its domain", file=name)
        return gone

    # -- one round ---------------------------------------------------------------------------------------

    def reconcile(self, guests: dict[str, str], state_of, booting: set[str]) -> dict[str, Action]:
        """Each guest (name → job) as its job's state says; what was done to whom. The guests side by side (a
        job's guests on a node are suspended together; a save is seconds of disk, a clock waits for the host's
        next whole second)."""
        mode: Mode = self.worker.config.node.suspend
        todo = []
        for name, job_id in sorted(guests.items()):
            if name in booting:
                continue
            job_state = state_of(job_id)
            if job_state not in ("suspended", "running"):
                continue  # nothing to do, and no libvirt call for it
            record = self.record(name)
            dom = self.worker.hv.lookup(name)
            if dom is None:
                continue
            raw = self.worker.hv.timed(f"the state of {name}", dom.state)[0]
            what = action(job_state, domain_state(raw, self.has_save(name)), record, mode)
            if what != "none":
                todo.append((what, name, job_id, dom, record))
        if not todo:
            return {}
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(todo), PARALLEL),
                                                   thread_name_prefix="suspend") as pool:
            outcomes = list(pool.map(lambda t: self._traced(t[0], t[1], t[2], t[3], t[4], mode), todo))
        return {name: what for (what, name, *_), ok in zip(todo, outcomes, strict=True) if ok}

    def _traced(self, what: Action, name: str, job_id: str, dom, record: Suspension | None, mode: Mode) -> bool:
        with tracing.job_trace(job_id, self._traceparent(job_id, name)):
            with tracing.tracer().start_as_current_span(
                    f"{what} guest", attributes={tracing.JOB_ID: job_id, "vtorque.guest": name,
                                                 "vtorque.node": self.worker.node,
                                                 "vtorque.suspend.mode": mode}) as span:
                try:
                    self._apply(what, name, job_id, dom, record, mode)
                except (HypervisorError, libvirt.libvirtError, OSError, trust.Refused) as exc:
                    tracing.mark_error(span, exc)
                    log(LOG, logging.ERROR, f"guest not {_PAST[what]}", guest=name, job_id=job_id, error=str(exc))
                    return False
        return True

    def _apply(self, what: Action, name: str, job_id: str, dom, record: Suspension | None, mode: Mode) -> None:
        hv, t0 = self.worker.hv, time.monotonic()
        if what in ("pause", "save"):
            # The record first: a worker that dies right after the pause still knows to resume the guest.
            self._write(name, started(record, job_id, what, self.worker.clock.now()))  # the clock walltimes go by
            if what == "pause":
                hv.timed("suspend", dom.suspend, timeout=hv.change_timeout)
            else:
                self._save(name, dom)
        elif what == "resume":
            hv.resume(dom)
        elif what == "restore":
            self._restore(name)
        seconds = round(time.monotonic() - t0, 3)
        if what in ("resume", "restore", "settle"):
            assert record is not None  # action() brings back only what a record says was suspended here
            clock = self.set_clock(name)
            now = self.worker.clock.now()
            self._write(name, ended(record, now))
            log(LOG, logging.INFO, f"guest {_PAST[what]}", guest=name, job_id=job_id, seconds=seconds,
                suspended_s=round(now - (record.since or now), 1), clock=clock)
        else:
            log(LOG, logging.INFO, f"guest {_PAST[what]}", guest=name, job_id=job_id, seconds=seconds, mode=mode)

    def _save(self, name: str, dom) -> None:
        self.directory()
        save_guest(self.worker, name, dom, self.path(name, SAVE))

    def _restore(self, name: str) -> None:
        path = self.path(name, SAVE)
        restore_guest(self.worker, name, path)
        path.unlink(missing_ok=True)  # the owner's memory: not kept once the guest runs from it

    def guest_dir(self, name: str) -> Path | None:
        return guest_dir_of(self.worker, name)

    def set_clock(self, name: str) -> str:
        return set_clock(self.worker, name)

    def _traceparent(self, job_id: str, name: str) -> str | None:
        """The job's trace context the guest's boot left in the launcher's job file (service.py), if any."""
        try:
            doc = json.loads((self.worker.config.job_dir(job_id) / f"{name}.json").read_text())
        except (OSError, ValueError):
            return None
        value = doc.get("traceparent")
        return value if isinstance(value, str) else None


_PAST: dict[str, str] = {"pause": "paused", "save": "saved", "resume": "resumed", "restore": "restored",
                         "settle": "clock set after its resume", "none": "touched"}


def _root_file(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.close(fd)


# -- a guest's memory to a file and back: suspension's save mode, and checkpoint.py's checkpoints ---------------

def guest_dir_of(worker, name: str) -> Path | None:
    """The guest's directory, when root made it in a root still root's alone (never a planted tree)."""
    for root in worker.guest_roots():
        if trust.is_safe_dir(root) is None and trust.own_entry(Path(root), name):
            return Path(root) / name
    return None


def save_guest(worker, name: str, dom, path: Path) -> None:
    """virDomainSave of the guest into `path` (in a directory of root's alone): QEMU writes its memory and exits.
    The file is root's, 0600, and has its name only once the save returned (one cut short stays
    `.<name>.tmp`, root_files.temp_of). Meanwhile the guest's ssh link waits for the restored QEMU (its `saved`
    mark, guest_link.py), so the job's sessions survive a save that is restored."""
    gdir = guest_dir_of(worker, name)
    if gdir is not None:
        _root_file(gdir / SAVED_MARK)
    tmp = root_files.temp_of(path)
    tmp.unlink(missing_ok=True)
    try:
        worker.hv.timed("save", dom.save, str(tmp), timeout=worker.hv.start_timeout)
        os.chown(tmp, 0, 0, follow_symlinks=False)
        os.chmod(tmp, 0o600)
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if gdir is not None:
            (gdir / SAVED_MARK).unlink(missing_ok=True)
        raise


def restore_guest(worker, name: str, path: Path, paused: bool = False) -> None:
    """The guest saved in `path` running again (`paused`: restored paused, for the caller to resume); the file is
    the caller's to keep or remove; the link's `saved` mark goes."""
    hv = worker.hv
    gdir = guest_dir_of(worker, name)
    if gdir is not None:
        _wait_for_link(gdir)
    if paused:
        hv.timed("restore", lambda: hv.conn.restoreFlags(str(path), None, libvirt.VIR_DOMAIN_SAVE_PAUSED),
                 timeout=hv.start_timeout)
    else:
        hv.timed("restore", lambda: hv.conn.restore(str(path)), timeout=hv.start_timeout)
    if gdir is not None:
        (gdir / SAVED_MARK).unlink(missing_ok=True)


LINK_WAIT = 10.0  # s for a guest's link to see its saved QEMU go and listen again


def _wait_for_link(gdir: Path) -> None:
    """The guest's link listening for the restored QEMU again, which it does once it has seen the saved QEMU's end
    (its link socket is there again). A restore right after a save (a periodic checkpoint) must not come first:
    QEMU would find no link to join, and the link, seeing the old QEMU's end once the mark is gone, would end."""
    if not os.path.lexists(gdir / SSH_SOCKET):
        return  # no link (it ended, or the guest never had one)
    deadline = time.monotonic() + LINK_WAIT
    while not os.path.lexists(gdir / LINK_SOCKET) and time.monotonic() < deadline:
        time.sleep(0.02)


def set_clock(worker, name: str) -> str:
    """The host's time given to the guest over its channel; what happened, for the log ("set", or why not: a
    guest without the channel, an image whose init does not answer, keeps its stopped clock)."""
    gdir = guest_dir_of(worker, name)
    sock = gdir / IDENTITY_SOCKET if gdir else None
    if sock is None or not os.path.lexists(sock):
        return "not set: the guest has no host channel"
    deadline = time.monotonic() + CLOCK_TIMEOUT
    try:
        with IdentityChannel.open(sock, deadline, root_only=True) as channel:
            channel.send_clock()
            channel.expect(CLOCK_OK, deadline + 1.0)
    except (ChannelError, OSError) as exc:
        log(LOG, logging.WARNING, "guest clock not set", guest=name, error=str(exc))
        return f"not set: {exc}"
    return "set"
