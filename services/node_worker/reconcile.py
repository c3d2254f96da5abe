"""Reconciliation: nothing outlives its job, even when a hook or a service died mid-way.

At start and every `node.reconcile_interval` seconds the node worker looks at what is on this node — domains
carrying vtorque metadata for this node, guest directories, the launcher's job files — and removes:
- a domain whose job the scheduler says is no longer running (finished, cancelled, requeued, unknown);
- a domain past its job's end (start + walltime, when the scheduler gave a walltime, + the time the guest spent
  suspended: the scheduler stops a suspended job's walltime clock) plus a grace period; never a domain of a job the
  scheduler says is suspended (the scheduler ends such a job when it must, and its guests go as any job's);
- a domain that never became ready and whose boot deadline passed;
- a guest directory (overlay, seed, console) with no domain, unless a boot of it is under way here;
- a job file directory whose guests are gone;
- a job network (job_segment.py) that no guest of its job uses, two rounds in a row;
- a suspended guest's record or save file (suspend.py) whose guest is gone;
- the checkpoints (checkpoint.py) of a job the scheduler says ended, of which this node wrote rank 0.
Then each guest of a job the scheduler says is suspended is paused or saved, and each one this node suspended
whose job runs again is resumed or restored (suspend.py), and the guests of a running job whose periodic checkpoint
is due are checkpointed (checkpoint.py): one scheduler question per job per round for all of these.
When the scheduler cannot be asked (command missing, timeout), nothing is removed for that reason: a wrong
"gone" would kill a running job.

`decide` is pure; `Reconciler` does the I/O in a thread of its own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from vtorque.shared.logs import log

from . import disks, suspend, warm_pool

if TYPE_CHECKING:  # the worker these parts serve (services/node_worker/service.py); not imported at run time
    from .service import NodeWorker

LOG = logging.getLogger("vtorque.node_worker.reconcile")



@dataclass(frozen=True)
class Domain:
    name: str
    job_id: str
    boot_deadline: datetime | None
    end_by: datetime | None
    ready: bool
    suspended_s: float = 0.0  # how long the guest was suspended in all (suspend.py): its job ends that much later
    job_suspended: bool = False  # the scheduler says its job is suspended now: its walltime clock stands still


@dataclass(frozen=True)
class Removal:
    name: str
    reason: str


GRACE = timedelta(minutes=2)


def decide(domains: list[Domain], guest_dirs: dict[str, float], booting: set[str],
           alive: Callable[[str], bool | None], now: datetime, now_mono_wall: float,
           grace: timedelta = GRACE) -> tuple[list[Removal], list[str]]:
    """(domains to remove with why, guest directories to remove). `guest_dirs` maps a directory name to its
    mtime (wall clock seconds); `alive(job_id)` is True, False, or None when unknown."""
    removals: list[Removal] = []
    verdicts: dict[str, bool | None] = {}
    for dom in domains:
        if dom.name in booting:
            continue
        if dom.job_id not in verdicts:
            verdicts[dom.job_id] = alive(dom.job_id)
        if verdicts[dom.job_id] is False:
            removals.append(Removal(dom.name, f"job {dom.job_id} is no longer running"))
        elif dom.end_by and not dom.job_suspended and now > dom.end_by + timedelta(seconds=dom.suspended_s) + grace:
            removals.append(Removal(dom.name, f"job {dom.job_id} passed its walltime"))
        elif not dom.ready and dom.boot_deadline and now > dom.boot_deadline + grace:
            removals.append(Removal(dom.name, "never became ready before its boot deadline"))
    known = {d.name for d in domains}
    stale = [name for name, mtime in guest_dirs.items()
             if name not in known and name not in booting and now_mono_wall - mtime > grace.total_seconds()]
    return removals, sorted(stale)


GONE = "gone"  # what `scheduler_states` answers for a job the scheduler no longer knows


def scheduler_states(config, scheduler=None) -> Callable[[str], str | None]:
    """job id -> its state in the scheduler's words (shared/scheduler.py State; GONE when it no longer knows the
    job), or None when the scheduler cannot be asked. `scheduler`: the node worker's (else the site's)."""
    from vtorque.shared.scheduler import SchedulerError, scheduler_for

    scheduler = scheduler or scheduler_for(config)

    def state(job_id: str) -> str | None:
        try:
            info = scheduler.job(job_id)
        except SchedulerError as exc:
            log(LOG, logging.WARNING, "scheduler not answering", job_id=job_id, error=str(exc))
            return None
        return GONE if info is None else info.state

    return state


def alive_of(state: str | None) -> bool | None:
    from vtorque.shared.scheduler import ALIVE

    return None if state is None else state in ALIVE


def scheduler_check(config) -> Callable[[str], bool | None]:
    """job id -> is it still running (True/False), or None when the scheduler cannot be asked."""
    states = scheduler_states(config)
    return lambda job_id: alive_of(states(job_id))


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class Reconciler:
    """`states` (scheduler_states): the scheduler's word for each job, asked once per job per round, for removal
    and suspension alike; a reconciler given only `alive` (job → still running?) suspends and resumes nothing."""

    def __init__(self, worker: NodeWorker, stop: threading.Event, interval: float,
                 alive: Callable[[str], bool | None] | None = None, states: Callable[[str], str | None] | None = None):
        self.worker, self.stop, self.interval, self.alive, self.states = worker, stop, interval, alive, states
        self.grace = GRACE  # past a deadline (boot, walltime) before a guest is removed for it
        self.clock = worker.clock  # the worker's (shared/clock.py): walltimes, deadlines and the grace go by it
        self.thread = threading.Thread(target=self._loop, name="reconcile", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - one bad round must not end reconciliation for good
                LOG.exception("reconcile round failed")
            self.stop.wait(self.interval)

    def run_once(self) -> list[Removal]:
        w = self.worker
        asked: dict[str, str | None] = {}

        def state_of(job_id: str) -> str | None:
            if job_id not in asked:
                asked[job_id] = self.states(job_id) if self.states else None
            return asked[job_id]

        alive = (lambda job_id: alive_of(state_of(job_id))) if self.states or self.alive is None else self.alive
        suspender: suspend.Suspender | None = getattr(w, "suspender", None)  # (a test double: none)
        domains = []
        now_wall = self.clock.now()
        listed = w.hv.vtorque_domains()
        for name, meta in listed.items():
            if meta.get("node", w.node) != w.node:
                continue  # another node worker's guest on a shared test host
            job_id = meta.get("job", "")
            record = suspender.record(name) if suspender else None
            domains.append(Domain(name=name, job_id=job_id,
                                  boot_deadline=_parse_time(meta.get("deadline")),
                                  end_by=_parse_time(meta.get("end-by")),
                                  ready=(w.config.job_dir(job_id) / f"{name}.json").exists(),
                                  suspended_s=suspend.suspended_seconds(record, now_wall),
                                  job_suspended=bool(self.states) and state_of(job_id) == "suspended"))
        dirs = {}
        for root in w.guest_roots():
            # Only directories root made in a root that is still root's alone (disks.guest_dirs): a tree a user
            # planted (say /dev/shm/vtorque made before root did) is never read, let alone removed from.
            for name, gdir in disks.guest_dirs(root).items():
                mtime = disks.mtime_of(gdir, "job")
                if mtime is not None and self._dir_node(gdir) in (w.node, None):
                    dirs[name] = mtime
        # The warm pool's guests it recognises are kept (not orphans); the rest of the pool it removes itself.
        pooled = warm_pool.pool_of(w).reconcile() if hasattr(w, "store") else set()  # (a test double: none)
        removals, stale = decide(domains, dirs, w.booting_now() | pooled, alive, self.clock.utcnow(),
                                 self.clock.now(), self.grace)
        for removal in removals:
            log(LOG, logging.WARNING, "reconcile: removing guest", guest=removal.name, reason=removal.reason)
            job = next(d.job_id for d in domains if d.name == removal.name)
            w.remove_guest(removal.name, job)
        for name in stale:
            log(LOG, logging.WARNING, "reconcile: removing guest files without a domain", guest=name)
            w.remove_guest(name, None)
        w.remove_orphan_job_files()
        w.remove_idle_networks()
        if suspender is not None:
            removed = {r.name for r in removals}
            kept = {d.name: d.job_id for d in domains if d.name not in removed}
            # Any domain of this host keeps its files (another node worker of a test host may share the directory).
            suspender.remove_orphans(set(listed) | w.booting_now())
            if self.states:
                suspender.reconcile(kept, state_of, w.booting_now())
        checkpoints = getattr(w, "checkpoints", None)  # (a test double: none)
        if checkpoints is not None and self.states:
            kept = {d.name: d.job_id for d in domains if d.name not in {r.name for r in removals}}
            # Periodic checkpoints that are due, and the checkpoints of jobs that ended (checkpoint.py).
            checkpoints.reconcile(kept, state_of)
        return removals

    @staticmethod
    def _dir_node(gdir: Path) -> str | None:
        text = disks.read_small(gdir, "node")
        return text.strip() if text is not None else None
