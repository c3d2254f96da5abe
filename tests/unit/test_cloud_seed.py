"""What the seed gives a real cloud-init (tests/guest/cloud boots it): readiness marker, the owner's gid, and
DHCP on the user-mode NIC beside the job network. Pure: no guest."""

import json
import xml.etree.ElementTree as ET
from datetime import UTC, datetime

from vtorque.services.node_worker.domain import (
    QEMU_NS,
    USER_NET_MAC,
    BootSource,
    GuestDisks,
    GuestMetadata,
    JobNic,
    domain_xml,
)
from vtorque.services.node_worker.readiness import GUEST_READY
from vtorque.services.node_worker.seed import seed_files
from vtorque.shared import messages as m
from vtorque.shared.job_network import guest_address, guest_mac, job_network

BOB = m.Owner(user="bob", uid=1001, gid=1002)


def plan(owner=BOB, **extra):
    return m.GuestPlan(name="vt-9-n1-0", node="n1", index=0, image="cloud", image_digest="a" * 64, vcpus=1,
                       ram_mib=512, cores=None, owner=owner, ssh_authorized_keys=["ssh-ed25519 AAAAk bob"], **extra)


def user_data(files):
    head, body = files["user-data"].decode().split("\n", 1)
    assert head == "#cloud-config"
    return json.loads(body)


def test_cloud_init_prints_the_readiness_marker_and_keeps_the_users_final_message():
    data = user_data(seed_files(plan(), "9"))
    assert data["final_message"].encode().startswith(GUEST_READY + b" ")
    mine = user_data(seed_files(plan(user_metadata={"final_message": "hello $UPTIME"}), "9"))
    assert mine["final_message"].startswith(GUEST_READY.decode()) and mine["final_message"].endswith("hello $UPTIME")


def test_the_owner_gets_his_gid_as_primary_group_made_before_users():
    data = user_data(seed_files(plan(), "9"))
    assert data["users"][0]["uid"] == 1001 and data["users"][0]["primary_group"] == "1002"
    (argv,) = data["bootcmd"]
    assert argv[:2] == ["sh", "-c"] and argv[3:] == ["vtorque-gid", "1002", "bob"]  # values as arguments, not code
    root = user_data(seed_files(plan(owner=m.Owner(user="root", uid=0, gid=0)), "9"))
    assert "bootcmd" not in root and "primary_group" not in root["users"][0] and root["disable_root"] is False


def test_network_config_names_both_nics_by_mac_and_the_domain_uses_those_macs():
    net = job_network("9", {"n1": "10.0.0.1"})
    mac = guest_mac("9", 0)
    peers = [m.GuestPeer(name="vt-9-n1-0", index=0, node="n1", vcpus=1, address=guest_address(0))]
    cfg = json.loads(seed_files(plan(), "9", peers, net, mac)["network-config"])
    assert cfg["version"] == 2
    assert cfg["ethernets"]["jobnet"] == {"match": {"macaddress": mac}, "addresses": [f"{guest_address(0)}/16"]}
    assert cfg["ethernets"]["usernet"] == {"match": {"macaddress": USER_NET_MAC}, "dhcp4": True}
    assert USER_NET_MAC != mac and not USER_NET_MAC.startswith("52:54:00:")
    meta = GuestMetadata(job_id="9", owner="bob", deadline=datetime.now(UTC), index=0)
    disks = GuestDisks(overlay="/g/root.qcow2", seed="/g/seed.iso", console_log="/g/c.log")
    root = ET.fromstring(domain_xml(plan(), disks, BootSource("/k/vmlinux"), meta,
                                    job_nic=JobNic("vtj00abcd", mac, 1450)))
    args = [a.get("value") for a in root.iter(f"{{{QEMU_NS}}}arg")]
    devices = [a for a in args if a.startswith("virtio-net-pci,")]
    assert len(devices) == 1 and f"mac={USER_NET_MAC}" in devices[0] and "netdev=vtnet0" in devices[0]
    # The job NIC: a tap on the job's bridge, made by libvirt; no socket or multicast netdev any process can join.
    assert not any("mcast=" in a or a.startswith("socket,") for a in args)
    (nic,) = root.findall("devices/interface")
    assert nic.get("type") == "bridge" and nic.find("source").get("bridge") == "vtj00abcd"
    assert nic.find("mac").get("address") == mac and nic.find("mtu").get("size") == "1450"
    assert nic.find("model").get("type") == "virtio"
