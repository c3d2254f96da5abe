"""vRDMA: which virtual RDMA backends this node has, which one a guest gets, and its domain XML.

Backends, best first (the default of [node] vrdma_backends):
- `sriov-vf`: an SR-IOV virtual function of the host's RDMA adapter passed through (`<hostdev>`): the guest's
  own verbs at native speed, between nodes. Needs an IOMMU and free VFs; one VF per guest.
- `skvm-virtio-rdma`: MIKELANGELO sKVM's paravirtual RDMA device in QEMU (virtio-rdma / HyV's
  virtio-hyv) on the host's RDMA adapter: between nodes, any number of guests.
- `pvrdma`: QEMU's VMware-compatible paravirtual RDMA (QEMU 2.12 to 9.0) on a host RDMA device, with its
  rdmacm-mux MAD socket: between nodes. Needs shared guest memory and a vmxnet3 at function 0 of its slot.
- `ivshmem`: inter-VM shared memory (`<shmem>` ivshmem-plain) between the job's guests on one node. Not
  verbs, and only for a job whose guests are all on this node.

Pure parts (parsing the probe's raw facts, ranking, choosing, XML fragments) are separate from `probe()`,
the only function that reads the host.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the worker these parts serve (services/node_worker/service.py); not imported at run time
    from .service import NodeWorker

SRIOV, SKVM, PVRDMA, IVSHMEM = "sriov-vf", "skvm-virtio-rdma", "pvrdma", "ivshmem"
BACKENDS = (SRIOV, SKVM, PVRDMA, IVSHMEM)
SKVM_DEVICES = ("virtio-rdma-pci", "virtio-hyv-pci")  # sKVM virtio-rdma; HyV (vRDMA prototype 2)
SHMEM_MIB = 64
# PCI slots of their own, away from the ones domain.py and libvirt use for disks and NICs.
PVRDMA_SLOT, SKVM_SLOT = 0x1D, 0x1E


class VrdmaUnavailable(Exception):
    """The node cannot give the guest vRDMA; the message names the node and what is missing."""


@dataclass(frozen=True)
class IbDevice:
    name: str  # e.g. mlx5_0
    netdevs: tuple[str, ...] = ()  # host network interfaces of the device (RoCE), for pvrdma
    vfs: tuple[str, ...] = ()  # PCI addresses of its SR-IOV virtual functions, e.g. 0000:03:00.1
    mad_sockets: tuple[tuple[int, str], ...] = ()  # (port, rdmacm-mux socket path) for pvrdma


@dataclass(frozen=True)
class Probe:
    """What the node has, as raw facts."""

    qemu_devices: frozenset[str] = frozenset()
    ib_devices: tuple[IbDevice, ...] = ()
    iommu: bool = False

    def skvm_device(self) -> str | None:
        return next((d for d in SKVM_DEVICES if d in self.qemu_devices), None)


@dataclass(frozen=True)
class Choice:
    """The backend a guest gets, with what its XML needs."""

    backend: str
    shmem_name: str = ""
    vf: str = ""  # PCI address (sriov-vf)
    ibdev: str = ""
    ibport: int = 1
    netdev: str = ""
    mad_socket: str = ""
    qemu_device: str = ""  # skvm-virtio-rdma: the QEMU device name


@dataclass
class Fragment:
    """What a backend adds to a domain: devices, QEMU arguments, and whether guest RAM must be shared."""

    devices: list[ET.Element] = field(default_factory=list)
    qemu_args: list[str] = field(default_factory=list)
    shared_memory: bool = False


# -- pure: parsing ------------------------------------------------------------------------------------------

def parse_device_help(text: str) -> frozenset[str]:
    """Device names from `qemu-system-x86_64 -device help`: lines like `name "pvrdma", bus PCI, …`."""
    names = set()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith('name "'):
            names.add(line[len('name "'):].split('"', 1)[0])
    return frozenset(names)


# -- pure: ranking and choosing -----------------------------------------------------------------------------

def missing(backend: str, probe: Probe, single_node: bool, used_vfs: frozenset[str] = frozenset()) -> str | None:
    """Why `backend` cannot serve a guest here, or None when it can."""
    if backend == SRIOV:
        vfs = [vf for dev in probe.ib_devices for vf in dev.vfs]
        if not vfs:
            return "SR-IOV: no RDMA virtual functions (/sys/class/infiniband/*/device/virtfn*)"
        if not probe.iommu:
            return "SR-IOV: no IOMMU (/sys/kernel/iommu_groups is empty)"
        if all(vf in used_vfs for vf in vfs):
            return f"SR-IOV: all {len(vfs)} RDMA virtual functions are in use"
        return None
    if backend == SKVM:
        if not probe.skvm_device():
            return f"sKVM virtio-rdma: QEMU has no {' or '.join(SKVM_DEVICES)} device"
        if not probe.ib_devices:
            return "sKVM virtio-rdma: no host RDMA device (/sys/class/infiniband)"
        return None
    if backend == PVRDMA:
        if "pvrdma" not in probe.qemu_devices:
            return "pvrdma: QEMU has no pvrdma device (removed in QEMU 9.1)"
        if not probe.ib_devices:
            return "pvrdma: no host RDMA device (/sys/class/infiniband)"
        if not any(dev.netdevs and dev.mad_sockets for dev in probe.ib_devices):
            return "pvrdma: no host RDMA device with a network interface and an rdmacm-mux socket"
        return None
    if backend == IVSHMEM:
        if "ivshmem-plain" not in probe.qemu_devices:
            return "ivshmem: QEMU has no ivshmem-plain device"
        if not single_node:
            return "ivshmem: shared memory reaches only guests on the same node, and the job spans nodes"
        return None
    return f"{backend}: unknown vRDMA backend"


def available(probe: Probe, single_node: bool = True) -> list[str]:
    """Every backend this node has, in the default order: what the heartbeat advertises."""
    return [b for b in BACKENDS if missing(b, probe, single_node) is None]


def capabilities(probe: Probe) -> list[str]:
    """Heartbeat capabilities: `vrdma-<backend>` for each backend the node has (ivshmem as for one node)."""
    return [f"vrdma-{b}" for b in available(probe, single_node=True)]


def choose(node: str, probe: Probe, job_id: str, preference: list[str], require: list[str], single_node: bool,
           used_vfs: frozenset[str] = frozenset(), shmem_secret: bytes = b"") -> Choice:
    """The first backend of `preference` (the site's order) that `require` allows (empty: any) and this node
    can serve; VrdmaUnavailable naming the node and every reason otherwise."""
    allowed = [b for b in preference if not require or b in require]
    if not allowed:
        raise VrdmaUnavailable(f"node {node}: vRDMA backends required by the site ({', '.join(require)}) are "
                               f"not among this node's [node] vrdma_backends ({', '.join(preference)})")
    reasons = []
    for backend in allowed:
        why = missing(backend, probe, single_node, used_vfs)
        if why is None:
            return _choice(backend, probe, job_id, used_vfs, shmem_secret)
        reasons.append(why)
    raise VrdmaUnavailable(f"node {node} has no usable vRDMA backend: " + "; ".join(reasons))


def _choice(backend: str, probe: Probe, job_id: str, used_vfs: frozenset[str], shmem_secret: bytes) -> Choice:
    if backend == SRIOV:
        dev, vf = next((d, vf) for d in probe.ib_devices for vf in d.vfs if vf not in used_vfs)
        return Choice(SRIOV, vf=vf, ibdev=dev.name)
    if backend == SKVM:
        return Choice(SKVM, ibdev=probe.ib_devices[0].name, qemu_device=probe.skvm_device() or "")
    if backend == PVRDMA:
        dev = next(d for d in probe.ib_devices if d.netdevs and d.mad_sockets)
        port, sock = dev.mad_sockets[0]
        return Choice(PVRDMA, ibdev=dev.name, ibport=port, netdev=dev.netdevs[0], mad_socket=sock)
    return Choice(IVSHMEM, shmem_name=shmem_name(job_id, shmem_secret))


def shmem_name(job_id: str, secret: bytes = b"") -> str:
    """One shared-memory region per job and node: every guest of the job on this node maps the same one. Its
    name (/dev/shm/<name>, a directory every user may write) is a keyed hash of the job id with this node's
    secret, so no user can guess it and create the file first (QEMU would map a file she owns)."""
    return "vtorque-" + hmac.new(secret, job_id.encode(), hashlib.sha256).hexdigest()[:32]


SHM_DIR = Path("/dev/shm")


def node_secret(state_dir: str) -> bytes:
    """This node's key for shared-memory names: 32 random bytes in <state_dir>/node.secret (root, 0600), made
    once; read back on every later start so a restarted worker names a running job's region the same."""
    path = Path(state_dir) / "node.secret"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
            raise OSError(f"{path} is not root's 0600 file: not used") from None
        return path.read_bytes()
    try:
        secret = secrets.token_bytes(32)
        os.write(fd, secret)
        os.fsync(fd)
    finally:
        os.close(fd)
    return secret


def prepare_shmem(name: str, qemu_user: str = "libvirt-qemu") -> None:
    """Create the job's region before QEMU opens it: root-made, owned by QEMU's user, 0600, so it is neither
    readable by other users (QEMU itself would make it 0644) nor a file a user made first. A second guest of
    the job finds it already there: then it must be exactly such a file, or the boot is refused."""
    import pwd

    path = SHM_DIR / name
    try:
        qemu = pwd.getpwnam(qemu_user)
        uid, gid = qemu.pw_uid, qemu.pw_gid
    except KeyError:
        uid, gid = 0, 0
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_uid not in (0, uid) or st.st_mode & 0o077:
            raise OSError(f"{path} exists and is not this node's (owner uid {st.st_uid}): refused") from None
        return
    try:
        os.fchown(fd, uid, gid)
    finally:
        os.close(fd)


def remove_shmem(name: str) -> bool:
    """Remove the job's region at its teardown (QEMU leaves it behind); only a file of root or QEMU's."""
    path = SHM_DIR / name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    path.unlink()
    return True


def used_vfs(domain_xmls: list[str]) -> frozenset[str]:
    """PCI addresses passed through to the given domains (VFs another guest holds)."""
    used = set()
    for xml in domain_xmls:
        for addr in ET.fromstring(xml).findall("devices/hostdev/source/address"):
            try:
                used.add(pci_address(*(int(addr.get(k, "0"), 0) for k in ("domain", "bus", "slot", "function"))))
            except ValueError:
                continue
    return frozenset(used)


def pci_address(domain: int, bus: int, slot: int, function: int) -> str:
    return f"{domain:04x}:{bus:02x}:{slot:02x}.{function:x}"


def parse_pci_address(text: str) -> tuple[int, int, int, int]:
    """'0000:03:00.1' → (0, 3, 0, 1)."""
    dom, bus, rest = text.split(":")
    slot, fn = rest.split(".")
    return int(dom, 16), int(bus, 16), int(slot, 16), int(fn, 16)


# -- pure: XML fragments ------------------------------------------------------------------------------------

def fragment(choice: Choice) -> Fragment:
    if choice.backend == IVSHMEM:
        shmem = ET.Element("shmem", {"name": choice.shmem_name})
        ET.SubElement(shmem, "model", {"type": "ivshmem-plain"})
        ET.SubElement(shmem, "size", {"unit": "M"}).text = str(SHMEM_MIB)
        return Fragment(devices=[shmem])
    if choice.backend == SRIOV:
        dom, bus, slot, fn = parse_pci_address(choice.vf)
        hostdev = ET.Element("hostdev", {"mode": "subsystem", "type": "pci", "managed": "yes"})
        ET.SubElement(ET.SubElement(hostdev, "source"), "address", {
            "domain": f"0x{dom:04x}", "bus": f"0x{bus:02x}", "slot": f"0x{slot:02x}", "function": f"0x{fn:x}"})
        return Fragment(devices=[hostdev])
    if choice.backend == PVRDMA:
        # libvirt has no element for pvrdma: QEMU arguments. QEMU wants a vmxnet3 at function 0 of the
        # pvrdma's slot (the guest driver pairs them) and all guest RAM shared with the host.
        addr = f"0x{PVRDMA_SLOT:x}"
        return Fragment(qemu_args=[
            "-netdev", "user,id=vtrdmanet",
            "-device", f"vmxnet3,netdev=vtrdmanet,addr={addr}.0,multifunction=on",
            "-chardev", f"socket,path={choice.mad_socket},id=vtrdmamad",
            "-device", f"pvrdma,addr={addr}.1,ibdev={choice.ibdev},ibport={choice.ibport},"
                       f"netdev={choice.netdev},mad-chardev=vtrdmamad",
        ], shared_memory=True)
    if choice.backend == SKVM:
        return Fragment(qemu_args=["-device", f"{choice.qemu_device},addr=0x{SKVM_SLOT:x}"], shared_memory=True)
    raise ValueError(f"unknown vRDMA backend {choice.backend!r}")


def apply(domain: ET.Element, devices: ET.Element, choice: Choice) -> list[str]:
    """Put the backend's devices into `devices` (and shared memory backing into `domain`); returns the QEMU
    arguments the caller adds to its <qemu:commandline>."""
    frag = fragment(choice)
    devices.extend(frag.devices)
    if frag.shared_memory and domain.find("memoryBacking") is None:
        backing = ET.SubElement(domain, "memoryBacking")
        ET.SubElement(backing, "source", {"type": "memfd"})
        ET.SubElement(backing, "access", {"mode": "shared"})
    return frag.qemu_args


# -- I/O: probing this node ---------------------------------------------------------------------------------

_probe_cache: dict[tuple[str, str], Probe] = {}


def probe(qemu: str = "qemu-system-x86_64", sysfs: str = "/sys", run_dir: str = "/var/run",
          refresh: bool = False) -> Probe:
    """This node's vRDMA facts. QEMU's device list is asked once per process (it takes ~0.1 s)."""
    key = (qemu, sysfs)
    if key in _probe_cache and not refresh:
        return _probe_cache[key]
    try:
        out = subprocess.run([qemu, "-device", "help"], capture_output=True, text=True, timeout=30)
        devices = parse_device_help(out.stdout + out.stderr)
    except (OSError, subprocess.SubprocessError):
        devices = frozenset()
    ib_root = Path(sysfs) / "class" / "infiniband"
    ib = []
    for dev in sorted(_ls(ib_root)):
        dev_dir = ib_root / dev / "device"
        netdevs = tuple(sorted(_ls(dev_dir / "net")))
        vfs = tuple(sorted(os.path.basename(os.path.realpath(dev_dir / v)) for v in _ls(dev_dir)
                           if v.startswith("virtfn")))
        ports = sorted(int(p) for p in _ls(ib_root / dev / "ports") if p.isdigit())
        socks = tuple((p, s) for p in ports if os.path.exists(s := f"{run_dir}/rdmacm-mux-{dev}-{p}"))
        ib.append(IbDevice(dev, netdevs, vfs, socks))
    result = Probe(qemu_devices=devices, ib_devices=tuple(ib),
                   iommu=bool(_ls(Path(sysfs) / "kernel" / "iommu_groups")))
    _probe_cache[key] = result
    return result


def _ls(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


# -- I/O: the node worker's use ------------------------------------------------------------------------------

def _single_node(cmd, node: str) -> bool:
    """Are all the job's guests on this node? (A command without peers is from a one-node plan.)"""
    return all(p.node == node for p in cmd.peers)


def _used_vfs(worker: NodeWorker) -> frozenset[str]:
    xmls = []
    for name in worker.hv.vtorque_domains():
        dom = worker.hv.lookup(name)
        if dom is None:
            continue
        try:
            xmls.append(worker.hv.xml(dom))  # with a deadline (hypervisor.py)
        except Exception:  # noqa: BLE001 - it went away while we looked
            continue
    return used_vfs(xmls)


def check_boot(worker: NodeWorker, cmd, guests) -> str | None:
    """Before any of the job's guests boots here: the reason this node cannot give them vRDMA, or None."""
    if not any(g.vrdma for g in guests):
        return None
    try:
        choose(worker.node, probe(), cmd.job_id, list(worker.config.node.vrdma_backends),
               list(worker.config.spec.vrdma_require), _single_node(cmd, worker.node), _used_vfs(worker))
    except VrdmaUnavailable as exc:
        return str(exc)
    return None


def for_guest(worker: NodeWorker, cmd, guest) -> Choice | None:
    """The backend for one guest, chosen right before its domain is defined (under the node worker's define
    lock, so two guests never get the same VF). Raises BootFailed (not retryable) when there is none."""
    if not guest.vrdma:
        return None
    from .readiness import BootFailed

    try:
        choice = choose(worker.node, probe(), cmd.job_id, list(worker.config.node.vrdma_backends),
                        list(worker.config.spec.vrdma_require), _single_node(cmd, worker.node), _used_vfs(worker),
                        node_secret(worker.config.state_dir))
    except VrdmaUnavailable as exc:
        raise BootFailed(str(exc), False) from None
    if choice.backend == IVSHMEM:
        try:
            prepare_shmem(choice.shmem_name)
        except OSError as exc:
            raise BootFailed(f"shared memory: {exc}", False) from None
    return choice
