"""The job network on one node: a Linux bridge of the job's own holding the job's VXLAN device and the taps of
the job's guests here (libvirt attaches those: domain.py's <interface type='bridge'>).

What makes it private (issue 11 finding 7, the loopback multicast group any process could join):
- the bridge and the VXLAN device have no host address (IPv4 or IPv6): no host process talks on the segment,
  and capturing on it needs CAP_NET_RAW;
- the VXLAN device sends the job's frames only to the job's other nodes (static forwarding entries per guest
  MAC and for floods, no learning: nothing a packet says changes where frames go);
- it listens on a UDP port below 1024 and sends from ports below 1024, and the node drops VXLAN packets from
  any other port (`guard_commands`): only root on a node can put a frame on a job's segment, as only root can
  bind such a port. A user's process, on any host, sends from a port of 1024 or more.
- each segment is named by its VNI and labelled with its job; a node refuses a VNI another job holds on it.

`Segment`, `setup_commands`, `guard_commands` are pure; `JobSegments` runs them (`ip`, `bridge`, `iptables`,
each with a deadline) under a host-wide lock, as two node workers of a test host share one kernel.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from vtorque.shared.job_boot import NodeBoot
from vtorque.shared.job_network import guest_mac

BRIDGE_PREFIX = "vtj"
VXLAN_PREFIX = "vtx"
ALIAS_PREFIX = "vtorque job "
FLOOD_MAC = "00:00:00:00:00:00"  # a VXLAN device's entry for broadcast, multicast and unknown unicast
# The source ports the VXLAN devices send from: privileged, so a receiver can tell the kernel's packets from a
# user's.
SOURCE_PORTS = (768, 1023)
GUARD_CHAIN = "VTORQUE-JOBNET"
COMMAND_TIMEOUT = 10.0
LOCK_PATH = "/run/vtorque-job-network.lock"


class SegmentError(Exception):
    pass


def bridge_name(vni: int) -> str:
    return f"{BRIDGE_PREFIX}{vni:06x}"  # 9 characters: interface names have at most 15


def vxlan_name(vni: int) -> str:
    return f"{VXLAN_PREFIX}{vni:06x}"


@dataclass(frozen=True)
class Segment:
    job_id: str
    vni: int
    local: str  # this node's VXLAN endpoint
    remotes: tuple[str, ...]  # the job's other nodes' endpoints (not this node's own)
    remote_macs: tuple[tuple[str, str], ...]  # (guest MAC, its node's endpoint) of the job's guests elsewhere
    port: int
    mtu: int

    @property
    def bridge(self) -> str:
        return bridge_name(self.vni)

    @property
    def vxlan(self) -> str:
        return vxlan_name(self.vni)

    @property
    def alias(self) -> str:
        return ALIAS_PREFIX + self.job_id


def segment_for(cmd: NodeBoot, node: str, local: str, port: int, mtu: int) -> Segment:
    """This node's part of the job network of a checked BootGuests (trust.check_boot's expansion)."""
    assert cmd.network is not None
    endpoints = cmd.network.endpoints
    # The guests of a job that share this node's address (two node workers on one test host) share its bridge:
    # no tunnel between them.
    remote_of = {n: a for n, a in endpoints.items() if n != node and a != local}
    macs = tuple(sorted((guest_mac(cmd.job_id, p.index), remote_of[p.node]) for p in cmd.peers
                        if p.node in remote_of))
    return Segment(job_id=cmd.job_id, vni=cmd.network.vni, local=local,
                   remotes=tuple(sorted(set(remote_of.values()))), remote_macs=macs, port=port, mtu=mtu)


def setup_commands(seg: Segment) -> list[list[str]]:
    """The commands that make the segment on a node that has none of it yet."""
    low, high = SOURCE_PORTS
    return [
        ["ip", "link", "add", seg.bridge, "mtu", str(seg.mtu), "type", "bridge"],
        # addrgenmode none (before up): no IPv6 link-local address either, so the host has no address on it.
        ["ip", "link", "set", seg.bridge, "addrgenmode", "none", "alias", seg.alias],
        ["ip", "link", "add", seg.vxlan, "mtu", str(seg.mtu), "type", "vxlan", "id", str(seg.vni),
         "local", seg.local, "dstport", str(seg.port), "srcport", str(low), str(high + 1), "nolearning"],
        ["ip", "link", "set", seg.vxlan, "addrgenmode", "none", "master", seg.bridge],
        ["ip", "link", "set", seg.vxlan, "up"],
        ["ip", "link", "set", seg.bridge, "up"],
    ]


def forwarding_commands(seg: Segment, present: set[tuple[str, str]]) -> list[list[str]]:
    """The VXLAN forwarding entries the segment lacks: floods to every other node of the job, and each remote
    guest's MAC to its node. `present` holds the (MAC, endpoint) entries already there."""
    wanted = [(FLOOD_MAC, r) for r in seg.remotes] + list(seg.remote_macs)
    vxlan = seg.vxlan
    return [["bridge", "fdb", "append" if mac == FLOOD_MAC else "replace", mac, "dev", vxlan, "dst", dst]
            for mac, dst in wanted if (mac, dst) not in present]


def guard_commands(port: int) -> list[tuple[list[str], list[str]]]:
    """(check, add) pairs of iptables commands: VXLAN packets to `port` from an unprivileged source port are
    dropped before the VXLAN device sees them."""
    chain = ["-w", "5"]
    low, high = 1, 1023
    return [
        (["iptables", *chain, "-L", GUARD_CHAIN, "-n"], ["iptables", *chain, "-N", GUARD_CHAIN]),
        (["iptables", *chain, "-C", GUARD_CHAIN, "-p", "udp", "-m", "udp", "!", "--sport", f"{low}:{high}",
          "-j", "DROP"],
         ["iptables", *chain, "-A", GUARD_CHAIN, "-p", "udp", "-m", "udp", "!", "--sport", f"{low}:{high}",
          "-j", "DROP"]),
        (["iptables", *chain, "-C", "INPUT", "-p", "udp", "-m", "udp", "--dport", str(port), "-j", GUARD_CHAIN],
         ["iptables", *chain, "-I", "INPUT", "1", "-p", "udp", "-m", "udp", "--dport", str(port),
          "-j", GUARD_CHAIN]),
    ]


# A dotted quad as ipaddress.IPv4Address takes it: four ASCII decimal octets, no leading zeros.
_OCTET = r"(0|[1-9][0-9]{0,2})"
_DOTTED_QUAD = re.compile(r"\.".join([_OCTET] * 4))


def check_endpoint(address: str, local: str) -> str | None:
    """Why `address` cannot be a VXLAN endpoint of a job seen from a node whose own is `local`, or None.
    The same verdicts as ipaddress.IPv4Address and its is_multicast/is_unspecified/is_loopback
    (tests/unit/test_job_segment.py compares them), without it: a node checks every endpoint of a job, 1,023 at
    1,024 nodes, and ipaddress took 10 ms of each node's boot there (docs/benchmarks.md, scale)."""
    match = _DOTTED_QUAD.fullmatch(address) if isinstance(address, str) else None
    octets = [int(o) for o in match.groups()] if match else []
    if not octets or max(octets) > 255:
        return "is not an IPv4 address"
    if 224 <= octets[0] <= 239 or octets in ([0, 0, 0, 0], [255, 255, 255, 255]):
        return "is not a unicast address"
    if octets[0] == 127 and address != local:
        return "is a loopback address other than this node's own"
    return None


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})


class JobSegments:
    """The job networks on this node. Everything is read and changed through `ip`/`bridge` (netlink), never
    /sys/class/net: sysfs shows the network namespace it was mounted in, which need not be this process's (a
    node in a container or a namespace, as the cluster rig's hosts are). `run` is injectable (a flow test's fake,
    the unit tests' fake kernel)."""

    def __init__(self, port: int, run: Callable[[list[str]], subprocess.CompletedProcess] = _run,
                 lock_path: str = LOCK_PATH):
        self.port, self.run, self.lock_path = port, run, lock_path  # port: what the guard protects
        self._guarded = False

    # -- what is there ------------------------------------------------------------------------------------

    def present(self) -> dict[int, str]:
        """VNI → job id of every job segment on this node."""
        found: dict[int, str] = {}
        for link in self._links(["type", "bridge"]):
            name, alias = link.get("ifname", ""), link.get("ifalias", "")
            vni = _vni_of(name, BRIDGE_PREFIX)
            if vni is not None and alias.startswith(ALIAS_PREFIX):
                found[vni] = alias[len(ALIAS_PREFIX):]
        return found

    def ports(self, vni: int) -> list[str]:
        """The interfaces on the segment's bridge other than its VXLAN device: the guests' taps."""
        return sorted(link["ifname"] for link in self._links(["master", bridge_name(vni)])
                      if link.get("ifname") and link["ifname"] != vxlan_name(vni))

    def _links(self, selector: list[str]) -> list[dict]:
        try:
            done = self.run(["ip", "-j", "link", "show", *selector])
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SegmentError(f"job network: ip failed: {exc}") from None
        if done.returncode != 0:
            return []  # no such master: no ports
        try:
            links = json.loads(done.stdout or "[]")
        except ValueError:
            raise SegmentError(f"job network: ip -j link: not JSON: {done.stdout[:100]!r}") from None
        return [link for link in links if isinstance(link, dict)]

    def _exists(self, name: str) -> bool:
        return self.run(["ip", "link", "show", "dev", name]).returncode == 0

    # -- changes ------------------------------------------------------------------------------------------

    def ensure(self, seg: Segment) -> str:
        """The job's segment on this node, made or completed; its bridge's name. Raises SegmentError."""
        with self._host_lock():
            self._guard()
            holder = self.present().get(seg.vni)
            if holder is not None and holder != seg.job_id:
                raise SegmentError(f"job network {seg.vni} is held by job {holder} on this node")
            if holder is None:
                if self._exists(seg.bridge) or self._exists(seg.vxlan):
                    # Our names without our label: a making cut short (the node worker killed between the
                    # commands). Nothing of a job is on it, or it would carry the label: made again.
                    if self.ports(seg.vni):
                        raise SegmentError(f"interface {seg.bridge} has ports but no vtorque job: left alone")
                    self._delete(seg.vni)
                try:
                    for argv in setup_commands(seg):
                        self._must(argv)
                except SegmentError:
                    self._delete(seg.vni)  # nothing half-made left behind
                    raise
            self._must_all(forwarding_commands(seg, self._forwarding(seg.vxlan)))
        return seg.bridge

    def remove(self, vni: int, job_id: str) -> bool:
        """Remove the job's segment once no guest's tap is on it. True if it is gone."""
        with self._host_lock():
            if self.present().get(vni) != job_id:
                return vni not in self.present()
            if self.ports(vni):
                return False
            self._delete(vni)
            return vni not in self.present()

    def _delete(self, vni: int) -> None:
        for name in (vxlan_name(vni), bridge_name(vni)):
            if self._exists(name):
                self.run(["ip", "link", "del", name])

    def _forwarding(self, vxlan: str) -> set[tuple[str, str]]:
        out = self.run(["bridge", "fdb", "show", "dev", vxlan])
        entries = set()
        for line in out.stdout.splitlines():
            words = line.split()
            if "dst" in words:
                entries.add((words[0], words[words.index("dst") + 1]))
        return entries

    def _guard(self) -> None:
        if self._guarded:
            return
        for check, add in guard_commands(self.port):
            if self.run(check).returncode != 0:
                self._must(add)
        self._guarded = True

    def _must(self, argv: list[str]) -> None:
        try:
            done = self.run(argv)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SegmentError(f"job network: {argv[0]} failed: {exc}") from None
        if done.returncode != 0:
            raise SegmentError(f"job network: {' '.join(argv[:4])}: {(done.stderr or done.stdout).strip()[:300]}")

    def _must_all(self, commands: list[list[str]]) -> None:
        """`bridge` commands, in one `bridge -batch` when there are several: a node of a 1,024-node job adds
        2,046 forwarding entries (a flood and a MAC per other node), 2,046 processes of ~3 ms each one by one.
        Without -force the batch stops at its first failing line and exits non-zero (that line in its stderr)."""
        if len(commands) <= 1:
            for argv in commands:
                self._must(argv)
            return
        assert all(argv[0] == "bridge" for argv in commands)
        fd, path = tempfile.mkstemp(prefix="vtorque-fdb-", suffix=".batch")  # 0600, a name of its own
        try:
            with os.fdopen(fd, "w") as batch:
                batch.writelines(" ".join(argv[1:]) + "\n" for argv in commands)
            self._must(["bridge", "-batch", path])
        finally:
            os.unlink(path)

    def _host_lock(self):
        return _FileLock(self.lock_path)


def _vni_of(name: str, prefix: str) -> int | None:
    """The VNI in one of our interface names (vtj00abcd → 0xabcd), or None for any other name."""
    if not name.startswith(prefix) or len(name) != len(prefix) + 6:
        return None
    try:
        vni = int(name[len(prefix):], 16)
    except ValueError:
        return None
    return vni if name == f"{prefix}{vni:06x}" else None


class _FileLock:
    """An exclusive flock on a root-owned file (O_NOFOLLOW: no planted link is followed)."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)
