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
PrologEpilogTimeout=60
NodeName={host} NodeAddr=127.0.0.1 CPUs=1 RealMemory=1000 State=UNKNOWN
PartitionName=batch Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""

# The real entry points, with this Slurm's and this test's config (PrologSlurmctld gets no environment).
HOOK_WRAPPER = """#!/bin/sh
export VTORQUE_CONFIG={d}/vtorque.toml SLURM_CONF={d}/etc/slurm.conf VTORQUE_SLURM_STATE={d}/state
exec {repo}/hooks/slurm/{name}
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def private_slurm():
    """slurmctld + slurmd of their own (own ports, state and spool; the stack's munge), whose hooks are
    vtorque's real entry points with a config whose broker cannot be reached: every attempt is an
    infrastructure failure. Stopped by their own PIDs."""
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
    conf.write_text(PRIVATE_CONF.format(host=host, ctld_port=_free_port(), slurmd_port=_free_port(), munge=munge, d=d))
    for name in ("prolog_slurmctld", "epilog_slurmctld"):
        (d / "hooks" / name).write_text(HOOK_WRAPPER.format(d=d, repo=repo, name=name))
        os.chmod(d / "hooks" / name, 0o755)
    tiny = load_config().images.catalog["tiny"]
    (d / "vtorque.toml").write_text(f"""state_dir = "{d}/var"
[broker]
url = "amqp://127.0.0.1:1//"
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


def test_a_requeued_then_failed_job_says_why_at_each_step(private_slurm, owner):
    from vtorque.shared.job_script import render_wrapper

    d, env = private_slurm
    script = d / "jobs" / "requeued.sh"
    script.write_text(render_wrapper("#!/bin/sh\necho never-runs\n", {"img": "tiny"}, "ssh-ed25519 AAAA test",
                                     str(d / "jobs" / "no-key"), None, f"{PREFIX}/venv/bin/vtorque-launch"))
    os.chmod(script, 0o755)
    user_env = [f"{k}={v}" for k, v in env.items()] + [f"HOME={owner.pw_dir}"]

    def as_owner(*argv):
        return subprocess.run(["runuser", "-u", owner.pw_name, "--", "env", "-i", *user_env, *argv],
                              cwd=d / "jobs", capture_output=True, text=True, timeout=60)

    def show():
        out = as_owner("scontrol", "show", "job", job_id).stdout
        return {k: v for k, _, v in (w.partition("=") for w in out.split()) if k in (
            "JobState", "Restarts", "ExitCode", "StdErr")}, next(
            (line.strip()[len("Comment="):] for line in out.splitlines() if line.strip().startswith("Comment=")), "")

    submitted = as_owner("sbatch", "--parsable", "--comment", "my run 7", "-o", str(d / "jobs" / "requeued.%j.out"),
                         "-e", str(d / "jobs" / "requeued.%j.err"), str(script))
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()

    # First attempt: the broker cannot be reached (infrastructure): requeued, the reason in the Comment.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (show()[0].get("Restarts"), show()[0].get("JobState")) != ("1", "PENDING"):
        time.sleep(0.3)  # (COMPLETING while its EpilogSlurmctld runs)
    fields, comment = show()
    assert fields["Restarts"] == "1" and fields["JobState"] == "PENDING", (fields, comment)
    assert comment.startswith("vtorque: requeued (1 of 1): broker unreachable"), comment
    assert comment.endswith(" | your comment: my run 7")
    squeued = as_owner("squeue", "-h", "-j", job_id, "-o", "%k").stdout.strip()
    assert squeued == comment
    assert not os.path.exists(fields["StdErr"])  # the batch step has not run: nothing to deliver yet

    # Second (last) attempt, without Slurm's requeue delay: refused; the batch step runs as the owner.
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env, check=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and show()[0].get("JobState") in ("PENDING", "CONFIGURING", "RUNNING",
                                                                                "COMPLETING"):
        time.sleep(0.3)
    fields, comment = show()
    assert comment.startswith("vtorque: not started: broker unreachable"), comment
    assert "(after 1 requeue)" in comment and comment.endswith(" | your comment: my run 7")
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] == "1:0", fields
    assert os.stat(fields["StdErr"]).st_uid == owner.pw_uid
    lines = open(fields["StdErr"]).read().splitlines()
    reason = comment[len("vtorque: not started: "):].partition(" | your comment: ")[0]
    assert lines == [f"vtorque: job {job_id} did not start: {reason}"], lines
    log = (d / "log" / "slurmctld.log").read_text()
    assert "EpilogSlurmctld killed" not in log and "PrologSlurmctld killed" not in log


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
