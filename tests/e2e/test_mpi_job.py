"""End to end: a real MPI program across the guests of one VM job on the single-host Slurm stack.

vsub -vm img=mpi,vms_per_node=2 boots two MPI guests (tests/guest/mpi: Open MPI from Debian packages) on the
job network; the job script runs in guest 0 and its mpirun reaches guest 1 by the name in /etc/hosts over
dbclient, authenticated by the job's agent that the launcher forwards (cli/launcher_ssh.py job_agent). Every
rank's line and the MPI_Allreduce sum must come back in the job's output. Nothing here depends on how the job
network's segment is made, only on the guests reaching each other by name."""

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.test_slurm_vm_job import gone_soon, running_qemus, submit

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.guest]

ROOT = Path(__file__).parents[2]
MPI_GUEST_DIR = Path(os.environ.get("VTORQUE_MPI_GUEST_DIR", "/var/cache/vtorque/mpiguest"))
VTORQUE = "/opt/vtorque/venv/bin/vtorque"
RANKS = 4
# Two guests of one vCPU each (this stack's node has 2 cores): 4 ranks are 2 per guest, placed round-robin by
# node so that both guests get ranks whatever the node file's order.
MPI_JOB = f"""#!/bin/sh
#PBS -N mpi
echo "nodefile: $(tr '\\n' ' ' < "$PBS_NODEFILE")"
echo "ssh-dir: $(ls -A ~/.ssh | tr '\\n' ' ')"
echo "agent: ${{SSH_AUTH_SOCK:+forwarded}}"
# This stack's tests submit as root (allow_system_owners), and Open MPI refuses root without both of these.
[ "$(id -u)" != 0 ] || export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mpirun --hostfile "$PBS_NODEFILE" --map-by node --oversubscribe -n {RANKS} /usr/local/bin/vt-mpi-hello
"""


def ensure_mpi_image(env: dict) -> str:
    """Build the MPI guest (cached: about 2 s when current; 107 s from scratch) and make the stack's catalog
    entry `mpi` (its images.toml, as `vtorque images add` writes it) name this build, replacing an entry of an
    older build; returns the image's sha256. Built here (or by `make mpi-guest`) rather than by `make demo`,
    which never needs it."""
    start = time.monotonic()
    build = subprocess.run([str(ROOT / "tests/guest/mpi/build.sh"), str(MPI_GUEST_DIR)], capture_output=True,
                           text=True, timeout=1200)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    print(f"mpi guest build: {time.monotonic() - start:.1f} s ({build.stdout.splitlines()[-1]})")
    sums = dict(reversed(line.split()) for line in (MPI_GUEST_DIR / "SHA256SUMS").read_text().splitlines())
    digest = sums["rootfs.qcow2"]
    shown = subprocess.run([VTORQUE, "images", "show", "mpi"], capture_output=True, text=True, env=env)
    if shown.returncode != 0 or digest not in shown.stdout:
        if shown.returncode == 0:
            subprocess.run([VTORQUE, "images", "remove", "mpi"], check=True, capture_output=True, env=env)
        add = subprocess.run([VTORQUE, "images", "add", "mpi", str(MPI_GUEST_DIR / "rootfs.qcow2"),
                              "--kernel", str(MPI_GUEST_DIR / "vmlinux"), "--initrd", str(MPI_GUEST_DIR / "initrd.img"),
                              "--distro", "debian"], capture_output=True, text=True, env=env)
        assert add.returncode == 0, add.stderr
    return digest


def test_an_mpi_program_runs_across_the_jobs_two_guests(slurm):
    ensure_mpi_image(slurm.env)
    try:
        _run_mpi_job(slurm)
    finally:
        # The stack's catalog as the test found it: other tests list the images it offers.
        subprocess.run([VTORQUE, "images", "remove", "mpi"], capture_output=True, env=slurm.env)


def _run_mpi_job(slurm):
    slurm.write("mpi.sh", MPI_JOB)
    start = time.monotonic()
    job_id = submit(slurm, "-N", "mpi", "-vm", "img=mpi,vms_per_node=2,vcpus=1,ram=384M", "mpi.sh")
    slurm.wait(job_id, timeout=600)
    print(f"mpi job {job_id}: submit to done {time.monotonic() - start:.1f} s")
    out = (slurm.workdir / f"mpi.o{job_id}").read_text()
    err = (slurm.workdir / f"mpi.e{job_id}").read_text()
    report = f"stdout:\n{out}\nstderr:\n{err}"
    print(report)
    ranks = {int(m["rank"]): m["host"] for m in
             re.finditer(rf"^VT-MPI rank=(?P<rank>\d+) size={RANKS} host=(?P<host>\S+)$", out, re.M)}
    assert sorted(ranks) == list(range(RANKS)), report
    guests = out.split("nodefile:", 1)[1].split("\n", 1)[0].split()
    assert len(set(guests)) == 2, report
    # Ranks ran in both guests: mpirun in guest 0 reached guest 1 over the job network.
    assert set(ranks.values()) == set(guests), report
    # ... with the launcher's forwarded agent, and no private key in the guest: only the job's public key
    assert "agent: forwarded" in out and "ssh-dir: authorized_keys \n" in out, report
    assert f"VT-MPI allreduce-sum={RANKS * (RANKS + 1) // 2} expected={RANKS * (RANKS + 1) // 2}" in out, report
    assert slurm.exit_code(job_id) == 0, report
    assert running_qemus(job_id) == [] and gone_soon(job_id) == ([], [])
