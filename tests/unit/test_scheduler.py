"""shared/slurm.py (the scheduler interface of shared/scheduler.py for Slurm): `scontrol -o show job` as Slurm 22.05
prints it → JobInfo; what `job` answers when Slurm has forgotten the job or cannot be asked. Recorded on the
single-host stack."""

from __future__ import annotations

import subprocess

import pytest

from vtorque.shared import scheduler, slurm
from vtorque.shared.config import SchedulerConfig
from vtorque.shared.scheduler import SchedulerError, hms_seconds
from vtorque.shared.slurm import Slurm, expand_hostlist, slurm_job_info

# Recorded: a vsub job whose script exited 1 (job 1 on the single-host stack, Slurm 22.05.8).
FAILED_1 = (
    "JobId=1 JobName=pin.sh UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901759 Nice=0 "
    "Account=(null) QOS=(null) JobState=FAILED Reason=NonZeroExitCode Dependency=(null) Requeue=1 Restarts=0 "
    "BatchFlag=1 Reboot=0 ExitCode=1:0 RunTime=00:00:30 TimeLimit=365-00:00:00 TimeMin=N/A "
    "SubmitTime=2026-12-01T17:51:18 EligibleTime=2026-12-01T17:51:18 AccrueTime=2026-12-01T17:51:18 "
    "StartTime=2026-12-01T17:51:19 EndTime=2026-12-01T17:51:49 Deadline=N/A SuspendTime=None SecsPreSuspend=0 "
    "LastSchedEval=2026-12-01T17:51:19 Scheduler=Backfill Partition=batch AllocNode:Sid=localhost:4216 "
    "ReqNodeList=(null) ExcNodeList=(null) NodeList=vm BatchHost=vm NumNodes=1 NumCPUs=2 NumTasks=2 CPUs/Task=1 "
    "ReqB:S:C:T=0:0:*:* TRES=cpu=2,mem=160M,node=1,billing=2 Socks/Node=* NtasksPerN:B:S:C=0:0:*:* CoreSpec=* "
    "MinCPUsNode=1 MinMemoryNode=160M MinTmpDiskNode=0 Features=(null) DelayBoot=00:00:00 OverSubscribe=OK "
    "Contiguous=0 Licenses=(null) Network=(null) Command=/tmp/vsub-nuir4h_5/pin.sh "
    "WorkDir=/var/lib/vtorque-stack/jobs/test-568aefcd StdErr=/var/lib/vtorque-stack/jobs/test-568aefcd/pin.sh.e1 "
    "StdIn=/dev/null StdOut=/var/lib/vtorque-stack/jobs/test-568aefcd/pin.sh.o1 Power= \n")


def variant(**fields) -> str:
    """FAILED_1 with some fields changed (a field given as None is dropped)."""
    words = FAILED_1.strip().split(" ")
    out = []
    for word in words:
        key = word.split("=", 1)[0]
        if key in fields:
            if fields[key] is not None:
                out.append(f"{key}={fields.pop(key)}")
            else:
                fields.pop(key)
        else:
            out.append(word)
    return " ".join(out + [f"{k}={v}" for k, v in fields.items() if v is not None]) + "\n"


def test_a_failed_job_is_failed_with_its_exit_code_owner_nodes_walltime_and_files():
    info = slurm_job_info("1", FAILED_1)
    assert (info.state, info.raw_state, info.exit_code, info.owner) == ("failed", "FAILED", 1, "root")
    assert info.nodes == ("vm",) and info.walltime_s == 365 * 86400
    assert info.reason == "NonZeroExitCode" and not info.alive
    assert info.stdout == "/var/lib/vtorque-stack/jobs/test-568aefcd/pin.sh.o1"
    assert info.stderr == "/var/lib/vtorque-stack/jobs/test-568aefcd/pin.sh.e1"


@pytest.mark.parametrize("state,exit_field,want_state,want_code", [
    ("COMPLETED", "0:0", "completed", 0),
    ("FAILED", "3:0", "failed", 3),           # the script's `exit 3`
    ("CANCELLED", "0:15", "cancelled", 143),  # scancel: SIGTERM, as a shell reports it
    ("TIMEOUT", "0:1", "failed", 129),
    ("NODE_FAIL", "0:0", "failed", 0),
    ("OUT_OF_MEMORY", "0:125", "failed", 253),
    ("PENDING", "0:0", "queued", None),       # no exit code while the job is alive
    ("CONFIGURING", "0:0", "queued", None),   # PrologSlurmctld (vtorque's boot) is running
    ("RUNNING", "0:0", "running", None),
    ("COMPLETING", "3:0", "exiting", None),   # EpilogSlurmctld (vtorque's teardown) is running
    ("SUSPENDED", "0:0", "suspended", None),
    ("SOMETHING_NEW", "0:0", "unknown", 0),
])
def test_states_and_exit_codes(state, exit_field, want_state, want_code):
    info = slurm_job_info("1", variant(JobState=state, ExitCode=exit_field))
    assert (info.state, info.raw_state, info.exit_code) == (want_state, state, want_code)
    assert info.alive == (want_state in scheduler.ALIVE)


def test_a_pending_job_has_no_nodes_and_a_reason_with_spaces():
    text = variant(JobState="PENDING", Reason="(ReqNodeNotAvail, UnavailableNodes:vm)", NodeList="(null)",
                   ExitCode="0:0", StdErr=None)
    info = slurm_job_info("1", text)
    assert info.state == "queued" and info.nodes == () and info.exit_code is None
    assert info.reason == "(ReqNodeNotAvail, UnavailableNodes:vm)" and info.stderr is None


def test_the_comment_is_the_reason_when_set_and_values_may_hold_spaces():
    text = variant(Comment="vtorque: image tiny failed its sha256 check", Command="/tmp/x/job.sh a b",
                   WorkDir="/home/u/my dir")
    f = slurm.parse_scontrol_oneliner(text)
    assert f["Command"] == "/tmp/x/job.sh a b" and f["WorkDir"] == "/home/u/my dir"
    assert f["Power"] == "" and f["TRES"] == "cpu=2,mem=160M,node=1,billing=2"
    assert f["AllocNode:Sid"] == "localhost:4216" and f["CPUs/Task"] == "1"
    assert slurm_job_info("1", text).reason == "vtorque: image tiny failed its sha256 check"
    assert slurm_job_info("1", variant(Reason="None")).reason is None


def test_several_lines_the_one_of_the_job_is_read():
    # an array job prints one line per task; a stray last line must not overwrite the job's fields
    text = (variant(JobId="7_1", JobState="COMPLETED", ExitCode="0:0") + variant(JobId="7", JobState="RUNNING")
            + variant(JobId="8", JobState="FAILED", ExitCode="9:0"))
    assert slurm_job_info("7", text).state == "running"
    assert slurm_job_info("7_1", text).exit_code == 0
    assert slurm_job_info("8", text).exit_code == 9
    assert slurm_job_info("9", variant(JobId="9", JobState="COMPLETED")).state == "completed"


def test_hostlists_and_time_limits():
    assert expand_hostlist("n[1-3,5],m1") == ("n1", "n2", "n3", "n5", "m1")
    assert expand_hostlist("c[08-10]") == ("c08", "c09", "c10")
    assert expand_hostlist("vm") == ("vm",)
    assert slurm_job_info("1", variant(NodeList="n[1-2]")).nodes == ("n1", "n2")
    assert hms_seconds("1-02:03:04") == 93784 and hms_seconds("05:00") == 300 and hms_seconds("UNLIMITED") is None
    assert slurm_job_info("1", variant(TimeLimit="UNLIMITED")).walltime_s is None
    assert slurm_job_info("1", variant(TimeLimit="00:15:00")).walltime_s == 900


def _answer(monkeypatch, rc: int, stdout: str = "", stderr: str = ""):
    calls = []

    def run(argv, timeout, env=None):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, rc, stdout, stderr)

    monkeypatch.setattr(slurm, "run_client", run)
    return calls


def test_slurm_job_asks_scontrol_by_absolute_path(monkeypatch):
    calls = _answer(monkeypatch, 0, FAILED_1)
    info = Slurm(SchedulerConfig(kind="slurm", bin_dir="/opt/slurm/bin")).job("1")
    assert calls == [["/opt/slurm/bin/scontrol", "-o", "-d", "show", "job", "1"]] and info.exit_code == 1
    assert scheduler.scheduler_for(SchedulerConfig(kind="slurm")).kind == "slurm"


def test_a_forgotten_job_is_none(monkeypatch):
    _answer(monkeypatch, 1, stderr="slurm_load_jobs error: Invalid job id specified\n")
    assert Slurm(SchedulerConfig(kind="slurm")).job("99") is None


def test_a_scheduler_that_cannot_be_asked_raises_with_its_last_line(monkeypatch):
    monkeypatch.delenv("SLURM_CONF", raising=False)
    _answer(monkeypatch, 1, stderr="scontrol: error: resolve_ctls_from_dns_srv: res_nsearch error: Unknown host\n"
                                   "scontrol: fatal: Could not establish a configuration source\n")
    with pytest.raises(SchedulerError, match=r"fatal: Could not establish a configuration source \(SLURM_CONF"):
        Slurm(SchedulerConfig(kind="slurm")).job("1")
    _answer(monkeypatch, 1, stderr="slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n")
    with pytest.raises(SchedulerError, match="Unable to contact slurm controller"):
        Slurm(SchedulerConfig(kind="slurm")).job("1")


def test_a_missing_scontrol_is_a_scheduler_error(tmp_path):
    with pytest.raises(SchedulerError, match="no such file"):
        Slurm(SchedulerConfig(kind="slurm", bin_dir=str(tmp_path))).job("1")


# Recorded: a job cancelled while held (never started; Slurm still says ExitCode=0:0, and NodeList is empty).
CANCELLED_PENDING = 'JobId=70 JobName=plain UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=0 Nice=0 Account=(null) QOS=(null) JobState=CANCELLED Reason=JobHeldUser Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:0 RunTime=00:00:00 TimeLimit=00:05:00 TimeMin=N/A SubmitTime=2026-12-01T18:06:18 EligibleTime=Unknown AccrueTime=Unknown StartTime=2026-12-01T18:06:18 EndTime=2026-12-01T18:06:18 Deadline=N/A SuspendTime=None SecsPreSuspend=0 LastSchedEval=2026-12-01T18:06:18 Scheduler=Main Partition=batch AllocNode:Sid=localhost:11481 ReqNodeList=(null) ExcNodeList=(null) NodeList= NumNodes=1 NumCPUs=1 NumTasks=N/A CPUs/Task=1 ReqB:S:C:T=0:0:*:* TRES=cpu=1,mem=100M,node=1,billing=1 Socks/Node=* NtasksPerN:B:S:C=0:0:*:* CoreSpec=* MinCPUsNode=1 MinMemoryCPU=100M MinTmpDiskNode=0 Features=(null) DelayBoot=00:00:00 OverSubscribe=OK Contiguous=0 Licenses=(null) Network=(null) Command=/tmp/vsub-bench-drgw1skp/job.sh WorkDir=/tmp/vsub-bench-drgw1skp StdErr=/tmp/vsub-bench-drgw1skp/job.sh.e70 StdIn=/dev/null StdOut=/tmp/vsub-bench-drgw1skp/job.sh.o70 Power='  # noqa: E501 - recorded verbatim: scontrol -o prints a job on one line
# Recorded: a VM job whose image failed its sha256 check: vtorque's hook put the reason in Comment, which Slurm
# prints followed by two spaces.
REJECTED_10 = 'JobId=10 JobName=badsum UserId=nobody(1001) GroupId=nobody(1001) MCS_label=N/A Priority=4294901752 Nice=0 Account=(null) QOS=(null) JobState=FAILED Reason=NonZeroExitCode Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=1:0 RunTime=00:00:00 TimeLimit=UNLIMITED TimeMin=N/A SubmitTime=2026-12-01T18:03:58 EligibleTime=2026-12-01T18:03:58 AccrueTime=2026-12-01T18:03:58 StartTime=2026-12-01T18:03:59 EndTime=2026-12-01T18:03:59 Deadline=N/A SuspendTime=None SecsPreSuspend=0 LastSchedEval=2026-12-01T18:03:59 Scheduler=Main Partition=batch AllocNode:Sid=localhost:11556 ReqNodeList=(null) ExcNodeList=(null) NodeList=vm BatchHost=vm NumNodes=1 NumCPUs=1 NumTasks=1 CPUs/Task=1 ReqB:S:C:T=0:0:*:* TRES=cpu=1,mem=256M,node=1,billing=1 Socks/Node=* NtasksPerN:B:S:C=0:0:*:* CoreSpec=* MinCPUsNode=1 MinMemoryNode=256M MinTmpDiskNode=0 Features=(null) DelayBoot=00:00:00 OverSubscribe=OK Contiguous=0 Licenses=(null) Network=(null) Command=/tmp/vsub-ii26ntok/bad.sh WorkDir=/var/lib/vtorque-stack/jobs/test-e65242bb Comment=vtorque: not started: image badsum-4f4cf0d8: sha256 mismatch for /var/lib/vtorque-stack/jobs/test-e65242bb/badsum.qcow2: the catalog says 000000000000…, the file is 0e7db0d4ad0a…; nothing was staged  StdErr=/var/lib/vtorque-stack/jobs/test-e65242bb/badsum.e10 StdIn=/dev/null StdOut=/var/lib/vtorque-stack/jobs/test-e65242bb/badsum.o10 Power='  # noqa: E501 - recorded verbatim: scontrol -o prints a job on one line


def test_a_job_cancelled_before_it_started_has_no_exit_code_and_no_nodes():
    info = slurm_job_info("70", CANCELLED_PENDING)
    assert (info.state, info.exit_code, info.nodes, info.reason) == ("cancelled", None, (), "JobHeldUser")
    assert info.stdout == "/tmp/vsub-bench-drgw1skp/job.sh.o70" and info.walltime_s == 300


def test_the_hooks_comment_is_the_reason_without_trailing_blanks():
    info = slurm_job_info("10", REJECTED_10)
    assert info.state == "failed" and info.exit_code == 1 and info.nodes == ("vm",)
    assert info.reason.startswith("vtorque: not started: image badsum-") and info.reason.endswith("nothing was staged")
    assert info.stderr.endswith("/badsum.e10")


# Recorded: `scontrol -o -d show job 1` on the single-host stack (Slurm 22.05.8): -d puts each node's cores on
# the job's line (`Nodes=vm CPU_IDs=0 Mem=256 GRES=`).
DETAILED_1 = (
    "JobId=1 JobName=vmdemo UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901759 Nice=0 "
    "Account=(null) QOS=(null) JobState=COMPLETED Reason=None Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 "
    "Reboot=0 ExitCode=0:0 DerivedExitCode=0:0 RunTime=00:00:11 TimeLimit=365-00:00:00 TimeMin=N/A "
    "SubmitTime=2026-12-03T08:43:04 EligibleTime=2026-12-03T08:43:04 AccrueTime=2026-12-03T08:43:04 "
    "StartTime=2026-12-03T08:43:04 EndTime=2026-12-03T08:43:15 Deadline=N/A SuspendTime=None SecsPreSuspend=0 "
    "LastSchedEval=2026-12-03T08:43:04 Scheduler=Backfill Partition=batch AllocNode:Sid=localhost:4691 "
    "ReqNodeList=(null) ExcNodeList=(null) NodeList=vm BatchHost=vm NumNodes=1 NumCPUs=1 NumTasks=1 CPUs/Task=1 "
    "ReqB:S:C:T=0:0:*:* TRES=cpu=1,mem=256M,node=1,billing=1 Socks/Node=* NtasksPerN:B:S:C=0:0:*:* CoreSpec=* "
    "JOB_GRES=(null)   Nodes=vm CPU_IDs=0 Mem=256 GRES= MinCPUsNode=1 MinMemoryNode=256M MinTmpDiskNode=0 "
    "Features=(null) DelayBoot=00:00:00 OverSubscribe=OK Contiguous=0 Licenses=(null) Network=(null) "
    "Command=/tmp/vsub-tzxnv0nz/vmdemo.sh WorkDir=/var/lib/vtorque-stack/jobs "
    "StdErr=/var/lib/vtorque-stack/jobs/vmdemo.sh.e1 StdIn=/dev/null StdOut=/var/lib/vtorque-stack/jobs/vmdemo.sh.o1 "
    "Power= \n")


def test_a_detailed_job_says_the_cores_of_each_node_and_its_partition():
    info = slurm_job_info("1", DETAILED_1)
    assert (info.state, info.exit_code, info.nodes, info.cores, info.queue) == ("completed", 0, ("vm",), (1,),
                                                                                "batch")
    assert info.stdout == "/var/lib/vtorque-stack/jobs/vmdemo.sh.o1" and info.mem_mib == 256
    two = DETAILED_1.replace("NodeList=vm", "NodeList=n[1-3]").replace(
        "Nodes=vm CPU_IDs=0 Mem=256 GRES=", "Nodes=n[1-2] CPU_IDs=0-1,4 Mem=256 GRES= Nodes=n3 CPU_IDs=2 Mem=256 GRES=")
    assert slurm_job_info("1", two).cores == (3, 3, 1)
    assert slurm_job_info("1", FAILED_1).cores == ()  # without -d: not told


def test_show_config_says_the_cluster_the_timeout_and_the_slurm_user(monkeypatch):
    calls = []

    def run(argv, timeout, env=None):
        calls.append((argv, env))
        return subprocess.CompletedProcess(argv, 0, "ClusterName             = vts\nSlurmUser = slurm(64030)\n"
                                                    "PrologEpilogTimeout     = 300\n", "")

    monkeypatch.setattr(slurm, "run_client", run)
    site = Slurm(SchedulerConfig(kind="slurm", bin_dir="/opt/slurm/bin"))
    assert site.cluster("") == "slurm:vts" and site.prolog_epilog_timeout() == (300, "")
    assert slurm.slurm_user(site.show_config(env={"SLURM_CONF": "/etc/x.conf"})) == "slurm"
    assert calls[-1] == (["/opt/slurm/bin/scontrol", "show", "config"], {"SLURM_CONF": "/etc/x.conf"})
    assert calls[0][1] is None  # the caller's environment unless told


def test_show_config_refused_or_unanswered_is_a_scheduler_error(monkeypatch):
    _answer(monkeypatch, 1, stderr="slurm_load_ctl_conf error: Unable to contact slurm controller\n")
    site = Slurm(SchedulerConfig(kind="slurm"))
    with pytest.raises(SchedulerError, match="scontrol show config: exit 1: slurm_load_ctl_conf"):
        site.show_config()
    assert site.cluster("5") is None
    assert site.prolog_epilog_timeout()[1].startswith("scontrol show config: exit 1")


def test_a_jobs_script_head_from_the_state_directory_else_scontrol(monkeypatch, tmp_path):
    calls = _answer(monkeypatch, 0, "".join(f"line {n}\n" for n in range(100)))
    site = Slurm(SchedulerConfig(kind="slurm", bin_dir="/opt/slurm/bin"))
    script = slurm.script_path(tmp_path, "23")
    assert script == tmp_path / "hash.3" / "job.23" / "script"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n# vtorque-spec: img=tiny\n" + "echo\n" * 100)
    assert site.script_head("23", str(tmp_path)).splitlines()[:2] == ["#!/bin/sh", "# vtorque-spec: img=tiny"]
    assert calls == []  # read where slurmctld keeps it: no process
    head = site.script_head("24", str(tmp_path))  # not there: asked
    assert head.splitlines() == [f"line {n}" for n in range(64)]
    assert calls == [["/opt/slurm/bin/scontrol", "write", "batch_script", "24", "-"]]
    _answer(monkeypatch, 1, stderr="Invalid job id\n")
    assert site.script_head("25", None) == ""


def test_slurm_submits_with_the_sites_qsub(tmp_path):
    qsub = tmp_path / "qsub"
    qsub.write_text('#!/bin/sh\necho "args $*" >&2\necho 41\n')
    qsub.chmod(0o755)
    proc = Slurm(SchedulerConfig(kind="slurm", qsub=str(qsub))).submit(["-l", "nodes=1", "job.sh"])
    assert (proc.returncode, proc.stdout) == (0, "41\n")
    with pytest.raises(SchedulerError):
        Slurm(SchedulerConfig(kind="slurm", qsub=str(tmp_path / "none"))).submit([])
