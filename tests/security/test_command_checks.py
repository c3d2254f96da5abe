"""Issue 11 item 3: root acts only on what it has checked itself. Hand-built BootGuests/TeardownGuests (what
anyone able to publish to a node's queue could send), through the wire's decoder into the node worker's
handler: each is refused with a named reason, as GuestFailed that no retry cures, and nothing is created on
disk (the site's whole tree is compared before and after) or in libvirt."""

from __future__ import annotations

import os
import pwd
import uuid
from pathlib import Path

import msgspec
import pytest

from vtorque.services.node_worker import trust
from vtorque.services.node_worker.job_segment import bridge_name
from vtorque.shared import messages as m
from vtorque.shared.messages import domain_name

from .conftest import KEY, snapshot, wire


def job() -> str:
    return f"{uuid.uuid4().int % 10**6}.sec"


def refused(answers, *words: str) -> m.GuestFailed:
    assert len(answers) >= 1 and all(isinstance(a, m.GuestFailed) for a in answers), answers
    for answer in answers:
        assert not answer.retryable, answer
        assert answer.reason.startswith("refused by node"), answer.reason
        for word in words:
            assert word in answer.reason, answer.reason
    return answers[0]


def assert_nothing_happened(site, before: dict, *names: str) -> None:
    assert snapshot(site.root) == before
    assert site.domains() == {}
    for name in names:
        assert site.worker.hv.lookup(name) is None


def test_a_well_formed_command_passes_the_checks(site, users):
    """The control: the checks refuse what is wrong, not everything."""
    a, _ = users
    j = job()
    cmd = m.BootGuests.new(job_id=j, deadline=60.0, node=site.node, guests=[site.plan(a, j)])
    accounts = trust.check_boot(wire(cmd), site.node, site.config)
    assert accounts[domain_name(j, site.node, 0)] == trust.OwnerAccount(a.name, a.uid, a.gid, str(a.home))


# (a) the owner -----------------------------------------------------------------------------------------------

def test_root_as_owner_is_refused(site, users):
    a, _ = users
    before, j = snapshot(site.root), job()
    answers = site.boot(j, site.plan(a, j, owner=m.Owner(user="root", uid=0, gid=0)))
    refused(answers, "owner root is root", "allow_system_owners")
    assert_nothing_happened(site, before, domain_name(j, site.node, 0))


@pytest.mark.parametrize("account", ["daemon", "bin", "nobody"])
def test_a_system_account_as_owner_is_refused(site, users, account):
    a, _ = users
    pw = pwd.getpwnam(account)
    before, j = snapshot(site.root), job()
    answers = site.boot(j, site.plan(a, j, owner=m.Owner(user=account, uid=pw.pw_uid, gid=pw.pw_gid)))
    refused(answers, f"owner {account} is ", "allow_system_owners")
    assert_nothing_happened(site, before)


def test_a_uid_that_is_not_the_names_is_refused(site, users):
    """The attacker names herself but the victim's uid (or root's): the password database decides."""
    a, b = users
    for uid, gid in ((b.uid, a.gid), (0, a.gid), (a.uid, 0)):
        before, j = snapshot(site.root), job()
        answers = site.boot(j, site.plan(a, j, owner=m.Owner(user=a.name, uid=uid, gid=gid)))
        refused(answers, f"owner {a.name} ")
        assert_nothing_happened(site, before)


def test_a_group_the_owner_is_not_in_is_refused_and_one_she_is_in_is_taken(site, users):
    import grp
    import subprocess

    a, b = users
    j = job()
    refused(site.boot(j, site.plan(a, j, owner=m.Owner(user=a.name, uid=a.uid, gid=b.gid))), "is not in group")
    group = f"g{a.name}"
    subprocess.run(["groupadd", group], check=True, capture_output=True)
    try:
        subprocess.run(["usermod", "-aG", group, a.name], check=True, capture_output=True)
        gid = grp.getgrnam(group).gr_gid
        cmd = m.BootGuests.new(job_id=j, deadline=60.0, node=site.node,
                               guests=[site.plan(a, j, owner=m.Owner(user=a.name, uid=a.uid, gid=gid))])
        assert trust.check_boot(cmd, site.node, site.config)[domain_name(j, site.node, 0)].gid == gid
    finally:
        subprocess.run(["groupdel", group], capture_output=True)


def test_an_unknown_owner_is_refused(site, users):
    a, _ = users
    before, j = snapshot(site.root), job()
    refused(site.boot(j, site.plan(a, j, owner=m.Owner(user="nosuchuser9", uid=4242, gid=4242))), "unknown")
    assert_nothing_happened(site, before)


def test_different_owners_in_one_job_are_refused(site, users):
    a, b = users
    before, j = snapshot(site.root), job()
    g0 = site.plan(a, j)
    g1 = site.plan(b, j, name=domain_name(j, site.node, 1), index=1)
    refused(site.boot(j, g0, g1), "different owners")
    assert_nothing_happened(site, before)


# (b) names and paths -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../canary", "vt-../../canary", "vt-x/../../canary", "vt-a" + "b" * 300,
                                  "vt-\n", "..", "vt-.", "/tmp/x"])
def test_a_guest_name_that_is_a_path_is_refused_and_the_directory_it_names_survives(site, users, name):
    a, _ = users
    canary = site.root / "canary"
    canary.mkdir()
    (canary / "keep").write_text("precious")
    (site.root / "guests").mkdir(mode=0o711)
    before, j = snapshot(site.root), job()
    answers = site.boot(j, site.plan(a, j, name=name))
    refused(answers, "is not a vtorque guest name")
    assert all(len(x.reason) < 1100 for x in answers)  # an oversized value is not echoed whole
    assert_nothing_happened(site, before)
    assert (canary / "keep").read_text() == "precious"


@pytest.mark.parametrize("job_id", ["../x", "1/../../canary", "..", "a" * 200, "1\n2", ""])
def test_a_job_id_that_is_a_path_is_refused(site, users, job_id):
    a, _ = users
    before = snapshot(site.root)
    refused(site.boot(job_id, site.plan(a, "x")), "is not a job id")
    assert_nothing_happened(site, before)


@pytest.mark.parametrize("job_id", ["../canary", "..", "x/../../canary"])
def test_a_teardown_with_a_path_for_a_job_id_removes_nothing(site, users, job_id):
    canary = site.root / "canary"
    canary.mkdir()
    (canary / "job").write_text(job_id)
    jobs = site.root / "state" / "jobs"
    jobs.mkdir(parents=True)
    before = snapshot(site.root)
    cmd = wire(m.TeardownGuests.new(job_id=job_id, deadline=60.0, node=site.node))
    site.worker.on_teardown_guests(cmd)
    refused(site.sent.sent[-1:], "is not a job id")
    assert snapshot(site.root) == before


def test_a_guest_named_like_another_jobs_domain_leaves_that_domain_alone(site, users):
    """A boot command naming a guest of another job: not re-announced, not removed as a leftover."""
    import libvirt

    from vtorque.services.node_worker.domain import BootSource, GuestDisks, GuestMetadata, domain_xml
    from vtorque.services.node_worker.hypervisor import Hypervisor

    a, _ = users
    site.worker.hv = Hypervisor("test:///default")  # a domain of the victim's, without booting anything
    # Job ids that escape to one name (6_x, 6.x): the only way a name the checks accept is another job's.
    n = uuid.uuid4().int % 10**6
    victim_job, j = f"{n}_x", f"{n}.x"
    name = domain_name(victim_job, site.node, 0)
    assert name == domain_name(j, site.node, 0)
    victim = site.plan(a, victim_job, name=name)
    xml = domain_xml(victim, GuestDisks("/nonexistent/o", "/nonexistent/s", "/nonexistent/c"), BootSource(),
                     GuestMetadata(job_id=victim_job, owner=a.name, deadline=m.utcnow(), index=0,
                                   node=site.node), domain_type="test")
    dom = site.worker.hv.define(xml)
    try:
        answers = site.boot(j, site.plan(a, j, name=name))
        refused(answers, "is not this job's")
        assert site.worker.hv.lookup(name) is not None
    finally:
        try:
            dom.undefine()
        except libvirt.libvirtError:
            pass


# (c) the spec ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes,word", [
    ({"vcpus": 10000}, "vcpus=10000"),
    ({"vcpus": 0}, "vcpus=0"),
    ({"ram_mib": 1 << 30}, "ram="),
    ({"ram_mib": 1}, "ram="),
    ({"distro": "plan9"}, "distro"),
    ({"arch": "riscv"}, "arch"),
    ({"image": "not-in-catalog"}, "no such image"),
    ({"image": "../../etc"}, "malformed"),
    ({"image_digest": "../" * 20 + "x" * 4}, "malformed"),
    ({"disk": m.DataDisk(size_mib=1 << 24)}, "disk="),
    ({"disk": m.DataDisk(image="/home/x/../../etc/shadow.img")}, "disk="),
    ({"disk": m.DataDisk(image="relative.qcow2")}, "disk="),
    ({"disk": m.DataDisk(size_mib=8, image="/home/x/a.img")}, "both"),
    ({"iocm_min_cores": 3}, "iocm_min_cores"),
    ({"iocm_min_cores": 1, "iocm_max_cores": 99}, "iocm_max_cores"),
    ({"cores": list(range(40))}, "cores"),
    ({"ssh_authorized_keys": ["ssh-ed25519 AAAA\ncommand=\"sh\" ssh-rsa AAAA"]}, "ssh_authorized_keys"),
    ({"ssh_authorized_keys": []}, "ssh_authorized_keys"),
])
def test_an_invalid_or_oversized_spec_is_refused(site, users, changes, word):
    a, _ = users
    before, j = snapshot(site.root), job()
    refused(site.boot(j, site.plan(a, j, **changes)), word)
    assert_nothing_happened(site, before)


def test_more_guests_on_a_node_than_the_site_allows_are_refused(site, users):
    a, _ = users
    before, j = snapshot(site.root), job()
    guests = [site.plan(a, j, name=domain_name(j, site.node, k), index=k) for k in range(3)]  # max_vms_per_node=2
    refused(site.boot(j, *guests), "vms_per_node")
    assert_nothing_happened(site, before)


def test_a_bad_job_network_is_refused_and_makes_nothing(site, users):
    a, _ = users
    before, j = snapshot(site.root), job()
    me, other = site.node, "c9"
    peers = [m.GuestPeer(name=domain_name(j, me, 0), index=0, node=me, vcpus=1, address="10.254.0.1"),
             m.GuestPeer(name=domain_name(j, other, 0), index=1, node=other, vcpus=1, address="10.254.0.2")]
    local = site.config.node.job_network_localaddr
    bad = {
        "VNI must be": m.JobNetwork(vni=42, prefix=16, endpoints={me: local, other: "10.1.0.2"}),
        "VNI must be ": m.JobNetwork(vni=1 << 24, prefix=16, endpoints={me: local, other: "10.1.0.2"}),
        "exactly the job's nodes": m.JobNetwork(vni=5000, prefix=16, endpoints={me: local}),
        "exactly the job's nodes ": m.JobNetwork(vni=5000, prefix=16, endpoints={me: local, other: "10.1.0.2",
                                                                                "c10": "10.1.0.3"}),
        "not a unicast address": m.JobNetwork(vni=5000, prefix=16, endpoints={me: local, other: "239.1.2.3"}),
        "loopback address other than": m.JobNetwork(vni=5000, prefix=16, endpoints={me: local, other: "127.0.0.9"}),
        "not an IPv4 address": m.JobNetwork(vni=5000, prefix=16, endpoints={me: local, other: "c9; reboot"}),
    }
    for reason, net in bad.items():
        refused(site.boot(j, site.plan(a, j), peers=peers, network=net), reason.strip())
        # refused before any of the job network was made on this node
        assert not Path(f"/sys/class/net/{bridge_name(net.vni % (1 << 24))}").exists()
    assert_nothing_happened(site, before)


# (d) the user's cloud-init metadata --------------------------------------------------------------------------

@pytest.mark.parametrize("metadata", [
    {"runcmd": [["sh", "-c", "id"]]},
    {"bootcmd": ["chmod 4755 /bin/sh"]},
    {"users": [{"name": "root", "ssh_authorized_keys": [KEY]}]},
    {"write_files": [{"path": "/etc/sudoers.d/x", "content": "ALL ALL=(ALL) NOPASSWD:ALL"}]},
    {"disable_root": False},
    {"ssh_authorized_keys": [KEY]},
    {"mounts": [["/dev/vdc", "/mnt"]]},
    {"packages": ["ok", "$(reboot)"]},
    {"final_message": "x\nruncmd: [reboot]"},
])
def test_metadata_with_root_giving_keys_is_refused(site, users, metadata):
    a, _ = users
    before, j = snapshot(site.root), job()
    refused(site.boot(j, site.plan(a, j, user_metadata=metadata)), "metadata")
    assert_nothing_happened(site, before)


def test_a_system_owner_is_allowed_only_where_the_site_says(site, users):
    """[node] allow_system_owners: read from the config when it has the field (shared/config.py)."""
    a, _ = users
    cmd = m.BootGuests.new(job_id="1.sec", deadline=60.0, node=site.node,
                           guests=[site.plan(a, "1.sec", owner=m.Owner(user="root", uid=0, gid=0))])
    with pytest.raises(trust.Refused, match="allow_system_owners"):
        trust.check_boot(cmd, site.node, site.config)
    if "allow_system_owners" in type(site.config.node).__struct_fields__:
        allowed = msgspec.structs.replace(site.config, node=msgspec.structs.replace(site.config.node,
                                                                                    allow_system_owners=True))
        assert trust.check_boot(cmd, site.node, allowed)


def test_the_guest_dirs_stay_confined(site, users):
    """Every path the worker derives stays under its root: no name the grammar lets through leaves it."""
    from vtorque.services.node_worker import disks

    for name in ("vt-1-n-0", "vt-" + "a" * 120, "vt-_-_"):
        path = disks.guest_dir(site.config.node.guest_dir, name)
        assert os.path.dirname(os.path.normpath(path)) == site.config.node.guest_dir
    for name in ("vt-../x", "vt-a/b", "vt-" + "a" * 121, "x"):
        with pytest.raises(trust.Refused):
            disks.guest_dir(site.config.node.guest_dir, name)
    assert Path(site.config.node.guest_dir).parent == site.root


@pytest.mark.parametrize("options,cores", [
    ({"img": "tiny"}, None),
    ({"img": "tiny", "vcpus": "2", "vms_per_node": "2", "disk": "64M", "fs_type": "ramdisk"}, None),
    ({"img": "tiny", "vcpus": "2", "vms_per_node": "1", "iocm": "true", "iocm_min_cores": "1",
      "iocm_max_cores": "2", "vcpu_pinning": "1:0"}, [0, 1, 2, 3, 4]),
    ({"img": "tiny", "vcpus": "1", "vms_per_node": "2", "vrdma": "true", "distro": "CentOS",
      "disk": "/home/x/data.qcow2"}, [0, 1, 2]),
])
def test_what_the_bridge_plans_passes_the_node_workers_checks(site, users, options, cores):
    """The checks and the bridge agree: every well-formed plan the bridge makes is accepted as it is."""
    from vtorque.services.scheduler_bridge.planning import boot_commands, plan_guests
    from vtorque.shared.spec import validate

    a, _ = users
    started = m.JobStarted.new(job_id="77.srv", deadline=60.0, scheduler="torque", owner=a.owner(),
                               nodes=[m.NodeAllocation(host=site.node, ncpus=5, cores=cores),
                                      m.NodeAllocation(host="other", ncpus=5, cores=cores)],
                               spec=options, ssh_authorized_keys=[KEY])
    spec = validate(options, site.config)
    guests = plan_guests(started, spec, site.config, {"packages": ["htop"], "timezone": "UTC"})
    # Each node's job network endpoint, as the nodes' heartbeats give the bridge.
    for cmd in boot_commands(started, guests, {site.node: site.config.node.job_network_localaddr,
                                               "other": "10.213.0.12"}):
        cmd = wire(cmd)
        accounts = trust.check_boot(cmd, site.node, site.config)
        assert set(accounts) == {g.name for g in cmd.guests if g.node == site.node}


def test_a_guest_name_of_another_job_is_refused(site, users):
    a, _ = users
    before, j = snapshot(site.root), job()
    refused(site.boot(j, site.plan(a, j, name=domain_name("999.other", site.node, 0))), "is not one of job")
    refused(site.boot(j, site.plan(a, j, name=domain_name(j, "othernode", 0))), "is not one of job")
    assert_nothing_happened(site, before)


def test_a_leftover_directory_of_another_job_is_not_cleared(site, users):
    """Two job ids that escape to one guest name: the boot of one never clears the other's guest files."""
    a, _ = users
    n = uuid.uuid4().int % 10**6
    victim_job, j = f"{n}_y", f"{n}.y"
    root = trust.secure_dir(site.config.node.guest_dir)
    gdir = root / domain_name(victim_job, site.node, 0)
    gdir.mkdir(mode=0o711)
    (gdir / "job").write_text(victim_job)
    (gdir / "root.qcow2").write_bytes(b"victim's overlay")
    before = snapshot(gdir)
    refused(site.boot(j, site.plan(a, j)), "belongs to another job")
    assert snapshot(gdir) == before
