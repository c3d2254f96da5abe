"""The bridge plans a job only once the scheduler confirms its event: a hand-made JobStarted gets nothing."""

import pytest

from vtorque.services.scheduler_bridge.verification import mismatch
from vtorque.shared import messages as m
from vtorque.shared.scheduler import JobInfo
from vtorque.shared.slurm import slurm_job_info
from vtorque.shared.torque import torque_job_info


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


def _guest(ram, fs_type="sharedfs", disk_mib=None, image=None):
    return m.GuestPlan(name="vt-7-n1-0", node="n1", index=0, image="tiny", image_digest="a" * 64, vcpus=1,
                       ram_mib=ram, cores=None, owner=m.Owner(user="alice", uid=1001, gid=1001),
                       ssh_authorized_keys=[], fs_type=fs_type,
                       disk=m.DataDisk(size_mib=disk_mib, image=image) if disk_mib or image else None)


def test_guests_are_held_to_the_memory_the_scheduler_gave_the_job():
    from vtorque.services.scheduler_bridge.verification import over_allocation
    from vtorque.shared.config import SpecConfig

    site = SpecConfig(ramdisk_root_max="1G", max_disk="8G")
    slurm = slurm_job_info("7", "JobId=7 UserId=alice(1001) JobState=CONFIGURING NodeList=n1 TRES=cpu=1,mem=1M,node=1")
    assert slurm.mem_mib == 1
    assert "need 2048 MiB" in over_allocation(slurm, [_guest(2048)], site)  # `--mem=1` and a 2 GiB guest
    roomy = slurm_job_info("7", "JobId=7 JobState=RUNNING NodeList=n1 TRES=cpu=2,mem=4G,node=1")
    assert roomy.mem_mib == 4096 and over_allocation(roomy, [_guest(2048), _guest(2048)], site) is None
    # a data disk kept in node memory counts: disk=100G,fs_type=ramdisk does not fit in 4 GiB
    assert over_allocation(roomy, [_guest(512, "ramdisk", 100 * 1024)], site) is not None
    # and so does the root disk's growth there (ramdisk_root_max), and the owner's own image up to max_disk
    assert "need 3584 MiB" in over_allocation(slurm, [_guest(512, "ramdisk", 2048)], site)
    assert over_allocation(roomy, [_guest(2048, "ramdisk")], site) is None  # 2 GiB + 1 GiB root
    assert "need 11264 MiB" in over_allocation(roomy, [_guest(2048, "ramdisk", image="/home/a/d.qcow2")], site)
    torque = torque_job_info("7", "    job_state = R\n    Resource_List.mem = 512mb\n")
    assert torque.mem_mib == 512 and over_allocation(torque, [_guest(1024)], site) is not None
    assert over_allocation(torque_job_info("7", "    job_state = R\n"), [_guest(10**6)], site) is None  # none asked
