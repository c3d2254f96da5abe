"""A job's guest from a warm image (warm.py): restore a copy of the saved guest as this guest, then give it its
identity over its host-only channel, before it is announced ready. Cold boot stays the fallback: whenever no
warm image fits, or anything of the restore fails, `try_restore` says why (the boot span's `vtorque.boot.path`
and `vtorque.boot.why`, and the log) and returns None.

The copy is this guest's own in every part a job could see: the XML in its save file's header names this
guest (name, a new uuid and VM generation ID, the job's metadata and pinning) and this guest's directory for
every file (root disk, seed, console, ssh link, identity channel), so teardown and reconciliation find and remove
it as any guest; its root disk is a copy of the saved guest's own overlay (never written by a job); the
identity (hostname, the owner's user and uid/gid, the job's ssh key, node file, job network address, hosts),
the host's clock and fresh random bytes reach the guest only over the channel, and its ssh host keys are made
after that (tests/guest/vtorque-init). A job network NIC is hot-plugged after the restore (a warm image has
none: it belongs to no job).
"""

from __future__ import annotations

import logging
import secrets
import shutil
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from datetime import datetime
from pathlib import Path
from typing import Protocol

import libvirt
from opentelemetry import trace

from vtorque.shared import messages as m
from vtorque.shared.config import ImageEntry
from vtorque.shared.job_network import guest_mac
from vtorque.shared.logs import log

from . import disks, guest_link, job_cgroup, numa, warm
from .domain import IDENTITY_SOCKET, QEMU_NS, USER_NET_MAC, BootSource, GuestMetadata, JobNic, domain_xml
from .hypervisor import HypervisorError
from .identity_channel import IDENTITY_OK, ChannelError, IdentityChannel
from .readiness import BootFailed, EarlyBanner, wait_ready
from .save_image import SaveImageError, copy_with_xml, read_header
from .seed import seed_files

LOG = logging.getLogger("vtorque.node_worker.warm_boot")
RESTORE_COPY = "restore.save"
PATH = "vtorque.boot.path"
WHY = "vtorque.boot.why"
# The parts of the saved XML that are the job's, taken from the guest's own fresh XML (domain.py).
PER_GUEST = ("metadata", "cputune", "numatune")


class RestoreFailed(Exception):
    pass


class BootOrder(Protocol):
    """What of a boot command a restore reads (the node's part of a job's BootGuests)."""

    job_id: str
    deadline: datetime
    peers: list[m.GuestPeer]
    network: m.JobNetwork | None


def restore_xml(saved: str, fresh: str, saved_dir: str, guest_dir: str) -> str:
    """The saved guest's XML as this guest's: its name, a new uuid and generation ID, the fresh XML's metadata,
    pinning and NUMA placement, and every path under the saved guest's directory moved to this guest's."""
    ET.register_namespace("qemu", QEMU_NS)
    dom, mine = ET.fromstring(saved), ET.fromstring(fresh)
    name = dom.find("name")
    new_name = mine.findtext("name")
    if name is None or not new_name:
        raise RestoreFailed("a domain XML without a name")
    name.text = new_name
    for tag in ("uuid", "genid"):
        element = dom.find(tag)
        if element is not None:
            element.text = str(uuid.uuid4())
    for tag in PER_GUEST:
        for element in dom.findall(tag):
            dom.remove(element)
    anchor = [child.tag for child in dom].index("vcpu") + 1
    for tag in reversed(PER_GUEST):
        element = mine.find(tag)
        if element is not None:
            dom.insert(1 if tag == "metadata" else anchor, element)
    old, new = saved_dir.rstrip("/") + "/", guest_dir.rstrip("/") + "/"
    for element in dom.iter():
        for key, value in element.attrib.items():
            if old in value:
                element.set(key, value.replace(old, new))
        if element.text and old in element.text:
            element.text = element.text.replace(old, new)
    text = ET.tostring(dom, encoding="unicode")
    if old in text or old.replace(",", ",,") in text:
        raise RestoreFailed("the saved XML names its directory where it cannot be moved")
    return text


def job_nic_xml(guest: m.GuestPlan, files: disks.GuestDisks, boot: BootSource, meta: GuestMetadata,
                domain_type: str, job_nic: JobNic) -> str:
    """The job network NIC of the guest's cold XML, alone (hot-plugged into the restored guest)."""
    full = ET.fromstring(domain_xml(guest, files, boot, meta, domain_type, job_nic))
    nic = full.find("devices/interface[@type='bridge']")
    assert nic is not None  # domain_xml puts it there for a job_nic
    return ET.tostring(nic, encoding="unicode")


def identity_env(seed: dict[str, bytes], clock: float | None = None) -> bytes:
    """What the guest takes over its channel: its seed's vtorque.env, the host's clock, fresh random bytes."""
    return seed["vtorque.env"] + f"VT_CLOCK={int(clock or time.time())}\nVT_RANDOM={secrets.token_hex(32)}\n".encode()


def try_restore(worker, cmd: BootOrder, guest: m.GuestPlan, entry: ImageEntry, base: Path,
                job_nic: JobNic | None, deadline: float, t0: float, pool_why: str = ""
                ) -> tuple[m.PhaseTimings, Path] | None:
    """The guest restored from a warm image and ready, or None (the caller boots it cold) with why in the span.
    `pool_why`: why the warm pool (warm_pool.py) gave no guest, said first in `vtorque.boot.why`."""
    span = _Prefixed(trace.get_current_span(), pool_why)
    t_image = time.monotonic()
    boot = BootSource(entry.kernel, entry.initrd, entry.cmdline)
    why = warm.why_not_warm(guest)
    image = None
    if why is None:
        key = warm.shape_key(guest, boot, worker.domain_type)
        image = warm.find(worker.config, worker.store, guest.image_digest, key)
        why = None if image else f"no warm image of {guest.image} for this shape ({key[:12]}) on this node"
    if image is None:
        span.set_attributes({PATH: "cold", WHY: why or ""})
        if why and why.startswith("no warm image"):
            rebuild_later(worker, guest, key)
        return None
    try:
        result = _restore(worker, cmd, guest, entry, base, boot, image, job_nic, deadline, t0, t_image)
    except (RestoreFailed, BootFailed, ChannelError, SaveImageError, HypervisorError, disks.DiskError,
            guest_link.LinkError, OSError, libvirt.libvirtError) as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        log(LOG, logging.WARNING, "warm restore failed: booting cold", guest=guest.name, warm_image=image.dir.name,
            error=reason)
        span.set_attributes({PATH: "cold", WHY: f"restore from warm image {image.dir.name} failed: {reason}"[:500]})
        return None
    span.set_attributes({PATH: "warm", WHY: f"warm image {image.dir.name}", "vtorque.warm_image": image.dir.name})
    log(LOG, logging.INFO, "guest restored from a warm image", guest=guest.name, warm_image=image.dir.name)
    return result


class _Prefixed:
    """The span, with the warm pool's reason before the restore's own in `vtorque.boot.why`."""

    def __init__(self, span, prefix: str):
        self.span, self.prefix = span, prefix

    def set_attributes(self, attrs: dict) -> None:
        if self.prefix and WHY in attrs:
            attrs = {**attrs, WHY: f"{self.prefix}; {attrs[WHY]}"[:500]}
        self.span.set_attributes(attrs)


_rebuilding: set[str] = set()
_rebuilding_lock = threading.Lock()
IDLE_POLL = 2.0


def rebuild_later(worker, guest: m.GuestPlan, key: str) -> threading.Thread | None:
    """On demand: a warm image of this guest's image and shape made in the background, once this node boots
    nothing, when the operator keeps warm images of that image here (a new digest, or a new shape, of one)
    and the shape is one `vtorque images warm` makes (else it would be made again at every boot)."""
    config = worker.config
    entry = config.images.catalog.get(guest.image)
    if entry is None or not warm.rebuild_wanted(config, guest.image, guest.image_digest, key):
        return None
    boot = BootSource(entry.kernel, entry.initrd, entry.cmdline)
    plan = warm.warm_plan("vt-warm", guest.image, entry, worker.node, guest.vcpus, guest.ram_mib, guest.arch)
    if warm.shape_key(plan, boot, worker.domain_type) != key:
        return None
    with _rebuilding_lock:
        if key in _rebuilding:
            return None
        _rebuilding.add(key)

    def run() -> None:
        try:
            while worker.booting_now():  # a build is a whole boot: never beside a job's
                time.sleep(IDLE_POLL)
            warm.build(config, worker.hv, worker.store, guest.image, guest.vcpus, guest.ram_mib,
                       worker.domain_type)
            # The warm images of this image's older digests go: nothing will ask for them again.
            for old in warm.listing(config):
                if old.meta.get("image") == guest.image and old.digest != guest.image_digest:
                    warm.remove(old.dir)
        except warm.WarmError as exc:
            log(LOG, logging.WARNING, "warm image not made", image=guest.image, error=str(exc))
        finally:
            with _rebuilding_lock:
                _rebuilding.discard(key)

    thread = threading.Thread(target=run, name=f"warm-{key[:8]}", daemon=True)
    thread.start()
    return thread


def _restore(worker, cmd: BootOrder, guest: m.GuestPlan, entry: ImageEntry, base: Path, boot: BootSource,
             image: warm.WarmImage, job_nic: JobNic | None, deadline: float, t0: float, t_image: float
             ) -> tuple[m.PhaseTimings, Path]:
    hv = worker.hv
    mac = guest_mac(cmd.job_id, guest.index) if cmd.network else None
    seed = seed_files(guest, cmd.job_id, cmd.peers, cmd.network, mac, worker.config.node.guest_mounts)
    files = disks.prepare(worker.config.node.guest_dir, guest.name, cmd.job_id, base, entry.format, seed,
                          store=worker.config.images.store, node=worker.node)
    try:
        gdir = Path(files.overlay).parent
        # Its root disk as the saved guest left it, a copy of its own: the memory restored expects that disk.
        shutil.copyfile(image.overlay, files.overlay)
        t_disks = time.monotonic()
        # Root's alone until the guest holds its identity (hand_over below): its sshd listens from before the save.
        guest_link.start(gdir, 0, USER_NET_MAC)
        meta = GuestMetadata(job_id=cmd.job_id, owner=guest.owner.user, deadline=cmd.deadline, index=guest.index,
                             node=worker.node, end_by=guest.end_by)
        fresh = domain_xml(guest, files, boot, meta, worker.domain_type, numa_topology=numa.host_topology(),
                           identity_channel=True)
        xml = restore_xml(read_header(image.save).xml, fresh, image.saved_dir, str(gdir))
        copy = gdir / RESTORE_COPY
        copy_with_xml(image.save, copy, xml)
        t_define = time.monotonic()
        try:
            hv.timed("restore", _restore_paused, hv, str(copy), timeout=hv.start_timeout)
        finally:
            copy.unlink(missing_ok=True)  # 70 MB of the saved guest's memory: not kept per guest
        dom = hv.lookup(guest.name)
        if dom is None:
            raise RestoreFailed("the restored domain is not there")
        if job_nic:
            nic = job_nic_xml(guest, files, boot, meta, worker.domain_type, job_nic)
            hv.timed("attach the job network NIC", dom.attachDeviceFlags, nic, libvirt.VIR_DOMAIN_AFFECT_LIVE,
                     timeout=hv.change_timeout)
        layout = worker.config.node.job_cgroup
        if layout:
            try:
                job_cgroup.adopt(layout, worker.config.node.job_cgroup_root, guest.name, cmd.job_id,
                                 guest.owner.uid, worker.node)
            except OSError as exc:  # the watcher tries again, as for a cold guest
                log(LOG, logging.WARNING, "guest not moved into its job's cgroup", guest=guest.name, error=str(exc))
        ssh_socket = gdir / guest_link.SSH_SOCKET
        # The identity is written while the guest is still paused (QEMU holds it in the socket): the restored
        # guest finds it at its first read, with no poll on its path.
        banner = None
        try:
            with IdentityChannel.open(gdir / IDENTITY_SOCKET, deadline, root_only=True) as channel:
                channel.send_identity(identity_env(seed))
                hv.resume(dom)
                t_start = time.monotonic()
                banner = EarlyBanner(ssh_socket, deadline)
                channel.expect(IDENTITY_OK, deadline)
            guest_link.hand_over(gdir, guest.owner.uid, guest.owner.gid)
            ready = wait_ready(files.console_log, ssh_socket, lambda: hv.is_active(guest.name), deadline,
                               banner=banner)
        finally:
            if banner is not None:
                banner.close()
    except BaseException:
        try:
            hv.remove(guest.name)
        finally:
            worker._remove_disks(guest.name)
        raise
    timings = m.PhaseTimings(image=t_image - t0, disks=t_disks - t0, define=t_define - t0, start=t_start - t0,
                             kernel_up=None, ready=ready.ready - t0)
    return timings, ssh_socket


def _restore_paused(hv, path: str) -> None:
    hv.conn.restoreFlags(path, None, libvirt.VIR_DOMAIN_SAVE_PAUSED)

