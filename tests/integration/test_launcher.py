"""vtorque-launch's failures: one line, non-zero, and the job's key gone whatever happened."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

LAUNCH = str(Path(sys.executable).parent / "vtorque-launch")


@pytest.mark.parametrize("stdin,env,message", [
    (b"!!!not base64", {"PBS_JOBID": "1"}, "damaged"),
    (b"ZWNobyBoaQo=\n", {"PBS_JOBID": "no-such-job-here"}, "has no ready guest"),
    (b"ZWNobyBoaQo=\n", {}, "runs inside a batch job"),
])
def test_a_failed_launch_says_why_and_removes_the_job_key(tmp_path, stdin, env, message):
    key = tmp_path / "keys" / "abc" / "id_ed25519"
    key.parent.mkdir(parents=True)
    key.write_text("secret")
    clean = {k: v for k, v in os.environ.items() if k not in ("PBS_JOBID", "SLURM_JOB_ID")}
    proc = subprocess.run([LAUNCH, "--ssh-key", str(key), "--wait", "0"], input=stdin, capture_output=True,
                          env={**clean, **env}, timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not key.parent.exists()
