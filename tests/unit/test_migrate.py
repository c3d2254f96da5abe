"""Live migration's pure decisions (services/node_worker/migrate.py; issue 14 item 3): who may move what where,
the target's XML and job network, the trace's pre-copy rounds, and the CLI's choice of target."""

from __future__ import annotations

import click
import pytest

from vtorque.cli.migrate import checked_command, pick_target
from vtorque.services.node_worker import migrate
from vtorque.services.node_worker.domain import GuestDisks, GuestMetadata, JobNic, domain_xml, parse_metadata
from vtorque.services.node_worker.job_segment import FLOOD_MAC
from vtorque.shared import messages as m
from vtorque.shared import topology
from vtorque.shared.job_network import guest_mac


@pytest.fixture
def plan() -> m.GuestPlan:
    return m.GuestPlan(name="vt-7-n2-0", node="n2", index=1, image="tiny", image_digest="a" * 64, vcpus=1,
                       ram_mib=256, cores=[3], owner=m.Owner(user="alice", uid=1000, gid=1000),
                       ssh_authorized_keys=[])

ISO = b"\0" * 0x8001 + b"CD001" + b"\0" * 100


def command(**kw) -> m.MigrateGuests:
    return m.MigrateGuests.new(job_id="7", deadline=60, **{"node": "n2", "target": "n1", **kw})


def prepare(**kw) -> m.PrepareMigration:
    fields = {"node": "n2", "target": "n1", "guest": "vt-7-n2-0", "index": 1, "owner": "alice",
              "image_digest": "a" * 64, "overlay_bytes": 1 << 30, "seed": ISO}
    return m.PrepareMigration.new(job_id="7", deadline=60, **{**fields, **kw})


def test_the_flags_are_libvirts_live_peer_to_peer_persistent_undefine_and_incremental_disk_copy():
    import libvirt

    assert migrate.flags(tls=True) == (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
                                       | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
                                       | libvirt.VIR_MIGRATE_NON_SHARED_INC | libvirt.VIR_MIGRATE_TLS)
    assert not migrate.flags(tls=False) & libvirt.VIR_MIGRATE_TLS
    assert migrate.MIGRATABLE_XML == libvirt.VIR_DOMAIN_XML_MIGRATABLE


def test_the_source_moves_only_to_a_node_the_scheduler_gave_the_job():
    migrate.check_migrate(command(), "n2", "running", ("n1", "n2"))
    with pytest.raises(migrate.MigrationRefused, match="n3 is not one of job 7's nodes"):
        migrate.check_migrate(command(target="n3"), "n2", "running", ("n1", "n2"))
    with pytest.raises(migrate.MigrationRefused, match="node n2 is not one of"):
        migrate.check_migrate(command(), "n2", "running", ("n1", "n3"))
    with pytest.raises(migrate.MigrationRefused, match="not running"):
        migrate.check_migrate(command(), "n2", "completed", ("n1", "n2"))
    with pytest.raises(migrate.MigrationRefused, match="not running"):
        migrate.check_migrate(command(), "n2", None, ())
    with pytest.raises(migrate.MigrationRefused, match="is the source"):
        migrate.check_migrate(command(target="n2"), "n2", "running", ("n1", "n2"))
    with pytest.raises(migrate.MigrationRefused, match="reached node n1"):
        migrate.check_migrate(command(), "n1", "running", ("n1", "n2"))


def test_a_guest_name_must_be_one_of_the_jobs_never_a_path_or_another_jobs():
    assert migrate.check_job_guest("vt-7-n2-0", "7") == "vt-7-n2-0"
    assert migrate.check_job_guest("vt-1_vm-n2-3", "1.vm")
    for bad in ("vt-8-n2-0", "vt-7", "vt-7-n2-x", "vt-70-n2-0", "../vt-7-n2-0", "vt-7-n2-0/../x", "x"):
        with pytest.raises(Exception):  # noqa: B017 - trust.Refused or MigrationRefused, either way refused
            migrate.check_job_guest(bad, "7")


def test_the_target_checks_the_job_both_nodes_the_name_the_seed_and_the_endpoints():
    migrate.check_prepare(prepare(), "n1", "running", ("n1", "n2"))
    with pytest.raises(migrate.MigrationRefused, match="node n2 is not one of"):
        migrate.check_prepare(prepare(), "n1", "running", ("n1", "n3"))
    with pytest.raises(migrate.MigrationRefused, match="node n1 is not one of"):
        migrate.check_prepare(prepare(), "n1", "running", ("n2", "n3"))
    with pytest.raises(migrate.MigrationRefused, match="reached node n3"):
        migrate.check_prepare(prepare(), "n3", "running", ("n1", "n2", "n3"))
    with pytest.raises(migrate.MigrationRefused, match="not an ISO 9660"):
        migrate.check_prepare(prepare(seed=b"#!/bin/sh\n" * 5000), "n1", "running", ("n1", "n2"))
    with pytest.raises(migrate.MigrationRefused, match="bytes is none of ours"):
        migrate.check_prepare(prepare(seed=ISO + b"\0" * (5 << 20)), "n1", "running", ("n1", "n2"))
    with pytest.raises(migrate.MigrationRefused, match="no disk's"):
        migrate.check_prepare(prepare(overlay_bytes=0), "n1", "running", ("n1", "n2"))
    with pytest.raises(migrate.MigrationRefused, match="not a unicast address"):
        migrate.check_prepare(prepare(endpoints=["224.0.0.1"]), "n1", "running", ("n1", "n2"))
    with pytest.raises(migrate.MigrationRefused, match="not a MAC"):
        migrate.check_prepare(prepare(guest_endpoints={"zz": "10.0.0.1"}), "n1", "running", ("n1", "n2"))


def xml_of(plan, job_nic=None) -> str:
    disks = GuestDisks(overlay="/var/lib/vtorque/guests/vt-7-n2-0/root.qcow2",
                       seed="/var/lib/vtorque/guests/vt-7-n2-0/seed.iso",
                       console_log="/var/lib/vtorque/guests/vt-7-n2-0/console.log")
    from datetime import UTC, datetime

    from vtorque.services.node_worker.domain import BootSource

    meta = GuestMetadata(job_id="7", owner="alice", deadline=datetime(2030, 1, 1, tzinfo=UTC), index=1, node="n2")
    return domain_xml(plan, disks, BootSource(kernel="/k"), meta, job_nic=job_nic)


def test_the_targets_xml_names_the_target_and_keeps_no_pinning_of_the_sources_cores(plan):
    source = xml_of(plan)
    assert "<vcpupin" in source
    moved = migrate.dest_xml(source, "n1")
    assert parse_metadata(moved)["node"] == "n1"
    assert parse_metadata(moved)["job"] == "7" and parse_metadata(moved)["index"] == "1"
    assert "<cputune" not in moved and "vcpupin" not in moved
    assert "qemu:commandline" in moved  # the guest's link stays on its QEMU command line
    with pytest.raises(migrate.MigrationRefused, match="no vtorque metadata"):
        migrate.dest_xml("<domain type='qemu'><name>x</name></domain>", "n1")


def test_what_the_source_reads_of_a_guest_and_what_cannot_move(plan):
    nic = JobNic(bridge="vtj000007", mac=guest_mac("7", 1))
    facts = migrate.guest_facts(xml_of(plan, nic))
    assert facts == {"vni": 7, "mac": guest_mac("7", 1), "overlay": "/var/lib/vtorque/guests/vt-7-n2-0/root.qcow2",
                     "unmovable": ""}
    plain = migrate.guest_facts(xml_of(plan))
    assert plain["vni"] is None and plain["mac"] is None
    with_disk = xml_of(plan).replace("</devices>", "<disk type='file' device='disk'><source file='/d'/>"
                                                   "<target dev='vdc' bus='virtio'/></disk></devices>")
    assert "data disk" in migrate.guest_facts(with_disk)["unmovable"]
    with_shm = xml_of(plan).replace("</devices>", "<shmem name='x'/></devices>")
    assert "vRDMA" in migrate.guest_facts(with_shm)["unmovable"]


def test_the_targets_segment_floods_to_the_jobs_other_nodes_and_knows_where_each_other_guest_is():
    seg = migrate.target_segment("7", 7, "10.0.0.1", ["10.0.0.2", "10.0.0.3", "10.0.0.1"],
                                 {"52:54:00:00:00:01": "10.0.0.2", "52:54:00:00:00:02": "10.0.0.1"}, 789, 1450)
    assert seg.remotes == ("10.0.0.2", "10.0.0.3")
    assert seg.remote_macs == (("52:54:00:00:00:01", "10.0.0.2"),)  # a guest on the target is on its bridge
    assert seg.local == "10.0.0.1" and seg.vni == 7


def test_a_moved_guests_frames_follow_it():
    mac, vx = "52:54:00:00:00:09", "vtx000007"
    present = {(FLOOD_MAC, "10.0.0.2"), (mac, "10.0.0.2")}
    # a node that keeps the segment: the guest's MAC now goes to the target, floods reach the target too
    assert migrate.moved_commands(vx, mac, "10.0.0.3", "10.0.0.1", present) == [
        ["bridge", "fdb", "del", mac, "dev", vx, "dst", "10.0.0.2"],
        ["bridge", "fdb", "replace", mac, "dev", vx, "dst", "10.0.0.3"],
        ["bridge", "fdb", "append", FLOOD_MAC, "dev", vx, "dst", "10.0.0.3"]]
    # the target itself: the guest is on its own bridge, no tunnel entry for it
    assert migrate.moved_commands(vx, mac, "10.0.0.1", "10.0.0.1", present) == [
        ["bridge", "fdb", "del", mac, "dev", vx, "dst", "10.0.0.2"]]
    # already right: nothing to do
    assert migrate.moved_commands(vx, mac, "10.0.0.2", "10.0.0.1", present) == [
        ["bridge", "fdb", "replace", mac, "dev", vx, "dst", "10.0.0.2"]]


def test_each_new_pre_copy_round_is_one_trace_event_and_the_summary_has_the_downtime():
    rounds = migrate.Rounds()
    assert rounds.add({}) == []
    first = rounds.add({"memory_iteration": 1, "memory_remaining": 100, "memory_processed": 5})
    assert [name for name, _ in first] == ["pre-copy round"]
    assert first[0][1]["vtorque.move.round"] == 1 and first[0][1]["vtorque.move.memory_remaining"] == 100
    assert rounds.add({"memory_iteration": 1, "memory_remaining": 90}) == []  # the same round
    assert len(rounds.add({"memory_iteration": 3})) == 1
    done = migrate.summary({"downtime": 75, "memory_iteration": 3, "memory_processed": 7 << 20,
                            "disk_processed": 1 << 20}, 3.1234)
    assert done == {"seconds": 3.123, "downtime_ms": 75.0, "memory_iterations": 3, "memory_bytes": 7 << 20,
                    "disk_bytes": 1 << 20}
    assert migrate.summary(None, 1.0)["downtime_ms"] is None


def test_the_cli_takes_a_target_only_among_the_jobs_nodes():
    assert pick_target("n2", ("n1", "n2"), None) == "n1"
    assert pick_target("n2", ("n1", "n2", "n3"), "n3") == "n3"
    with pytest.raises(click.ClickException, match="not one of the job's nodes"):
        pick_target("n2", ("n1", "n2"), "n3")
    with pytest.raises(click.ClickException, match="node n4 is not one of"):
        pick_target("n4", ("n1", "n2"), None)
    with pytest.raises(click.ClickException, match="nowhere to move"):
        pick_target("n1", ("n1",), None)
    with pytest.raises(click.ClickException, match="is the node the guests are on"):
        pick_target("n1", ("n1", "n2"), "n1")


def test_the_node_to_node_commands_go_to_the_migrate_binding_of_the_receivers_queue():
    q = topology.command_queue(prepare())
    assert q.name == "vtorque.node.n1" and q.bindings[0] == "migrate.n1"
    moved = m.JobGuestMoved.new(job_id="7", deadline=60, node="n2", peer="n3", target="n1",
                                mac="52:54:00:00:00:01", endpoint="10.0.0.1", vni=7)
    assert topology.command_queue(moved).bindings[0] == "migrate.n3"
    assert topology.command_queue(command()).bindings[0] == "node.n2"


@pytest.mark.parametrize("source, target, guests", [
    ("n2", "n1", ("../../etc/passwd",)),  # a path, not a guest's name
    ("n2", "n1", ("vt-7-n2-0; reboot",)),
    ("-n2", "n1", ()),  # not a node's name
    ("n2", "n1/../x", ()),
])
def test_a_bad_name_is_refused_in_one_line_before_anything_is_sent(source, target, guests):
    with pytest.raises(click.ClickException) as refused:
        checked_command("7", source, target, guests, 60.0)
    assert refused.value.message.startswith("vtorque migrate: ") and "\n" not in refused.value.message


def test_a_good_command_is_what_the_node_worker_decodes():
    cmd = checked_command("7.srv", "n2", "n1", ("vt-7-n2-0",), 60.0)
    assert m.decode(m.encode(cmd)) == cmd and cmd.guests == ["vt-7-n2-0"] and cmd.target == "n1"


def test_no_answer_from_the_source_is_one_line_that_does_not_say_not_moved(monkeypatch):
    """The source's worker killed mid-move: libvirtd may have finished the move, so the CLI cannot say either
    way; it says where to look, in one line, and publishes the command once."""
    import types

    from vtorque.cli import migrate as cli_migrate
    from vtorque.shared import bus

    sent = []

    class Waiter:
        def __init__(self, *a, **kw):
            pass

        def next(self, end):
            return None  # nothing before the deadline

        def close(self):
            pass

    class Publisher:
        def __init__(self, url):
            pass

        def publish(self, message):
            sent.append(message)

        def close(self):
            pass

    monkeypatch.setattr(bus, "EventWaiter", Waiter)
    monkeypatch.setattr(bus, "Publisher", Publisher)
    config = types.SimpleNamespace(broker=types.SimpleNamespace(connection_url=lambda: "amqp://x", connect_timeout=1))
    cmd = checked_command("7", "n2", "n1", (), 0.01)
    with pytest.raises(click.ClickException) as failed:
        cli_migrate.move(config, cmd, lambda text, err=False: None)
    assert sent == [cmd]
    text = failed.value.message
    assert "\n" not in text and "no answer from n2's node worker" in text and "not moved" not in text
    assert "virsh list` on n2 and n1" in text
