"""On the real single-host Slurm: a VM job that fails before its guests are ready (an image whose catalog sha256
is wrong) tells its owner why, in one line, where the owner looks: the job's error file (written as the owner,
by the job's own batch step) and the job's Comment in `scontrol show job` and `squeue -o %k`.

vsub runs as an ordinary user made for the test. Run it under the stack's lock:
    flock /tmp/vtorque-e2e.lock python -m pytest tests/e2e/test_slurm_failure_reason.py
"""

from __future__ import annotations

import os
import pwd
import subprocess
import time
import uuid

import pytest

from vtorque.services.image_stager.catalog import editing
from vtorque.shared.config import load_config

from .test_slurm_vm_job import vtorque_leftovers

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

WRONG = "0" * 64


@pytest.fixture
def owner():
    """An ordinary user of its own, with a home of its own (vsub keeps the job's key there)."""
    name = f"vtf{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", "-U", name], check=True, capture_output=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", "-r", "-f", name], capture_output=True)


@pytest.fixture
def bad_image(slurm):
    """A catalog entry whose sha256 is not that of its file (the stager must refuse it), removed afterwards."""
    config = load_config()
    tiny = config.images.catalog["tiny"]
    source = slurm.workdir / "badsum.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(source), "1M"], check=True)
    os.chmod(source, 0o644)
    name = f"badsum-{uuid.uuid4().hex[:8]}"
    import msgspec

    entry = msgspec.structs.replace(tiny, source=str(source), sha256=WRONG, size=source.stat().st_size)
    with editing(config.images.catalog_file) as entries:
        entries[name] = entry
    try:
        yield name
    finally:
        with editing(config.images.catalog_file) as entries:
            entries.pop(name, None)


def as_user(slurm, user, *argv) -> subprocess.CompletedProcess:
    env = {k: v for k, v in slurm.env.items() if k.startswith(("SLURM", "VTORQUE", "PATH"))}
    env.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)
    return subprocess.run(["runuser", "-u", user.pw_name, "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()),
                           *argv], cwd=slurm.workdir, capture_output=True, text=True, timeout=120)


def test_a_job_whose_image_fails_to_stage_tells_its_owner_why_in_one_line(slurm, owner, bad_image):
    slurm.write("bad.sh", "#!/bin/sh\necho never-runs\n")
    t0 = time.monotonic()
    proc = as_user(slurm, owner, "vsub", "-N", "badsum", "-vm", f"img={bad_image}", "bad.sh")
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    assert job_id.isdigit(), proc.stdout
    slurm.wait(job_id, timeout=120)
    took = time.monotonic() - t0

    # The scheduler's own field: scontrol show job and squeue -o %k, one line, as the owner sees it.
    shown = as_user(slurm, owner, "scontrol", "show", "job", job_id).stdout
    comment = next(line.strip()[len("Comment="):] for line in shown.splitlines() if line.strip().startswith("Comment="))
    assert comment.startswith(f"vtorque: not started: image {bad_image}: "), shown
    assert "sha256" in comment and "\n" not in comment
    squeued = as_user(slurm, owner, "squeue", "-h", "-t", "all", "-j", job_id, "-o", "%k").stdout.strip()
    assert squeued == comment

    # The job's error file (StdErr= of scontrol show job): the owner's, one line saying why.
    stderr_path = next(w.split("=", 1)[1] for w in shown.split() if w.startswith("StdErr="))
    assert stderr_path == str(slurm.workdir / f"badsum.e{job_id}")
    st = os.stat(stderr_path)
    assert st.st_uid == owner.pw_uid
    lines = open(stderr_path).read().splitlines()
    assert lines == [f"vtorque: job {job_id} did not start: {comment[len('vtorque: not started: '):]}"], lines
    assert "never-runs" not in (slurm.workdir / f"badsum.o{job_id}").read_text()

    assert "JobState=FAILED" in shown and "ExitCode=1:0" in shown, shown
    print(f"\nwrong sha256: reason in {stderr_path} and the Comment {took:.2f} s after vsub")
    assert took < 25, f"the job took {took:.1f}s to fail"  # fails fast, not after the launcher's 30 s wait
    deadline = time.monotonic() + 30
    while vtorque_leftovers(job_id) != ([], []) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert vtorque_leftovers(job_id) == ([], [])
