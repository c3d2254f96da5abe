"""On the real single-host Slurm: a VM job that fails before its guests are ready (an image whose catalog sha256
is wrong) tells its owner why, in one line, where the owner looks: the job's error file (written as the owner,
by the job's own batch step) and the job's Comment in `scontrol show job` and `squeue -o %k`.

vsub runs as an ordinary user made for the test. Run it under the stack's lock:
    flock /tmp/vtorque-e2e.lock python -m pytest tests/e2e/test_slurm_failure_reason.py
"""

from __future__ import annotations

import contextlib
import os
import pwd
import subprocess
import time
import uuid

import pytest

from vtorque.shared.config import load_config
from vtorque.shared.image_catalog import editing

from .conftest import PREFIX
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


# -- a requeued-then-failed job, on a Slurm of the test's own ------------------------------------------------

PRIVATE_CONF = """ClusterName=vtreq
SlurmctldHost={host}(127.0.0.1)
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
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=100
ReturnToService=2
PrologSlurmctld={d}/hooks/prolog_slurmctld
EpilogSlurmctld={d}/hooks/epilog_slurmctld
PrologEpilogTimeout={prolog_timeout}
NodeName={host} NodeAddr=127.0.0.1 CPUs=1 RealMemory=1000 State=UNKNOWN
PartitionName=batch Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""

# The real entry points, with this Slurm's and this test's config (PrologSlurmctld gets no environment).
HOOK_WRAPPER = """#!/bin/sh
export VTORQUE_CONFIG={d}/vtorque.toml SLURM_CONF={d}/etc/slurm.conf VTORQUE_SLURM_STATE={d}/state
export VTORQUE_BROKER__CREDENTIALS_FILE={d}/broker.credentials
exec {repo}/hooks/slurm/{name}
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def private_slurm():
    """A Slurm of the test's own whose hooks' broker cannot be reached: every attempt is an infrastructure
    failure."""
    with running_private_slurm() as site:
        yield site


@contextlib.contextmanager
def running_private_slurm(prolog_timeout: int = 60, broker_url: str = "amqp://127.0.0.1:1//"):
    """slurmctld + slurmd of their own (own ports, state and spool; the stack's munge), whose hooks are
    vtorque's real entry points with a config of the test's own (`broker_url`). Stopped by their own PIDs."""
    import shutil
    import socket
    import tempfile
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    stack = Path(os.environ.get("VTORQUE_STACK_DIR", "/var/lib/vtorque-stack"))
    munge = stack / "slurm" / "munge-run" / "munge.socket"
    if not munge.exists():
        pytest.fail(f"{munge} missing: the single-host stack's munge is not running")
    d = Path(tempfile.mkdtemp(prefix="vtorque-slurm-"))
    os.chmod(d, 0o755)
    for sub in ("etc", "state", "spool", "run", "log", "hooks", "jobs", "traces", "var"):
        (d / sub).mkdir()
    for sub in ("state", "run", "log"):
        shutil.chown(d / sub, "slurm", "slurm")
    os.chmod(d / "jobs", 0o1777)
    os.chmod(d / "traces", 0o1777)
    host = socket.gethostname().split(".")[0]
    conf = d / "etc" / "slurm.conf"
    conf.write_text(PRIVATE_CONF.format(host=host, ctld_port=_free_port(), slurmd_port=_free_port(), munge=munge, d=d,
                                        prolog_timeout=prolog_timeout))
    for name in ("prolog_slurmctld", "epilog_slurmctld"):
        (d / "hooks" / name).write_text(HOOK_WRAPPER.format(d=d, repo=repo, name=name))
        os.chmod(d / "hooks" / name, 0o755)
    tiny = load_config().images.catalog["tiny"]
    import urllib.parse

    parts = urllib.parse.urlsplit(broker_url)  # the credentials go where the hooks' go: a file for SlurmUser
    (d / "broker.credentials").write_text(f"{parts.username or 'x'}:{parts.password or 'x'}\n")
    shutil.chown(d / "broker.credentials", "root", "slurm")
    os.chmod(d / "broker.credentials", 0o640)
    bare = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    (d / "vtorque.toml").write_text(f"""state_dir = "{d}/var"
[broker]
url = "{bare}"
credentials_file = "{d}/broker.credentials"
connect_timeout = 1.0
[tracing]
dir = "{d}/traces"
[images.catalog.tiny]
source = "{tiny.source}"
sha256 = "{tiny.sha256}"
[scheduler]
kind = "slurm"
bin_dir = "/usr/bin"
[hooks]
max_requeues = 1
broker_attempts = 1
epilogue_timeout = 5
""")
    os.chmod(d / "vtorque.toml", 0o644)
    env = {"PATH": f"{PREFIX}/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin", "SLURM_CONF": str(conf),
           "VTORQUE_CONFIG": str(d / "vtorque.toml")}
    procs = [subprocess.Popen([daemon, "-D", *extra, "-f", str(conf)], env=env, stdin=subprocess.DEVNULL,
                              stdout=open(d / "log" / f"{daemon}.out", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
             for daemon, extra in (("slurmctld", ["-c"]), ("slurmd", ["-N", host]))]
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True)
            if state.stdout.strip() == "idle":
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"private Slurm not idle after 30 s: {(d / 'log' / 'slurmctld.log').read_text()[-2000:]}")
        yield d, env
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(d, ignore_errors=True)


class PrivateJob:
    """A VM job (a vtorque wrapper script) submitted by `owner` to a private Slurm, looked at as the owner."""

    def __init__(self, site, owner, comment: str = "my run 7"):
        from vtorque.shared.job_script import render_wrapper

        self.d, self.env = site
        self.owner = owner
        script = self.d / "jobs" / "vmjob.sh"
        script.write_text(render_wrapper("#!/bin/sh\necho never-runs\n", {"img": "tiny"}, "ssh-ed25519 AAAA test",
                                         str(self.d / "jobs" / "no-key"), None, f"{PREFIX}/venv/bin/vtorque-launch"))
        os.chmod(script, 0o755)
        out = str(self.d / "jobs" / "vmjob.%j")
        submitted = self.as_owner("sbatch", "--parsable", "--comment", comment, "-o", out + ".out", "-e",
                                  out + ".err", str(script))
        assert submitted.returncode == 0, submitted.stderr
        self.id = submitted.stdout.strip()

    def as_owner(self, *argv) -> subprocess.CompletedProcess:
        user_env = [f"{k}={v}" for k, v in self.env.items()] + [f"HOME={self.owner.pw_dir}"]
        return subprocess.run(["runuser", "-u", self.owner.pw_name, "--", "env", "-i", *user_env, *argv],
                              cwd=self.d / "jobs", capture_output=True, text=True, timeout=60)

    def show(self) -> tuple[dict[str, str], str]:
        out = self.as_owner("scontrol", "show", "job", self.id).stdout
        fields = {k: v for k, _, v in (w.partition("=") for w in out.split())
                  if k in ("JobState", "Restarts", "ExitCode", "StdErr")}
        comment = next((line.strip()[len("Comment="):] for line in out.splitlines()
                        if line.strip().startswith("Comment=")), "")
        return fields, comment

    def wait_requeued(self, restarts: str, timeout: float = 60) -> tuple[dict[str, str], str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fields, comment = self.show()
            if (fields.get("Restarts"), fields.get("JobState")) == (restarts, "PENDING"):
                break  # (COMPLETING while its EpilogSlurmctld runs)
            time.sleep(0.3)
        return self.show()

    def start_now(self) -> None:
        """Skip Slurm's requeue delay (~120 s)."""
        subprocess.run(["scontrol", "update", f"JobId={self.id}", "StartTime=now"], env=self.env, check=True)

    def wait_done(self, timeout: float = 90) -> tuple[dict[str, str], str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.show()[0].get("JobState") in (
                "PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            time.sleep(0.3)
        return self.show()

    def error_lines(self, fields) -> list[str]:
        assert os.stat(fields["StdErr"]).st_uid == self.owner.pw_uid
        return open(fields["StdErr"]).read().splitlines()


def test_a_requeued_then_failed_job_says_why_at_each_step(private_slurm, owner):
    d, env = private_slurm
    job = PrivateJob(private_slurm, owner)

    # First attempt: the broker cannot be reached (infrastructure): requeued, the reason in the Comment.
    fields, comment = job.wait_requeued("1")
    assert fields["Restarts"] == "1" and fields["JobState"] == "PENDING", (fields, comment)
    assert comment.startswith("vtorque: requeued (1 of 1): broker unreachable"), comment
    assert comment.endswith(" | your comment: my run 7")
    assert job.as_owner("squeue", "-h", "-j", job.id, "-o", "%k").stdout.strip() == comment
    assert not os.path.exists(fields["StdErr"])  # the batch step has not run: nothing to deliver yet

    # Second (last) attempt: refused; the batch step runs as the owner and says why.
    job.start_now()
    fields, comment = job.wait_done()
    assert comment.startswith("vtorque: not started: broker unreachable"), comment
    assert "(after 1 requeue)" in comment and comment.endswith(" | your comment: my run 7")
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] == "1:0", fields
    reason = comment[len("vtorque: not started: "):].partition(" | your comment: ")[0]
    assert job.error_lines(fields) == [f"vtorque: job {job.id} did not start: {reason}"]
    log = (d / "log" / "slurmctld.log").read_text()
    assert "EpilogSlurmctld killed" not in log and "PrologSlurmctld killed" not in log


def test_a_prolog_timeout_below_the_hooks_wait_is_not_an_endless_loop(broker_url, node_name, owner):
    """PrologEpilogTimeout=15 with hooks.prologue_timeout = 240 (its default): the node has a "node worker"
    (a consumer that never answers), so the hook waits for a plan that never comes. It must stop before Slurm
    kills it (15 s), count the attempt, and end the job with the reason after hooks.max_requeues, instead of
    being killed at 15 s on every attempt forever (issue 12)."""
    import pika

    from vtorque.shared.bus import node_queue

    host = os.uname().nodename.split(".")[0]  # the private slurmd's node; its queue lives on the test vhost
    worker = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        channel = worker.channel()
        channel.queue_declare(node_queue(host).name, durable=False, auto_delete=True)
        channel.basic_consume(node_queue(host).name, on_message_callback=lambda *a: None)
        with running_private_slurm(prolog_timeout=15, broker_url=broker_url) as site:
            job = PrivateJob(site, owner)
            t0 = time.monotonic()
            fields, comment = job.wait_requeued("1", timeout=40)
            first = time.monotonic() - t0
            assert comment.startswith("vtorque: requeued (1 of 1): timed out after "), comment
            assert first < 15, f"the first attempt took {first:.1f} s"  # ended before Slurm's kill
            job.start_now()
            fields, comment = job.wait_done(timeout=60)
            assert comment.startswith("vtorque: not started: timed out after "), comment
            assert fields["JobState"] == "FAILED", fields
            assert job.error_lines(fields) == [
                f"vtorque: job {job.id} did not start: "
                f"{comment[len('vtorque: not started: '):].partition(' | your comment: ')[0]}"]
            log = (site[0] / "log" / "slurmctld.log").read_text()
            # Slurm's own words for a hook it killed (its timeout SIGKILLs): none.
            assert "killed by signal" not in log and "slurmctld JobId=" + job.id + " timed out" not in log, log[-1500:]
            print(f"\nPrologEpilogTimeout=15: first attempt requeued after {first:.1f} s, job FAILED with the reason")
    finally:
        worker.close()


# -- a node without a node worker, against the real broker (the session's own vhost) -------------------------

def test_a_node_without_a_node_worker_fails_at_once_on_the_real_broker(broker_url, node_name):
    """The Slurm hook's channel: one node has a consumer on its queue, the other none (never declared): the
    hook learns it before it publishes anything, in about the grace, not after the whole prologue wait."""
    import pika

    from vtorque.hooks import slurm
    from vtorque.shared.bus import node_queue
    from vtorque.shared.hook_channel import BrokerUnreachable

    worker = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        channel = worker.channel()
        channel.queue_declare(node_queue(node_name).name, durable=True)  # as a node worker would, unbound here
        channel.basic_consume(node_queue(node_name).name, on_message_callback=lambda *a: None)
        absent = f"{node_name}x"
        t0 = time.monotonic()
        with pytest.raises(BrokerUnreachable, match=f"no node worker is running on {absent} "):
            slurm.slurm_channel_factory([node_name, absent], grace=1.0)(broker_url, [])
        assert time.monotonic() - t0 < 5
        slurm.slurm_channel_factory([node_name], grace=1.0)(broker_url, []).close()  # a worker: no complaint
    finally:
        worker.close()
