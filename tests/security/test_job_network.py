"""Finding 7: the job network was a multicast group on loopback that any local process could join, sniff and
inject into. Now a job's guests share a VXLAN segment of the job's own (services/node_worker/job_segment.py).

Proved here on two nodes made of network namespaces (a switch namespace between them, as the cluster rig has),
with the real code a node worker runs — the bridge's plan, the node's checks, `JobSegments.ensure` — inside each
node's namespace. The guests are namespaces too (a veth end on the job's bridge, where libvirt puts a guest's
tap): what is proved is the segment, not QEMU. tests/integration/test_multi_node.py and tests/e2e/test_rig.py
run real guests on it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid
from typing import NamedTuple

import msgspec
import pytest

from vtorque.services.node_worker.job_segment import bridge_name, vxlan_name
from vtorque.services.scheduler_bridge.planning import boot_command
from vtorque.shared import messages as m
from vtorque.shared.job_boot import expand, hoist
from vtorque.shared.job_network import guest_address, guest_mac, job_vni

from .conftest import KEY

PORT = 789

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def sh(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=check, **kw)


def in_ns(ns: str, *argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns, *argv, check=check, **kw)


# What a node worker does with a BootGuests, in the node's namespace: the same checks and code path.
NODE_SIDE = textwrap.dedent(f"""
    import sys
    from vtorque.services.node_worker import trust
    from vtorque.services.node_worker.job_segment import JobSegments, segment_for
    from vtorque.shared import messages as m
    from vtorque.shared.config import Config, NodeConfig
    from vtorque.shared.job_boot import expand
    node, local, action = sys.argv[1:4]
    segments = JobSegments({PORT}, lock_path="/run/vtorque-job-network-" + node + ".lock")
    if action == "ensure":
        cmd = expand(m.decode(sys.stdin.buffer.read()), node)  # the job's one BootGuests: this node's part
        config = Config(node=NodeConfig(name=node, job_network_localaddr=local, job_network_port={PORT}))
        trust.check_network(cmd, node, config)
        print(segments.ensure(segment_for(cmd, node, local, {PORT}, 1450)))
    else:
        print(segments.remove(int(sys.argv[4]), sys.argv[5]))
""")


class Sent(NamedTuple):
    """A job's BootGuests as the queue of `node` got it."""

    node: str
    command: m.BootGuests


class Cluster:
    """Nodes n1, n2 (namespaces) on a switch namespace; guests are namespaces wired to a node's job bridge."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:5]
        self.sw = f"vjsw{self.tag}"
        self.nodes = {"n1": "10.79.0.1", "n2": "10.79.0.2"}
        self.ns = {n: f"vj{n}{self.tag}" for n in self.nodes}
        self.guests: list[str] = []
        sh("ip", "netns", "add", self.sw)
        in_ns(self.sw, "ip", "link", "add", "br0", "type", "bridge")
        in_ns(self.sw, "ip", "link", "set", "br0", "up")
        for i, (node, address) in enumerate(self.nodes.items()):
            ns = self.ns[node]
            sh("ip", "netns", "add", ns)
            # Both ends made inside rig namespaces: nothing appears in the machine's own.
            in_ns(ns, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}", "netns", self.sw)
            in_ns(self.sw, "ip", "link", "set", f"p{i}", "master", "br0", "up")
            in_ns(ns, "ip", "addr", "add", f"{address}/24", "dev", "eth0")
            in_ns(ns, "ip", "link", "set", "eth0", "up")
            in_ns(ns, "ip", "link", "set", "lo", "up")

    def plan(self, job_id: str, where: list[str]) -> dict[str, Sent]:
        """The bridge's one BootGuests of a job with one guest on each node of `where` (planning.boot_command),
        as each node's queue gets it."""
        guests = [m.GuestPlan(name=m.domain_name(job_id, node, 0), node=node, index=i, image="tiny",
                              image_digest="a" * 64, vcpus=1, ram_mib=128, cores=None,
                              owner=m.Owner(user="u", uid=1000, gid=1000), ssh_authorized_keys=[KEY])
                  for i, node in enumerate(where)]
        job = m.JobStarted.new(job_id=job_id, deadline=60.0, scheduler="slurm", owner=guests[0].owner,
                               nodes=[m.NodeAllocation(host=n, ncpus=1) for n in where], spec={"img": "tiny"},
                               ssh_authorized_keys=[KEY])
        command = boot_command(job, guests, dict(self.nodes))
        return {n: Sent(n, command) for n in where}

    def node_side(self, node: str, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
        """Entered as the cluster rig enters its hosts (nsenter --net, no sysfs of the namespace's own): what the
        node worker reads of its interfaces must come from its network namespace, not from /sys."""
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
        return subprocess.run(["nsenter", f"--net=/run/netns/{self.ns[node]}", sys.executable, "-c", NODE_SIDE,
                               node, self.nodes[node], *args], input=stdin, capture_output=True, timeout=60, env=env)

    def boot(self, sent: Sent) -> str:
        """The job's segment on the command's node, and a guest on it; the guest namespace's name."""
        done = self.node_side(sent.node, "ensure", stdin=m.encode(sent.command))
        assert done.returncode == 0, done.stderr.decode()
        bridge = done.stdout.decode().split()[-1]
        cmd = expand(sent.command, sent.node)
        assert bridge == bridge_name(job_vni(cmd.job_id))
        guest = cmd.guests[0]
        ns, tap = f"vjg{len(self.guests)}{self.tag}", f"t{len(self.guests)}{self.tag}"
        sh("ip", "netns", "add", ns)
        self.guests.append(ns)
        in_ns(self.ns[cmd.node], "ip", "link", "add", tap, "mtu", "1450", "type", "veth", "peer", "name", "eth1",
              "netns", ns)
        in_ns(self.ns[cmd.node], "ip", "link", "set", tap, "master", bridge, "up")
        in_ns(ns, "ip", "link", "set", "eth1", "address", guest_mac(cmd.job_id, guest.index))
        in_ns(ns, "ip", "addr", "add", f"{guest_address(guest.index)}/16", "dev", "eth1")
        in_ns(ns, "ip", "link", "set", "eth1", "up")
        return ns

    def close(self) -> None:
        for ns in [*self.guests, *self.ns.values(), self.sw]:
            sh("ip", "netns", "del", ns, check=False)


@pytest.fixture
def cluster():
    c = Cluster()
    try:
        yield c
    finally:
        c.close()


def rx_packets(guest_ns: str) -> int:
    return int(in_ns(guest_ns, "cat", "/sys/class/net/eth1/statistics/rx_packets").stdout)


def neighbour_mac(guest_ns: str, address: str) -> str:
    in_ns(guest_ns, "busybox", "ping", "-c", "1", "-W", "2", address, check=False)
    words = in_ns(guest_ns, "ip", "neigh", "show", address, "dev", "eth1").stdout.split()
    return words[words.index("lladdr") + 1] if "lladdr" in words else ""


INJECT = textwrap.dedent("""
    import socket, sys
    target = sys.argv[1]
    port, vni, count, sport = (int(a) for a in sys.argv[2:6])
    header = bytes([0x08, 0, 0, 0]) + vni.to_bytes(3, "big") + b"\\0"
    frame = b"\\xff" * 6 + bytes.fromhex("020000000099") + b"\\x88\\xb5" + b"vtorque-inject".ljust(46, b"\\0")
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if sport:
        s.bind(("0.0.0.0", sport))
    for _ in range(count):
        s.sendto(header + frame, (target, port))
    print("sent", count)
""")


def inject(cluster: Cluster, node: str, target: str, vni: int, count: int, user=None, sport: int = 0):
    argv = ["ip", "netns", "exec", cluster.ns[node]]
    if user is not None:
        argv += ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups"]
    return subprocess.run([*argv, sys.executable, "-c", INJECT, target, str(PORT), str(vni), str(count), str(sport)],
                          capture_output=True, text=True, timeout=30)


# In a guest: how many frames of the injected kind (EtherType 0x88b5) reach its job NIC in `seconds`.
CAPTURE = textwrap.dedent("""
    import socket, sys, time
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88b5))
    s.bind(("eth1", 0x88b5))
    s.settimeout(0.1)
    print("listening", flush=True)
    seen, end = 0, time.monotonic() + float(sys.argv[1])
    while time.monotonic() < end:
        try:
            seen += b"vtorque-inject" in s.recv(2048)
        except socket.timeout:
            pass
    print(seen)
""")


def frames_seen(guest_ns: str, during) -> int:
    """Injected frames the guest sees while `during()` runs."""
    proc = subprocess.Popen(["ip", "netns", "exec", guest_ns, sys.executable, "-c", CAPTURE, "3"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "listening"
    during()
    out, _ = proc.communicate(timeout=30)
    return int(out.split()[-1])


def test_a_jobs_guests_on_two_nodes_share_one_segment_that_is_no_other_jobs(cluster):
    a, b = "7001", "7002"
    a_cmds, b_cmds = cluster.plan(a, ["n1", "n2"]), cluster.plan(b, ["n1", "n2"])
    a0, a1 = cluster.boot(a_cmds["n1"]), cluster.boot(a_cmds["n2"])
    b0 = cluster.boot(b_cmds["n1"])
    cluster.boot(b_cmds["n2"])
    # The same guest addresses in both jobs: each guest reaches its own job's guest, across the nodes.
    assert neighbour_mac(a0, guest_address(1)) == guest_mac(a, 1)
    assert neighbour_mac(a1, guest_address(0)) == guest_mac(a, 0)
    assert neighbour_mac(b0, guest_address(1)) == guest_mac(b, 1)
    assert in_ns(a0, "busybox", "ping", "-c", "2", "-W", "2", guest_address(1), check=False).returncode == 0
    # The nodes themselves have no address on a job segment (IPv4 or IPv6): no host process talks on it.
    for node in ("n1", "n2"):
        for dev in (bridge_name(job_vni(a)), vxlan_name(job_vni(a))):
            shown = in_ns(cluster.ns[node], "ip", "-o", "addr", "show", "dev", dev).stdout
            assert "inet" not in shown, shown


def test_a_job_of_one_node_has_a_segment_no_other_node_sends_to(cluster):
    job = "7010"
    (one,) = cluster.plan(job, ["n1"]).values()
    # A job of one guest has no network; a job of two guests on one node needs no tunnel.
    assert one.command.network is None
    first = expand(one.command, "n1").guests[0]
    second = msgspec.structs.replace(first, name=m.domain_name(job, "n1", 1), index=1)
    two = hoist(job, one.command.deadline, [first, second],
                m.JobNetwork(vni=job_vni(job), prefix=16, endpoints={"n1": "10.79.0.1"}))
    cluster.boot(Sent("n1", two))
    fdb = in_ns(cluster.ns["n1"], "bridge", "fdb", "show", "dev", vxlan_name(job_vni(job))).stdout
    assert " dst " not in fdb, fdb  # its frames go to no other node


def test_a_user_on_a_node_cannot_inject_into_a_job_segment_and_root_can(cluster, users):
    attacker, _ = users
    job = "7020"
    cmds = cluster.plan(job, ["n1", "n2"])
    g0 = cluster.boot(cmds["n1"])
    cluster.boot(cmds["n2"])
    vni = job_vni(job)

    def users_send() -> None:
        # An ordinary user on the job's other node, and on the guest's own node (to its cluster address and to
        # loopback): VXLAN packets with the job's VNI, from the ports a user can bind.
        for node, target in (("n2", "10.79.0.1"), ("n1", "10.79.0.1"), ("n1", "127.0.0.1")):
            sent = inject(cluster, node, target, vni, 200, user=attacker)
            assert sent.returncode == 0 and "sent 200" in sent.stdout, sent.stderr

    assert frames_seen(g0, users_send) == 0
    # A user cannot send from a port root's VXLAN uses, nor read the segment's frames.
    denied = inject(cluster, "n2", "10.79.0.1", vni, 1, user=attacker, sport=900)
    assert denied.returncode != 0 and "PermissionError" in denied.stderr
    sniff = subprocess.run(["ip", "netns", "exec", cluster.ns["n1"], "setpriv", f"--reuid={attacker.uid}",
                            f"--regid={attacker.gid}", "--clear-groups", sys.executable, "-c",
                            "import socket; socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))"],
                           capture_output=True, text=True, timeout=30)
    assert sniff.returncode != 0 and "PermissionError" in sniff.stderr

    def root_sends() -> None:
        sent = inject(cluster, "n2", "10.79.0.1", vni, 200, sport=900)
        assert sent.returncode == 0, sent.stderr

    # The control: the same packets from root on the job's other node, from a privileged port, do arrive.
    # Without it this test could pass on a segment that takes nothing at all.
    assert frames_seen(g0, root_sends) == 200


def test_the_segment_goes_with_its_last_guest_and_a_vni_held_by_another_job_is_refused(cluster):
    job = "7030"
    cmds = cluster.plan(job, ["n1", "n2"])
    g0 = cluster.boot(cmds["n1"])
    vni = job_vni(job)
    # Another job that the numbering wrapped onto the same VNI: refused on this node, the first job untouched.
    clash = str(int(job) + (1 << 24) - 4096)
    assert job_vni(clash) == vni
    other = cluster.plan(clash, ["n1", "n2"])["n1"]
    done = cluster.node_side("n1", "ensure", stdin=m.encode(other.command))
    assert done.returncode != 0 and f"held by job {job}" in done.stderr.decode()
    # While the guest is on it the segment stays; once its tap is gone it is removed, nothing left.
    assert cluster.node_side("n1", "remove", str(vni), job).stdout.split() == [b"False"]
    sh("ip", "netns", "del", g0)
    cluster.guests.remove(g0)
    time.sleep(0.2)
    assert cluster.node_side("n1", "remove", str(vni), job).stdout.split() == [b"True"]
    links = in_ns(cluster.ns["n1"], "ip", "-o", "link").stdout
    assert bridge_name(vni) not in links and vxlan_name(vni) not in links
