import contextlib
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

STACK = Path(os.environ.get("VTORQUE_STACK_DIR", "/var/lib/vtorque-stack"))
PREFIX = Path(os.environ.get("PREFIX", "/opt/vtorque"))


def _stack_env() -> dict:
    env = dict(os.environ)
    env_file = STACK / "env"
    if not env_file.exists():
        pytest.fail(f"{env_file} missing: the single-host stack is not set up (`make test` does it)")
    for line in env_file.read_text().splitlines():
        if line.startswith("export ") and "=" in line:
            key, value = line[len("export "):].split("=", 1)
            env[key] = value
    env["PATH"] = f"{PREFIX}/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return env


class Slurm:
    def __init__(self, workdir: Path):
        self.env = _stack_env()
        self.workdir = workdir

    def run(self, *argv, check=False, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), cwd=self.workdir, env=self.env, capture_output=True, text=True,
                              timeout=120, check=check, **kw)

    def write(self, name: str, text: str) -> Path:
        path = self.workdir / name
        path.write_text(text)
        return path

    def queued(self) -> list[str]:
        return self.run("squeue", "-h", "-o", "%i", check=True).stdout.split()

    def submitted_here(self) -> list[str]:
        """The queued jobs submitted from this test's own work directory: what another test (or a user of the
        stack) has queued meanwhile is not this test's business."""
        out = self.run("squeue", "-h", "-o", "%i %Z", check=True).stdout
        return [job for job, _, workdir in (line.partition(" ") for line in out.splitlines())
                if Path(workdir.strip()) == self.workdir]

    def wait(self, job_id: str, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if job_id not in self.queued():
                return
            time.sleep(0.2)
        pytest.fail(f"job {job_id} still queued after {timeout}s: {self.run('scontrol', 'show', 'job', job_id).stdout}")

    def running_domain(self, job_id: str, timeout: float = 120.0):
        """(name, libvirt domain) of the job's first guest once it runs, while the job is still queued."""
        from vtorque.services.node_worker.hypervisor import Hypervisor
        from vtorque.shared.config import load_config

        hv = Hypervisor(load_config().node.libvirt_uri)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and job_id in self.queued():
            mine = [n for n, meta in hv.vtorque_domains().items() if meta.get("job") == job_id]
            if mine and hv.is_active(mine[0]):
                return mine[0], hv.lookup(mine[0])
            time.sleep(0.2)
        pytest.fail(f"the domain of job {job_id} never ran")

    def exit_code(self, job_id: str) -> int:
        out = self.run("scontrol", "show", "job", job_id, check=True).stdout
        field = next(w for w in out.split() if w.startswith("ExitCode="))
        return int(field.split("=")[1].split(":")[0])


@contextlib.contextmanager
def stack_slurm():
    """A Slurm client of the single-host stack with a work directory of its own (removed afterwards). The
    e2e tests drive the stack on purpose; each uses only the jobs it submitted and its own work directory."""
    workdir = STACK / "jobs" / f"test-{uuid.uuid4().hex[:8]}"
    workdir.mkdir(parents=True)
    os.chmod(workdir, 0o1777)
    try:
        status = subprocess.run([str(Path(__file__).parents[2] / "deploy/single-host/services.sh"), "status"],
                                capture_output=True, text=True)
        if status.returncode != 0:
            pytest.fail(f"vtorque services are not running: {status.stdout}")
        yield Slurm(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def slurm():
    with stack_slurm() as client:
        yield client
