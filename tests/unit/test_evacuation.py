"""Moving VM guests off a node the scheduler took out (cli/evacuation.py, issue 14 item 4): which nodes are bad
in each scheduler's own output, and what each job on one gets."""

from __future__ import annotations

from vtorque.cli.evacuation import Leave, Move, Requeue, owner_note, plan
from vtorque.shared.scheduler import BadNode
from vtorque.shared.slurm import bad_nodes as slurm_bad_nodes
from vtorque.shared.torque import bad_nodes as torque_bad_nodes

# `scontrol -o show node` of Slurm 22.05 (this machine's), fields cut; Reason is near the line's end and has spaces.
SHOW_NODE = "\n".join([
    "NodeName=c1 Arch=x86_64 CoresPerSocket=1  CPUAlloc=1 OS=Linux 6.1 #1 SMP PREEMPT_DYNAMIC @0  "
    "State=MIXED ThreadsPerCore=1 Partitions=batch",
    "NodeName=c2 Arch=x86_64 CoresPerSocket=1  CPUAlloc=1 State=MIXED+DRAIN ThreadsPerCore=1 "
    "CfgTRES=cpu=2,mem=4000M AllocTRES=cpu=1 CapWatts=n/a Reason=ECC errors on DIMM 3 [root@2026-12-03T18:40:00]",
    "NodeName=c3 State=DOWN* ThreadsPerCore=1 Reason=Not responding [slurm@2026-12-03T18:41:00]",
    "NodeName=c4 State=IDLE+DRAIN ThreadsPerCore=1",
    "NodeName=c5 State=IDLE ThreadsPerCore=1 Reason=an old reason the node no longer has",
    "NodeName=c6 State=ALLOCATED+FAIL ThreadsPerCore=1 Reason=health check: fan",
])


def test_slurm_bad_nodes_are_the_drained_down_and_failing_ones_with_their_reasons():
    assert slurm_bad_nodes(SHOW_NODE) == [
        BadNode("c2", "ECC errors on DIMM 3 [root@2026-12-03T18:40:00]"),
        BadNode("c3", "Not responding [slurm@2026-12-03T18:41:00]"),
        BadNode("c4", ""), BadNode("c6", "health check: fan")]
    assert slurm_bad_nodes("") == []


def test_torque_bad_nodes_are_those_pbsnodes_lists_offline_or_down():
    text = "n1  offline  ECC errors on DIMM 3\nn2  down\nn3  offline,job-exclusive  fan\nn4  free  not bad\n"
    assert torque_bad_nodes(text) == [BadNode("n1", "ECC errors on DIMM 3"), BadNode("n2", ""),
                                      BadNode("n3", "fan")]


def test_a_job_with_a_healthy_node_of_its_own_moves_there_the_one_with_most_free_memory():
    free = {"c1": 900, "c2": 4000, "c3": 2000, "c4": 8000}
    # c4 has the most memory but is not the job's; c2 is the bad node itself
    assert plan("c2", "7", ("c1", "c2", "c3"), {"c2"}, free, requeue=True) == Move("7", "c2", "c3")
    # a bad node of the job is no target, nor a node without a heartbeat (no node worker to take the guest)
    assert plan("c2", "7", ("c1", "c2", "c3"), {"c2", "c3"}, free, requeue=True) == Move("7", "c2", "c1")
    assert plan("c2", "7", ("c1", "c2", "c5"), {"c2"}, {"c1": 1, "c2": 1}, requeue=True) == Move("7", "c2", "c1")
    # equal memory: the scheduler's node order, so every run decides the same
    assert plan("c2", "7", ("c3", "c1", "c2"), {"c2"}, {"c1": 5, "c3": 5}, requeue=True) == Move("7", "c2", "c3")


def test_a_job_with_nowhere_to_go_is_requeued_or_left_when_the_operator_said_so():
    action = plan("c2", "7", ("c2",), {"c2"}, {"c2": 100}, requeue=True)
    assert action == Requeue("7", "c2", "no healthy node of the job to move to: it holds no other node")
    action = plan("c2", "7", ("c1", "c2"), {"c1", "c2"}, {"c1": 100}, requeue=True)
    assert isinstance(action, Requeue) and "its other nodes (c1) are bad" in action.why
    left = plan("c2", "7", ("c2",), {"c2"}, {}, requeue=False)
    assert isinstance(left, Leave) and "left running" in left.why


def test_the_owner_reads_what_happened_and_why_in_one_line():
    note = owner_note(Move("7", "c2", "c1"), "ECC errors [root@t]")
    assert note == "vtorque: node c2 was taken out (ECC errors [root@t]): guests moved live to c1"
    note = owner_note(Requeue("7", "c2", "no healthy node of the job to move to: it holds no other node"), "")
    assert note == ("vtorque: node c2 was taken out: requeued, no healthy node of the job to move to: "
                    "it holds no other node")
    assert "\n" not in owner_note(Leave("7", "c2", "x"), "a\nb".replace("\n", " "))
