"""Moving VM guests off a node the scheduler took out (cli/evacuation.py, issue 14 item 4): which nodes are bad
in each scheduler's own output, and what each job on one gets."""

from __future__ import annotations

from datetime import UTC, datetime

import click
import msgspec
import pytest

from vtorque.cli.evacuate import Evacuation
from vtorque.cli.evacuation import Leave, Move, Requeue, owner_note, plan
from vtorque.shared import messages as m
from vtorque.shared.scheduler import BadNode, JobInfo, SchedulerError
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


# -- one round, the scheduler, the heartbeats and the moves replaced ---------------------------------------



class Scheduler:
    def __init__(self, bad, jobs, refuse_requeue=""):
        self.bad, self.jobs, self.refuse_requeue = bad, jobs, refuse_requeue
        self.requeued, self.notes, self.released = [], [], []

    def bad_nodes(self):
        return self.bad

    def job(self, job_id):
        return self.jobs.get(job_id)

    def requeue(self, job_id):
        if self.refuse_requeue:
            raise SchedulerError(self.refuse_requeue)
        self.requeued.append(job_id)

    def note(self, job_id, text):
        self.notes.append((job_id, text))

    def release(self, job, node):
        self.released.append((job.job_id, node))
        return None


def beat(node, jobs, free=1000):
    return m.NodeHeartbeat.new(job_id="", deadline=30.0, node=node, cores=2, mem_free_mib=free, guests_running=1,
                               domain_type="qemu", jobs=jobs)


def running(job_id, nodes):
    return JobInfo(job_id=job_id, state="running", raw_state="RUNNING", nodes=tuple(nodes), owner="alice")


def evacuation(sched, beats, moves=None, fail_move="", requeue=True):
    said = []
    asked = [] if moves is None else moves

    def move(config, cmd, echo):
        asked.append((cmd.job_id, cmd.node, cmd.target, cmd.guests))
        if fail_move:
            echo(f"vt-{cmd.job_id}-{cmd.node}-0: not moved: {fail_move}", err=True)
            return 1
        echo(f"vt-{cmd.job_id}-{cmd.node}-0: {cmd.node} -> {cmd.target} in 2.00s, downtime 90 ms, 3 pre-copy rounds")
        return 0

    ev = Evacuation(config=None, scheduler=sched, echo=lambda text, err=False: said.append((err, text)),
                    requeue=requeue, read_beats=lambda: beats, move=move)
    return ev, said, asked


def test_a_round_moves_each_vm_job_off_a_drained_node_once_and_tells_the_owner():
    sched = Scheduler([BadNode("c2", "ECC [root@t]")], {"7": running("7", ["c1", "c2"]), "9": running("9", ["c2"])})
    older = msgspec.structs.replace(beat("c2", ["7"], free=5), created_at=datetime(2026, 1, 1, tzinfo=UTC))
    beats = [beat("c1", ["7"]), beat("c2", ["7", "9"]), older]  # an older beat read last is not the node's word
    ev, said, asked = evacuation(sched, beats)
    results = ev.round()
    assert asked == [("7", "c2", "c1", [])]  # the move, to the job's healthy node; job 9 has none
    assert [type(a).__name__ for a, _ in results] == ["Move", "Requeue"] and sched.requeued == ["9"]
    assert sched.notes == [("7", "vtorque: node c2 was taken out (ECC [root@t]): guests moved live to c1"),
                           ("9", "vtorque: node c2 was taken out (ECC [root@t]): requeued, no healthy node of the "
                                 "job to move to: it holds no other node")]
    assert any("c2 -> c1" in text for _, text in said)
    assert sched.released == [("7", "c2")]  # the moved job gives the drained node back; the requeued one ends
    # the next round, the node's beat still naming job 7 (beats are seconds apart): nothing again
    assert ev.round() == [] and len(asked) == 1 and sched.requeued == ["9"]


def test_a_failed_move_requeues_the_job_or_leaves_it_with_no_requeue():
    sched = Scheduler([BadNode("c2", "")], {"7": running("7", ["c1", "c2"])})
    ev, said, _ = evacuation(sched, [beat("c1", []), beat("c2", ["7"])], fail_move="target refused")
    ((action, outcome),) = ev.round()
    assert isinstance(action, Requeue) and "the move to c1 failed" in action.why and sched.requeued == ["7"]
    sched = Scheduler([BadNode("c2", "")], {"7": running("7", ["c1", "c2"])})
    ev, said, _ = evacuation(sched, [beat("c1", []), beat("c2", ["7"])], fail_move="target refused", requeue=False)
    ((action, outcome),) = ev.round()
    assert isinstance(action, Move) and "not moved" in outcome and sched.requeued == []
    assert said[-1][0] is True  # said on stderr: the operator's attention


def test_a_refused_requeue_is_said_and_jobs_not_running_or_not_vm_are_left_alone():
    sched = Scheduler([BadNode("c2", "")], {"7": running("7", ["c2"]),
                                            "8": JobInfo(job_id="8", state="suspended", raw_state="SUSPENDED")},
                      refuse_requeue="scontrol requeue 7: Requested operation is presently disabled")
    ev, said, asked = evacuation(sched, [beat("c2", ["7", "8"])])
    results = ev.round()
    assert "refused the requeue" in results[0][1] and isinstance(results[1][0], Leave) and asked == []
    assert [j for j, _ in sched.notes] == ["7"]  # a suspended job's owner is not told of a move that was not made


def test_a_named_node_must_be_taken_out_in_the_scheduler_first_and_a_silent_node_is_said():
    sched = Scheduler([BadNode("c2", "")], {})
    ev, said, _ = evacuation(sched, [])
    with pytest.raises(click.ClickException, match="node c1 is not taken out in the scheduler: drain it first"):
        ev.round(("c1",))
    assert ev.round(("c2",)) == [] and "no heartbeat" in said[-1][1]


def test_a_node_naming_a_job_the_scheduler_does_not_place_there_moves_and_requeues_nothing():
    """NodeHeartbeat.jobs is the node's word (a compromised node may lie); what is done is the scheduler's."""
    sched = Scheduler([BadNode("c2", "")], {"7": running("7", ["c1"]), "8": running("8", ["c3", "c4"])})
    ev, said, asked = evacuation(sched, [beat("c1", []), beat("c2", ["7", "8"]), beat("c3", [])])
    results = ev.round()
    assert [type(a).__name__ for a, _ in results] == ["Leave", "Leave"] and asked == [] and sched.requeued == []
    assert "does not place it on c2" in results[0][0].why and sched.notes == []


def test_slurm_takes_the_node_from_the_job_unless_its_batch_script_runs_there(tmp_path):
    """`scontrol update JobId= NodeList=` shrinks a running job (Slurm's own); the batch host cannot go."""
    from vtorque.shared.config import SchedulerConfig
    from vtorque.shared.slurm import Slurm, slurm_job_info

    asked = tmp_path / "asked"
    scontrol = tmp_path / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {asked}\n')
    scontrol.chmod(0o755)
    slurm = Slurm(SchedulerConfig(kind="slurm", bin_dir=str(tmp_path)))
    info = slurm_job_info("7", "JobId=7 JobName=j UserId=alice(1000) JobState=RUNNING Restarts=0 "
                               "BatchHost=c1 NodeList=c[1-3] NumNodes=3")
    assert info.batch_host == "c1" and info.nodes == ("c1", "c2", "c3")
    assert slurm.release(info, "c2") is None
    assert asked.read_text().split() == ["update", "JobId=7", "NodeList=c1,c3"]
    assert slurm.release(info, "c1") == "its batch script runs on c1"
    assert slurm.release(info, "c9") is None and len(asked.read_text().splitlines()) == 1
