"""vRDMA (pure): parsing the node's facts, ranking and choosing backends, XML for every backend; and NUMA
memory placement in the guest definition. The host facts come from fake hosts (tests/conftest.py), never from
the machine the tests run on."""

import xml.etree.ElementTree as ET
from datetime import UTC, datetime

import libvirt
import pytest
from conftest import FakeHost

from vtorque.services.node_worker import numa, vrdma
from vtorque.services.node_worker.domain import BootSource, GuestDisks, GuestMetadata, domain_xml, parse_metadata
from vtorque.services.node_worker.vrdma import (
    BACKENDS,
    IVSHMEM,
    PVRDMA,
    SKVM,
    SRIOV,
    Choice,
    IbDevice,
    Probe,
    VrdmaUnavailable,
    choose,
)
from vtorque.shared import messages as m

HELP = '''Network devices:
name "e1000", bus PCI, alias "e1000-82540em", desc "Intel Gigabit Ethernet"
name "pvrdma", bus PCI, desc "RDMA Device"
Misc devices:
name "ivshmem-plain", bus PCI, desc "Inter-VM shared memory"
'''
THIS_HOST = Probe(qemu_devices=vrdma.parse_device_help(HELP))  # a host without RDMA hardware
MLX = IbDevice("mlx5_0", netdevs=("ens3f0",), vfs=("0000:03:00.1", "0000:03:00.2"),
               mad_sockets=((1, "/var/run/rdmacm-mux-mlx5_0-1"),))
FULL = Probe(qemu_devices=frozenset({"pvrdma", "ivshmem-plain", "virtio-rdma-pci"}), ib_devices=(MLX,), iommu=True)


def test_device_help_parsing():
    assert vrdma.parse_device_help(HELP) == {"e1000", "pvrdma", "ivshmem-plain"}


def test_this_host_offers_only_shared_memory():
    assert vrdma.available(THIS_HOST) == [IVSHMEM]
    assert vrdma.capabilities(THIS_HOST) == ["vrdma-ivshmem"]
    assert "no host RDMA device" in vrdma.missing(PVRDMA, THIS_HOST, True)


def test_ranking_best_first_and_site_order_wins():
    assert vrdma.available(FULL) == [SRIOV, SKVM, PVRDMA, IVSHMEM]
    assert choose("n1", FULL, "7", list(BACKENDS), [], True).backend == SRIOV
    assert choose("n1", FULL, "7", [PVRDMA, SRIOV], [], True).backend == PVRDMA


def test_vfs_in_use_are_skipped_then_the_next_backend():
    c = choose("n1", FULL, "7", list(BACKENDS), [], False, used_vfs=frozenset({"0000:03:00.1"}))
    assert (c.backend, c.vf) == (SRIOV, "0000:03:00.2")
    c = choose("n1", FULL, "7", list(BACKENDS), [], False, used_vfs=frozenset(MLX.vfs))
    assert (c.backend, c.qemu_device, c.ibdev) == (SKVM, "virtio-rdma-pci", "mlx5_0")


def test_no_iommu_no_sriov():
    assert "IOMMU" in vrdma.missing(SRIOV, Probe(ib_devices=(MLX,)), True)


def test_shared_memory_only_for_a_job_on_one_node():
    chosen = choose("n1", THIS_HOST, "7.srv", list(BACKENDS), [], True, shmem_secret=b"k" * 32)
    assert chosen == Choice(IVSHMEM, shmem_name=vrdma.shmem_name("7.srv", b"k" * 32))
    with pytest.raises(VrdmaUnavailable) as exc:
        choose("n1", THIS_HOST, "7", list(BACKENDS), [], single_node=False)
    text = str(exc.value)
    assert text.startswith("node n1 has no usable vRDMA backend")
    assert "SR-IOV: no RDMA virtual functions" in text and "same node" in text


def test_a_required_backend_the_node_lacks_names_node_and_what_is_missing():
    with pytest.raises(VrdmaUnavailable) as exc:
        choose("n7", THIS_HOST, "7", list(BACKENDS), [SRIOV, SKVM], True)
    assert "node n7" in str(exc.value) and "ivshmem" not in str(exc.value)
    assert "virtio-rdma" in str(exc.value) and "virtual functions" in str(exc.value)
    with pytest.raises(VrdmaUnavailable, match="not among this node's"):
        choose("n7", FULL, "7", [IVSHMEM], [SRIOV], True)


def test_vfs_held_by_other_domains():
    xml = """<domain><devices><hostdev mode='subsystem' type='pci'><source>
             <address domain='0x0000' bus='0x03' slot='0x00' function='0x2'/></source></hostdev></devices></domain>"""
    assert vrdma.used_vfs([xml, "<domain><devices/></domain>"]) == {"0000:03:00.2"}


def _frag(choice):
    dom, dev = ET.Element("domain"), ET.Element("devices")
    args = vrdma.apply(dom, dev, choice)
    return dom, dev, args


def test_xml_ivshmem():
    dom, dev, args = _frag(Choice(IVSHMEM, shmem_name="vtorque-7"))
    assert dev.find("shmem").get("name") == "vtorque-7" and dev.find("shmem/model").get("type") == "ivshmem-plain"
    assert dev.findtext("shmem/size") == "64" and args == [] and dom.find("memoryBacking") is None


def test_xml_sriov_vf():
    _, dev, args = _frag(Choice(SRIOV, vf="0000:03:00.2", ibdev="mlx5_0"))
    host = dev.find("hostdev")
    assert (host.get("type"), host.get("managed")) == ("pci", "yes")
    assert host.find("source/address").attrib == {"domain": "0x0000", "bus": "0x03", "slot": "0x00", "function": "0x2"}
    assert args == []


def test_xml_pvrdma():
    dom, dev, args = _frag(choose("n1", FULL, "7", [PVRDMA], [], False))
    assert len(dev) == 0
    assert dom.find("memoryBacking/access").get("mode") == "shared"
    assert dom.find("memoryBacking/source").get("type") == "memfd"
    joined = " ".join(args)
    assert "vmxnet3,netdev=vtrdmanet,addr=0x1d.0,multifunction=on" in joined
    assert "pvrdma,addr=0x1d.1,ibdev=mlx5_0,ibport=1,netdev=ens3f0,mad-chardev=vtrdmamad" in joined
    assert "socket,path=/var/run/rdmacm-mux-mlx5_0-1,id=vtrdmamad" in joined


def test_xml_skvm_virtio_rdma():
    dom, _, args = _frag(Choice(SKVM, ibdev="mlx5_0", qemu_device="virtio-hyv-pci"))
    assert args == ["-device", "virtio-hyv-pci,addr=0x1e"] and dom.find("memoryBacking") is not None


GUEST = m.GuestPlan(name="vt-9-n1-0", node="n1", index=0, image="tiny", image_digest="a" * 64, vcpus=2,
                    ram_mib=256, cores=[2, 3], owner=m.Owner(user="bob", uid=1001, gid=1002),
                    ssh_authorized_keys=["k"], emulator_cores=[0], io_cores=[4, 5], iocm_min_cores=1,
                    iocm_max_cores=2, vrdma=True)
DISKS = GuestDisks(overlay="/g/root.qcow2", seed="/g/seed.iso", console_log="/g/c.log")
META = GuestMetadata(job_id="9", owner="bob", deadline=datetime(2030, 1, 1, tzinfo=UTC), index=0)


def test_guest_definition_carries_the_chosen_backend_and_iocm_facts():
    xml = domain_xml(GUEST, DISKS, BootSource("/k/vmlinux"), META,
                     vrdma_choice=choose("n1", FULL, "9", [PVRDMA], [], True))
    root = ET.fromstring(xml)
    assert root.find("devices/shmem") is None and root.find("memoryBacking") is not None
    args = [a.get("value") for a in root.iter("{http://libvirt.org/schemas/domain/qemu/1.0}arg")]
    assert args[:2] == ["-netdev", "user,id=vtuser0,ipv6=off"]  # the guest's own NIC first, then vRDMA's
    assert any(a.startswith("pvrdma,") for a in args)
    meta = parse_metadata(xml)
    assert (meta["iocm-cores"], meta["iocm-min"], meta["iocm-max"]) == ("4,5", "1", "2")


def test_every_backend_definition_is_accepted_by_libvirt():
    conn = libvirt.open("test:///default")
    for choice in (Choice(IVSHMEM, shmem_name="vtorque-9"), Choice(SRIOV, vf="0000:03:00.2"),
                   choose("n1", FULL, "9", [PVRDMA], [], True), Choice(SKVM, qemu_device="virtio-rdma-pci")):
        xml = domain_xml(GUEST, DISKS, BootSource("/k/vmlinux"), META, vrdma_choice=choice)
        dom = conn.defineXML(xml.replace('type="qemu"', 'type="test"', 1))
        try:
            back = ET.fromstring(dom.XMLDesc(0))
            if choice.backend == SRIOV:
                assert back.find("devices/hostdev/source/address").get("function") == "0x2"
            if choice.backend == IVSHMEM:
                assert back.find("devices/shmem").get("name") == "vtorque-9"
        finally:
            dom.undefine()


TWO_NODES = {0: frozenset({0, 1, 2, 3}), 1: frozenset({4, 5, 6, 7})}


def test_numa_nodeset_only_with_more_than_one_node():
    assert numa.nodeset([2, 3], TWO_NODES) == "0"
    assert numa.nodeset([3, 4], TWO_NODES) == "0,1"
    assert numa.nodeset([2, 3], {0: frozenset(range(8))}) is None
    assert numa.nodeset(None, TWO_NODES) is None
    assert numa.parse_cpulist("0-2,7\n") == {0, 1, 2, 7}


def test_numatune_in_the_definition_only_on_a_numa_host():
    multi = ET.fromstring(domain_xml(GUEST, DISKS, BootSource(), META, numa_topology=TWO_NODES))
    assert multi.find("numatune/memory").attrib == {"mode": "strict", "nodeset": "0"}
    single = ET.fromstring(domain_xml(GUEST, DISKS, BootSource(), META, numa_topology={0: frozenset({0, 1})}))
    assert single.find("numatune") is None


def test_the_topology_and_the_placement_come_from_the_host_the_node_worker_sees(fake_host):
    """On the injected 2-core and 16-core hosts alike: host_topology reads that host's sysfs, and the guest's
    memory goes to the nodes of its cores only where there is more than one node."""
    host = fake_host.host
    assert numa.host_topology() == host.topology()
    assert sum(len(cpus) for cpus in numa.host_topology().values()) == host.cores
    for cores in ([0], [host.cores - 1], [0, host.cores - 1]):
        guest = m.GuestPlan(**{**{f: getattr(GUEST, f) for f in GUEST.__struct_fields__}, "cores": cores})
        root = ET.fromstring(domain_xml(guest, DISKS, BootSource(), META, numa_topology=numa.host_topology()))
        want = sorted({n for n, cpus in host.topology().items() if cpus & set(cores)})
        if host.numa_nodes == 1:
            assert root.find("numatune") is None
        else:
            assert root.find("numatune/memory").get("nodeset") == ",".join(map(str, want))
    if host.numa_nodes == 2:
        assert numa.nodeset([0, host.cores - 1], numa.host_topology()) == "0,1"


def test_the_probe_reads_the_host_it_is_given(fake_host, make_fake_host):
    """No RDMA hardware on either fake host: shared memory only; a host with a ConnectX, VFs and an IOMMU
    offers SR-IOV first."""
    assert fake_host.probe() == Probe(qemu_devices=frozenset({"e1000", "ivshmem-plain"}), ib_devices=(),
                                      iommu=False)
    assert vrdma.available(vrdma.probe()) == [IVSHMEM]  # the injected probe, as the node worker calls it
    rdma = make_fake_host(FakeHost("16-core-2-numa-rdma", cores=16, numa_nodes=2, rdma=True,
                                   qemu_devices=("pvrdma", "ivshmem-plain")))
    found = rdma.probe()
    assert found.iommu and [d.name for d in found.ib_devices] == ["mlx5_0"]
    assert found.ib_devices[0].vfs == ("0000:03:00.1", "0000:03:00.2")
    assert found.ib_devices[0].netdevs == ("ens3f0",)
    assert vrdma.available(found) == [SRIOV, PVRDMA, IVSHMEM]
    assert vrdma.available(vrdma.probe()) == [SRIOV, PVRDMA, IVSHMEM]  # now injected


def test_a_jobs_shared_memory_name_cannot_be_guessed_without_the_nodes_secret():
    """/dev/shm is every user's: a region named after the job id alone could be created first by anyone."""
    name = vrdma.shmem_name("7.srv", b"s" * 32)
    assert name == vrdma.shmem_name("7.srv", b"s" * 32)  # every guest of the job on the node: one region
    assert name != vrdma.shmem_name("7.srv", b"t" * 32) != vrdma.shmem_name("8.srv", b"s" * 32)
    assert "srv" not in name and len(name) == len("vtorque-") + 32


def test_the_node_secret_is_made_once_root_only_and_a_planted_region_is_refused(tmp_path, monkeypatch):
    import os

    secret = vrdma.node_secret(str(tmp_path))
    assert len(secret) == 32 and vrdma.node_secret(str(tmp_path)) == secret
    assert (tmp_path / "node.secret").stat().st_mode & 0o777 == 0o600
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setattr(vrdma, "SHM_DIR", shm)
    vrdma.prepare_shmem("vtorque-a", qemu_user="root")
    assert (shm / "vtorque-a").stat().st_mode & 0o777 == 0o600
    vrdma.prepare_shmem("vtorque-a", qemu_user="root")  # the job's second guest: the same region
    planted = shm / "vtorque-b"
    planted.write_bytes(b"")
    os.chown(planted, 65534, 65534)
    with pytest.raises(OSError, match="not this node's"):
        vrdma.prepare_shmem("vtorque-b", qemu_user="root")
    (shm / "vtorque-c").symlink_to("/etc/passwd")
    with pytest.raises(OSError):
        vrdma.prepare_shmem("vtorque-c", qemu_user="root")
    assert vrdma.remove_shmem("vtorque-a") and not (shm / "vtorque-a").exists()
    assert not vrdma.remove_shmem("vtorque-c") and os.path.exists("/etc/passwd")  # a symlink is not followed
