"""Domain XML and seed contents (pure), and the XML accepted by libvirt's test driver."""

import xml.etree.ElementTree as ET
from datetime import UTC, datetime

import pytest

from vtorque.services.node_worker.domain import (
    QEMU_NS,
    BootSource,
    GuestDisks,
    GuestMetadata,
    domain_xml,
    parse_metadata,
)
from vtorque.services.node_worker.seed import seed_files
from vtorque.shared import messages as m

GUEST = m.GuestPlan(name="vt-7_srv-n1-0", node="n1", index=0, image="tiny", image_digest="a" * 64, vcpus=2,
                    ram_mib=256, cores=[3, 5], owner=m.Owner(user="bob", uid=1001, gid=1002),
                    ssh_authorized_keys=["ssh-ed25519 AAAAkey bob"])
DISKS = GuestDisks(overlay="/g/vt/root.qcow2", seed="/g/vt/seed.iso", console_log="/g/vt/console.log")
META = GuestMetadata(job_id="7.srv", owner="bob", deadline=datetime(2030, 1, 1, tzinfo=UTC), index=0)


def test_domain_carries_the_plan():
    xml = domain_xml(GUEST, DISKS, BootSource("/k/vmlinux", "/k/initrd.img"), META)
    root = ET.fromstring(xml)
    assert root.get("type") == "qemu"
    assert root.findtext("vcpu") == "2" and root.find("memory").get("unit") == "MiB"
    assert root.findtext("memory") == "256"
    assert [(p.get("vcpu"), p.get("cpuset")) for p in root.iter("vcpupin")] == [("0", "3"), ("1", "5")]
    sources = [d.find("source").get("file") for d in root.iter("disk")]
    assert sources == [DISKS.overlay, DISKS.seed]
    assert root.find("devices/serial/source").get("path") == DISKS.console_log
    # No port on the host: the guest's NIC is on a hub with slirp (no IPv6) and the link to its guest_link
    # process, whose socket is in the guest's own directory.
    args = [a.get("value") for a in root.iter(f"{{{QEMU_NS}}}arg")]
    assert "hostfwd" not in xml
    assert "user,id=vtuser0,ipv6=off" in args
    assert "stream,id=vtlink0,server=off,addr.type=unix,addr.path=/g/vt/link.sock" in args
    assert parse_metadata(xml) == {"job": "7.srv", "owner": "bob", "deadline": "2030-01-01T00:00:00+00:00",
                                   "index": "0"}


def test_cloud_image_boots_from_disk_and_kvm_passes_the_cpu_through():
    root = ET.fromstring(domain_xml(GUEST, DISKS, BootSource(), META, domain_type="kvm"))
    assert root.find("os/kernel") is None and root.find("os/boot").get("dev") == "hd"
    assert root.find("cpu").get("mode") == "host-passthrough"


def test_libvirt_accepts_the_xml():
    libvirt = pytest.importorskip("libvirt")
    conn = libvirt.open("test:///default")
    xml = domain_xml(GUEST, DISKS, BootSource("/k/vmlinux", "/k/initrd.img"), META).replace(
        "<domain type=\"qemu\"", "<domain type=\"test\"")
    dom = conn.defineXML(xml)
    try:
        assert parse_metadata(dom.XMLDesc(0))["job"] == "7.srv"
    finally:
        dom.undefine()


def test_seed_gives_the_owner_and_only_the_job_key():
    files = seed_files(GUEST, "7.srv")
    env = files["vtorque.env"].decode()
    assert "VT_USER=bob\n" in env and "VT_UID=1001\n" in env and "VT_GID=1002\n" in env
    assert "VT_SSH_AUTHORIZED_KEYS='ssh-ed25519 AAAAkey bob'" in env
    assert files["user-data"].startswith(b"#cloud-config\n")
    assert b'"ssh_pwauth": false' in files["user-data"]


def test_seed_values_cannot_inject_shell():
    evil = m.GuestPlan(**{**{f: getattr(GUEST, f) for f in GUEST.__struct_fields__},
                          "ssh_authorized_keys": ["x'; reboot; '"]})
    line = next(x for x in seed_files(evil, "1")["vtorque.env"].decode().splitlines() if x.startswith("VT_SSH"))
    import shlex
    assert shlex.split(line.split("=", 1)[1]) == ["x'; reboot; '"]


FULL = m.GuestPlan(name="vt-8-n1-0", node="n1", index=0, image="tiny", image_digest="a" * 64, vcpus=2, ram_mib=512,
                   cores=[1, 2], owner=m.Owner(user="bob", uid=1001, gid=1002), ssh_authorized_keys=["k"],
                   distro="centos", emulator_cores=[0], io_cores=[3, 4], iocm_min_cores=1, iocm_max_cores=2,
                   vrdma=True, fs_type="ramdisk", disk=m.DataDisk(size_mib=1024),
                   user_metadata={"packages": ["htop"], "hostname": "evil"})


def test_every_key_reaches_the_guest_definition():
    disks = GuestDisks(overlay="/g/root.qcow2", seed="/g/seed.iso", console_log="/g/c.log", data="/g/data.qcow2")
    root = ET.fromstring(domain_xml(FULL, disks, BootSource("/k/vmlinux"), META))
    assert root.findtext("iothreads") == "2"
    assert [(p.get("iothread"), p.get("cpuset")) for p in root.iter("iothreadpin")] == [("1", "3"), ("2", "3")]
    assert root.find("cputune/emulatorpin").get("cpuset") == "0"
    assert [(p.get("vcpu"), p.get("cpuset")) for p in root.iter("vcpupin")] == [("0", "1"), ("1", "2")]
    targets = {d.find("target").get("dev"): d for d in root.iter("disk")}
    assert targets["vdc"].find("source").get("file") == "/g/data.qcow2"
    assert targets["vda"].find("driver").get("iothread") == "1"
    assert root.find("devices/shmem/model").get("type") == "ivshmem-plain"
    assert root.find("os/type").get("arch") == "x86_64"


def test_full_definition_is_accepted_by_libvirt():
    libvirt = pytest.importorskip("libvirt")
    conn = libvirt.open("test:///default")
    disks = GuestDisks(overlay="/g/root.qcow2", seed="/g/seed.iso", console_log="/g/c.log", data="/g/d.img",
                       data_format="raw")
    xml = domain_xml(FULL, disks, BootSource("/k/vmlinux"), META).replace('type="qemu"', 'type="test"', 1)
    dom = conn.defineXML(xml)
    try:
        back = ET.fromstring(dom.XMLDesc(0))
        assert back.findtext("iothreads") == "2" and back.find("devices/shmem") is not None
    finally:
        dom.undefine()


def test_user_metadata_is_merged_but_ours_wins_and_distro_shapes_the_seed():
    import json
    data = json.loads(seed_files(FULL, "8")["user-data"].decode().split("\n", 1)[1])
    assert data["packages"] == ["htop"] and data["hostname"] == "vt-8-n1-0"
    assert data["users"][0]["shell"] == "/bin/bash"  # redhat/centos flavour
    osv = m.GuestPlan(**{**{f: getattr(FULL, f) for f in FULL.__struct_fields__}, "distro": "osv"})
    osv_data = json.loads(seed_files(osv, "8")["user-data"].decode().split("\n", 1)[1])
    assert "users" not in osv_data and "/etc/vtorque.env" in osv_data["files"]


def test_site_mounts_for_home_and_scratch_reach_the_seed():
    import json

    from vtorque.shared.config import GuestMount
    mounts = [GuestMount(source="nfs:/export/home/{user}", target="{home}"),
              GuestMount(source="nfs:/scratch", target="/scratch", options="rw,nofail")]
    files = seed_files(GUEST, "7.srv", mounts=mounts)
    data = json.loads(files["user-data"].decode().split("\n", 1)[1])
    assert data["mounts"] == [["nfs:/export/home/bob", "/home/bob", "nfs", "defaults,nofail,_netdev", "0", "0"],
                              ["nfs:/scratch", "/scratch", "nfs", "rw,nofail", "0", "0"]]
    assert "nfs:/export/home/bob /home/bob nfs" in files["vtorque.env"].decode()


# -- what root checks (services/node_worker/trust.py, shared/user_files.py image_refusal) ----------------------

def test_data_disk_and_seed_say_they_have_no_backing_chain():
    """libvirt must never read a chain from a user's image header: `<backingStore/>` says there is none."""
    disks = GuestDisks(overlay="/g/o", seed="/g/s", console_log="/g/c", data="/g/data.raw", data_format="raw")
    root = ET.fromstring(domain_xml(GUEST, disks, BootSource(), META))
    by_target = {d.find("target").get("dev"): d for d in root.iter("disk")}
    assert by_target["vdb"].find("backingStore") is not None and by_target["vdc"].find("backingStore") is not None
    assert by_target["vda"].find("backingStore") is None  # the overlay's chain is root's: the store's image


@pytest.mark.parametrize("name,ok", [("vt-7_srv-n1-0", True), ("vt-a-b-12", True), ("vt-../x", False),
                                     ("vt-a/b", False), ("../x", False), ("vt-", False), ("vt-a.b", False),
                                     ("vt-" + "a" * 121, False), ("x-1", False)])
def test_guest_name_grammar(name, ok):
    from vtorque.services.node_worker import trust

    if ok:
        assert trust.check_guest_name(name) == name
    else:
        with pytest.raises(trust.Refused):
            trust.check_guest_name(name)


@pytest.mark.parametrize("job_id,ok", [("7.srv", True), ("12[3].server", True), ("123_4", True), ("..", False),
                                       ("1/2", False), ("a..b", False), ("", False), ("a" * 129, False),
                                       (".x", False), ("1 2", False)])
def test_job_id_grammar(job_id, ok):
    from vtorque.services.node_worker import trust

    if ok:
        assert trust.check_job_id(job_id) == job_id
    else:
        with pytest.raises(trust.Refused):
            trust.check_job_id(job_id)


def _qcow2_header(version=3, backing=(0, 0), incompatible=0, extensions=b""):
    import struct

    head = b"QFI\xfb" + struct.pack(">IQI", version, *backing) + b"\0" * (72 - 20)
    if version >= 3:
        head += struct.pack(">QQQII", incompatible, 0, 0, 4, 104)
    return head + extensions + b"\0" * 8


def test_image_refusal_reads_the_qcow2_header_itself():
    import struct

    from vtorque.shared.user_files import image_refusal

    assert image_refusal(_qcow2_header(), "qcow2") is None
    assert image_refusal(_qcow2_header(version=2), "qcow2") is None
    assert "backing file" in image_refusal(_qcow2_header(backing=(512, 11)), "qcow2")
    assert "backing file" in image_refusal(_qcow2_header(version=2, backing=(512, 11)), "qcow2")
    assert "external data file" in image_refusal(_qcow2_header(incompatible=1 << 2), "qcow2")
    ext = struct.pack(">II", 0x44415441, 11) + b"/etc/shadow" + b"\0" * 5
    assert "external data file" in image_refusal(_qcow2_header(extensions=ext), "qcow2")
    assert "not a qcow2" in image_refusal(b"\0" * 512, "qcow2")
    assert image_refusal(_qcow2_header(backing=(512, 11)), "raw") is None  # raw is bytes, never a header
    assert image_refusal(b"", "vmdk")
