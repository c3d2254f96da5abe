"""`Scheduler.suspend`/`resume` (shared/scheduler.py) on both schedulers: Slurm's `scontrol suspend|resume JOBID`,
Torque's `qsig -s suspend|resume JOBID`, by the configured absolute path; a refusal (not an operator, a job in the
wrong state) is one SchedulerError line with the scheduler's own words, and `vtorque suspend|resume` prints it and
exits non-zero. The client binaries are scripts that record their argv and answer as the real ones do."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from vtorque.cli.main import main
from vtorque.shared.config import SchedulerConfig
from vtorque.shared.scheduler import SchedulerError
from vtorque.shared.slurm import Slurm
from vtorque.shared.torque import Torque

# What the real clients say when they refuse (Slurm 22.05 scontrol as an ordinary user; TORQUE 6.1 qsig).
SLURM_DENIED = "scontrol: error: Access/permission denied for job 7"
SLURM_NOT_RUNNING = "scontrol: error: Job is pending execution for job 7"
TORQUE_DENIED = "qsig: Unauthorized Request  MSG=operation not permitted 7.vm"


def client(bin_dir: Path, name: str, exit_code: int = 0, stderr: str = "") -> Path:
    """A stand-in for a scheduler client: records its argv (one line) and answers `stderr` with `exit_code`."""
    log = bin_dir / f"{name}.argv"
    script = bin_dir / name
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n"
                      + (f"echo '{stderr}' >&2\n" if stderr else "") + f"exit {exit_code}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return log


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("kind,binary,argv", [
    ("slurm", "scontrol", "{verb} 7"),
    ("torque", "qsig", "-s {verb} 7"),
])
def test_suspend_and_resume_ask_the_scheduler_by_its_configured_path(tmp_path, kind, binary, argv):
    log = client(tmp_path, binary)
    site = (Slurm if kind == "slurm" else Torque)(SchedulerConfig(kind=kind, bin_dir=str(tmp_path)))
    site.suspend("7")
    site.resume("7")
    assert calls(log) == [argv.format(verb="suspend"), argv.format(verb="resume")]


@pytest.mark.parametrize("kind,binary,said,want", [
    ("slurm", "scontrol", SLURM_DENIED, "scontrol suspend 7: Access/permission denied for job 7"),
    ("slurm", "scontrol", SLURM_NOT_RUNNING, "scontrol suspend 7: Job is pending execution for job 7"),
    ("torque", "qsig", TORQUE_DENIED, "qsig -s suspend 7: Unauthorized Request  MSG=operation not permitted 7.vm"),
    ("slurm", "scontrol", "", "scontrol suspend 7: exit 1"),
])
def test_a_refusal_is_one_line_in_the_schedulers_words(tmp_path, kind, binary, said, want):
    client(tmp_path, binary, exit_code=1, stderr=said)
    site = (Slurm if kind == "slurm" else Torque)(SchedulerConfig(kind=kind, bin_dir=str(tmp_path)))
    with pytest.raises(SchedulerError) as err:
        site.suspend("7")
    assert str(err.value) == want and "\n" not in str(err.value)


def test_a_missing_client_is_a_scheduler_error(tmp_path):
    site = Slurm(SchedulerConfig(kind="slurm", bin_dir=str(tmp_path / "none")))
    with pytest.raises(SchedulerError, match="no such file"):
        site.resume("7")


def _site_config(tmp_path: Path, kind: str) -> Path:
    conf = tmp_path / "vtorque.toml"
    conf.write_text(f'state_dir = "{tmp_path}/state"\n[scheduler]\nkind = "{kind}"\nbin_dir = "{tmp_path}"\n')
    return conf


@pytest.mark.parametrize("kind,binary", [("slurm", "scontrol"), ("torque", "qsig")])
def test_vtorque_suspend_and_resume_print_what_they_asked(tmp_path, kind, binary):
    log = client(tmp_path, binary)
    env = {"VTORQUE_CONFIG": str(_site_config(tmp_path, kind))}
    for verb in ("suspend", "resume"):
        done = CliRunner().invoke(main, [verb, "7"], env=env)
        assert done.exit_code == 0, done.output
        assert done.output.strip().startswith(f"job 7: {verb}")
    assert len(calls(log)) == 2


@pytest.mark.parametrize("kind,binary,said,want", [
    ("slurm", "scontrol", SLURM_DENIED, "Error: scontrol suspend 7: Access/permission denied for job 7"),
    ("torque", "qsig", TORQUE_DENIED,
     "Error: qsig -s suspend 7: Unauthorized Request  MSG=operation not permitted 7.vm"),
])
def test_vtorque_suspend_refused_is_one_line_and_a_non_zero_exit(tmp_path, kind, binary, said, want):
    client(tmp_path, binary, exit_code=1, stderr=said)
    env = {"VTORQUE_CONFIG": str(_site_config(tmp_path, kind))}
    done = CliRunner().invoke(main, ["suspend", "7"], env=env)
    assert done.exit_code != 0
    lines = [line for line in done.output.splitlines() if line.strip()]
    assert lines == [want]
