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

from .conftest import KEY, hand_built, snapshot, wire


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
    cmd = hand_built(j, [site.plan(a, j)])
    boot, accounts = trust.check_boot(wire(cmd), site.node, site.config)
    assert accounts[domain_name(j, site.node, 0)] == trust.OwnerAccount(a.name, a.uid, a.gid, str(a.home))
    assert boot.guests == [site.plan(a, j)]  # the node's own GuestPlan, expanded from the job-wide command


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
        cmd = hand_built(j, [site.plan(a, j, owner=m.Owner(user=a.name, uid=a.uid, gid=gid))])
        assert trust.check_boot(cmd, site.node, site.config)[1][domain_name(j, site.node, 0)].gid == gid
    finally:
        subprocess.run(["groupdel", group], capture_output=True)


def test_an_unknown_owner_is_refused(site, users):
    a, _ = users
    before, j = snapshot(site.root), job()
    refused(site.boot(j, site.plan(a, j, owner=m.Owner(user="nosuchuser9", uid=4242, gid=4242))), "unknown")
    assert_nothing_happened(site, before)


def test_a_command_cannot_name_a_guest_or_give_guests_different_owners(site, users):
    """A job's BootGuests says the owner once and no guest's name, rank or node: the node makes each of its
    guests' names from the job id and its own name (messages.domain_name). A body that tries to (the old
    per-guest shape) is not a BootGuests: the decoder refuses it, and the consumer dead-letters it with that."""
    a, b = users
    j = job()
    body = msgspec.json.decode(m.encode(hand_built(j, [site.plan(a, j)])))
    body["guests"] = [msgspec.to_builtins(site.plan(b, j, name="vt-../../canary"))]
    with pytest.raises(msgspec.ValidationError, match="unknown field `guests`"):
        m.decode(msgspec.json.encode(body))
    body = msgspec.json.decode(m.encode(hand_built(j, [site.plan(a, j)])))
    body["guest"]["name"] = "vt-../../canary"
    with pytest.raises(msgspec.ValidationError, match="unknown field `name`"):
        m.decode(msgspec.json.encode(body))


# (b) names and paths -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../canary", "vt-../../canary", "vt-x/../../canary", "vt-a" + "b" * 300,
                                  "vt-\n", "..", "-x", "/tmp/x"])
def test_a_node_name_that_is_a_path_is_refused_and_the_directory_it_names_survives(site, users, name):
    """Guest names are made from the job's node names (and the job id): a node of the job named like a path is
    refused before any name is made from it."""
    a, _ = users
    canary = site.root / "canary"
    canary.mkdir()
    (canary / "keep").write_text("precious")
    (site.root / "guests").mkdir(mode=0o711)
    before, j = snapshot(site.root), job()
    answers = site.boot(j, site.plan(a, j), nodes=[site.node, name])
    refused(answers, "is not a node name")
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
    victim = site.plan(a, victim_job)
    xml = domain_xml(victim, GuestDisks("/nonexistent/o", "/nonexistent/s", "/nonexistent/c"), BootSource(),
                     GuestMetadata(job_id=victim_job, owner=a.name, deadline=m.utcnow(), index=0,
                                   node=site.node), domain_type="test")
    dom = site.worker.hv.define(xml)
    try:
        answers = site.boot(j, site.plan(a, j))  # its guest here is named `name`
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
    guests = [site.plan(a, j) for _ in range(3)]  # three guests on this node; max_vms_per_node=2
    refused(site.boot(j, *guests), "vms_per_node")
    assert_nothing_happened(site, before)


def test_a_bad_job_network_is_refused_and_makes_nothing(site, users):
    a, _ = users
    before, j = snapshot(site.root), job()
    me, other = site.node, "c9"
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
        refused(site.boot(j, site.plan(a, j), nodes=[me, other], network=net), reason.strip())
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
    cmd = hand_built("1.sec", [site.plan(a, "1.sec", owner=m.Owner(user="root", uid=0, gid=0))])
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
    from vtorque.services.scheduler_bridge.planning import boot_command, plan_guests
    from vtorque.shared.spec import validate

    a, _ = users
    started = m.JobStarted.new(job_id="77.srv", deadline=60.0, scheduler="torque", owner=a.owner(),
                               nodes=[m.NodeAllocation(host=site.node, ncpus=5, cores=cores),
                                      m.NodeAllocation(host="other", ncpus=5, cores=cores)],
                               spec=options, ssh_authorized_keys=[KEY])
    spec = validate(options, site.config)
    guests = plan_guests(started, spec, site.config, {"packages": ["htop"], "timezone": "UTC"})
    # Each node's job network endpoint, as the nodes' heartbeats give the bridge.
    cmd = wire(boot_command(started, guests, {site.node: site.config.node.job_network_localaddr,
                                              "other": "10.213.0.12"}))
    boot, accounts = trust.check_boot(cmd, site.node, site.config)
    assert boot.guests == [g for g in guests if g.node == site.node] and set(accounts) == {g.name for g in boot.guests}
    assert [p.name for p in boot.peers] == [g.name for g in guests]


@pytest.mark.parametrize("fields,word", [
    ({"nodes": ["c7", "c8"]}, "names no guest of node"),
    ({"nodes": []}, "exactly one of cores"),
    ({"cores": None}, "exactly one of cores"),
    ({"node_cores": [m.NodeCores(guests=[None])]}, "exactly one of cores"),
    ({"cores": None, "node_cores": [m.NodeCores(guests=[None])] * 3}, "node_cores for 3 nodes"),
    ({"cores": m.NodeCores(guests=[])}, "0 guests on a node"),
    ({"cores": m.NodeCores(guests=[None] * 300)}, "300 guests on a node"),
])
def test_a_command_whose_parts_do_not_fit_is_refused(site, users, fields, word):
    """The job-wide command's own shape: this node among its nodes, one core layout for all or one per node,
    each node with 1..MAX_GUESTS guests; refused with what does not fit, before any guest is made."""
    a, _ = users
    before, j = snapshot(site.root), job()
    refused(site.boot(j, site.plan(a, j), nodes=fields.pop("nodes", [site.node, "c2"]), **fields), word)
    assert_nothing_happened(site, before)


def test_a_node_named_twice_is_refused(site, users):
    a, _ = users
    before, j = snapshot(site.root), job()
    refused(site.boot(j, site.plan(a, j), nodes=[site.node, "c2", site.node]), "named twice")
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
