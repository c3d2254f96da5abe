"""IOcm: how many dedicated I/O cores each guest's I/O threads may run on, moved between the job's
iocm_min_cores and iocm_max_cores by the guest's measured I/O load, with hysteresis.

Three layers:
- pure decision logic (`Policy`, `State`, `decide`, `io_rate`): given I/O counters over time, the number of
  active I/O cores. Tested without any I/O.
- adapters that apply a number of active cores to a running guest: `LibvirtIocm` re-pins the guest's
  iothreads live (`virDomain.pinIOThread`); `SkvmIocm` drives MIKELANGELO's sKVM IOcm kernel interface
  (/sys/class/vhost: shared vhost workers, one per I/O core, devices moved between them) where that kernel
  module is loaded. `detect_backend` picks one.
- `IocmController`: a daemon thread in the node worker that samples the running vtorque guests with IOcm
  (libvirt block and interface stats) every `interval` seconds and applies the decisions.

The guest's I/O threads always share one cpuset, the first `active` of its I/O cores: the same shape
domain.py gives them at boot (`active` = iocm_min_cores), so a restarted node worker picks up where the
guest is, reading the active count back from the live pinning.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from vtorque.shared.cpu_list import parse_cpu_list
from vtorque.shared.logs import log

if TYPE_CHECKING:  # the worker these parts serve (services/node_worker/service.py); not imported at run time
    from .service import NodeWorker

LOG = logging.getLogger("vtorque.node_worker.iocm")

SKVM_VHOST = "/sys/class/vhost"  # the sKVM IOcm module's interface (mikelangelo-project/dynamic-io-manager)
# (read when called, not when defined: tests point it at a fake host's tree)


# -- pure: the decision -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Policy:
    """Thresholds in bytes per second per active I/O core.

    Widen when each active core carries more than `high` for `up_samples` samples in a row; narrow when the
    load would still fit below `low` per core on one core fewer for `down_samples` samples in a row. `low`
    is below `high`, so the load right after widening (rate / (n+1)) does not immediately qualify for
    narrowing again: no flapping at a steady load. Narrowing waits longer than widening because an
    I/O burst that is starved costs more than a core that idles a few seconds.
    """

    high: float = 64 * 2**20
    low: float = 16 * 2**20
    up_samples: int = 2
    down_samples: int = 5

    def __post_init__(self):
        if not 0 <= self.low < self.high:
            raise ValueError(f"IOcm thresholds need 0 <= low < high, got low={self.low} high={self.high}")
        if self.up_samples < 1 or self.down_samples < 1:
            raise ValueError("IOcm sample counts must be at least 1")


@dataclass(frozen=True)
class State:
    active: int  # I/O cores the guest's I/O threads may run on now
    above: int = 0  # samples in a row that asked for one more core
    below: int = 0  # samples in a row that allowed one core fewer


def decide(state: State, rate: float, policy: Policy, min_cores: int, max_cores: int) -> State:
    """The next state after one sample of the guest's I/O rate (bytes/s). Moves one core at a time."""
    active = min(max(state.active, min_cores), max_cores)
    per_core = rate / active
    if per_core > policy.high and active < max_cores:
        above = state.above + 1
        if above >= policy.up_samples:
            return State(active + 1)
        return State(active, above=above)
    if active > min_cores and rate / (active - 1) < policy.low:
        below = state.below + 1
        if below >= policy.down_samples:
            return State(active - 1)
        return State(active, below=below)
    return State(active)


@dataclass(frozen=True)
class Counters:
    """Cumulative I/O counters of one guest at one moment (monotonic seconds)."""

    at: float
    bytes: int  # disk read+written plus network received+sent
    ops: int = 0  # disk requests plus packets


def io_rate(prev: Counters, cur: Counters) -> float:
    """Bytes per second between two samples. A counter that went backwards (device re-created, guest
    rebooted) counts as no I/O rather than a huge negative or wrapped number."""
    dt = cur.at - prev.at
    if dt <= 0:
        return 0.0
    delta = cur.bytes - prev.bytes
    return delta / dt if delta > 0 else 0.0


def block_bytes(stats: tuple) -> tuple[int, int]:
    """(bytes, requests) from virDomain.blockStats: (rd_req, rd_bytes, wr_req, wr_bytes, errs)."""
    rd_req, rd_bytes, wr_req, wr_bytes = (max(0, int(v)) for v in stats[:4])
    return rd_bytes + wr_bytes, rd_req + wr_req


def interface_bytes(stats: tuple) -> tuple[int, int]:
    """(bytes, packets) from virDomain.interfaceStats: (rx_bytes, rx_packets, rx_errs, rx_drop, tx_bytes,
    tx_packets, tx_errs, tx_drop)."""
    return max(0, int(stats[0])) + max(0, int(stats[4])), max(0, int(stats[1])) + max(0, int(stats[5]))


@dataclass(frozen=True)
class GuestIocm:
    """What the controller needs of one guest, read from its live domain XML."""

    name: str
    io_cores: list[int]  # all the I/O cores the plan gave it, in order; the first `active` are in use
    min_cores: int
    max_cores: int
    iothreads: list[int]  # iothread ids
    disks: list[str] = field(default_factory=list)  # target devs, for blockStats
    interfaces: list[str] = field(default_factory=list)  # target devs, for interfaceStats
    pinned: list[int] | None = None  # the cpuset of its iothreads now, when they all share one

    def active_now(self) -> int:
        """The active count the live pinning shows: a prefix of io_cores, else iocm_min_cores."""
        if self.pinned:
            n = len(self.pinned)
            if sorted(self.io_cores[:n]) == sorted(self.pinned):
                return min(max(n, self.min_cores), self.max_cores)
        return self.min_cores


def parse_cpuset(text: str) -> list[int]:
    """'0-2,5' → [0, 1, 2, 5] (libvirt's and the kernel's cpuset syntax: shared/cpu_list.py)."""
    return parse_cpu_list(text)


def guest_iocm(xml: str, meta: dict[str, str]) -> GuestIocm | None:
    """The guest's IOcm facts from its domain XML and vtorque metadata; None when it has no IOcm."""
    cores_text = meta.get("iocm-cores")
    if not cores_text:
        return None
    root = ET.fromstring(xml)
    io_cores = parse_cpuset(cores_text)
    count = int(root.findtext("iothreads") or 0)
    if not count or not io_cores:
        return None
    pins = {p.get("cpuset") for p in root.iter("iothreadpin")}
    pin = pins.pop() if len(pins) == 1 else None
    pinned = parse_cpuset(pin) if pin is not None else None
    disks = [dev for t in root.findall("devices/disk/target") if (dev := t.get("dev"))]
    nics = [dev for t in root.findall("devices/interface/target") if (dev := t.get("dev"))]
    ids = [int(i.attrib["id"]) for i in root.findall("iothreadids/iothread")] or list(range(1, count + 1))
    return GuestIocm(name=root.findtext("name") or "", io_cores=io_cores,
                     min_cores=int(meta.get("iocm-min") or 1), max_cores=int(meta.get("iocm-max") or len(io_cores)),
                     iothreads=ids, disks=disks, interfaces=nics, pinned=pinned)


def cpumap(cores: list[int], host_cpus: int) -> tuple[bool, ...]:
    """libvirt's cpumap: one bool per host CPU."""
    wanted = set(cores)
    return tuple(i in wanted for i in range(host_cpus))


# -- pure: the sKVM vhost interface -------------------------------------------------------------------------

@dataclass(frozen=True)
class VhostWorker:
    id: str  # "w.N"
    cpu: int
    devices: list[str]  # "d.N"


def plan_vhost(workers: list[VhostWorker], devices: list[str], cores: list[int]) -> tuple[
        list[int], list[str], dict[str, int]]:
    """How to bring sKVM's shared vhost workers to one per active I/O core with the guest's devices spread
    over them: (cores that need a new worker, workers to remove once empty, device → index into `cores`).
    Devices are dealt round-robin in their sorted order, so the same input always gives the same layout."""
    have = {w.cpu for w in workers}
    create = [c for c in cores if c not in have]
    remove = [w.id for w in workers if w.cpu not in cores]
    placement = {dev: i % len(cores) for i, dev in enumerate(sorted(devices))} if cores else {}
    return create, remove, placement


# -- I/O: adapters ------------------------------------------------------------------------------------------

class LibvirtIocm:
    """Re-pins a running guest's iothreads through libvirt (works with any QEMU that has iothreads)."""

    name = "libvirt"

    def apply(self, dom, guest: GuestIocm, cores: list[int]) -> None:
        import libvirt

        host_cpus = dom.connect().getCPUMap(0)[0]  # highest CPU id + 1, offline ones included
        cmap = cpumap(cores, host_cpus)
        for tid in guest.iothreads:
            dom.pinIOThread(tid, cmap, libvirt.VIR_DOMAIN_AFFECT_LIVE)


class SkvmIocm:
    """MIKELANGELO sKVM's IOcm: the vhost module exposes shared vhost workers under /sys/class/vhost
    (worker/create, worker/remove, worker/w.N/{pid,cpu,dev_list,locked}, dev/d.N/{worker,owner}). The
    guest's vhost devices (owner = its QEMU process) are spread over one worker per active I/O core; each
    worker's kernel thread is pinned to its core. Layout as in mikelangelo-project/dynamic-io-manager."""

    name = "skvm"

    def __init__(self, root: str | None = None, pid_dir: str = "/run/libvirt/qemu"):
        self.root, self.pid_dir = Path(root or SKVM_VHOST), Path(pid_dir)

    @staticmethod
    def present(root: str | None = None) -> bool:
        base = Path(root or SKVM_VHOST)
        return (base / "worker" / "create").exists() and (base / "dev").is_dir()

    def _read(self, *parts: str) -> str:
        return (self.root.joinpath(*parts)).read_text().strip()

    def _write(self, value: str, *parts: str) -> None:
        (self.root.joinpath(*parts)).write_text(value)

    def workers(self) -> list[VhostWorker]:
        out = []
        for d in sorted((self.root / "worker").glob("w.*")):
            devs = self._read("worker", d.name, "dev_list").split()
            out.append(VhostWorker(d.name, int(self._read("worker", d.name, "cpu") or -1), devs))
        return out

    def guest_devices(self, guest_name: str) -> list[str]:
        pid = (self.pid_dir / f"{guest_name}.pid").read_text().strip()
        return [d.name for d in sorted((self.root / "dev").glob("d.*")) if self._read("dev", d.name, "owner") == pid]

    def apply(self, dom, guest: GuestIocm, cores: list[int]) -> None:
        # The guest's iothreads (disk I/O in QEMU) follow the same cores as its vhost devices (network).
        LibvirtIocm().apply(dom, guest, cores)
        create, remove, placement = plan_vhost(self.workers(), self.guest_devices(guest.name), cores)
        for core in create:
            self._write(str(core), "worker", "create")
        by_cpu = {w.cpu: w for w in self.workers()}
        for core in cores:
            os.sched_setaffinity(int(self._read("worker", by_cpu[core].id, "pid")), {core})
        for dev, i in placement.items():
            self._write(by_cpu[cores[i]].id, "dev", dev, "worker")
        for wid in remove:
            if not self._read("worker", wid, "dev_list").split():  # other guests' devices may still be there
                self._write("1", "worker", wid, "locked")
                self._write(wid, "worker", "remove")


def detect_backend(root: str | None = None):
    """sKVM's interface where its module is loaded, else libvirt's iothread pinning."""
    return SkvmIocm(root) if SkvmIocm.present(root) else LibvirtIocm()


def capabilities(root: str | None = None) -> list[str]:
    return ["iocm", "iocm-skvm"] if SkvmIocm.present(root) else ["iocm"]


# -- I/O: the controller thread ---------------------------------------------------------------------------

def sample(dom, guest: GuestIocm, now: float | None = None) -> Counters:
    total = ops = 0
    for dev in guest.disks:
        try:
            b, o = block_bytes(dom.blockStats(dev))
        except Exception:  # noqa: BLE001 - a disk without stats (e.g. hot-unplugged) counts as idle
            continue
        total, ops = total + b, ops + o
    for dev in guest.interfaces:
        try:
            b, o = interface_bytes(dom.interfaceStats(dev))
        except Exception:  # noqa: BLE001
            continue
        total, ops = total + b, ops + o
    return Counters(at=time.monotonic() if now is None else now, bytes=total, ops=ops)


class IocmController:
    """Samples every running vtorque guest with IOcm and moves its I/O cores. One thread per node worker."""

    def __init__(self, hv, stop: threading.Event, interval: float = 2.0, policy: Policy | None = None,
                 backend=None):
        self.hv, self.stop = hv, stop
        self.interval = max(0.2, float(interval))
        self.policy = policy or Policy()
        self.backend = backend or detect_backend()
        self.thread = threading.Thread(target=self._run, name="iocm", daemon=True)
        self._last: dict[str, Counters] = {}
        self._state: dict[str, State] = {}
        self.changes: list[tuple[str, int, int]] = []  # (guest, from, to): what the loop did, for operators/tests

    def start(self) -> IocmController:
        log(LOG, logging.INFO, "IOcm controller started", backend=self.backend.name, interval=self.interval)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - one bad round must not end the controlling
                log(LOG, logging.WARNING, "IOcm round failed", error=str(exc))
            self.stop.wait(self.interval)

    def step(self) -> None:
        """One round: sample, decide, apply. Guests that went away are forgotten."""
        seen = set()
        for name, meta in self.hv.vtorque_domains().items():
            if not meta.get("iocm-cores"):
                continue
            # Every libvirt call with a deadline (hypervisor.py): a wedged libvirtd fails the round, it does not
            # hold the controller for ever.
            dom = self.hv.lookup(name)
            if dom is None or not self.hv.timed(f"is {name} active", dom.isActive):
                continue
            guest = guest_iocm(self.hv.xml(dom), meta)
            if guest is None:
                continue
            seen.add(name)
            cur = self.hv.timed(f"{name}'s I/O counters", sample, dom, guest)
            prev = self._last.get(name)
            self._last[name] = cur
            state = self._state.get(name) or State(guest.active_now())
            if prev is None:
                self._state[name] = state
                continue
            rate = io_rate(prev, cur)
            new = decide(state, rate, self.policy, guest.min_cores, guest.max_cores)
            if new.active != state.active:
                cores = guest.io_cores[:new.active]
                try:
                    self.hv.timed(f"{name}'s I/O pinning", self.backend.apply, dom, guest, cores)
                except Exception as exc:  # noqa: BLE001 - keep the old count; retried next round
                    log(LOG, logging.WARNING, "IOcm pinning not applied", guest=name, error=str(exc))
                    new = replace(state, above=0, below=0)
                else:
                    log(LOG, logging.INFO, "IOcm cores changed", guest=name, was=state.active, now=new.active,
                        cores=",".join(map(str, cores)), rate_bytes_s=int(rate))
                    self.changes.append((name, state.active, new.active))
            self._state[name] = new
        for gone in set(self._last) - seen:
            self._last.pop(gone, None)
            self._state.pop(gone, None)


def policy_from(node_config) -> Policy:
    """The [node] iocm_* keys as a Policy; a bad value names its key."""
    n = node_config
    if not 0 <= n.iocm_narrow_mib_s < n.iocm_widen_mib_s:
        raise ValueError(f"node.iocm_narrow_mib_s ({n.iocm_narrow_mib_s}) must be at least 0 and below "
                         f"node.iocm_widen_mib_s ({n.iocm_widen_mib_s})")
    for key in ("iocm_widen_samples", "iocm_narrow_samples"):
        if getattr(n, key) < 1:
            raise ValueError(f"node.{key}: must be at least 1")
    return Policy(high=n.iocm_widen_mib_s * 2**20, low=n.iocm_narrow_mib_s * 2**20,
                  up_samples=n.iocm_widen_samples, down_samples=n.iocm_narrow_samples)


def start(worker: NodeWorker, stop: threading.Event) -> IocmController:
    """The node worker's IOcm thread (cli/main.py starts it beside the heartbeat)."""
    return IocmController(worker.hv, stop, worker.config.node.iocm_interval, policy_from(worker.config.node)).start()
