"""MPI across hosts on the cluster rig (deploy/rig/rig.sh): a VM job of 2 rig hosts × 2 MPI guests
(tests/guest/mpi) runs one MPI program over all four guests, through the rig's own Slurm with vsub.

mpirun in guest 0 (on c1) reaches its sibling on c1 and both guests on c2 by their names in /etc/hosts, over
the job network, with the job's agent forwarded by the launcher. Nothing here depends on how the job's segment
spans hosts (a VXLAN segment per job since 1160a89, a multicast group on loopback before), only that the guests
reach each other by name."""

import re
import subprocess
import time
import uuid

import pytest

from .test_mpi_job import MPI_GUEST_DIR, ROOT
from .test_rig import COMPUTE, HOSTS, RIG_DIR, cluster, on  # noqa: F401 - the rig, up for this module

pytestmark = [pytest.mark.slow]

RANKS = 4  # one per guest: 2 hosts × 2 guests × 1 vCPU
JOB = f"""#!/bin/sh
echo "nodefile: $(tr '\\n' ' ' < "$PBS_NODEFILE")"
# The rig's tests submit as root (allow_system_owners), and Open MPI refuses root without both of these.
[ "$(id -u)" != 0 ] || export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mpirun --hostfile "$PBS_NODEFILE" -n {RANKS} /usr/local/bin/vt-mpi-hello
"""


@pytest.fixture(scope="module")
def mpi_image(cluster):  # noqa: F811 - the fixture imported above
    build = subprocess.run([str(ROOT / "tests/guest/mpi/build.sh"), str(MPI_GUEST_DIR)], capture_output=True,
                           text=True, timeout=1200)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    # Every rig host has a catalog file of its own (beside its vtorque.toml): the hooks and the bridge on head,
    # the stager and the node workers each read theirs.
    for h in HOSTS:
        on(h, "vtorque", "images", "add", "mpi", str(MPI_GUEST_DIR / "rootfs.qcow2"), "--kernel",
           str(MPI_GUEST_DIR / "vmlinux"), "--initrd", str(MPI_GUEST_DIR / "initrd.img"), "--distro", "debian",
           timeout=120)


def test_an_mpi_program_runs_over_two_guests_on_each_of_two_rig_hosts(mpi_image):
    job_dir = RIG_DIR / "jobs" / f"test-rig-{uuid.uuid4().hex[:8]}"
    job_dir.mkdir(parents=True)
    job_dir.chmod(0o755)
    (job_dir / "mpi.sh").write_text(JOB)
    job_id = on("head", "vsub", "-l", "nodes=2", "-vm", "img=mpi,vms_per_node=2,vcpus=1,ram=384M", "mpi.sh",
                cwd=job_dir).stdout.strip()
    assert job_id.isdigit(), job_id
    guests = sorted(f"vt-{job_id}-{c}-{i}" for c in COMPUTE for i in range(2))
    end = time.monotonic() + 600
    while time.monotonic() < end and job_id in on("head", "squeue", "-h", "-o", "%i").stdout.split():
        time.sleep(1)
    show = on("head", "scontrol", "show", "job", job_id, check=False).stdout
    out_file, err_file = job_dir / f"mpi.sh.o{job_id}", job_dir / f"mpi.sh.e{job_id}"
    out = out_file.read_text() if out_file.exists() else ""
    err = err_file.read_text() if err_file.exists() else ""
    report = f"{show}\nstdout:\n{out}\nstderr:\n{err}"
    print(report)
    assert sorted(set(out.split("nodefile:", 1)[-1].split("\n", 1)[0].split())) == guests, report
    ranks = {int(m["rank"]): m["host"] for m in
             re.finditer(rf"^VT-MPI rank=(?P<rank>\d+) size={RANKS} host=(?P<host>\S+)$", out, re.M)}
    assert sorted(ranks) == list(range(RANKS)), report
    assert sorted(ranks.values()) == guests, report  # one rank in each guest, on both hosts
    assert f"VT-MPI allreduce-sum={RANKS * (RANKS + 1) // 2} expected={RANKS * (RANKS + 1) // 2}" in out, report
    assert "JobState=COMPLETED" in show and "ExitCode=0:0" in show, report
