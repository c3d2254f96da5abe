import pytest

from vtorque.services.scheduler_bridge.planning import PlanError, boot_command, plan_guests
from vtorque.shared import messages as m
from vtorque.shared.config import Config, ImageEntry, ImagesConfig, SpecConfig
from vtorque.shared.job_boot import expand_all, guest_counts
from vtorque.shared.messages import domain_name
from vtorque.shared.spec import SpecError, validate

from .conftest import DIGEST


def job(nodes, cores=None):
    return m.JobStarted.new(job_id="7.srv", deadline=60.0, scheduler="torque",
                            owner=m.Owner(user="bob", uid=1001, gid=1001),
                            nodes=[m.NodeAllocation(host=h, ncpus=n, cores=cores) for h, n in nodes],
                            spec={"img": "tiny"}, ssh_authorized_keys=["ssh-ed25519 AAAA"])


def site(**kw):
    return Config(spec=SpecConfig(**kw), images=ImagesConfig(catalog={"tiny": ImageEntry(source="/x", sha256=DIGEST)}))


def test_vms_per_node_on_every_node_rank_zero_first():
    config = site(host_reserve_cores=0)
    started = job([("n1", 4), ("n2", 4)])
    spec = validate({"img": "tiny", "vcpus": "2", "vms_per_node": "2", "disk": "1G"}, config)
    guests = plan_guests(started, spec, config)
    assert [(g.node, g.index) for g in guests] == [("n1", 0), ("n1", 1), ("n2", 2), ("n2", 3)]
    assert len({g.name for g in guests}) == 4 and all(g.image_digest == DIGEST for g in guests)
    assert guests[0].disk == m.DataDisk(size_mib=1024) and all(g.disk is None for g in guests[1:])
    command = boot_command(started, guests)  # one for the job, every node's guests in it
    assert command.nodes == ["n1", "n2"] and guest_counts(command) == [2, 2] and expand_all(command) == guests


def test_cores_split_reserve_then_vms_then_io():
    config = site(host_reserve_cores=1)
    spec = validate({"img": "tiny", "vcpus": "2", "vms_per_node": "2", "iocm": "true", "iocm_min_cores": "1",
                     "iocm_max_cores": "2"}, config)
    guests = plan_guests(job([("n1", 7)], cores=[10, 11, 12, 13, 14, 15, 16]), spec, config)
    assert [g.cores for g in guests] == [[11, 12], [13, 14]]
    assert all(g.emulator_cores == [10] and g.io_cores == [15, 16] for g in guests)
    assert all((g.iocm_min_cores, g.iocm_max_cores) == (1, 2) for g in guests)


def test_every_key_reaches_the_plan():
    config = site(host_reserve_cores=0)
    spec = validate({"img": "tiny", "distro": "centos", "vrdma": "true", "fs_type": "ramdisk",
                     "disk": "/home/bob/d.img", "vcpus": "2", "vcpu_pinning": "1:0"}, config)
    [g] = plan_guests(job([("n1", 2)], cores=[4, 5]), spec, config, {"packages": ["htop"]})
    assert (g.distro, g.vrdma, g.fs_type, g.disk.image, g.cores) == (
        "centos",
        True,
        "ramdisk",
        "/home/bob/d.img",
        [5, 4],
    )
    assert g.user_metadata == {"packages": ["htop"]} and g.arch == "x86_64"


def test_unknown_cores_or_pinning_off_pins_nothing():
    config = site(host_reserve_cores=1)
    spec = validate({"img": "tiny"}, config)
    assert plan_guests(job([("n1", 2)]), spec, config)[0].cores is None
    off = validate({"img": "tiny", "vcpu_pinning": "false"}, config)
    assert plan_guests(job([("n1", 2)], cores=[0, 1]), off, config)[0].cores is None


def test_a_node_with_too_few_cores_is_refused_with_the_reason():
    config = site(host_reserve_cores=1)
    with pytest.raises(PlanError, match="node n1 gave the job 2 cores; its VMs need 3"):
        plan_guests(job([("n1", 2)]), validate({"img": "tiny", "vcpus": "2"}, config), config)


def test_a_core_map_beyond_the_allocation_names_the_key():
    config = site(host_reserve_cores=0)
    spec = validate({"img": "tiny", "vcpus": "2", "vcpu_pinning": "0:5"}, config)
    with pytest.raises(SpecError) as err:
        plan_guests(job([("n1", 2)], cores=[0, 1]), spec, config)
    assert err.value.key == "vcpu_pinning"


def test_domain_names_are_path_safe():
    assert domain_name("1.vm/../x", "n1", 0) == "vt-1_vm____x-n1-0"
