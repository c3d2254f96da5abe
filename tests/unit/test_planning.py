from vtorque.services.scheduler_bridge.planning import boot_commands, domain_name, plan_guests
from vtorque.shared import messages as m
from vtorque.shared.spec import validate

from .conftest import DIGEST


def job(nodes):
    return m.JobStarted.new(job_id="7.srv", deadline=60.0, scheduler="torque",
                            owner=m.Owner(user="bob", uid=1001, gid=1001),
                            nodes=[m.NodeAllocation(host=h, ncpus=2) for h in nodes], spec={"img": "tiny"},
                            ssh_authorized_keys=["ssh-ed25519 AAAA"])


def test_one_guest_per_node_rank_zero_first(config):
    started = job(["n1", "n2"])
    guests = plan_guests(started, validate({"img": "tiny", "vcpus": "2"}, config), config)
    assert [(g.node, g.index, g.vcpus, g.image_digest) for g in guests] == [("n1", 0, 2, DIGEST), ("n2", 1, 2, DIGEST)]
    assert len({g.name for g in guests}) == 2
    commands = boot_commands(started, guests)
    assert [c.node for c in commands] == ["n1", "n2"] and all(c.deadline == started.deadline for c in commands)


def test_domain_names_are_path_safe():
    assert domain_name("1.vm/../x", "n1", 0) == "vt-1_vm____x-n1-0"
