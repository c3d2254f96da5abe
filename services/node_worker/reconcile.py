"""Reconciliation: nothing outlives its job, even when a hook or a service died mid-way.

At start and every `node.reconcile_interval` seconds the node worker looks at what is on this node — domains
carrying vtorque metadata for this node, guest directories, the launcher's job files — and removes:
- a domain whose job the scheduler says is no longer running (finished, cancelled, requeued, unknown);
- a domain past its job's end (start + walltime, when the scheduler gave a walltime) plus a grace period;
- a domain that never became ready and whose boot deadline passed;
- a guest directory (overlay, seed, console) with no domain, unless a boot of it is under way here;
- a job file directory whose guests are gone;
- a job network (job_segment.py) that no guest of its job uses, two rounds in a row.
When the scheduler cannot be asked (command missing, timeout), nothing is removed for that reason: a wrong
"gone" would kill a running job.

`decide` is pure; `Reconciler` does the I/O in a thread of its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from vtorque.shared.logs import log

from . import disks, warm_pool

LOG = logging.getLogger("vtorque.node_worker.reconcile")



@dataclass(frozen=True)
class Domain:
    name: str
    job_id: str
    boot_deadline: datetime | None
    end_by: datetime | None
    ready: bool


@dataclass(frozen=True)
class Removal:
    name: str
    reason: str


def decide(domains: list[Domain], guest_dirs: dict[str, float], booting: set[str],
           alive: Callable[[str], bool | None], now: datetime, now_mono_wall: float,
           grace: timedelta = timedelta(minutes=2)) -> tuple[list[Removal], list[str]]:
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
        elif dom.end_by and now > dom.end_by + grace:
            removals.append(Removal(dom.name, f"job {dom.job_id} passed its walltime"))
        elif not dom.ready and dom.boot_deadline and now > dom.boot_deadline + grace:
            removals.append(Removal(dom.name, "never became ready before its boot deadline"))
    known = {d.name for d in domains}
    stale = [name for name, mtime in guest_dirs.items()
             if name not in known and name not in booting and now_mono_wall - mtime > grace.total_seconds()]
    return removals, sorted(stale)


def scheduler_check(config) -> Callable[[str], bool | None]:
    """job id -> is it still running (True/False), or None when the scheduler cannot be asked."""
    from vtorque.shared.scheduler import SchedulerError, scheduler_for

    scheduler = scheduler_for(config)

    def alive(job_id: str) -> bool | None:
        try:
            info = scheduler.job(job_id)
        except SchedulerError as exc:
            log(LOG, logging.WARNING, "scheduler not answering", job_id=job_id, error=str(exc))
            return None
        return info is not None and info.alive

    return alive


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class Reconciler:
    def __init__(self, worker, stop: threading.Event, interval: float, alive: Callable[[str], bool | None]):
        self.worker, self.stop, self.interval, self.alive = worker, stop, interval, alive
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
        domains = []
        for name, meta in w.hv.vtorque_domains().items():
            if meta.get("node", w.node) != w.node:
                continue  # another node worker's guest on a shared test host
            domains.append(Domain(name=name, job_id=meta.get("job", ""),
                                  boot_deadline=_parse_time(meta.get("deadline")),
                                  end_by=_parse_time(meta.get("end-by")),
                                  ready=(w.config.job_dir(meta.get("job", "")) / f"{name}.json").exists()))
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
        removals, stale = decide(domains, dirs, w.booting_now() | pooled, self.alive, datetime.now(UTC),
                                 time.time())
        for removal in removals:
            log(LOG, logging.WARNING, "reconcile: removing guest", guest=removal.name, reason=removal.reason)
            job = next(d.job_id for d in domains if d.name == removal.name)
            w.remove_guest(removal.name, job)
        for name in stale:
            log(LOG, logging.WARNING, "reconcile: removing guest files without a domain", guest=name)
            w.remove_guest(name, None)
        w.remove_orphan_job_files()
        w.remove_idle_networks()
        return removals

    @staticmethod
    def _dir_node(gdir: Path) -> str | None:
        text = disks.read_small(gdir, "node")
        return text.strip() if text is not None else None
