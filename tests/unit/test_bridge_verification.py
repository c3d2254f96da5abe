"""The bridge plans a job only once the scheduler confirms its event: a hand-made JobStarted gets nothing."""

import pytest

from vtorque.services.scheduler_bridge.verification import mismatch
from vtorque.shared import messages as m
from vtorque.shared.scheduler import JobInfo, slurm_job_info, torque_job_info


def started(user="alice", nodes=("n1",)) -> m.JobStarted:
    return m.JobStarted.new(job_id="7", deadline=60.0, scheduler="slurm", owner=m.Owner(user=user, uid=1001, gid=1001),
                            nodes=[m.NodeAllocation(host=h, ncpus=1) for h in nodes], spec={"img": "tiny"},
                            ssh_authorized_keys=[])


def info(state="running", owner="alice", nodes=("n1", "n2")) -> JobInfo:
    return JobInfo(job_id="7", state=state, raw_state=state.upper(), owner=owner, nodes=tuple(nodes))


def test_a_confirmed_event_passes():
    assert mismatch(started(nodes=("n1", "n2")), info()) is None
    assert mismatch(started(), info(state="queued")) is None  # Slurm's PrologSlurmctld: CONFIGURING


@pytest.mark.parametrize("event,answer,why", [
    (started(), None, "knows no job 7"),
    (started(), info(state="completed"), "not starting or running"),
    (started(user="mallory"), info(), "belongs to alice, not to mallory"),
    (started(nodes=("n1", "n9")), info(), "not given node(s) n9"),
])
def test_an_event_the_scheduler_does_not_confirm_is_refused(event, answer, why):
    assert why in mismatch(event, answer)


def test_what_the_schedulers_really_print_is_what_is_compared():
    slurm = slurm_job_info("7", "JobId=7 JobName=x UserId=alice(1001) GroupId=alice(1001) JobState=CONFIGURING "
                                "Reason=None ExitCode=0:0 NodeList=n[1-2] TimeLimit=00:10:00")
    assert mismatch(started(nodes=("n1", "n2")), slurm) is None
    torque = torque_job_info("7.srv", "Job Id: 7.srv\n    Job_Owner = alice@login1\n    job_state = R\n"
                                      "    exec_host = n1/0-1+n2/0-1\n")
    assert mismatch(started(nodes=("n2",)), torque) is None
    assert "belongs to alice" in mismatch(started(user="bob"), torque)
