"""Prefetch: learn that a VM job was queued, so its image is staged while it waits (`vtorque run prefetch`).

Torque: pbs_server writes one accounting record a line to server_priv/accounting/YYYYMMDD (a new file each
day): `MM/DD/YYYY HH:MM:SS;TYPE;JOBID;key=value ...`, TYPE Q queued, S started, E ended, D deleted, A aborted,
R rerun (reference/torque-hooks.md §8). This follows those files: a `Q` record of a job whose script
(server_priv/jobs/<id>.SC, or jobs/<digit>/ with use_jobs_subdirs) carries a vtorque-spec header becomes a
JobQueued event, which the bridge turns into StageImage; a `D` or `A` record of such a job becomes JobDeleted,
which withdraws its staging. Where it is in which file is saved after every record it acted on, so a restart
neither misses nor repeats records; a new day's file is taken once the old one is read to its end.

Slurm has no queue log to follow; slurmctld knows its pending jobs: this polls `squeue -t all`, reads a new
pending job's script where the Slurm hooks read it (slurmctld's state directory, else `scontrol write
batch_script`), and reports a pending job that was cancelled (or vanished) before it started as deleted.

Parsing and the decisions are pure functions (unit-tested on the recorded accounting log); the classes at the
end do the file and subprocess I/O and publish.
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import struct
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import ClassVar, Literal

from vtorque.shared import messages as m
from vtorque.shared import tracing
from vtorque.shared.clock import SYSTEM_CLOCK, Clock
from vtorque.shared.config import Config
from vtorque.shared.job_script import JobHeader, ScriptError, parse_header, read_head
from vtorque.shared.logs import log
from vtorque.shared.scheduler import SchedulerError

# What Torque's accounting records and Slurm's queue say is read by shared/torque.py and shared/slurm.py.
from vtorque.shared.slurm import STATE_HASHES, Slurm
from vtorque.shared.torque import AccountingRecord, accounting_dir, parse_record, server_job_script

LOG = logging.getLogger("vtorque.prefetch")
_LOG_NAME = re.compile(r"^\d{8}$")
_MESSAGE_IDS = uuid.UUID("6d3c1f0e-6a53-4c57-9a7e-0c2f6f1f7a11")

# -- pure: Torque accounting records ----------------------------------------------------------------------


def is_log_name(name: str) -> bool:
    return bool(_LOG_NAME.match(name))


def later_logs(names: Iterable[str], current: str | None) -> list[str]:
    """The day files after `current`, oldest first (YYYYMMDD sorts by date)."""
    return sorted(n for n in names if is_log_name(n) and (current is None or n > current))


def still_queued(records: Iterable[AccountingRecord]) -> list[str]:
    """Jobs queued and not yet started, ended, deleted or aborted at the end of `records`, in queue order:
    what a prefetcher starting with no saved state should stage (a job id may be reused: a new Q counts)."""
    queued: dict[str, None] = {}
    for rec in records:
        if rec.type == "Q":
            queued.pop(rec.job_id, None)
            queued[rec.job_id] = None
        elif rec.type in ("S", "E", "D", "A"):
            queued.pop(rec.job_id, None)
    return list(queued)


@dataclass(frozen=True)
class Action:
    kind: str  # "queued": stage its image; "deleted": withdraw its staging
    job_id: str
    reason: str = ""


class PrefetchBook:
    """Which VM jobs the prefetcher announced and has not seen end; what each record means for them.

    `is_vm(job_id)` is asked once, on a job's Q record: it reads the job's script (I/O stays outside)."""

    def __init__(self, vm_jobs: dict[str, float] | None = None):
        self.vm_jobs: dict[str, float] = dict(vm_jobs or {})

    def on_record(self, rec: AccountingRecord, is_vm) -> list[Action]:
        if rec.type == "Q":
            if is_vm(rec.job_id):
                self.vm_jobs[rec.job_id] = rec.when.timestamp()
                return [Action("queued", rec.job_id)]
            self.vm_jobs.pop(rec.job_id, None)
            return []
        if rec.type in ("D", "A") and rec.job_id in self.vm_jobs:
            del self.vm_jobs[rec.job_id]
            who = rec.attrs.get("requestor", "")
            reason = "deleted" + (f" by {who}" if who else "") if rec.type == "D" else "aborted"
            return [Action("deleted", rec.job_id, reason)]
        if rec.type == "E":
            self.vm_jobs.pop(rec.job_id, None)
        return []


# -- pure: Slurm's queue ----------------------------------------------------------------------------------

SLURM_WAITING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
SLURM_WITHDRAWN = {"CANCELLED", "DEADLINE", "REVOKED"}


def slurm_changes(known: dict[str, str], states: dict[str, str]) -> tuple[list[str], list[str], list[str]]:
    """(newly pending, withdrawn before they started, started or otherwise done) relative to `known`."""
    new = sorted((j for j, s in states.items() if s in SLURM_WAITING and j not in known), key=int)
    withdrawn: list[str] = []
    done: list[str] = []
    for job_id in sorted(known, key=int):
        state = states.get(job_id)
        if state in SLURM_WAITING:
            continue
        (withdrawn if state is None or state in SLURM_WITHDRAWN else done).append(job_id)
    return new, withdrawn, done


# -- I/O: following the log -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cursor:
    file: str | None  # YYYYMMDD
    offset: int = 0
    inode: int | None = None


class AccountingFollower:
    """Reads records from server_priv/accounting/ from a cursor on, across day files."""

    def __init__(self, directory: Path, cursor: Cursor):
        self.directory, self.cursor = Path(directory), cursor

    def names(self) -> list[str]:
        try:
            return [p.name for p in self.directory.iterdir()]
        except FileNotFoundError:
            return []

    def read_new(self) -> list[tuple[AccountingRecord | None, Cursor]]:
        """Every complete line after the cursor, each with the cursor just past it. The cursor moves to the
        next day's file only once that file exists and the current one was read to its end after that."""
        out: list[tuple[AccountingRecord | None, Cursor]] = []
        while True:
            name = self.cursor.file
            if name is None:
                first = later_logs(self.names(), None)
                if not first:
                    return out
                name = first[0]
                self.cursor = Cursor(name)
            later = later_logs(self.names(), name)  # looked at before reading: see below
            try:
                fh = open(self.directory / name, "rb")
            except FileNotFoundError:
                if not later:
                    return out
                self.cursor = Cursor(later[0])
                out.append((None, self.cursor))
                continue
            with fh:
                st = os.fstat(fh.fileno())
                offset = self.cursor.offset
                if (self.cursor.inode not in (None, st.st_ino)) or st.st_size < offset:
                    log(LOG, logging.WARNING, "accounting file replaced or truncated: reading it from the start",
                        file=self.cursor.file)
                    offset = 0
                fh.seek(offset)
                data = fh.read()
            end = data.rfind(b"\n") + 1
            # Once a later file existed before this read, the server had stopped writing this one: a last
            # line without its newline is complete.
            if later and end < len(data):
                end = len(data)
            for raw in data[:end].splitlines(keepends=True):
                offset += len(raw)
                rec = parse_record(raw.decode("utf-8", "replace"))
                out.append((rec, Cursor(self.cursor.file, offset, st.st_ino)))
            self.cursor = Cursor(self.cursor.file, offset, st.st_ino)
            if not later:
                return out
            self.cursor = Cursor(later[0])
            out.append((None, self.cursor))


def read_header(path: Path | None) -> JobHeader | None:
    if path is None:
        return None
    try:
        head = read_head(path)
    except OSError:
        return None
    try:
        return parse_header(head)
    except ScriptError as exc:
        log(LOG, logging.WARNING, "job script header unreadable", script=str(path), error=str(exc))
        return None


# -- pure: when to ask Slurm again --------------------------------------------------------------------------

MAX_POLL = 30.0  # s between two squeue calls at most, while queued VM jobs are watched and nothing changes


def next_poll(interval: float, base: float, changed: bool, watching: bool) -> float | None:
    """Seconds until the next `squeue`, after one that `changed` something (or not): None when there is no
    queued VM job to watch (a new submission wakes the prefetcher, see SlurmSubmissions); `base` again after a
    change; else twice the last interval, up to MAX_POLL."""
    if not watching:
        return None
    return base if changed else min(MAX_POLL, max(base, 2 * interval))


class SlurmSubmissions:
    """Wakes the Slurm prefetcher when a job is submitted: slurmctld writes every new job's script into its
    StateSaveLocation (`hash.<id % 10>/job.<id>/`), so inotify on those ten directories (and on the state
    directory, for a hash directory made later) says "a job was submitted" without asking slurmctld anything.
    `wait(timeout)` is True when one was (or may have been: an overflow) since the last call."""

    IN_CREATE, IN_MOVED_TO, IN_Q_OVERFLOW, IN_ISDIR = 0x100, 0x80, 0x4000, 0x40000000
    _EVENT = struct.Struct("iIII")

    def __init__(self, state_dir: str):
        import ctypes

        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.state_dir = Path(state_dir)
        try:
            self._top = self._watch(self.state_dir)
            self._hashes: set[int] = set()
            for name in STATE_HASHES:
                self._watch_hash(name)
        except OSError:
            os.close(self.fd)
            raise

    def _watch(self, path: Path) -> int:
        import ctypes

        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), self.IN_CREATE | self.IN_MOVED_TO)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
        return wd

    def _watch_hash(self, name: str) -> None:
        if (self.state_dir / name).is_dir():
            self._hashes.add(self._watch(self.state_dir / name))

    def wait(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not ready:
            return False
        submitted = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return submitted
            offset = 0
            while offset < len(data):
                wd, mask, _cookie, length = self._EVENT.unpack_from(data, offset)
                name = data[offset + self._EVENT.size:offset + self._EVENT.size + length].rstrip(b"\0").decode()
                offset += self._EVENT.size + length
                if mask & self.IN_Q_OVERFLOW or wd in self._hashes:
                    submitted = True  # a job.<id> directory (or lost events: look anyway)
                elif wd == self._top and mask & self.IN_ISDIR and name in STATE_HASHES:
                    self._watch_hash(name)  # slurmctld's first job of that hash: the job is in it already
                    submitted = True
                # Anything else in the state directory (job_state, node_state … rewritten on every change) is
                # not a submission.

    def close(self) -> None:
        os.close(self.fd)


# -- I/O: the prefetchers ---------------------------------------------------------------------------------

class _Prefetcher:
    scheduler: ClassVar[Literal["torque", "slurm"]]  # each prefetcher's own

    def __init__(self, config: Config, publisher, state_path: Path, clock: Clock = SYSTEM_CLOCK):
        self.config, self.publisher, self.state_path = config, publisher, Path(state_path)
        self.clock = clock  # what its messages' times and deadlines are stamped by (shared/clock.py)

    def _load_state(self) -> dict:
        try:
            return json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log(LOG, logging.WARNING, "prefetch state unreadable: starting afresh", path=str(self.state_path),
                error=str(exc))
            return {}

    def _save_state(self, state: dict) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_name(f".{self.state_path.name}.tmp")
        with open(tmp, "w") as fh:
            json.dump(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, self.state_path)

    def _queued(self, job_id: str, header: JobHeader, key: str) -> None:
        # In the job's own trace (its script header carries vsub's context), so a job stays one trace.
        with tracing.job_trace(job_id, header.traceparent), tracing.tracer().start_as_current_span("prefetch image"):
            now = self.clock.utcnow()
            self.publisher.publish(m.JobQueued(
                message_id=_message_id(self.scheduler, key), job_id=job_id, created_at=now,
                deadline=now + timedelta(seconds=self.config.prefetch.deadline),
                scheduler=self.scheduler, spec=dict(header.spec)))
        log(LOG, logging.INFO, "VM job queued: image prefetch asked", job_id=job_id, spec=header.spec)

    def _deleted(self, job_id: str, reason: str, key: str) -> None:
        now = self.clock.utcnow()
        self.publisher.publish(m.JobDeleted(
            message_id=_message_id(self.scheduler, key), job_id=job_id, created_at=now,
            deadline=now + timedelta(seconds=self.config.prefetch.deadline), scheduler=self.scheduler,
            reason=reason))
        log(LOG, logging.INFO, "VM job deleted while queued: its staging withdrawn", job_id=job_id, reason=reason)

    def step(self) -> int:
        raise NotImplementedError

    def run(self, stop: threading.Event) -> None:
        log(LOG, logging.INFO, "prefetch following the scheduler", scheduler=self.scheduler)
        while not stop.is_set():
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - broker or scheduler hiccup: the saved state lets us retry
                log(LOG, logging.WARNING, "prefetch step failed, retrying", error=f"{type(exc).__name__}: {exc}")
                stop.wait(min(10.0, 5 * self.config.prefetch.poll_interval))
                continue
            stop.wait(self.config.prefetch.poll_interval)


class TorquePrefetch(_Prefetcher):
    scheduler = "torque"

    def __init__(self, config: Config, publisher, state_path: Path, torque_home: str | Path | None = None,
                 clock: Clock = SYSTEM_CLOCK):
        super().__init__(config, publisher, state_path, clock=clock)
        self.torque_home = Path(torque_home or config.prefetch.torque_home)
        self.directory = accounting_dir(self.torque_home)
        state = self._load_state()
        self.book = PrefetchBook(state.get("vm_jobs"))
        self.started = bool(state)
        cursor = Cursor(state.get("file"), int(state.get("offset", 0)), state.get("inode")) if state else None
        self.follower = AccountingFollower(self.directory, cursor or Cursor(None))

    def _header(self, job_id: str) -> JobHeader | None:
        return read_header(server_job_script(self.torque_home, job_id))

    def _vm_probe(self, headers: dict[str, JobHeader]):
        """The book's is_vm for one record: a job is a VM job when its script has a header, kept in `headers`."""
        def is_vm(job_id: str) -> bool:
            header = self._header(job_id)
            if header is not None:
                headers[job_id] = header
            return header is not None
        return is_vm

    def _state(self) -> dict:
        c = self.follower.cursor
        return {"scheduler": "torque", "file": c.file, "offset": c.offset, "inode": c.inode,
                "vm_jobs": self.book.vm_jobs}

    def _first_start(self) -> None:
        """No saved state: skip the history of the newest day file, but stage for its jobs still queued."""
        names = later_logs(self.follower.names(), None)
        if not names:
            return
        read = AccountingFollower(self.directory, Cursor(names[-1])).read_new()
        records = [rec for rec, _ in read if rec is not None]
        for job_id in still_queued(records):
            header = self._header(job_id)
            if header is not None:
                self.book.vm_jobs[job_id] = self.clock.now()
                self._queued(job_id, header, f"start:{names[-1]}:{job_id}")
        self.follower.cursor = read[-1][1] if read else Cursor(names[-1])
        self._save_state(self._state())

    def step(self) -> int:
        if not self.started:
            self._first_start()
            self.started = True
        acted = 0
        pending_save = False
        for rec, cursor in self.follower.read_new():
            headers: dict[str, JobHeader] = {}
            if rec is not None:
                for action in self.book.on_record(rec, self._vm_probe(headers)):
                    key = f"{cursor.file}:{cursor.offset}"
                    if action.kind == "queued":
                        self._queued(action.job_id, headers[action.job_id], key)
                    else:
                        self._deleted(action.job_id, action.reason, key)
                    acted += 1
            # Published (and confirmed) first, then the cursor saved: a crash in between repeats one record,
            # with the same message id, and never loses one.
            self.follower.cursor = cursor
            if acted or rec is None:
                self._save_state(self._state())
                pending_save = False
            else:
                pending_save = True
        if pending_save:
            self._save_state(self._state())
        return acted


class SlurmPrefetch(_Prefetcher):
    scheduler = "slurm"

    def __init__(self, config: Config, publisher, state_path: Path, state_dir: str | None = None,
                 clock: Clock = SYSTEM_CLOCK):
        super().__init__(config, publisher, state_path, clock=clock)
        self.state_dir = state_dir or config.prefetch.slurm_state_dir or os.environ.get("VTORQUE_SLURM_STATE")
        self.known: dict[str, str] = dict(self._load_state().get("jobs", {}))
        self.changed = False  # whether the last step saw a job come, start or go

    def _header(self, job_id: str) -> JobHeader | None:
        try:
            return parse_header(Slurm(self.config.scheduler).script_head(job_id, self.state_dir))
        except (ScriptError, SchedulerError, OSError) as exc:
            log(LOG, logging.WARNING, "job script unreadable", job_id=job_id, error=str(exc))
            return None

    def step(self) -> int:
        try:
            states = Slurm(self.config.scheduler).queue_states()
        except SchedulerError as exc:
            raise OSError(str(exc)) from None  # the prefetch loop's retry, as for any failure to look
        new, withdrawn, done = slurm_changes(self.known, states)
        acted = 0
        for job_id in new:
            header = self._header(job_id)
            self.known[job_id] = "vm" if header is not None else "plain"
            if header is not None:
                self._queued(job_id, header, f"queued:{job_id}")
                acted += 1
            self._save_state({"scheduler": "slurm", "jobs": self.known})
        for job_id in withdrawn:
            if self.known.pop(job_id) == "vm":
                self._deleted(job_id, "cancelled while pending", f"deleted:{job_id}")
                acted += 1
        for job_id in done:
            self.known.pop(job_id, None)
        if withdrawn or done:
            self._save_state({"scheduler": "slurm", "jobs": self.known})
        self.changed = bool(new or withdrawn or done)
        return acted

    def watching(self) -> bool:
        """Whether a queued VM job is known: only then is slurmctld asked again without a new submission."""
        return "vm" in self.known.values()

    def run(self, stop: threading.Event) -> None:
        """squeue only while queued VM jobs are watched (backing off from poll_interval to MAX_POLL while
        nothing changes) and when a job was submitted; none at all while nothing is queued. Without a readable
        state directory (no inotify to learn of submissions) it polls every poll_interval, as before."""
        try:
            submissions = SlurmSubmissions(self.state_dir) if self.state_dir else None
        except OSError as exc:
            log(LOG, logging.WARNING, "slurm submissions not watched: polling squeue", error=str(exc))
            submissions = None
        if submissions is None:
            super().run(stop)
            return
        log(LOG, logging.INFO, "prefetch following the scheduler", scheduler=self.scheduler,
            submissions=str(self.state_dir))
        base = self.config.prefetch.poll_interval
        interval: float | None = 0.0  # look once at start: jobs queued while we were down
        try:
            while not stop.is_set():
                due = time.monotonic() + interval if interval is not None else None
                # Woken by a submission, at the poll's time, or every second to see `stop`.
                woken = False
                while not stop.is_set() and not woken and (due is None or time.monotonic() < due):
                    woken = submissions.wait(1.0 if due is None else min(1.0, due - time.monotonic()))
                if stop.is_set():
                    break
                try:
                    self.step()
                except Exception as exc:  # noqa: BLE001 - broker or scheduler hiccup: the saved state lets us retry
                    log(LOG, logging.WARNING, "prefetch step failed, retrying", error=f"{type(exc).__name__}: {exc}")
                    interval = min(10.0, 5 * base)
                    continue
                # After a submission, one more look in poll_interval: a job that squeue did not show yet.
                interval = base if woken else next_poll(interval or base, base, self.changed, self.watching())
        finally:
            submissions.close()


def detect_scheduler(config: Config) -> str:
    return config.scheduler.kind


def make_prefetcher(config: Config, publisher, clock: Clock = SYSTEM_CLOCK) -> _Prefetcher:
    scheduler = detect_scheduler(config)
    state = Path(config.prefetch.state_file or Path(config.state_dir) / "prefetch" / f"{scheduler}.json")
    return (TorquePrefetch if scheduler == "torque" else SlurmPrefetch)(config, publisher, state, clock=clock)


def _message_id(scheduler: str, key: str) -> str:
    """The same record always gives the same message id, so a record repeated after a crash is recognisable."""
    return uuid.uuid5(_MESSAGE_IDS, f"{scheduler}:{key}").hex
