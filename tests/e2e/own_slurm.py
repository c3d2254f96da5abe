"""A slurmctld and slurmd of a test's own on this host (own ports, state and spool; the single-host stack's munge),
for the tests that need a Slurm configured otherwise than the stack's, or that must not touch the stack's:
tests/e2e/test_guest_cgroup.py (cgroups), tests/e2e/test_suspend_resume.py (suspend and resume). Stopped by their
own pids; every job of theirs cancelled first."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .conftest import PREFIX

HOST = socket.gethostname().split(".")[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OwnSlurm:
    def __init__(self, d: Path, env: dict):
        self.d, self.env = d, env

    def run(self, *argv: str, user=None, check=True) -> subprocess.CompletedProcess:
        kw = {"user": user.uid, "group": user.gid, "extra_groups": [], "cwd": self.d / "jobs"} if user else {}
        done = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=60, **kw)
        assert not check or done.returncode == 0, (argv, done.stdout, done.stderr)
        return done

    def submit(self, user, *options: str) -> str:
        out = self.run("sbatch", "--parsable", "-D", str(self.d / "jobs"), "-o", "/dev/null", *options,
                       "--wrap", "sleep 600", user=user)
        return out.stdout.strip().split(";")[0]

    def state(self, job: str) -> str:
        return self.run("squeue", "-h", "-j", job, "-o", "%T", check=False).stdout.strip()

    def wait_running(self, job: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.state(job) != "RUNNING":
            assert time.monotonic() < deadline, (self.state(job), (self.d / "log/slurmd.log").read_text()[-2000:])
            time.sleep(0.2)


def slurm_conf(cluster: str, plugins: str) -> str:
    """A one-node slurm.conf template for `own_slurm`: the cluster's name and its process tracking, task and
    accounting-gather lines (what the tests differ in), the rest the same for every test."""
    return f"ClusterName={cluster}\n" + _DAEMONS + plugins.strip() + "\n" + _SITE


_DAEMONS = """SlurmctldHost={host}(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
"""
_SITE = """AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=100
ReturnToService=2
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 RealMemory=4000 State=UNKNOWN
PartitionName=batch Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@contextlib.contextmanager
def own_slurm(conf: str, prefix: str, extra: dict[str, str] | None = None) -> Iterator[OwnSlurm]:
    """Our Slurm from `conf`, a slurm.conf template ({host}, {ctld_port}, {slurmd_port}, {munge}, {d}: its
    directory), with `extra` files beside it in etc/ (cgroup.conf)."""
    stack = Path(os.environ.get("VTORQUE_STACK_DIR", "/var/lib/vtorque-stack"))
    munge = stack / "slurm" / "munge-run" / "munge.socket"
    assert munge.exists(), f"{munge} missing: the single-host stack's munge is not running"
    d = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(d, 0o755)
    for sub in ("etc", "state", "spool", "run", "log", "jobs"):
        (d / sub).mkdir()
    for sub in ("state", "run", "log"):
        shutil.chown(d / sub, "slurm", "slurm")
    os.chmod(d / "jobs", 0o1777)
    path = d / "etc" / "slurm.conf"
    path.write_text(conf.format(host=HOST, ctld_port=free_port(), slurmd_port=free_port(), munge=munge, d=d))
    for name, text in (extra or {}).items():
        (d / "etc" / name).write_text(text)
    env = {"PATH": f"{PREFIX}/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin", "SLURM_CONF": str(path)}
    procs = [subprocess.Popen([daemon, "-D", *args, "-f", str(path)], env=env, stdin=subprocess.DEVNULL,
                              stdout=open(d / "log" / f"{daemon}.out", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
             for daemon, args in (("slurmctld", ["-c"]), ("slurmd", ["-N", HOST]))]
    slurm = OwnSlurm(d, env)
    try:
        deadline = time.monotonic() + 30
        while slurm.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip() != "idle":
            assert time.monotonic() < deadline, (d / "log" / "slurmd.log").read_text()[-2000:]
            time.sleep(0.2)
        yield slurm
    finally:
        jobs = slurm.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if jobs:
            slurm.run("scancel", "--quiet", "--full", *jobs, check=False)
        deadline = time.monotonic() + 30
        while slurm.run("squeue", "-h", "-o", "%i", check=False).stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.5)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(d, ignore_errors=True)
