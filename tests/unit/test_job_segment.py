"""The job network's pure parts: its VNI from the job id, the commands that make a node's part of it, and what a
node worker does with what it finds (JobSegments with its commands recorded). The real thing, on namespaces,
is tests/security/test_job_network.py."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from vtorque.services.node_worker.job_segment import (
    FLOOD_MAC,
    JobSegments,
    Segment,
    SegmentError,
    check_endpoint,
    forwarding_commands,
    guard_commands,
    segment_for,
    setup_commands,
)
from vtorque.services.scheduler_bridge.planning import boot_command
from vtorque.shared import messages as m
from vtorque.shared.job_boot import NodeBoot, expand
from vtorque.shared.job_network import VNI_MAX, VNI_MIN, guest_mac, job_vni

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG2dXW1vjFpNu2d0dw7Fqt5fLwRY7FTl1Qb4mK3xqQ9n t"


def test_running_jobs_of_one_scheduler_get_different_vnis_and_any_id_gets_one_in_range():
    # A scheduler's job numbers: consecutive ones never clash, Torque's server suffix is the same job.
    assert len({job_vni(str(n)) for n in range(1, 20001)}) == 20000
    assert job_vni("123") == job_vni("123.torque-server.example") == VNI_MIN + 123
    for job in ("123[4].server", "123_4", "x" * 200, "0", str(10 ** 17)):
        assert VNI_MIN <= job_vni(job) <= VNI_MAX
    assert job_vni("123[4].server") != job_vni("123[5].server")


def plan(job: str, nodes: dict[str, str], per_node: int = 1) -> dict[str, NodeBoot]:
    """Each node's part of the bridge's one BootGuests of the job, as the node expands it."""
    guests = [m.GuestPlan(name=m.domain_name(job, n, k), node=n, index=i * per_node + k, image="tiny",
                          image_digest="a" * 64, vcpus=1, ram_mib=128, cores=None,
                          owner=m.Owner(user="u", uid=1000, gid=1000), ssh_authorized_keys=[KEY])
              for i, n in enumerate(nodes) for k in range(per_node)]
    started = m.JobStarted.new(job_id=job, deadline=60.0, scheduler="slurm", owner=guests[0].owner,
                               nodes=[m.NodeAllocation(host=n, ncpus=per_node) for n in nodes], spec={"img": "tiny"},
                               ssh_authorized_keys=[KEY])
    command = boot_command(started, guests, nodes)
    return {n: expand(command, n) for n in nodes}


def test_a_node_sends_the_jobs_frames_to_the_jobs_other_nodes_only():
    cmds = plan("42", {"c1": "10.0.0.1", "c2": "10.0.0.2", "c3": "10.0.0.3"}, per_node=2)
    assert cmds["c1"].network.endpoints == {"c1": "10.0.0.1", "c2": "10.0.0.2", "c3": "10.0.0.3"}
    seg = segment_for(cmds["c1"], "c1", "10.0.0.1", 789, 1450)
    assert seg.vni == job_vni("42") and seg.remotes == ("10.0.0.2", "10.0.0.3")
    # each remote guest's MAC pinned to its node: no learning from what a packet says
    assert dict(seg.remote_macs) == {guest_mac("42", i): f"10.0.0.{i // 2 + 1}" for i in range(2, 6)}
    fdb = forwarding_commands(seg, set())
    floods = [c for c in fdb if c[3] == FLOOD_MAC]
    assert [c[-1] for c in floods] == ["10.0.0.2", "10.0.0.3"] and all(c[2] == "append" for c in floods)
    assert len(fdb) == 2 + 4
    # what is there already is not added again
    assert forwarding_commands(seg, {(FLOOD_MAC, "10.0.0.2")} | set(seg.remote_macs)) == [fdb[1]]


def test_two_node_workers_on_one_host_share_its_bridge_and_no_tunnel():
    cmds = plan("43", {"n1": "127.0.0.1", "n2": "127.0.0.1"})
    seg = segment_for(cmds["n1"], "n1", "127.0.0.1", 789, 1450)
    assert seg.remotes == () and seg.remote_macs == () and forwarding_commands(seg, set()) == []


def test_the_segment_has_no_host_address_and_sends_from_privileged_ports_only():
    seg = Segment(job_id="42", vni=4138, local="10.0.0.1", remotes=(), remote_macs=(), port=789, mtu=1450)
    cmds = setup_commands(seg)
    flat = [" ".join(c) for c in cmds]
    assert not any(" addr " in c or "address" in c for c in flat)  # no IPv4 address
    assert sum("addrgenmode none" in c for c in flat) == 2  # no IPv6 link-local on bridge or VXLAN device
    (vxlan,) = [c for c in cmds if "vxlan" in c]
    assert vxlan[vxlan.index("srcport") + 1:vxlan.index("srcport") + 3] == ["768", "1024"]  # 768..1023
    assert "nolearning" in vxlan and vxlan[vxlan.index("dstport") + 1] == "789"
    assert vxlan[vxlan.index("local") + 1] == "10.0.0.1" and "group" not in vxlan  # no multicast group
    checks = [" ".join(check) for check, _ in guard_commands(789)]
    assert any("! --sport 1:1023 -j DROP" in c for c in checks) and any("--dport 789" in c for c in checks)


@pytest.mark.parametrize("address, why", [
    ("239.1.1.1", "unicast"), ("0.0.0.0", "unicast"), ("255.255.255.255", "unicast"), ("127.0.0.2", "loopback"),
    ("node1", "IPv4"), ("10.0.0.1; reboot", "IPv4"), ("::1", "IPv4")])
def test_an_endpoint_that_is_not_another_nodes_unicast_address_is_refused(address, why):
    assert why in check_endpoint(address, "10.0.0.1")
    assert check_endpoint("10.0.0.2", "10.0.0.1") is None and check_endpoint("127.0.0.1", "127.0.0.1") is None


def _check_endpoint_by_ipaddress(address: str, local: str) -> str | None:
    """check_endpoint as it was, with ipaddress (10 ms a node at 1,024 endpoints): the verdicts to keep."""
    import ipaddress

    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        return "is not an IPv4 address"
    if ip.is_multicast or ip.is_unspecified or ip == ipaddress.IPv4Address("255.255.255.255"):
        return "is not a unicast address"
    if ip.is_loopback and address != local:
        return "is a loopback address other than this node's own"
    return None


def test_an_endpoints_verdict_is_ipaddress_s():
    import random

    rng = random.Random(12)
    odd = ["", ".", "1.2.3", "1.2.3.4.5", "01.2.3.4", "1.2.3.04", "1.2.3.00", "256.1.1.1", "1.2.3.255",
           "1.2.3.1000", "1.2.3.4 ", " 1.2.3.4", "1.2.3.4\n", "1..3.4", "+1.2.3.4", "1.2.3.-4", "\u0661.2.3.4",
           "1.2.3.\uff14", "0x1.2.3.4", "1e2.2.3.4", "127.0.0.1", "127.255.255.255", "128.0.0.1", "126.1.1.1",
           "223.255.255.255", "224.0.0.0", "239.255.255.255", "240.0.0.1", "255.255.255.254", "0.0.0.1",
           "0.0.0.0", "255.255.255.255", "10.0.0.1", "::ffff:1.2.3.4", "1.2.3.4/32", "1_0.2.3.4"]
    quads = [".".join(str(rng.choice([0, 1, 9, 10, 99, 100, 127, 199, 223, 224, 239, 240, 249, 250, 255, 256,
                                      rng.randrange(0, 300)])) for _ in range(4)) for _ in range(3000)]
    for address in odd + quads:
        for local in ("10.0.0.1", "127.0.0.1", address):
            assert check_endpoint(address, local) == _check_endpoint_by_ipaddress(address, local), (address, local)


class FakeHost:
    """`ip`/`bridge`/`iptables` as a node's kernel would take them: interfaces by name, their type, master, alias."""

    def __init__(self, fail_on: str = ""):
        self.fail_on, self.ran, self.links, self.batches = fail_on, [], {}, []

    def __call__(self, argv):
        self.ran.append(argv)
        ok = subprocess.CompletedProcess(argv, 0, "", "")
        if argv[:2] == ["bridge", "-batch"]:
            self.batches.append(Path(argv[2]).read_text())
        if self.fail_on and self.fail_on in " ".join(argv):
            return subprocess.CompletedProcess(argv, 2, "", "RTNETLINK answers: Operation not permitted")
        if argv[:3] == ["ip", "link", "add"]:
            if argv[3] in self.links:
                return subprocess.CompletedProcess(argv, 2, "", "RTNETLINK answers: File exists")
            self.links[argv[3]] = {"ifname": argv[3], "kind": argv[argv.index("type") + 1]}
        elif argv[:3] == ["ip", "link", "set"]:
            link = self.links[argv[3]]
            if "alias" in argv:
                link["ifalias"] = argv[argv.index("alias") + 1]
            if "master" in argv:
                link["master"] = argv[argv.index("master") + 1]
        elif argv[:3] == ["ip", "link", "del"]:
            self.links.pop(argv[3])
            for link in self.links.values():
                if link.get("master") == argv[3]:
                    del link["master"]
        elif argv[:4] == ["ip", "link", "show", "dev"]:
            return ok if argv[4] in self.links else subprocess.CompletedProcess(argv, 1, "", "does not exist")
        elif argv[:4] == ["ip", "-j", "link", "show"]:
            key, value = argv[4], argv[5]
            if key == "master" and value not in self.links:
                return subprocess.CompletedProcess(argv, 1, "", "does not exist")
            shown = [dict(link) for link in self.links.values()
                     if (key == "type" and link["kind"] == value) or (key == "master" and link.get("master") == value)]
            return subprocess.CompletedProcess(argv, 0, json.dumps(shown), "")
        elif argv[0] == "iptables" and ("-C" in argv or "-L" in argv):
            return subprocess.CompletedProcess(argv, 1, "", "")
        return ok


def segments(tmp_path: Path, **kw) -> tuple[JobSegments, FakeHost]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    host = FakeHost(**kw)
    return JobSegments(789, run=host, lock_path=str(tmp_path / "lock")), host


def test_a_vni_another_job_holds_is_refused_and_a_half_made_segment_is_removed(tmp_path):
    segs, host = segments(tmp_path)
    seg = Segment(job_id="42", vni=4138, local="10.0.0.1", remotes=("10.0.0.2",), remote_macs=(), port=789,
                  mtu=1450)
    assert segs.ensure(seg) == "vtj00102a" and segs.present() == {4138: "42"}
    assert sum(a[0] == "iptables" for a in host.ran) == 6  # guarded once: three checks, three adds
    segs.ensure(seg)  # again (a redelivered BootGuests): nothing new but what is missing
    with pytest.raises(SegmentError, match="held by job 42"):
        segs.ensure(Segment(job_id="99", vni=4138, local="10.0.0.1", remotes=(), remote_macs=(), port=789, mtu=1450))
    # a tap on it keeps it; without one it goes
    host.links["vnet0"] = {"ifname": "vnet0", "kind": "tun", "master": "vtj00102a"}
    assert segs.ports(4138) == ["vnet0"]
    assert segs.remove(4138, "42") is False and segs.present() == {4138: "42"}
    del host.links["vnet0"]
    assert segs.remove(4138, "99") is False and segs.remove(4138, "42") is True and segs.present() == {}
    assert host.links == {}

    broken, broken_host = segments(tmp_path / "b", fail_on="type vxlan")
    with pytest.raises(SegmentError, match="Operation not permitted"):
        broken.ensure(seg)
    assert broken_host.links == {}  # the bridge made before the failure is gone too


def test_a_nodes_forwarding_entries_go_in_one_bridge_batch_and_a_failing_batch_fails_the_segment(tmp_path):
    """2,046 entries on a node of a 1,024-node job: one `bridge -batch` process, not one each (~3 ms apiece)."""
    cmds = plan("44", {f"c{i}": f"10.0.0.{i + 1}" for i in range(5)})
    seg = segment_for(cmds["c0"], "c0", "10.0.0.1", 789, 1450)
    segs, host = segments(tmp_path)
    segs.ensure(seg)
    assert [argv[:2] for argv in host.ran if argv[0] == "bridge"] == [["bridge", "fdb"], ["bridge", "-batch"]]
    assert host.batches == ["".join(" ".join(c[1:]) + "\n" for c in forwarding_commands(seg, set()))]
    batch_file = next(argv[2] for argv in host.ran if argv[:2] == ["bridge", "-batch"])
    assert len(host.batches[0].splitlines()) == 4 + 4 and not Path(batch_file).exists()
    broken, _ = segments(tmp_path / "b", fail_on="-batch")
    with pytest.raises(SegmentError, match="Operation not permitted"):
        broken.ensure(seg)


def test_a_segment_whose_making_was_cut_short_is_made_again(tmp_path):
    """The node worker killed between its commands (the cluster rig's fault b): the bridge exists without its
    label. The job's next BootGuests (redelivered, or the requeued job) makes it afresh instead of failing on
    'File exists'; a labelled-less bridge that has ports is not ours to take."""
    segs, host = segments(tmp_path)
    seg = Segment(job_id="42", vni=4138, local="10.0.0.1", remotes=(), remote_macs=(), port=789, mtu=1450)
    host.links["vtj00102a"] = {"ifname": "vtj00102a", "kind": "bridge"}  # made, then killed before its alias
    assert segs.ensure(seg) == "vtj00102a" and segs.present() == {4138: "42"}
    host.links["vtj00102b"] = {"ifname": "vtj00102b", "kind": "bridge"}
    host.links["eth5"] = {"ifname": "eth5", "kind": "veth", "master": "vtj00102b"}
    with pytest.raises(SegmentError, match="has ports but no vtorque job"):
        segs.ensure(Segment(job_id="43", vni=4139, local="10.0.0.1", remotes=(), remote_macs=(), port=789, mtu=1450))
    assert "vtj00102b" in host.links and host.links["eth5"]["master"] == "vtj00102b"


def test_a_node_without_ip_fails_the_jobs_network_with_a_reason_and_its_teardowns_still_answer(tmp_path):
    """A node worker where `ip` is missing (a container image without iproute2): a job of several guests fails
    with the reason, and a teardown is still answered (the epilogue waits for it), the network left to
    reconciliation."""
    from vtorque.services.node_worker.service import NodeWorker
    from vtorque.shared.config import Config, NodeConfig

    def no_ip(argv):
        raise FileNotFoundError(2, "No such file or directory", argv[0])

    segs = JobSegments(789, run=no_ip, lock_path=str(tmp_path / "lock"))
    with pytest.raises(SegmentError, match="ip failed"):
        segs.present()

    class Hv:
        def vtorque_domains(self):
            return {}

    class Sent(list):
        def publish(self, message):
            self.append(message)

    sent = Sent()
    worker = NodeWorker(Config(node=NodeConfig(name="n1", domain_type="qemu"), state_dir=str(tmp_path / "state")),
                        sent, hypervisor=Hv(), store=object(), segments=segs)
    worker.on_teardown_guests(m.TeardownGuests.new(job_id="42", deadline=60.0, node="n1"))
    assert [type(x).__name__ for x in sent] == ["GuestsTornDown"]
    assert worker.remove_idle_networks() == []
