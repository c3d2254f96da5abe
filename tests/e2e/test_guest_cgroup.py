"""A job's guests are accounted to and capped by the job's own cgroup, on a real Slurm that uses cgroups
(proctrack/cgroup, task/cgroup with ConstrainRAMSpace, PrologFlags=Contain, jobacct_gather/cgroup), as a site
runs it: services/node_worker/job_cgroup.py with the Slurm layout of docs/admin-guide.md.

The single-host stack's Slurm runs without cgroups (proctrack/linuxproc, task/none) and the other tests rely on
it, so this test starts a slurmctld and slurmd of its own (own ports, state and spool, the stack's munge),
stopped by their own pids. A real node worker (no broker: its handler is called with the command, as in
tests/security) boots a real guest for a job that an ordinary account submitted to that Slurm, through the boot
path's own code.

Boots guests and runs Slurm jobs: run under the lock,
    flock /tmp/vtorque-e2e.lock python -m pytest tests/e2e/test_guest_cgroup.py
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from security.conftest import base_image, make_site, users  # noqa: F401 - fixtures used here

from vtorque.cli.launcher_ssh import ssh_argv
from vtorque.services.node_worker import job_cgroup
from vtorque.shared import messages as m

from .own_slurm import HOST, own_slurm, slurm_conf

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.guest]

CGROUP = Path("/sys/fs/cgroup")
# This Debian build of Slurm 22.05 names its cgroup root slurm_<NodeName> (measured: slurm_vm).
SLURM_ROOT = f"slurm_{HOST}"
LAYOUT = {"memory": SLURM_ROOT + "/uid_{uid}/job_{job}/step_extern/task_0",
          "cpuacct": SLURM_ROOT + "/uid_{uid}/job_{job}/step_extern/task_0",
          "freezer": SLURM_ROOT + "/uid_{uid}/job_{job}/step_extern"}
MIB = 1 << 20

SLURM_CONF = slurm_conf("vtcg", """
ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup
PrologFlags=Alloc,Contain
JobAcctGatherType=jobacct_gather/cgroup
JobAcctGatherFrequency=task=1
""")
CGROUP_CONF = """CgroupPlugin=cgroup/v1
ConstrainCores=yes
ConstrainRAMSpace=yes
AllowedRAMSpace=100
ConstrainSwapSpace=yes
AllowedSwapSpace=0
"""


def _remove_empty_tree(top: Path) -> None:
    """A cgroup tree our slurmd made, deepest first (rmdir: a cgroup still in use stays)."""
    if not top.is_dir():
        return
    for here, _, _ in sorted(os.walk(top), key=lambda w: -w[0].count("/")):
        with contextlib.suppress(OSError):
            os.rmdir(here)


@pytest.fixture(scope="module")
def cgroup_slurm():
    for c in ("memory", "freezer", "cpuacct"):
        if any((CGROUP / c / SLURM_ROOT).glob("uid_*/job_*")):
            pytest.fail(f"{CGROUP / c / SLURM_ROOT} has jobs: another Slurm with cgroups runs on this host")
    try:
        with own_slurm(SLURM_CONF, "vtorque-cgslurm-", {"cgroup.conf": CGROUP_CONF}) as slurm:
            yield slurm
    finally:
        # A slurmstepd of ours that outlived its slurmd (only our Slurm uses this tree here: checked at start).
        for procs_file in (CGROUP / "freezer" / SLURM_ROOT).rglob("cgroup.procs"):
            for pid in procs_file.read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), 9)
        time.sleep(0.5)
        for c in ("memory", "freezer", "cpuacct", "cpuset", "cpu", "pids", "devices"):
            _remove_empty_tree(CGROUP / c / SLURM_ROOT)


@pytest.fixture
def cg_site(base_image, test_guest):  # noqa: F811 - the fixture imported above
    """A node worker with the Slurm layout, its ramdisk on real tmpfs (/dev/shm), and its watcher running."""
    site = make_site(base_image, entry=test_guest, boot_timeout=150.0)
    shm = Path(f"/dev/shm/vtorque-cgtest-{uuid.uuid4().hex[:8]}")
    site.config.node.ramdisk_dir = str(shm / "guests")
    site.config.node.job_cgroup = dict(LAYOUT)
    site.config.spec.max_ram = "2G"
    stop = threading.Event()
    assert job_cgroup.start(site.worker, stop) is not None
    try:
        yield site
    finally:
        stop.set()
        for name in site.domains():
            site.worker.hv.remove(name)
        shutil.rmtree(site.root, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)


def _job_dir(controller: str, job: str, uid: int) -> Path:
    return CGROUP / controller / job_cgroup.job_paths(LAYOUT, job, uid, HOST)[controller]


def _usage(path: Path) -> int:
    return int((path / "memory.usage_in_bytes").read_text())


def _wait(what, predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, what
        time.sleep(0.2)
    return value


def _boot(site, user, job: str, key: Path, **plan) -> tuple[m.GuestPlan, Path]:
    guest = site.plan(user, job, vcpus=1, ssh_authorized_keys=[key.with_suffix(".pub").read_text().strip()], **plan)
    answers = site.boot(job, guest)
    assert len(answers) == 1 and isinstance(answers[0], m.GuestReady), answers
    return guest, Path(answers[0].address)


def _as(user, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    """A long command as `user` (Account.run's own limit is 30 s)."""
    return subprocess.run(argv, user=user.uid, group=user.gid, extra_groups=[], cwd=user.home, capture_output=True,
                          text=True, timeout=timeout)


def _key(user) -> Path:
    key = user.home / f"job_key_{uuid.uuid4().hex[:6]}"
    assert user.run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)).returncode == 0
    return key


def test_a_jobs_guest_is_counted_in_the_jobs_cgroup_and_ends_with_the_job(cgroup_slurm, cg_site, users):  # noqa: F811 - the fixture imported above
    """As on a site: the guest boots while slurmd has not made the job's cgroups yet (Slurm's PrologSlurmctld,
    here a held job); the watcher moves it in when they appear; what the guest then uses is the job's, in the
    cgroup, in sstat and in cpuacct; libvirt's pinning is kept; the job's end kills the guest."""
    _, owner = users
    job = cgroup_slurm.submit(owner, "--hold", "--mem=900M", "-c", "1")
    key = _key(owner)
    guest, sock = _boot(cg_site, owner, job, key, ram_mib=384)
    pid = job_cgroup.qemu_pid(guest.name)
    assert pid and "machine/" in job_cgroup.placed(pid)["memory"]  # no job cgroup yet: libvirt's
    cgroup_slurm.run("scontrol", "release", job)
    cgroup_slurm.wait_running(job)

    wanted = job_cgroup.job_paths(LAYOUT, job, owner.uid, HOST)
    _wait("the guest never went into its job's cgroup",
          lambda: all(job_cgroup.placed(pid).get(c) == p for c, p in wanted.items()), 15)
    where = job_cgroup.placed(pid)
    assert where["cpuset"].startswith("machine/qemu-")  # libvirt's pinning cgroups, untouched
    threads = {(Path(t) / "comm").read_text().strip(): job_cgroup.parse_proc_cgroup((Path(t) / "cgroup").read_text())
               for t in Path(f"/proc/{pid}/task").iterdir()}
    vcpu = threads["CPU 0/TCG"]
    assert vcpu["cpuset"].endswith("/vcpu0") and vcpu["memory"] == wanted["memory"]  # every thread moved

    # The guest fills 150 MiB of its own RAM (its /tmp): charged to the job, seen by sstat and by cpuacct.
    job_mem = _job_dir("memory", job, owner.uid).parent.parent  # .../job_N
    before, cpu_before = _usage(job_mem), int((_job_dir("cpuacct", job, owner.uid) / "cpuacct.usage").read_text())
    fill = _as(owner, ssh_argv(key, sock, owner.name, "dd if=/dev/zero of=/tmp/fill bs=1M count=150 2>&1"), 300)
    assert fill.returncode == 0, fill.stderr
    after = _usage(job_mem)
    assert after - before > 120 * MIB, (before, after)
    assert int((_job_dir("cpuacct", job, owner.uid) / "cpuacct.usage").read_text()) > cpu_before + 10**8
    time.sleep(2)  # JobAcctGatherFrequency=task=1
    stat = cgroup_slurm.run("sstat", "-n", "-P", "-j", f"{job}.extern", "--format=MaxRSS").stdout.strip()
    assert stat.endswith("K") and int(stat[:-1]) * 1024 > 120 * MIB, stat

    # The job's end (scancel, as the owner) kills what is left in it: the guest's QEMU.
    cgroup_slurm.run("scancel", job, user=owner)
    _wait("the job's end did not stop its guest", lambda: not cg_site.worker.hv.is_active(guest.name), 30)
    _wait("Slurm left the job's cgroups", lambda: not any(
        (CGROUP / c / SLURM_ROOT / f"uid_{owner.uid}" / f"job_{job}").exists() for c in LAYOUT), 30)
    cg_site.worker.on_teardown_guests(m.TeardownGuests.new(job_id=job, deadline=60.0, node=cg_site.node))
    for thread in cg_site.worker.teardown_threads:  # a killed guest's domain is undefined after the answer
        thread.join(60)
    assert cg_site.worker.hv.lookup(guest.name) is None


def test_a_guest_cannot_write_its_ramdisk_beyond_the_jobs_memory(cgroup_slurm, cg_site, users):  # noqa: F811 - the fixture imported above
    """The attack: a job given 250 MiB whose guest asks for more (256 MiB of RAM and a 1 GiB disk in node memory,
    fs_type=ramdisk: a hand-made plan, the bridge's own check bypassed) and writes into its disks, i.e. into host
    RAM. QEMU is in the job's cgroup from before its first instruction (the job's cgroups exist at boot), so
    every page it writes into tmpfs is the job's: counted there (shmem), and the job's limit stops the guest
    (QEMU is killed by the job's OOM); the job and the node carry on."""
    attacker, _ = users
    job = cgroup_slurm.submit(attacker, "--mem=250M", "-c", "1")
    cgroup_slurm.wait_running(job)
    task = _job_dir("memory", job, attacker.uid)
    _wait("slurmd made no cgroup for the job", lambda: all(_job_dir(c, job, attacker.uid).is_dir() for c in LAYOUT), 15)
    limit = int((task.parent.parent / "memory.limit_in_bytes").read_text())
    assert limit == 250 * MIB
    key = _key(attacker)
    guest, sock = _boot(cg_site, attacker, job, key, ram_mib=256, fs_type="ramdisk", disk=m.DataDisk(size_mib=1024))
    pid = job_cgroup.qemu_pid(guest.name)
    wanted = job_cgroup.job_paths(LAYOUT, job, attacker.uid, HOST)
    assert all(job_cgroup.placed(pid).get(c) == p for c, p in wanted.items())  # at boot, not later
    gdir = Path(cg_site.config.node.ramdisk_dir) / guest.name
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(gdir)], capture_output=True, text=True).stdout.strip()
    assert fs == "tmpfs" and (gdir / "root.qcow2").is_file() and (gdir / "data.qcow2").is_file()

    # Slurm gives the owner her step's cgroup directories (she may make cgroups in them), but not the guest: QEMU
    # is libvirt-qemu's process, and the kernel lets no one else move it out of the job's cgroup.
    step = task.parent
    assert step.stat().st_uid == attacker.uid
    escape = step / f"escape{uuid.uuid4().hex[:4]}"
    assert attacker.run("mkdir", str(escape)).returncode == 0
    try:
        for target in (escape / "cgroup.procs", CGROUP / "memory" / "cgroup.procs",
                       CGROUP / "freezer" / wanted["freezer"] / "cgroup.procs"):
            moved = attacker.run("sh", "-c", f"echo {pid} > {target}")
            assert moved.returncode != 0, target
        assert job_cgroup.placed(pid)["memory"] == wanted["memory"]
    finally:
        escape.rmdir()

    # Her home is on the guest's root disk, whose overlay is in node memory.
    fill = "dd if=/dev/zero of=$HOME/fill bs=1M count=110; sync"
    write = _as(attacker, ssh_argv(key, sock, attacker.name, fill), 600)
    _wait("the guest outlived its job's memory limit", lambda: not cg_site.worker.hv.is_active(guest.name), 60)
    assert write.returncode != 0, write.stdout  # the guest died under it
    oom = dict(line.split() for line in (task / "memory.oom_control").read_text().splitlines())
    assert int(oom["oom_kill"]) >= 1
    assert int((task.parent.parent / "memory.max_usage_in_bytes").read_text()) <= limit
    shmem = dict(line.split() for line in (task / "memory.stat").read_text().splitlines())["total_shmem"]
    assert int(shmem) > 16 * MIB, shmem  # the ramdisk pages QEMU wrote are the job's
    on_host = sum(f.stat().st_blocks * 512 for f in gdir.iterdir() if f.is_file())
    assert on_host < limit, on_host  # in host RAM: no more than the job was given
    assert cgroup_slurm.state(job) == "RUNNING"  # the job itself, and the node, carry on
    assert cgroup_slurm.run("sinfo", "-h", "-N", "-o", "%T").stdout.strip() in ("mixed", "allocated")
    cg_site.worker.on_teardown_guests(m.TeardownGuests.new(job_id=job, deadline=60.0, node=cg_site.node))
    assert not gdir.exists()
    cgroup_slurm.run("scancel", job)
