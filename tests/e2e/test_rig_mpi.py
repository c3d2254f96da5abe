"""MPI across hosts on the cluster rig (deploy/rig/rig.sh): a VM job of 2 rig hosts × 2 MPI guests
(tests/guest/mpi) runs one MPI program over all four guests, through the rig's own Slurm with vsub.

mpirun in guest 0 (on c1) reaches its sibling on c1 and both guests on c2 by their names in /etc/hosts, over
the job network, with the job's agent forwarded by the launcher. Nothing here depends on how the job's segment
spans hosts (a VXLAN segment per job since 1160a89, a multicast group on loopback before), only that the guests
reach each other by name. An MPI program also carries on while one of its guests moves live to another host of
its job (`vtorque migrate`, issue 14 item 3)."""

import re
import subprocess
import time
import uuid

import pytest

from .rig_support import FaultJob, cancel_unfinished, domains, wait_nothing_left
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


# An MPI program across a live migration (issue 14 item 3): a 2-host job, one MPI guest on each host, runs
# vt-mpi-hello's rounds (an allreduce a second, rank 0 printing each) while its guest on c2 moves to c1, a node
# the job holds. The program does not notice beyond a longer round: every round is there once, in order, with the
# right sum, and the job completes; the moved guest runs on c1 and nothing of the job is left after its end.
ROUNDS = 75
MOVING = f"""#!/bin/sh
[ "$(id -u)" != 0 ] || export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mpirun --hostfile "$PBS_NODEFILE" -n 2 /usr/local/bin/vt-mpi-hello {ROUNDS} 1000
"""
ROUND = re.compile(r"^VT-MPI round=(\d+) sum=(\d+) took=([0-9.]+)$", re.M)


class MpiJob(FaultJob):
    """A 2-host job of the MPI guest, one guest on each compute host, its script `job.sh` (FaultJob's output)."""

    def __init__(self, text: str):
        self.dir = RIG_DIR / "jobs" / f"test-rig-{uuid.uuid4().hex[:8]}"
        self.dir.mkdir(parents=True)
        self.dir.chmod(0o755)
        (self.dir / "job.sh").write_text(text)
        self.submitted = time.monotonic()
        self.id = on("head", "vsub", "-l", "nodes=2", "-vm", "img=mpi,vcpus=1,ram=384M", "job.sh",
                     cwd=self.dir).stdout.strip()
        assert self.id.isdigit(), self.id
        FaultJob.submitted_jobs.append(self)


def test_an_mpi_program_carries_on_while_one_of_its_guests_moves_to_another_host(mpi_image):
    try:
        job = MpiJob(MOVING)
        job.wait("the program's fifth round", lambda: "VT-MPI round=5 " in job.output(), timeout=300, every=0.5)
        moving = job.guest("c2")
        moved = on("head", "vtorque", "migrate", job.id, "--from", "c2", "--to", "c1", timeout=300)
        at_move = [int(r[0]) for r in ROUND.findall(job.output())]
        print(moved.stdout, moved.stderr)
        line = re.search(rf"{moving}: c2 -> c1 in ([0-9.]+)s, downtime (\d+) ms", moved.stdout)
        assert line, moved.stdout + moved.stderr
        assert moving in on("c1", "virsh", "-q", "list", "--name").stdout.split() and moving not in domains("c2")
        assert at_move and at_move[-1] < ROUNDS - 5, f"the program was not running across the move: {at_move}"

        show = job.wait_done(timeout=400)
        out, err = job.output(), job.output("e")
        report = f"{show}\nstdout:\n{out}\nstderr:\n{err}"
        rounds = [(int(i), int(s), float(t)) for i, s, t in ROUND.findall(out)]
        assert [i for i, _, _ in rounds] == list(range(1, ROUNDS + 1)), report  # every round once, in order
        assert all(s == 3 for _, s, _ in rounds), report  # ranks 0 and 1: 1 + 2
        assert f"VT-MPI rounds-right={ROUNDS} of {ROUNDS}" in out, report
        assert "JobState=COMPLETED" in show and "ExitCode=0:0" in show, report
        longest = max(rounds, key=lambda r: r[2])
        print(f"moved in {line.group(1)} s (downtime {line.group(2)} ms) after round {at_move[-1]}; "
              f"longest round {longest[0]}: {longest[2]:.3f} s")
        wait_nothing_left(job)
    finally:
        cancel_unfinished()
