"""libvirt domain XML for one guest. Pure: takes a plan and paths, returns XML; never reads the host."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from vtorque.shared import messages as m

from . import guest_link, numa, vrdma

METADATA_NS = "https://vtorque.org/xmlns/guest/1"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
# The user-mode NIC's MAC, the same in every guest (each guest's slirp network is its own), so a seed's
# network-config can name it; outside 52:54:00:…, where job network MACs are (shared/job_network.py).
USER_NET_MAC = "52:54:01:00:00:01"
# A warm guest's host-only channel (warm.py, warm_boot.py): a virtio-serial port whose host end is a unix socket
# libvirtd makes in the guest's root-owned directory, made root's and 0600 before the node worker speaks on it
# (identity_channel.py); the guest waits on it for its job's identity after a restore.
IDENTITY_CHANNEL = "org.vtorque.identity.0"
IDENTITY_SOCKET = "identity.sock"


@dataclass(frozen=True)
class GuestDisks:
    overlay: str  # qcow2 on the base image, the guest's root disk
    seed: str  # NoCloud seed ISO (label cidata), read-only
    console_log: str
    data: str | None = None  # the job's extra disk (spec key `disk`), first guest only
    data_format: str = "qcow2"


@dataclass(frozen=True)
class BootSource:
    """Direct kernel boot for images that carry no boot loader (the project's test guest)."""

    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None


@dataclass(frozen=True)
class JobNic:
    """The guest's second NIC, a tap on the job network's bridge on this node (job_segment.py)."""

    bridge: str
    mac: str
    mtu: int = 1450


@dataclass(frozen=True)
class GuestMetadata:
    job_id: str
    owner: str
    deadline: datetime  # of the boot: a guest not ready by then is removed by reconciliation
    index: int
    node: str = ""
    end_by: datetime | None = None  # the job's start + walltime, when the scheduler said


def domain_xml(guest: m.GuestPlan, disks: GuestDisks, boot: BootSource, meta: GuestMetadata,
               domain_type: str = "qemu", job_nic: JobNic | None = None,
               vrdma_choice: vrdma.Choice | None = None, numa_topology: numa.Topology | None = None,
               identity_channel: bool = False, host_channel: bool = False) -> str:
    """`identity_channel`: the shape of a warm guest (warm.py): its identity channel, and a VM generation ID
    (libvirt gives each restore a new one; the guest kernel reseeds its random state on a change).
    `host_channel`: the same channel alone, for a cold guest (its clock after a resume: suspend.py)."""
    ET.register_namespace("qemu", QEMU_NS)
    dom = ET.Element("domain", {"type": domain_type})
    ET.SubElement(dom, "name").text = guest.name
    if identity_channel:
        ET.SubElement(dom, "genid")

    metadata = ET.SubElement(ET.SubElement(dom, "metadata"), f"{{{METADATA_NS}}}guest")
    for key, value in (("job", meta.job_id), ("owner", meta.owner), ("deadline", meta.deadline.isoformat()),
                       ("index", str(meta.index)), ("node", meta.node),
                       ("end-by", meta.end_by.isoformat() if meta.end_by else "")):
        if value:
            ET.SubElement(metadata, f"{{{METADATA_NS}}}{key}").text = value
    if guest.iocm_max_cores and guest.io_cores:
        # What the node worker's IOcm controller (iocm.py) needs to move the I/O cores of the running guest.
        for key, value in (("iocm-cores", cpuset(guest.io_cores)), ("iocm-min", str(guest.iocm_min_cores)),
                           ("iocm-max", str(guest.iocm_max_cores))):
            ET.SubElement(metadata, f"{{{METADATA_NS}}}{key}").text = value

    ET.SubElement(dom, "memory", {"unit": "MiB"}).text = str(guest.ram_mib)
    ET.SubElement(dom, "vcpu", {"placement": "static"}).text = str(guest.vcpus)
    iothreads = guest.iocm_max_cores
    if iothreads:
        # IOcm: one I/O thread per possible I/O core; the node worker's controller widens or narrows the
        # cores they may run on between iocm_min_cores and iocm_max_cores.
        ET.SubElement(dom, "iothreads").text = str(iothreads)
    cores = guest.cores or []
    if cores or guest.emulator_cores or (iothreads and guest.io_cores):
        tune = ET.SubElement(dom, "cputune")
        for vcpu in range(guest.vcpus if cores else 0):
            ET.SubElement(tune, "vcpupin", {"vcpu": str(vcpu), "cpuset": str(cores[vcpu % len(cores)])})
        if guest.emulator_cores:
            ET.SubElement(tune, "emulatorpin", {"cpuset": cpuset(guest.emulator_cores)})
        if iothreads and guest.io_cores:
            active = cpuset(guest.io_cores[:max(1, guest.iocm_min_cores)])
            for thread in range(1, iothreads + 1):
                ET.SubElement(tune, "iothreadpin", {"iothread": str(thread), "cpuset": active})

    placement = numa.nodeset(guest.cores, numa_topology or {})
    if placement:
        # Memory on the NUMA nodes of the guest's cores (only on hosts with more than one node).
        ET.SubElement(ET.SubElement(dom, "numatune"), "memory", {"mode": "strict", "nodeset": placement})

    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", {"arch": guest.arch, "machine": "pc"}).text = "hvm"
    if boot.kernel:
        ET.SubElement(os_el, "kernel").text = boot.kernel
        if boot.initrd:
            ET.SubElement(os_el, "initrd").text = boot.initrd
        ET.SubElement(os_el, "cmdline").text = boot.cmdline or "console=ttyS0 root=/dev/vda rw quiet panic=-1"
    else:
        ET.SubElement(os_el, "boot", {"dev": "hd"})
    ET.SubElement(ET.SubElement(dom, "features"), "acpi")
    if domain_type == "kvm":
        ET.SubElement(dom, "cpu", {"mode": "host-passthrough"})
    else:
        cpu = ET.SubElement(dom, "cpu", {"mode": "custom", "match": "exact"})
        ET.SubElement(cpu, "model", {"fallback": "allow"}).text = "qemu64"
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(dom, event).text = "destroy"

    dev = ET.SubElement(dom, "devices")
    ET.SubElement(dev, "controller", {"type": "usb", "model": "none"})
    ET.SubElement(dev, "memballoon", {"model": "none"})
    _disk(dev, disks.overlay, "qcow2", "vda", readonly=False, iothread=1 if iothreads else None)
    _disk(dev, disks.seed, "raw", "vdb", readonly=True, no_backing=True)
    if disks.data:
        _disk(dev, disks.data, disks.data_format, "vdc", readonly=False, iothread=min(2, iothreads) or None,
              no_backing=True)
    vrdma_args: list[str] = []
    if guest.vrdma:
        # The backend the node worker chose (vrdma.choose); without one, shared memory between the job's
        # guests on this node.
        # The node worker always passes its choice (vrdma.for_guest: the region's name keyed with the node's
        # secret); a caller without one (a pure test) gets the same shape under an unkeyed name.
        choice = vrdma_choice or vrdma.Choice(vrdma.IVSHMEM, shmem_name=vrdma.shmem_name(meta.job_id))
        vrdma_args = vrdma.apply(dom, dev, choice)
    if job_nic:
        # The job's guests, on every node, share one L2 segment: a tap libvirt (root) makes and puts on the job's
        # bridge; QEMU gets only its descriptor. The MTU reaches the guest's driver (virtio host_mtu).
        nic = ET.SubElement(dev, "interface", {"type": "bridge"})
        ET.SubElement(nic, "source", {"bridge": job_nic.bridge})
        ET.SubElement(nic, "mac", {"address": job_nic.mac})
        ET.SubElement(nic, "model", {"type": "virtio"})
        ET.SubElement(nic, "mtu", {"size": str(job_nic.mtu)})
        # A fixed slot beside the user-mode NIC's (0x10, on the QEMU command line), which libvirt cannot see.
        ET.SubElement(nic, "address", {"type": "pci", "domain": "0x0000", "bus": "0x00", "slot": "0x11",
                                       "function": "0x0"})
    # Without an entropy source a TCG guest's sshd waits ~1 s for kernel randomness before its banner.
    rng = ET.SubElement(dev, "rng", {"model": "virtio"})
    ET.SubElement(rng, "backend", {"model": "random"}).text = "/dev/urandom"
    serial = ET.SubElement(dev, "serial", {"type": "file"})
    ET.SubElement(serial, "source", {"path": disks.console_log})
    ET.SubElement(serial, "target", {"port": "0"})
    if identity_channel or host_channel:
        channel = ET.SubElement(dev, "channel", {"type": "unix"})
        ET.SubElement(channel, "source", {"mode": "bind", "path": str(Path(disks.overlay).parent / IDENTITY_SOCKET)})
        ET.SubElement(channel, "target", {"type": "virtio", "name": IDENTITY_CHANNEL})

    # User-mode networking for the guest's own traffic, and its sshd reached through a link only root enters
    # (guest_link.py: no port on the host). The guest's files, its link's sockets among them, share one directory.
    # On the QEMU command line: libvirt 9.0 has no hub nor stream netdev for type='user'.
    cmd = ET.SubElement(dom, f"{{{QEMU_NS}}}commandline")
    args = guest_link.netdev_args(Path(disks.overlay).parent, USER_NET_MAC)
    for arg in args:
        ET.SubElement(cmd, f"{{{QEMU_NS}}}arg", {"value": arg})
    for arg in vrdma_args:
        ET.SubElement(cmd, f"{{{QEMU_NS}}}arg", {"value": arg})
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")


def cpuset(cores: list[int]) -> str:
    return ",".join(str(c) for c in cores)




def _disk(devices: ET.Element, path: str, fmt: str, target: str, readonly: bool, iothread: int | None = None,
          no_backing: bool = False) -> None:
    disk = ET.SubElement(devices, "disk", {"type": "file", "device": "disk"})
    driver = {"name": "qemu", "type": fmt}
    if iothread:
        driver["iothread"] = str(iothread)
    ET.SubElement(disk, "driver", driver)
    ET.SubElement(disk, "source", {"file": path})
    if no_backing:
        # Said outright, so libvirt never reads a chain from the image's header (a user's data disk, the seed).
        ET.SubElement(disk, "backingStore")
    ET.SubElement(disk, "target", {"dev": target, "bus": "virtio"})
    if readonly:
        ET.SubElement(disk, "readonly")


def parse_metadata(xml: str) -> dict[str, str]:
    """The vtorque metadata of a domain's XML, or {} for a domain that is not ours."""
    root = ET.fromstring(xml)
    node = root.find(f"metadata/{{{METADATA_NS}}}guest")
    if node is None:
        return {}
    return {child.tag.split("}", 1)[1]: child.text or "" for child in node}
