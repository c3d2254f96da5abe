"""One home per scheduler (shared/torque.py, shared/slurm.py) behind one small interface (shared/scheduler.py):
the hooks and the bridge's prefetch ask Torque and Slurm through the same classes, by the configured absolute
paths, and a scheduler that cannot be asked is one SchedulerError, which each caller turns into its own answer."""

from __future__ import annotations

import subprocess

from vtorque.hooks import slurm as slurm_hook
from vtorque.hooks.torque import job as torque_job
from vtorque.shared import slurm, torque
from vtorque.shared.config import Config, SchedulerConfig
from vtorque.shared.scheduler import Scheduler, SchedulerError, scheduler_for


def _answers(monkeypatch, module, replies):
    """Every client call of `module` recorded; `replies` maps argv[1:] (as a tuple) to (rc, stdout, stderr)."""
    calls = []

    def run(argv, timeout, env=None):
        calls.append(argv)
        reply = replies.get(tuple(argv[1:]))
        if reply is None:
            raise SchedulerError(f"{argv[0]} gave no answer within {timeout:g}s")
        return subprocess.CompletedProcess(argv, *reply)

    monkeypatch.setattr(module, "run_client", run)
    return calls


def test_every_part_gets_the_same_implementation_of_the_one_interface():
    for kind, cls in (("torque", torque.Torque), ("slurm", slurm.Slurm)):
        site = scheduler_for(Config(scheduler=SchedulerConfig(kind=kind)))
        assert type(site) is cls and site.kind == kind
        # Every call of the interface (shared/scheduler.py's Scheduler), on both.
        asked = [name for name in vars(Scheduler) if not name.startswith("_") and callable(vars(Scheduler)[name])]
        assert {"job", "binary", "run", "cluster", "submit", "cancel"} <= set(asked)
        assert all(callable(getattr(site, name)) for name in asked), kind
    # The Slurm hook's own calls (Comment, timeout, host lists) are the same class's.
    assert type(slurm_hook.slurm_for(Config(scheduler=SchedulerConfig(kind="slurm")))) is slurm.Slurm


def test_the_slurm_hook_asks_by_the_configured_path_and_a_silent_slurm_is_a_reason(monkeypatch):
    site = slurm_hook.slurm_for(Config(scheduler=SchedulerConfig(kind="slurm", bin_dir="/opt/slurm/bin")))
    calls = _answers(monkeypatch, slurm, {
        ("show", "hostnames", "n[1-2]"): (0, "n1\nn2\n", ""),
        ("show", "config"): (0, "PrologEpilogTimeout     = 300\n", ""),
        ("update", "JobId=7", "Comment=vtorque: not started: x"): (1, "", "Access/permission denied\n"),
    })
    assert site.hostnames("n[1-2]") == ["n1", "n2"] and site.hostnames("a,b") == ["a", "b"]
    assert site.prolog_epilog_timeout() == (300, "")
    assert site.set_comment("7", "vtorque: not started: x") == "Access/permission denied"
    assert site.show_job("7") == ""  # scontrol gave no answer: the hook goes on without the cores
    assert site.set_comment("8", "y").endswith("gave no answer within 10s")
    assert {c[0] for c in calls} == {"/opt/slurm/bin/scontrol"}


def test_without_a_slurm_section_the_launcher_still_finds_scontrol(monkeypatch):
    """vtorque-launch asks for the refusal with whatever config it could read: none is a Slurm site's binary on
    the PATH, /usr/bin first, never an error before the owner is told."""
    calls = _answers(monkeypatch, slurm, {("show", "job", "-d", "5"): (0, "JobId=5\n   Comment=vtorque: not started: "
                                                                         "bad spec\n", "")})
    assert slurm_hook.refusal("5", None) == "vtorque: job 5 did not start: bad spec"
    assert calls[0][0].endswith("/scontrol")


def test_the_torque_prologue_reads_qstat_f_through_shared_torque(monkeypatch):
    config = Config(scheduler=SchedulerConfig(kind="torque", qstat="/opt/torque/bin/qstat"))
    calls = _answers(monkeypatch, torque, {
        ("-f", "3.vm"): (0, "Job Id: 3.vm\n    job_state = R\n    exec_host = n1/0-1+n2/\n\t2-3\n", ""),
        ("-f", "4.vm"): (153, "", "qstat: Unknown Job Id 4.vm\n"),
    })
    assert torque_job.qstat_exec_host("3.vm", config) == ({"n1": [0, 1], "n2": [2, 3]}, "")
    assert torque_job.qstat_exec_host("4.vm", config) == (None, "qstat -f 4.vm: Torque does not know the job")
    assert torque_job.qstat_exec_host("5.vm", config)[1].endswith("gave no answer within 10s")
    assert {c[0] for c in calls} == {"/opt/torque/bin/qstat"}


def test_prefetch_polls_slurms_queue_through_the_same_class(monkeypatch, tmp_path):
    from vtorque.services.scheduler_bridge.accounting import SlurmPrefetch

    config = Config(scheduler=SchedulerConfig(kind="slurm", bin_dir="/opt/slurm/bin"))
    calls = _answers(monkeypatch, slurm, {("-h", "-t", "all", "-o", "%i|%T"): (0, "12|RUNNING\n", "")})
    prefetch = SlurmPrefetch(config, publisher=None, state_path=tmp_path / "slurm.json", state_dir=str(tmp_path))
    assert prefetch.step() == 0  # a running job is not new: nothing to stage, and no script asked for
    assert calls == [["/opt/slurm/bin/squeue", "-h", "-t", "all", "-o", "%i|%T"]]
