"""exec_host, qstat -f (and its .o/.e paths), accounting records, PBS_NODEFILE and the prologue's Resource_List,
mom_priv/config's $prologalarm, parsed (shared/torque.py)."""

from collections import OrderedDict
from pathlib import Path

import pytest

from vtorque.shared.torque import (
    ExecHostError,
    exec_host_of,
    nodes_from_nodefile,
    nodes_with_cores,
    output_paths,
    parse_accounting,
    parse_core_list,
    parse_exec_host,
    parse_qstat_f,
    prologalarm_from_config,
    read_prologalarm,
    torque_kill_after,
    walltime_seconds,
)

RECORDED = Path(__file__).parents[1] / "data" / "torque-recorded" / "accounting" / "20261126"


@pytest.mark.parametrize("text, want", [
    ("vm/0-1", {"vm": [0, 1]}),
    ("vm/0", {"vm": [0]}),
    ("n1/0-1+n2/2-3", {"n1": [0, 1], "n2": [2, 3]}),
    ("n1.cluster/0+n1.cluster/1+n2/0", {"n1": [0, 1], "n2": [0]}),  # the older one-slot-per-entry form
    ("n2/4,6-7+n1/0", {"n2": [4, 6, 7], "n1": [0]}),
])
def test_exec_host_gives_hosts_in_order_with_their_cores(text, want):
    got = parse_exec_host(text)
    assert dict(got) == want
    assert list(got) == list(want)  # the mother superior first


@pytest.mark.parametrize("text", ["", "vm", "vm/", "/0", "vm/a", "vm/3-1", "vm/0-1+"])
def test_bad_exec_host_says_so(text):
    with pytest.raises(ExecHostError):
        parse_exec_host(text)


def test_core_list_keeps_order_and_drops_repeats():
    assert parse_core_list("3,0-1,1") == [3, 0, 1]


def test_qstat_f_unfolds_long_values():
    text = ("Job Id: 7.vm\n    Job_Name = big\n    exec_host = n1/0-1+n2/0-1+n3/0-1+n4/0-1+n5/0-1+n6/0-1+n7/0\n"
            "\t-1+n8/0-1\n    Resource_List.nodes = 8:ppn=2\n")
    attrs = parse_qstat_f(text)
    assert attrs["Job_Name"] == "big"
    assert parse_exec_host(attrs["exec_host"])["n7"] == [0, 1]
    assert list(parse_exec_host(attrs["exec_host"]))[-1] == "n8"
    assert attrs["Resource_List.nodes"] == "8:ppn=2"


def test_recorded_accounting_records_parse():
    records = parse_accounting(RECORDED.read_text())
    starts = [r for r in records if r.type == "S"]
    # The first run's job 1 (the server db was re-created later: run2's ids start from 0 again).
    assert next(r.attrs["exec_host"] for r in starts if r.job_id == "1.vm") == "vm/0-1"
    assert parse_exec_host(starts[0].attrs["exec_host"]) == {"vm": [0]}
    ended: dict[str, str] = {}
    for r in records:
        if r.type == "E":
            ended.setdefault(r.job_id, r.attrs["Exit_status"])
    assert ended["1.vm"] == "3" and ended["3.vm"] == "-2"
    requeued = [int(r.attrs["start_count"]) for r in starts if r.job_id == "4.vm"]
    assert max(requeued) > 100  # the recorded endless requeue of `exit -1`


def test_qstat_f_keeps_a_folded_values_own_text():
    """prt_attr breaks inside a token longer than the line: the continuation's text (even a leading blank) is
    the value's; only the tab goes."""
    text = "Job Id: 7.vm\n    comment = job was cancelled by the user becau\n\t se of a typo\n    job_state = C\n"
    assert parse_qstat_f(text)["comment"] == "job was cancelled by the user becau se of a typo"


QSTAT_F_RUNNING = """Job Id: 12.vm
    Job_Name = hooktest
    Job_Owner = trqtest@vm
    job_state = R
    queue = batch
    Error_Path = vm:/home/trqtest/hooktest.e12
    exec_host = vm/0-1
    Output_Path = vm:/home/trqtest/hooktest.o12
    Resource_List.nodes = 1:ppn=2
    Resource_List.walltime = 00:05:00
    start_count = 1
"""


def test_torque_job_info_of_a_running_and_a_completed_job():
    from vtorque.shared.torque import torque_job_info

    info = torque_job_info("12.vm", QSTAT_F_RUNNING)
    assert (info.state, info.alive, info.owner, info.nodes, info.walltime_s) == ("running", True, "trqtest",
                                                                                ("vm",), 300)
    # where its .o/.e go, as Slurm's StdOut/StdErr say it (`vtorque status` shows them)
    assert (info.stdout, info.stderr) == ("/home/trqtest/hooktest.o12", "/home/trqtest/hooktest.e12")
    done = torque_job_info("12.vm", QSTAT_F_RUNNING.replace("job_state = R", "job_state = C\n    exit_status = -2"))
    assert (done.state, done.exit_code, done.alive) == ("failed", -2, False)
    qdel = torque_job_info("12.vm", QSTAT_F_RUNNING.replace("job_state = R", "job_state = C\n    exit_status = 271"))
    assert qdel.state == "cancelled"


def _scheduler_with(tmp_path, script: str):
    from vtorque.shared.config import SchedulerConfig
    from vtorque.shared.torque import Torque

    qstat = tmp_path / "qstat"
    qstat.write_text("#!/bin/sh\n" + script)
    qstat.chmod(0o755)
    return Torque(SchedulerConfig(kind="torque", qstat=str(qstat), timeout=5.0))


def test_torque_is_asked_with_plain_qstat_f_never_x(tmp_path):
    """TORQUE's `qstat -x` is XML output, not "finished jobs too" (that is PBS Pro): asking with it would give
    text without job_state, and reconciliation would have taken every running job for gone."""
    answer = tmp_path / "answer"
    answer.write_text(QSTAT_F_RUNNING)
    torque = _scheduler_with(tmp_path, f'[ "$1" = -f ] && [ "$2" = 12.vm ] && [ $# = 2 ] || exit 2\ncat {answer}\n')
    assert torque.job("12.vm").state == "running"


def test_torque_output_without_a_job_state_is_an_error_not_a_gone_job(tmp_path):
    import pytest

    from vtorque.shared.scheduler import SchedulerError

    torque = _scheduler_with(tmp_path, "echo '<Data><Job><Job_Id>12.vm</Job_Id></Job></Data>'\n")
    with pytest.raises(SchedulerError, match="no job_state"):
        torque.job("12.vm")
    gone = _scheduler_with(tmp_path, "echo 'qstat: Unknown Job Id Error 12.vm' >&2; exit 153\n")
    assert gone.job("12.vm") is None


def test_torque_job_nodes_are_short_names_as_the_hooks_give_them():
    from vtorque.shared.torque import torque_job_info

    text = QSTAT_F_RUNNING.replace("exec_host = vm/0-1", "exec_host = n1.cluster/0-1+n2.cluster/0-1+n1.cluster/2")
    assert torque_job_info("12.vm", text).nodes == ("n1", "n2")


@pytest.mark.parametrize("resources, seconds", [
    ("nodes=1:ppn=2,walltime=00:05:00,mem=100mb,neednodes=1:ppn=2", 300),
    ("walltime=00:01:00,nodes=1,neednodes=1", 60),
    ("prologue=/home/u/p.sh,epilogue=e.sh,walltime=01:02:03,nodes=1", 3723),
    ("walltime=90", 90),
    ("walltime=2:00:00:00", 172800),
    ("nodes=1", None),
    ("walltime=1::0", None),
])
def test_walltime_from_resource_list(resources, seconds):
    assert walltime_seconds(resources) == seconds


def test_exec_host_cores_only_where_they_agree_with_the_node_file():
    counts = OrderedDict([("n1", 2), ("n2", 2), ("n3", 1)])
    exec_host = OrderedDict([("n1", [0, 1]), ("n2", [2]), ("n3", [5])])
    nodes = nodes_with_cores(counts, exec_host)
    assert [(n.host, n.ncpus, n.cores) for n in nodes] == [("n1", 2, [0, 1]), ("n2", 2, None), ("n3", 1, [5])]
    assert [n.cores for n in nodes_with_cores(counts, None)] == [None, None, None]


def test_nodefile_gives_hosts_in_order_with_core_counts(tmp_path):
    nodefile = tmp_path / "1.vm"
    nodefile.write_text("n2.cluster\nn2.cluster\nn1.cluster\n")
    nodes = nodes_from_nodefile(str(nodefile))
    assert [(n.host, n.ncpus) for n in nodes] == [("n2", 2), ("n1", 1)]


def test_exec_host_of_qstat_attributes_or_why_not():
    assert exec_host_of({"exec_host": "n1/0-1+n2/2"}) == ({"n1": [0, 1], "n2": [2]}, "")
    assert exec_host_of(None, "qstat gave no answer") == (None, "qstat gave no answer")
    assert exec_host_of({"job_state": "R"}) == (None, "qstat -f shows no exec_host")
    assert exec_host_of({"exec_host": "vm/"})[0] is None


def test_torque_job_info_says_the_cores_of_each_node_and_the_queue():
    from vtorque.shared.torque import torque_job_info

    assert torque_job_info("12.vm", QSTAT_F_RUNNING).cores == (2,)
    text = QSTAT_F_RUNNING.replace("exec_host = vm/0-1", "exec_host = n1.cluster/0-1+n2.cluster/0-1+n1.cluster/2")
    info = torque_job_info("12.vm", text.replace("queue = batch", "queue = long"))
    assert (info.nodes, info.cores, info.queue) == (("n1", "n2"), (3, 2), "long")
    queued = torque_job_info("12.vm", QSTAT_F_RUNNING.replace("    exec_host = vm/0-1\n", ""))
    assert queued.cores == () and queued.nodes == ()


def test_the_servers_copy_of_a_job_script(tmp_path):
    from vtorque.shared.torque import server_job_script

    jobs = tmp_path / "server_priv" / "jobs"
    (jobs / "7").mkdir(parents=True)
    (jobs / "12.vm.SC").write_text("#!/bin/sh\n")
    (jobs / "7" / "17.vm.SC").write_text("#!/bin/sh\n")  # use_jobs_subdirs: by the id's last digit
    assert server_job_script(tmp_path, "12.vm") == jobs / "12.vm.SC"
    assert server_job_script(tmp_path, "17.vm") == jobs / "7" / "17.vm.SC"
    assert server_job_script(tmp_path, "13.vm") is None
    assert server_job_script(tmp_path, "../12.vm") is None and server_job_script(tmp_path, ".x") is None


def test_torque_names_its_cluster_by_the_server_submits_with_qsub_and_cancels_with_qdel(tmp_path):
    from vtorque.shared.config import SchedulerConfig
    from vtorque.shared.torque import Torque

    log = tmp_path / "log"
    for name, body in (("qsub", 'echo "qsub $*" >> {log}; echo 12.head'), ("qdel", 'echo "qdel $*" >> {log}')):
        (tmp_path / name).write_text("#!/bin/sh\n" + body.format(log=log) + "\n")
        (tmp_path / name).chmod(0o755)
    torque = Torque(SchedulerConfig(kind="torque", bin_dir=str(tmp_path), timeout=5.0))
    proc = torque.submit(["-N", "x", "job.sh"])
    assert (proc.returncode, proc.stdout) == (0, "12.head\n")
    torque.cancel("12.head")
    assert log.read_text().splitlines() == ["qsub -N x job.sh", "qdel 12.head"]
    assert torque.cluster("12.head") == "torque:head"
    Torque(SchedulerConfig(kind="torque", bin_dir=str(tmp_path / "none"), timeout=5.0)).cancel("1.head")  # no raise


def test_prologalarm_from_mom_config():
    text = "$pbsserver vm\n$logevent 255\n# $prologalarm 5\n$prologalarm 30   # seconds\n"
    assert prologalarm_from_config(text) == 30
    assert prologalarm_from_config("$pbsserver vm\n") is None
    assert prologalarm_from_config("$prologalarm 30\n$prologalarm 600\n") == 600


def test_a_mom_without_prologalarm_has_torques_default(tmp_path):
    assert read_prologalarm(tmp_path) == 300  # no mom_priv/config
    (tmp_path / "mom_priv").mkdir()
    (tmp_path / "mom_priv" / "config").write_text("$pbsserver vm\n$prologalarm 45\n")
    assert read_prologalarm(tmp_path) == 45


@pytest.mark.parametrize("alarm, kill", [(300, 290), (30, 20), (11, 1), (10, 10), (5, 5)])
def test_torque_kills_ten_seconds_early_when_it_can(alarm, kill):
    assert torque_kill_after(alarm) == kill  # recorded: $prologalarm 30 killed after 20 s


def test_the_output_paths_come_from_qstat():
    attrs = {"Output_Path": "login1.cluster:/home/u/j.o4", "Error_Path": "login1.cluster:/home/u/j.e4"}
    assert output_paths(attrs) == [Path("/home/u/j.o4"), Path("/home/u/j.e4")]
    joined = {"Output_Path": "vm:/home/u/j.o4", "Error_Path": "vm:/home/u/j.o4"}
    assert output_paths(joined) == [Path("/home/u/j.o4")]
    assert output_paths(None) == [] and output_paths({"Error_Path": "vm:relative"}) == []
