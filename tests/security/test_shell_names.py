"""slurm-wlm-torque's qsub (a Perl wrapper) pastes the script's path, its name, `-N` and every other argument
unquoted into one sbatch command line that it runs through /bin/sh (issue 11, low). vsub refuses such
arguments for a VM job with one line and exit 2, before anything is made or submitted.

The site's qsub here is a copy of the real /usr/bin/qsub beside a recording `sbatch` of the test's own (the
wrapper runs the sbatch of its own directory), so an injection that got through would really run; vsub runs
as a real unprivileged account."""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from pathlib import Path

import pytest

DIGEST = "cd" * 32
REAL_QSUB = Path("/usr/bin/qsub")


@pytest.fixture
def slurm_site(users):
    if not REAL_QSUB.is_file() or "Slurm" not in REAL_QSUB.read_text(errors="replace"):
        pytest.fail("this test needs slurm-wlm-torque's /usr/bin/qsub (installed by deploy/install-deps.sh)")
    _, victim = users
    root = Path(f"/tmp/vts-shell-{uuid.uuid4().hex[:8]}")
    bindir = root / "bin"
    bindir.mkdir(parents=True)
    shutil.copy(REAL_QSUB, bindir / "qsub")
    (bindir / "sbatch").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >> {root}/sbatch.calls\n'
                                   'echo "Submitted batch job 4711"\n')
    (bindir / "scontrol").write_text('#!/bin/sh\necho "slurm_load_jobs error: Invalid job id specified" >&2\n'
                                     'exit 1\n')
    for tool in ("qsub", "sbatch", "scontrol"):
        (bindir / tool).chmod(0o755)
    # The wrapper's Slurm module reads a slurm.conf (of the test's own: nothing here talks to a slurmctld).
    (root / "slurm.conf").write_text("ClusterName=vts\nSlurmctldHost=localhost\n")
    (root / "trace").mkdir()
    os.chmod(root / "trace", 0o1777)
    (root / "vtorque.toml").write_text(
        f'state_dir = "{root}/state"\n[tracing]\ndir = "{root}/trace"\n'
        f'[images.catalog.tiny]\nsource = "/x/tiny.qcow2"\nsha256 = "{DIGEST}"\n'
        f'[scheduler]\nkind = "slurm"\nbin_dir = "{bindir}"\n')
    os.chmod(root, 0o777)
    shutil.rmtree(victim.home / ".vtorque", ignore_errors=True)
    yield root
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(victim.home / ".vtorque", ignore_errors=True)


def vsub(victim, root: Path, *argv: str):
    return victim.run(sys.executable, "-m", "vtorque.cli.vsub", "-vm", "img=tiny", *argv, env=env_of(victim, root))


def env_of(victim, root: Path) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "VTORQUE_CONFIG": str(root / "vtorque.toml"), "HOME": str(victim.home),
            "SLURM_CONF": str(root / "slurm.conf")}


def script(root: Path, name: str) -> str:
    path = root / name
    path.write_text("#!/bin/sh\necho hi\n")
    path.chmod(0o644)
    return str(path)


@pytest.fixture
def canary(users):
    """Where an injected `touch CANARY` lands: the shell's working directory, the victim's home (vsub's)."""
    path = users[1].home / "CANARY"
    path.unlink(missing_ok=True)
    yield path
    path.unlink(missing_ok=True)


def test_a_plain_name_goes_through_the_real_wrapper(users, slurm_site):
    """The control: the same site submits a job whose names are plain."""
    _, victim = users
    proc = vsub(victim, slurm_site, "-N", "plain-name_1.x", script(slurm_site, "job.sh"))
    assert (proc.returncode, proc.stdout.strip()) == (0, "4711"), proc.stderr
    assert "plain-name_1.x" in (slurm_site / "sbatch.calls").read_text()


@pytest.mark.parametrize("argv, what", [
    (["SCRIPT:x;touch CANARY"], "the script's name"),
    (["-N", "$(touch CANARY)", "SCRIPT:job.sh"], "the job name (-N)"),
    (["-N`touch CANARY`", "SCRIPT:job.sh"], "the job name (-N)"),
    (["-o", "out|touch CANARY", "SCRIPT:job.sh"], "the qsub argument"),
    (["SCRIPT:job.sh", "arg;touch CANARY"], "the script argument"),
])
def test_a_name_the_wrapper_would_run_through_a_shell_is_refused_and_nothing_runs(users, slurm_site, canary, argv,
                                                                                   what):
    _, victim = users
    words = [script(slurm_site, w[len("SCRIPT:"):]) if w.startswith("SCRIPT:") else w for w in argv]
    proc = vsub(victim, slurm_site, *words)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith(f"vsub: {what}") and proc.stderr.count("\n") == 1, proc.stderr
    assert "nothing was submitted" in proc.stderr
    assert proc.stdout == ""
    assert not canary.exists()
    assert not (slurm_site / "sbatch.calls").exists()  # the wrapper never ran
    keys = victim.home / ".vtorque" / "keys"
    assert not keys.exists() or list(keys.iterdir()) == []  # no key made for a job that never was


def test_the_attack_works_without_vsub(users, slurm_site, canary):
    """Why: the same script name straight to the wrapper (as with plain qsub) runs the user's command."""
    _, victim = users
    ran = victim.run(str(slurm_site / "bin/qsub"), script(slurm_site, "x;touch CANARY"), env=env_of(victim, slurm_site))
    assert canary.exists(), (ran.stdout, ran.stderr)
