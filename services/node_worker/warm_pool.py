"""The warm pool: single-use guests restored from a warm image (warm.py) ahead of demand, kept paused, and taken
at a prologue by exactly one job, which resumes it and gives it its identity (issue 13 item 3).

`[node] warm_pool = N` keeps N of them per warm image on this node (a warm image is one image digest and one guest
shape: `vtorque images warm`); 0, the default, keeps none. What holds, and why:

- Single-use: a job claims a pooled guest by creating its `claim` file (O_EXCL: one winner, even between two
  threads or processes); the claim is never undone. A claimed guest is the job's from then on (its metadata, its
  `job` file) and goes with it at teardown like any guest; a failure after the claim removes it. Nothing a job
  touched is ever pooled again: the pool only ever restores the warm image's own files.
- Root's alone until claimed: `<guest_dir>/vt-pool-<key12>-<hex8>/` (root's, as every guest directory) with its
  `pool.json` record (0600, written last: no record, no pooled guest) and the link's ssh socket made for root only
  (owner uid 0). The guest has never run after its restore (paused), holds no identity, no key and no user, and
  its channel socket is made root's.
- Its owner's way in: the link (guest_link.py) lets in root and the uid that owns its ssh socket file, looked at
  on each connection; once the claimed guest holds its identity the node worker makes that socket the owner's
  (`guest_link.hand_over`, a chown in a root-only directory): a node worker restart changes nothing.
- The domain keeps its pool name (libvirt renames no running domain): the job's guest is named in its metadata,
  the GuestReady and the launcher's job file (named after the domain, `<domain>.json`, as teardown and
  reconciliation look for it); its hostname is the job's (the identity).
- Reconciliation (`reconcile`) keeps the pooled guests it recognises (name, record, running domain, of a current
  warm image) and removes the others: a pooled guest whose warm image was evicted or rebuilt, one beyond
  `warm_pool`, a record without a domain or a domain without its record, a claim that never became a job's guest.
- Memory: a pooled guest's RAM is taken while it waits (QEMU has it); the pool is outside any job's allocation, so
  the refill restores one only while the node's MemAvailable stays above the guest's RAM plus
  `[spec] host_reserve_ram`, and the operator takes `warm_pool × RAM × warm images` off what the scheduler
  may give jobs on the node (Slurm MemSpecLimit/RealMemory); the worker logs that figure at start. CPU: a paused
  guest uses none; the refill runs only while the node boots nothing.
- Fallback: no pooled guest, or one that fails after its claim, and the guest is restored from the warm image
  (warm_boot.py), else booted cold; the boot span's `vtorque.boot.path` is `pool`, `warm` or `cold` and
  `vtorque.boot.why` says why (the pool's reason first).

The pure part (names, records, what to refill, which pooled guest fits, what reconciliation removes, live
pinning) is apart from the I/O (`WarmPool`), whose dependencies (worker, clock, free memory) are injected.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import stat
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from vtorque.shared.cpu_list import parse_cpu_list

POOL_PREFIX = "vt-pool-"
POOL_NAME = re.compile(r"^vt-pool-([0-9a-f]{12})-([0-9a-f]{8})$")
POOL_JOB = "vt-pool"  # the `job` file of a pooled guest until its claim
RECORD = "pool.json"
CLAIM = "claim"
RESTORE_COPY = "pool-restore.save"
FORMAT = 1
GRACE = 120.0  # seconds: an incomplete pooled guest, or a claim that never became a job's guest, is left that long
OVERHEAD_MIB = 64  # what QEMU takes beside a guest's RAM
REFILL_POLL = 2.0
LOG = logging.getLogger("vtorque.node_worker.warm_pool")


# -- the pure part ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """A warm image the pool keeps guests of."""
    key: str
    digest: str
    created: float  # the warm image's: a rebuilt one (same key and digest) is another target
    ram_mib: int
    image: str = ""


@dataclass(frozen=True)
class Pooled:
    name: str
    key: str
    digest: str
    warm_created: float
    created: float
    claimed_by: str | None = None  # the job that claimed it; never None again once set
    claimed_at: float | None = None


def pool_name(key: str, token: str) -> str:
    name = f"{POOL_PREFIX}{key[:12]}-{token}"
    if not POOL_NAME.match(name):
        raise ValueError(f"not a pooled guest's name: {name!r}")
    return name


def is_pool_name(name: str) -> bool:
    return bool(POOL_NAME.match(name))


def parse_record(name: str, text: str | None, claim: str | None = None, claimed_at: float | None = None
                 ) -> Pooled | None:
    """The pooled guest of directory `name` from its record (and claim file), or None when any of it is not as
    the node worker writes it: such a directory is never used, and reconciliation removes it."""
    match = POOL_NAME.match(name)
    if match is None or text is None:
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return None
    key, digest = doc.get("key"), doc.get("digest")
    warm_created, created = doc.get("warm_created"), doc.get("created")
    if not (isinstance(key, str) and re.fullmatch(r"[0-9a-f]{24}", key) and key.startswith(match.group(1))
            and isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)
            and isinstance(warm_created, int | float) and not isinstance(warm_created, bool)
            and isinstance(created, int | float) and not isinstance(created, bool)):
        return None
    if claim is not None:
        claim = claim.strip() or "?"
    return Pooled(name=name, key=key, digest=digest, warm_created=float(warm_created), created=float(created),
                  claimed_by=claim, claimed_at=claimed_at if claim is not None else None)


def record_text(key: str, digest: str, warm_created: float, created: float) -> str:
    return json.dumps({"format": FORMAT, "key": key, "digest": digest, "warm_created": warm_created,
                       "created": created})


def fits(p: Pooled, t: Target) -> bool:
    return p.claimed_by is None and (p.key, p.digest, p.warm_created) == (t.key, t.digest, t.created)


def candidates(pooled: Iterable[Pooled], target: Target) -> list[Pooled]:
    """The pooled guests a job's guest of `target`'s shape may take, the oldest first."""
    return sorted((p for p in pooled if fits(p, target)), key=lambda p: (p.created, p.name))


def refill_plan(targets: list[Target], pooled: Iterable[Pooled], size: int, mem_available_mib: int | None,
                reserve_mib: int, busy: bool, filling: int = 0) -> Target | None:
    """The warm image to restore one more pooled guest of now, or None: none while the node boots (`busy`) or a
    fill is under way, none past `size` per warm image, none that would leave less than `reserve_mib` of the
    node's memory available (unknown free memory: none). The target with the fewest waiting goes first."""
    if size <= 0 or busy or filling or mem_available_mib is None:
        return None
    pooled = list(pooled)
    short = [(sum(1 for p in pooled if fits(p, t)), t) for t in targets]
    for have, target in sorted(short, key=lambda pair: (pair[0], pair[1].key)):
        if have < size and mem_available_mib - target.ram_mib - OVERHEAD_MIB >= reserve_mib:
            return target
    return None


def pool_memory_mib(targets: Iterable[Target], size: int) -> int:
    """What the pool holds of the node's memory when full: what the scheduler should not give jobs."""
    return sum((t.ram_mib + OVERHEAD_MIB) * size for t in targets)


def removals(pooled: dict[str, Pooled | None], dir_mtimes: dict[str, float], active: set[str],
             job_domains: set[str], targets: list[Target], size: int, filling: set[str], now: float,
             grace: float = GRACE) -> list[tuple[str, str]]:
    """What reconciliation removes of the pool, (name, why). `pooled`: pool directory name → its pooled guest
    (None: no valid record); `active`: running domains with a pool name; `job_domains`: domains with vtorque
    metadata (a claimed guest that became a job's: normal reconciliation's). Names being filled are left."""
    out: list[tuple[str, str]] = []
    kept: dict[Target, list[Pooled]] = {}
    for name in sorted(pooled):
        if name in filling:
            continue
        p = pooled[name]
        if p is None:
            if now - dir_mtimes.get(name, now) > grace:
                out.append((name, "a pooled guest without a valid record"))
            continue
        if p.claimed_by is not None:
            if name not in job_domains and now - (p.claimed_at or now) > grace:
                out.append((name, f"claimed by job {p.claimed_by} but never became its guest"))
            continue
        if name not in active:
            out.append((name, "its domain is gone"))
            continue
        target = next((t for t in targets if fits(p, t)), None)
        if target is None:
            out.append((name, "its warm image was evicted or rebuilt"))
            continue
        kept.setdefault(target, []).append(p)
    for group in kept.values():
        for extra in sorted(group, key=lambda p: (p.created, p.name))[size:]:
            out.append((extra.name, f"more than warm_pool = {size}"))
    for name in sorted(active - set(pooled) - filling - job_domains):
        out.append((name, "a pool domain without its directory"))
    return out


def parse_cpuset(text: str) -> set[int]:
    """libvirt's cpuset ("3", "0-2,5") as CPU numbers (shared/cpu_list.py); ValueError on anything else, an empty
    cpuset included (a pin without one is no pin)."""
    if not text.strip():
        raise ValueError(f"cpuset {text!r}")
    return set(parse_cpu_list(text))


@dataclass(frozen=True)
class Pins:
    vcpus: dict[int, set[int]]
    emulator: set[int] | None
    numa: bool  # the guest's memory is placed (numatune): not done to a guest whose memory is already there


def live_pins(fresh_xml: str) -> Pins:
    """The pinning a job's guest gets (its own cold XML, domain.py), to apply to a pooled guest live."""
    dom = ET.fromstring(fresh_xml)
    vcpus = {int(pin.get("vcpu", "")): parse_cpuset(pin.get("cpuset", ""))
             for pin in dom.findall("cputune/vcpupin")}
    emulator = dom.find("cputune/emulatorpin")
    return Pins(vcpus=vcpus, emulator=parse_cpuset(emulator.get("cpuset", "")) if emulator is not None else None,
                numa=dom.find("numatune") is not None)


def cpumap(cpus: set[int], host_cpus: int) -> tuple[bool, ...]:
    if not cpus or max(cpus) >= host_cpus:
        raise ValueError(f"CPUs {sorted(cpus)} not on this host ({host_cpus})")
    return tuple(i in cpus for i in range(host_cpus))


# -- the I/O part ------------------------------------------------------------------------------------------------

def mem_available_mib() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError):
        return None
    return None


def _write_root_file(path: Path, text: str, exclusive: bool = False) -> None:
    """A root-only file (0600) written whole: O_EXCL when `exclusive` (the claim: one winner), else through a
    rename (root_files.write_atomic)."""
    if not exclusive:
        from . import root_files

        root_files.write_atomic(path, text.encode())
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with open(fd, "w") as fh:
        fh.write(text)


class WarmPool:
    """One node worker's pool. `worker` gives config, hv, store, node, domain_type, booting_now() and
    _remove_disks(); `mem_available` and `clock` are injected (tests). The clock (wall seconds) is the worker's
    own (shared/clock.py) unless one is given: a pooled guest's age is judged by the time its node worker decides by."""

    def __init__(self, worker, mem_available: Callable[[], int | None] = mem_available_mib,
                 clock: Callable[[], float] | None = None):
        worker_clock = getattr(worker, "clock", None)
        self.worker, self.mem_available = worker, mem_available
        self.clock = clock or (worker_clock.now if worker_clock is not None else time.time)
        self.size = max(0, int(getattr(worker.config.node, "warm_pool", 0) or 0))
        self.lock = threading.Lock()
        self.filling: set[str] = set()
        self.wake = threading.Event()

    # -- what there is ---------------------------------------------------------------------------------------

    def targets(self) -> list[Target]:
        from . import warm

        config, store = self.worker.config, self.worker.store
        catalog = {(name, e.sha256) for name, e in config.images.catalog.items()}
        found = []
        for image in warm.listing(config):
            meta = image.meta
            if (meta.get("image"), image.digest) in catalog and store.has(image.digest) \
                    and meta.get("domain_type") == self.worker.domain_type and isinstance(meta.get("ram_mib"), int):
                found.append(Target(key=image.key, digest=image.digest, created=float(meta.get("created", 0)),
                                    ram_mib=meta["ram_mib"], image=str(meta.get("image"))))
        return found

    def dirs(self) -> dict[str, Path]:
        from . import disks

        found = {}
        for name, gdir in disks.guest_dirs(self.worker.config.node.guest_dir).items():
            node = disks.read_small(gdir, "node")
            if is_pool_name(name) and (node is None or node.strip() == self.worker.node):
                found[name] = gdir
        return found

    def read(self, name: str, gdir: Path) -> Pooled | None:
        from . import disks

        claim = disks.read_small(gdir, CLAIM)
        claimed_at = None
        if claim is not None:
            try:
                claimed_at = os.lstat(gdir / CLAIM).st_mtime
            except OSError:
                claimed_at = None
        return parse_record(name, disks.read_small(gdir, RECORD), claim, claimed_at)

    def pooled(self) -> dict[str, Pooled | None]:
        return {name: self.read(name, gdir) for name, gdir in self.dirs().items()}

    # -- filling -----------------------------------------------------------------------------------------------

    def fill_once(self) -> str | None:
        """One more pooled guest when the plan says so; its name, or None."""
        if self.size <= 0:
            return None
        from vtorque.shared.spec import parse_size_mib

        targets = self.targets()
        with self.lock:
            filling = len(self.filling)
        target = refill_plan(targets, [p for p in self.pooled().values() if p], self.size, self.mem_available(),
                             parse_size_mib(self.worker.config.spec.host_reserve_ram),
                             bool(self.worker.booting_now()), filling)
        return self.fill(target) if target is not None else None

    def fill_to_target(self, timeout: float = 300.0) -> int:
        """Fill until the plan wants no more (bench, tests); how many were made."""
        made, until = 0, time.monotonic() + timeout
        while time.monotonic() < until and self.fill_once():
            made += 1
        return made

    def fill(self, target: Target) -> str:
        from . import disks, guest_link, warm, warm_boot
        from .domain import IDENTITY_SOCKET, USER_NET_MAC, BootSource, domain_xml
        from .save_image import copy_with_xml, read_header

        w = self.worker
        config, hv = w.config, w.hv
        image = next((i for i in warm.listing(config) if (i.key, i.digest) == (target.key, target.digest)), None)
        entry = config.images.catalog.get(target.image)
        if image is None or entry is None or entry.sha256 != target.digest:
            raise OSError(f"warm image {target.key[:12]} of {target.image} is gone")
        name = pool_name(target.key, secrets.token_hex(4))
        with self.lock:
            self.filling.add(name)
        try:
            seed = warm.identity_free_seed(name)  # as the warm image's own: no identity
            files = disks.prepare(config.node.guest_dir, name, POOL_JOB, w.store.path(target.digest), entry.format,
                                  seed, store=config.images.store, node=w.node)
            gdir = Path(files.overlay).parent
            try:
                shutil.copyfile(image.overlay, files.overlay)
                os.chmod(files.overlay, 0o600)
                guest_link.start(gdir, 0, USER_NET_MAC)  # root's alone until a job claims it (hand_over)
                plan = warm.warm_plan(name, target.image, entry, w.node, int(image.meta["vcpus"]), target.ram_mib)
                boot = BootSource(entry.kernel, entry.initrd, entry.cmdline)
                fresh = domain_xml(plan, files, boot, warm._no_meta(), w.domain_type, identity_channel=True)
                xml = warm.without_metadata(warm_boot.restore_xml(read_header(image.save).xml, fresh,
                                                                  image.saved_dir, str(gdir)))
                copy = gdir / RESTORE_COPY
                copy_with_xml(image.save, copy, xml)
                try:
                    hv.timed("restore", warm_boot._restore_paused, hv, str(copy), timeout=hv.start_timeout)
                finally:
                    copy.unlink(missing_ok=True)
                # Its identity channel root's alone from now on (libvirt makes it QEMU's, group-writable): the
                # guest may wait long before a job takes it, and nothing but this worker may speak to it.
                channel = gdir / IDENTITY_SOCKET
                if not stat.S_ISSOCK(os.lstat(channel).st_mode):
                    raise OSError(f"{channel} is not the guest's channel socket")
                os.chown(channel, 0, 0, follow_symlinks=False)
                os.chmod(channel, 0o600)
                _write_root_file(gdir / RECORD, record_text(target.key, target.digest, target.created, self.clock()))
            except BaseException:
                hv.remove(name)
                w._remove_disks(name)
                raise
        finally:
            with self.lock:
                self.filling.discard(name)
        _log(logging.INFO, "pooled guest ready", guest=name, warm_image=image.dir.name)
        return name

    # -- the refill thread --------------------------------------------------------------------------------------

    def start(self, stop: threading.Event) -> threading.Thread | None:
        if self.size <= 0:
            return None
        targets = self.targets()
        _log(logging.INFO, "warm pool on", size=self.size, warm_images=len(targets),
             reserve_from_scheduler_mib=pool_memory_mib(targets, self.size))
        thread = threading.Thread(target=self._loop, args=(stop,), name="warm-pool", daemon=True)
        thread.start()
        return thread

    def _loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                made = self.fill_once()
            except Exception as exc:  # noqa: BLE001 - one failed fill must not end the refill for good
                _log(logging.WARNING, "pooled guest not made", error=str(exc))
                made = None
            if not made:
                self.wake.wait(REFILL_POLL)
                self.wake.clear()

    # -- a job's guest from the pool -----------------------------------------------------------------------

    def claim_for(self, cmd, guest, entry, job_nic, deadline: float, t0: float):
        """(timings, the job's ssh socket) of a pooled guest resumed as `guest`, or (None, why not)."""
        from opentelemetry import trace

        from . import warm, warm_boot
        from .domain import BootSource

        span = trace.get_current_span()
        if self.size <= 0:
            return None, ""
        again = self.claimed_for(cmd.job_id, guest.index)
        if again is not None:
            return self._again(again, guest, deadline), ""
        why = warm.why_not_warm(guest)
        if why:
            return None, f"no pooled guest: {why}"
        boot = BootSource(entry.kernel, entry.initrd, entry.cmdline)
        key = warm.shape_key(guest, boot, self.worker.domain_type)
        target = next((t for t in self.targets() if (t.key, t.digest) == (key, guest.image_digest)), None)
        if target is None:
            return None, f"no pooled guest: no warm image for this shape ({key[:12]})"
        taken = None
        for p in candidates([p for p in self.pooled().values() if p], target):
            gdir = Path(self.worker.config.node.guest_dir) / p.name
            try:
                _write_root_file(gdir / CLAIM, cmd.job_id, exclusive=True)
            except FileExistsError:
                continue  # another boot took it first
            except OSError:
                continue
            taken = p
            break
        self.wake.set()  # one fewer waiting: the refill makes another once the node is idle
        if taken is None:
            return None, "no pooled guest free for this shape"
        try:
            result = self._resume(cmd, guest, taken, job_nic, boot, deadline, t0)
        except Exception as exc:  # noqa: BLE001 - any failure: the guest goes, the job's guest is restored
            reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            _log(logging.WARNING, "pooled guest failed: restoring instead", guest=guest.name, pooled=taken.name,
                 error=reason)
            self._remove(taken.name)
            return None, f"pooled guest {taken.name} failed: {reason}"[:300]
        span.set_attributes({warm_boot.PATH: "pool", warm_boot.WHY: f"pooled guest {taken.name}",
                             "vtorque.pool_guest": taken.name})
        _log(logging.INFO, "guest taken from the warm pool", guest=guest.name, pooled=taken.name)
        return result, ""

    def _resume(self, cmd, guest, taken: Pooled, job_nic, boot, deadline: float, t0: float):
        import libvirt

        from vtorque.shared import messages as m
        from vtorque.shared.job_network import guest_mac

        from . import disks, guest_link, job_cgroup, numa, warm_boot
        from .domain import IDENTITY_SOCKET, METADATA_NS, GuestMetadata, domain_xml
        from .identity_channel import IDENTITY_OK, IdentityChannel
        from .readiness import EarlyBanner, wait_ready
        from .seed import seed_files

        w = self.worker
        hv = w.hv
        t_image = time.monotonic()
        gdir = Path(w.config.node.guest_dir) / taken.name
        dom = hv.lookup(taken.name)
        if dom is None or not hv.is_active(taken.name):
            raise OSError("its domain is gone")
        mac = guest_mac(cmd.job_id, guest.index) if cmd.network else None
        seed = seed_files(guest, cmd.job_id, cmd.peers, cmd.network, mac, w.config.node.guest_mounts)
        meta = GuestMetadata(job_id=cmd.job_id, owner=guest.owner.user, deadline=cmd.deadline, index=guest.index,
                             node=w.node, end_by=guest.end_by)
        files = disks.GuestDisks(overlay=str(gdir / "root.qcow2"), seed=str(gdir / "seed.iso"),
                                 console_log=str(gdir / "console.log"))
        fresh = domain_xml(msgspec_replace(guest, name=taken.name), files, boot, meta, w.domain_type,
                           numa_topology=numa.host_topology(), identity_channel=True)
        pins = live_pins(fresh)
        if pins.numa:
            raise OSError("the guest's memory is NUMA-placed: not done to a guest already in memory")
        # The job's from now on: its `job` file, its metadata (teardown and reconciliation find it by that).
        _write_root_file(gdir / "job", cmd.job_id)
        element = ET.fromstring(fresh).find(f"metadata/{{{METADATA_NS}}}guest")
        assert element is not None
        element.append(_text_element(f"{{{METADATA_NS}}}guest-name", guest.name))
        # In the namespace as a default one: libvirt declares its own prefix on the element ("failed to create a
        # new XML namespace" when the element declares that prefix already); the children keep the namespace.
        text = ET.tostring(element, encoding="unicode", default_namespace=METADATA_NS)
        hv.timed("set metadata", dom.setMetadata, libvirt.VIR_DOMAIN_METADATA_ELEMENT, text, "vtorque", METADATA_NS,
                 libvirt.VIR_DOMAIN_AFFECT_LIVE, timeout=hv.change_timeout)
        hv.metadata_changed(dom)
        t_disks = time.monotonic()
        host_cpus = os.cpu_count() or 1
        for vcpu, cpus in pins.vcpus.items():
            hv.timed("pin a vCPU", dom.pinVcpuFlags, vcpu, cpumap(cpus, host_cpus), libvirt.VIR_DOMAIN_AFFECT_LIVE,
                     timeout=hv.change_timeout)
        if pins.emulator:
            hv.timed("pin the emulator", dom.pinEmulator, cpumap(pins.emulator, host_cpus),
                     libvirt.VIR_DOMAIN_AFFECT_LIVE, timeout=hv.change_timeout)
        if job_nic:
            nic = warm_boot.job_nic_xml(msgspec_replace(guest, name=taken.name), files, boot, meta, w.domain_type,
                                        job_nic)
            hv.timed("attach the job network NIC", dom.attachDeviceFlags, nic, libvirt.VIR_DOMAIN_AFFECT_LIVE,
                     timeout=hv.change_timeout)
        layout = w.config.node.job_cgroup
        if layout:
            try:
                job_cgroup.adopt(layout, w.config.node.job_cgroup_root, taken.name, cmd.job_id, guest.owner.uid,
                                 w.node)
            except OSError as exc:
                _log(logging.WARNING, "guest not moved into its job's cgroup", guest=taken.name, error=str(exc))
        ssh_socket = gdir / guest_link.SSH_SOCKET
        st = os.lstat(ssh_socket)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != 0:
            raise OSError("the pooled guest's ssh socket is not root's")
        t_define = time.monotonic()
        # The identity is written while the guest is still paused (QEMU holds it in the socket): the resumed
        # guest finds it at its first read, with no poll on its path.
        banner = None
        try:
            with IdentityChannel.open(gdir / IDENTITY_SOCKET, deadline, root_only=True) as channel:
                channel.send_identity(warm_boot.identity_env(seed))
                hv.resume(dom)
                t_start = time.monotonic()
                banner = EarlyBanner(gdir / guest_link.SSH_SOCKET, deadline)
                channel.expect(IDENTITY_OK, deadline)
            # The owner's way in only once the guest is theirs: its sshd already listens (started before the
            # save), and no login of the owner's may come before the identity and the host's random bytes are in.
            guest_link.hand_over(gdir, guest.owner.uid, guest.owner.gid)
            ready = wait_ready(files.console_log, ssh_socket, lambda: hv.is_active(taken.name),
                               deadline, banner=banner)
        finally:
            if banner is not None:
                banner.close()
        hv.metadata_changed(dom)  # again: a listing that read the XML before the change is over
        timings = m.PhaseTimings(image=t_image - t0, disks=t_disks - t0, define=t_define - t0, start=t_start - t0,
                                 kernel_up=None, ready=ready.ready - t0)
        return timings, ssh_socket

    def _again(self, name: str, guest, deadline: float):
        """A redelivered BootGuests: the pooled guest this job took already runs; announced again, not taken twice."""
        from vtorque.shared import messages as m

        from . import guest_link
        from .readiness import wait_ready

        started = time.monotonic()
        gdir = Path(self.worker.config.node.guest_dir) / name
        wait_ready(gdir / "console.log", gdir / guest_link.SSH_SOCKET, lambda: self.worker.hv.is_active(name),
                   deadline)
        _log(logging.INFO, "pooled guest already the job's, announcing it again", guest=guest.name, pooled=name)
        zero = m.PhaseTimings(image=0, disks=0, define=0, start=0, kernel_up=None, ready=time.monotonic() - started)
        return zero, gdir / guest_link.SSH_SOCKET

    def claimed_for(self, job_id: str, index: int) -> str | None:
        """A pooled guest this job already took for its guest `index` (a redelivered BootGuests)."""
        for name, meta in self.worker.hv.vtorque_domains().items():
            if is_pool_name(name) and meta.get("job") == job_id and meta.get("index") == str(index) \
                    and meta.get("node", self.worker.node) == self.worker.node:
                return name
        return None

    # -- reconciliation --------------------------------------------------------------------------------------

    def reconcile(self) -> set[str]:
        """Remove what `removals` says; the pool directories left (reconciliation keeps them)."""
        from . import disks

        w = self.worker
        dirs = self.dirs()
        if self.size <= 0 and not dirs:
            return set()  # no pool here (a pool domain left without its directory goes once one is kept again)
        pooled = {name: self.read(name, gdir) for name, gdir in dirs.items()}
        mtimes = {name: disks.mtime_of(gdir, "job") or self.clock() for name, gdir in dirs.items()}
        active = {n for n in w.hv.active_names() if is_pool_name(n)}
        job_domains = {n for n in w.hv.vtorque_domains() if is_pool_name(n)}
        with self.lock:
            filling = set(self.filling)
        gone = removals(pooled, mtimes, active, job_domains, self.targets(), self.size, filling, self.clock())
        for name, why in gone:
            _log(logging.WARNING, "reconcile: removing pooled guest", guest=name, reason=why)
            self._remove(name)
        removed = {name for name, _ in gone}
        # A claimed guest that is a job's (its metadata) is normal reconciliation's: it goes with its job.
        return (set(dirs) | filling) - removed - job_domains

    def _remove(self, name: str) -> None:
        try:
            self.worker.hv.remove(name)
        finally:
            self.worker._remove_disks(name)


def msgspec_replace(guest, **changes):
    import msgspec

    return msgspec.structs.replace(guest, **changes)


def _text_element(tag: str, text: str) -> ET.Element:
    element = ET.Element(tag)
    element.text = text
    return element


def _log(level: int, message: str, **fields) -> None:
    from vtorque.shared.logs import log

    log(LOG, level, message, **fields)


def pool_of(worker) -> WarmPool:
    """The worker's pool (one per node worker, made on first use)."""
    pool = getattr(worker, "_warm_pool", None)
    if pool is None:
        pool = WarmPool(worker)
        worker._warm_pool = pool
    return pool
