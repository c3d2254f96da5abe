"""`make demo` (deploy/single-host/demo.sh) passes only when its job ran in its guest and succeeded, and says
so with the job's state, exit code, phases and output path; otherwise it exits 1 with the reason (issue 10
item 2)."""

import os
import subprocess
from pathlib import Path

import pytest

from .conftest import PREFIX, _stack_env

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.guest]
DEMO = Path(__file__).resolve().parents[2] / "deploy" / "single-host" / "demo.sh"


def _demo(prefix: Path) -> subprocess.CompletedProcess:
    env = {**_stack_env(), "PREFIX": str(prefix)}
    return subprocess.run(["sh", str(DEMO)], env=env, capture_output=True, text=True, timeout=600)


def test_the_demo_job_runs_in_its_guest_and_the_demo_says_how_it_ended(slurm):
    proc = _demo(PREFIX)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    job = out.split("== job ", 1)[1].split()[0]
    assert f"job {job}: completed, exit code 0  (slurm: COMPLETED)" in out
    assert "prologue: boot guests" in out and "run in guest" in out and "exit code 0" in out
    assert f"== demo OK: job {job} ran in its guest vt-{job}-" in out
    assert f"output in {_stack_env()['VTORQUE_JOBS_DIR']}/vmdemo.sh.o{job}" in out


def _shim_prefix(tmp_path: Path, vsub: str) -> Path:
    """A PREFIX whose venv is the real one but for `vsub`, replaced by a shell script."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "vtorque"):
        os.symlink(PREFIX / "venv" / "bin" / name, bin_dir / name)
    shim = bin_dir / "vsub"
    shim.write_text(f"#!/bin/sh\n{vsub}\n")
    shim.chmod(0o755)
    return tmp_path


def _failed(proc) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "demo OK" not in proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("== demo FAILED: "), proc.stderr
    return last


def test_a_demo_job_that_runs_on_the_host_fails_the_demo(slurm, tmp_path):
    """vsub made to drop -vm: the job runs on the host as with plain qsub, marker and all."""
    prefix = _shim_prefix(tmp_path, f'[ "$1" = -vm ] && shift 2\nexec {PREFIX}/venv/bin/vsub "$@"')
    last = _failed(_demo(prefix))
    assert f"ran on the host ({os.uname().nodename}, kernel {os.uname().release})" in last, last


def test_a_demo_job_whose_script_never_ran_fails_the_demo_with_slurms_word(slurm, tmp_path):
    """In its place a job that fails at once, as the launcher does when no guest is ready."""
    prefix = _shim_prefix(tmp_path, "printf '#!/bin/sh\\necho no ready guest >&2\\nexit 1\\n' > broken.sh\n"
                                    f"exec {PREFIX}/venv/bin/vsub broken.sh")
    last = _failed(_demo(prefix))
    assert "the demo's marker line is not in " in last and "/broken.sh.o" in last, last
    assert last.endswith("(Slurm: FAILED, NonZeroExitCode, exit code 1); its stderr: no ready guest"), last
