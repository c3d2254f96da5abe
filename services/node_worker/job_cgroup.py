"""Guests accounted to and capped by their job's cgroup, where the scheduler has one.

libvirt puts every QEMU in cgroups of its own (`/machine/qemu-N-name.libvirt-qemu`), outside the job's, so the
scheduler neither counts a guest (sstat, the job cgroup's memory.usage_in_bytes, cpuacct), nor holds it to the
job's memory limit, nor kills it when the job ends. The site names its scheduler's job cgroup per controller
(`[node] job_cgroup`, docs/admin-guide.md); the node worker moves each guest's QEMU (every thread: cgroup.procs)
there:

- at boot, while the guest is still paused (`start_guest`): what QEMU touches from then on (guest RAM, the TCG
  code cache, pages of a ramdisk disk it writes) is charged to the job from the first instruction. The kernel
  no longer moves charges with a task (memory.move_charge_at_immigrate is refused with EINVAL on this host's
  6.18), so what is charged before the move stays with libvirt's cgroup: measured 74 MiB for the test guest
  (its 63 MiB kernel and initrd loaded into guest RAM before the first instruction);
- later, by a watcher (`start`), when the job's cgroup appears only after the guest started (Slurm: slurmd makes
  the job's cgroups after PrologSlurmctld, i.e. after the guests are ready), and after a node worker restart.

Never cpuset: moving a task into a cpuset cgroup resets its affinity to that cgroup's CPUs (cgroup v1
cpuset_attach), undoing libvirt's vcpu, emulator and I/O thread pinning; the bridge already pins guests to the
cores the scheduler gave the job. libvirt keeps managing its own (now empty) cgroups: live pinning, stats and
destroy work unchanged, and its cgroup is removed when the domain stops.

The pure part (layout checks, paths, what to move) is unit-tested; the I/O is `qemu_pid`, `placed` and `move`.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import re
import string
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from vtorque.shared.logs import log

if TYPE_CHECKING:  # the worker these parts serve (services/node_worker/service.py); not imported at run time
    from .service import NodeWorker

LOG = logging.getLogger("vtorque.node_worker.job_cgroup")
PLACEHOLDERS = ("job", "uid", "node")
REFUSED = {
    "cpuset": "moving QEMU into another cpuset cgroup resets every thread's affinity to that cgroup's CPUs, "
              "undoing libvirt's pinning (guests are pinned to the job's cores already)",
}
CONTROLLER = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:@%+=[\]-]{0,127}$")
WATCH_INTERVAL = 2.0  # seconds between the watcher's looks; the first boot memory is placed at start already
WARN_AFTER = 120.0  # a running guest still outside its job's cgroup this long is logged (a wrong layout)


class LayoutError(ValueError):
    pass


# -- pure ------------------------------------------------------------------------------------------------

def layout_errors(layout: dict[str, str]) -> list[str]:
    """What is wrong with a `[node] job_cgroup` layout (controller → path template), one line each."""
    errors = []
    for controller, template in sorted(layout.items()):
        where = f"node.job_cgroup.{controller}"
        if controller in REFUSED:
            errors.append(f"{where}: refused: {REFUSED[controller]}")
            continue
        if not CONTROLLER.match(controller):
            errors.append(f"{where}: not a cgroup controller name")
            continue
        try:
            fields = list(string.Formatter().parse(template))
        except ValueError as exc:
            errors.append(f"{where}: {exc}")
            continue
        bad = [f for _, f, spec, conv in fields if f is not None and (f not in PLACEHOLDERS or spec or conv)]
        if bad:
            errors.append(f"{where}: unknown placeholder {{{bad[0]}}} (only {{job}}, {{uid}}, {{node}})")
            continue
        if not any(f == "job" for _, f, _, _ in fields):
            # Without the job in it, guests of different jobs would share one cgroup: accounted to none.
            errors.append(f"{where}: the path must name the job ({{job}})")
            continue
        sample = template.format(job="1", uid="1000", node="n1")
        if sample.startswith("/") or not all(COMPONENT.match(c) for c in sample.split("/")):
            errors.append(f"{where}: {template!r} is not a relative path of plain names under the controller")
    return errors


def job_paths(layout: dict[str, str], job_id: str, uid: int, node: str) -> dict[str, str]:
    """controller → the job's cgroup, relative to the controller's mount. The job id and node are names the
    node worker checked (trust.py); each is still refused here if it is not one plain path component."""
    for what, value in (("job id", job_id), ("node", node)):
        if not COMPONENT.match(value) or ".." in value:
            raise LayoutError(f"{what} {value!r} cannot be a cgroup name")
    if isinstance(uid, bool) or not isinstance(uid, int) or uid < 0:
        raise LayoutError(f"uid {uid!r} is not a uid")
    return {c: t.format(job=job_id, uid=uid, node=node) for c, t in layout.items()}


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/PID/cgroup (cgroup v1 lines `N:ctrl[,ctrl]:/path`) → controller → path without its leading /."""
    found = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[1]:
            continue  # the unified hierarchy's `0::/path`, or junk
        for controller in parts[1].split(","):
            found[controller] = parts[2].lstrip("/")
    return found


def to_move(current: dict[str, str], wanted: dict[str, str]) -> list[str]:
    """The controllers in which the process is not where it should be."""
    return sorted(c for c, path in wanted.items() if current.get(c) != path)


def qemu_pid_of(cmdline: bytes, name: str) -> bool:
    """True when a process's /proc/PID/cmdline is the QEMU of domain `name` (libvirt: `-name guest=NAME,…`)."""
    args = cmdline.split(b"\0")
    want = f"guest={name}".encode()
    return any(a == b"-name" and i + 1 < len(args) and args[i + 1].split(b",")[0] == want
               for i, a in enumerate(args))


# -- I/O -------------------------------------------------------------------------------------------------

def qemu_pid(name: str, run_dir: str = "/run/libvirt/qemu") -> int | None:
    """The pid of domain `name`'s QEMU: libvirt's root-owned pid file, checked against the process's own
    command line (a stale file never names another process)."""
    try:
        fd = os.open(Path(run_dir) / f"{name}.pid", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with open(fd) as fh:
            pid = int(fh.read().strip() or "0")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if pid > 0 and qemu_pid_of(cmdline, name) else None


def placed(pid: int) -> dict[str, str]:
    return parse_proc_cgroup(Path(f"/proc/{pid}/cgroup").read_text())


def move(pid: int, paths: dict[str, str], root: str = "/sys/fs/cgroup") -> list[str]:
    """Moves every thread of `pid` into `paths` (controller → cgroup); returns the controllers whose cgroup does
    not exist (yet), having moved nothing then: a guest is in all of its job's cgroups or in none."""
    targets = {c: Path(root) / c / p / "cgroup.procs" for c, p in paths.items()}
    missing = sorted(c for c, t in targets.items() if not t.is_file())
    if missing:
        return missing
    for _controller, target in sorted(targets.items()):
        fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, f"{pid}\n".encode())
        finally:
            os.close(fd)
    return []


def adopt(layout: dict[str, str], root: str, name: str, job_id: str, uid: int, node: str,
          pid: int | None = None) -> str:
    """Puts the guest `name` into its job's cgroups: "placed" (it is there now), "waiting" (a job cgroup does not
    exist yet) or "gone" (no QEMU of that name)."""
    pid = pid or qemu_pid(name)
    if pid is None:
        return "gone"
    wanted = job_paths(layout, job_id, uid, node)
    try:
        need = to_move(placed(pid), wanted)
        if not need:
            return "placed"
        missing = move(pid, {c: wanted[c] for c in need}, root)
    except OSError as exc:
        if exc.errno in (errno.ESRCH, errno.ENOENT):
            return "gone"  # QEMU or the job's cgroup went away meanwhile: the job is ending
        raise
    if missing:
        return "waiting"
    log(LOG, logging.INFO, "guest moved into its job's cgroup", guest=name, job=job_id,
        cgroups=",".join(f"{c}:{wanted[c]}" for c in need))
    return "placed"


def start_guest(worker: NodeWorker, dom, job_id: str, guest) -> None:
    """Starts the guest's domain; with a job cgroup layout, paused, moved into the job's cgroups, then run.
    A job cgroup that does not exist yet is left to the watcher (`start`)."""
    layout = worker.config.node.job_cgroup
    if not layout:
        worker.hv.start(dom)
        return
    worker.hv.start(dom, paused=True)
    try:
        adopt(layout, worker.config.node.job_cgroup_root, guest.name, job_id, guest.owner.uid, worker.node)
    except OSError as exc:  # the watcher tries again; a guest never stays paused for it
        log(LOG, logging.WARNING, "guest not moved into its job's cgroup", guest=guest.name, error=str(exc))
    finally:
        worker.hv.resume(dom)


def start(worker: NodeWorker, stop: threading.Event) -> Watcher | None:
    """The watcher: every running guest of this node goes into its job's cgroups as soon as they exist."""
    layout = worker.config.node.job_cgroup
    if not layout:
        return None
    errors = layout_errors(layout)
    if errors:
        raise LayoutError("; ".join(errors))
    watcher = Watcher(worker)
    threading.Thread(target=watcher.run, args=(stop,), name="job-cgroup", daemon=True).start()
    return watcher


class Watcher:
    def __init__(self, worker: NodeWorker, pid_of=qemu_pid):
        self.worker, self.pid_of = worker, pid_of
        self.first_seen: dict[str, float] = {}
        self.warned: set[str] = set()

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(WATCH_INTERVAL):
            try:
                self.tick(self.worker.clock.monotonic())  # the worker's clock: when a guest is warned of
            except Exception as exc:  # noqa: BLE001 - libvirt down or wedged: look again next time
                log(LOG, logging.WARNING, "job cgroups: libvirt not answering", error=str(exc))

    def tick(self, now: float) -> dict[str, str]:
        """One look at every running guest of this node; guest → placed | waiting | gone | error: …"""
        node = self.worker.config.node
        active = self.worker.hv.active_names()
        domains = self.worker.hv.vtorque_domains()
        for name in set(self.first_seen) - active:
            self.first_seen.pop(name, None)
            self.warned.discard(name)
        states = {}
        for name, meta in domains.items():
            if name not in active or meta.get("node", self.worker.node) != self.worker.node or not meta.get("job"):
                continue
            self.first_seen.setdefault(name, now)
            try:
                # The owner as root wrote it into the domain's metadata at boot; its uid from the password database.
                uid = pwd.getpwnam(meta.get("owner", "")).pw_uid
                state = adopt(node.job_cgroup, node.job_cgroup_root, name, meta["job"], uid, self.worker.node,
                              pid=self.pid_of(name))
            except (KeyError, LayoutError, OSError) as exc:
                state = f"error: {exc}"
            states[name] = state
            if state in ("placed", "gone"):
                self.warned.add(name)  # nothing to say about it any more
            elif now - self.first_seen[name] > WARN_AFTER and name not in self.warned:
                self.warned.add(name)
                log(LOG, logging.WARNING, "guest still outside its job's cgroup", guest=name, job=meta["job"],
                    state=state)
        return states
