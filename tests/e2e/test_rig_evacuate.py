"""Away from degrading hardware, automatically (issue 14 item 4; cli/evacuate.py) on the cluster rig.

`vtorque evacuate --watch` runs on the head host as an operator would run it (as a service). The operator drains
c2 in Slurm with a reason, as a site health check would: the watcher sees it within a round, moves the 2-host
job's guest on c2 live to c1 (a node the job holds) while a counter in it keeps counting, and the job's owner
reads what happened and why in its Comment; the job completes. A job with no other node to go to is requeued
and starts again on the healthy host. Nothing is left behind."""

from __future__ import annotations

import subprocess
import time
import uuid

import pytest

from .rig_support import FaultJob, cancel_unfinished, domains, leftovers, wait_nothing_left
from .test_rig import PREFIX, RIG, RIG_DIR, cluster, on  # noqa: F401 - the rig, up for this module
from .test_rig_migrate import COUNTER, MigrateJob, counts, in_guest, job_key

pytestmark = [pytest.mark.slow]

REASON = "ECC errors on DIMM 3 (test)"


def watcher() -> subprocess.Popen:
    """`vtorque evacuate --watch` on head, as its service would run; bounded by `timeout` should the test die."""
    return subprocess.Popen([str(RIG), "exec", "head", "env", f"PATH={PREFIX}/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                             "timeout", "300", "vtorque", "evacuate", "--watch", "--interval", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop(watch: subprocess.Popen) -> tuple[str, str]:
    on("head", "pkill", "-TERM", "-f", "vtorque evacuate --watch", check=False)  # inside head's namespaces
    return watch.communicate(timeout=30)


def drain(node: str) -> None:
    on("head", "scontrol", "update", f"NodeName={node}", "State=DRAIN", f"Reason={REASON}")


@pytest.fixture
def healthy_again(cluster):  # noqa: F811 - the fixture imported above
    yield
    cancel_unfinished()
    for node in ("c1", "c2"):
        on("head", "scontrol", "update", f"NodeName={node}", "State=RESUME", check=False)


def comment_of(job: FaultJob) -> str:
    return on("head", "squeue", "-h", "-j", job.id, "-o", "%k").stdout.strip()


def field(show: str, key: str) -> str:
    return next((w.partition("=")[2] for w in show.split() if w.startswith(f"{key}=")), "")


def test_a_drained_nodes_guest_moves_to_a_healthy_node_of_its_job_and_the_owner_is_told(healthy_again):
    job = MigrateJob(pings=60)
    job.wait_ready("c1")
    job.wait_ready("c2")
    moving = job.guest("c2")
    key = job_key(job.id)
    in_guest("c2", moving, key, COUNTER)
    time.sleep(3)
    before = counts(in_guest("c2", moving, key, "cat /tmp/count"))

    # an ordinary user may not
    refused = on("head", "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "vtorque", "evacuate",
                 check=False)
    assert refused.returncode != 0 and "only root" in refused.stderr, refused
    # a node the scheduler has not taken out is refused: the scheduler stays the one source of truth
    healthy = on("head", "vtorque", "evacuate", "c2", check=False)
    assert healthy.returncode != 0 and "not taken out in the scheduler: drain it first" in healthy.stderr, healthy

    watch = watcher()
    try:
        drained = time.monotonic()
        drain("c2")
        job.wait("the guest on c1", lambda: moving in on("c1", "virsh", "-q", "list", "--name").stdout.split(),
                 timeout=180, every=0.5)
        job.wait("nothing of it on c2", lambda: moving not in domains("c2"), timeout=60, every=0.5)
        took = time.monotonic() - drained
        job.wait("the owner told", lambda: "moved live" in comment_of(job), timeout=30, every=0.5)
        job.wait("c2 out of the job's allocation", lambda: field(job.show(), "NodeList") == "c1", timeout=30)
    finally:
        out, err = stop(watch)
    print(out, err, f"drain -> moved in {took:.1f}s")
    assert f"{moving}: c2 -> c1" in out, out + err
    # the owner's word, in the job's Comment: what, where and why
    comment = comment_of(job)
    assert comment.startswith(f"vtorque: node c2 was taken out ({REASON}") and "moved live to c1" in comment, comment

    # nothing of the job runs on c2 any more: Slurm takes c2 from the job, and the drain completes at once
    # (DRAINED: the operator may take it out now, not at the job's end)
    job.wait("c2 drained", lambda: on("head", "sinfo", "-h", "-n", "c2", "-o", "%T").stdout.strip() == "drained",
             timeout=60, every=0.5)
    assert "node c2 taken out of its allocation" in out, out

    # the same guest ran on: its counter has no gap
    after = counts(in_guest("c1", moving, key, "cat /tmp/count"))
    assert [i for i, _ in after] == list(range(1, len(after) + 1)) and len(after) > len(before), (before, after)
    show = job.wait_done(timeout=240)
    assert "JobState=COMPLETED" in show, show
    wait_nothing_left(job)
    assert not leftovers(job)


class OneNodeJob(FaultJob):
    """A 1-host VM job whose script runs for `seconds` (vsub on head, the tiny guest)."""

    def __init__(self, seconds: int):
        self.dir = RIG_DIR / "jobs" / f"test-rig-{uuid.uuid4().hex[:8]}"
        self.dir.mkdir(parents=True)
        self.dir.chmod(0o755)
        (self.dir / "job.sh").write_text(f"#!/bin/sh\necho \"EVAC-RAN on $(hostname)\"\nsleep {seconds}\n"
                                         "echo EVAC-END\n")
        self.submitted = time.monotonic()
        proc = on("head", "vsub", "-l", "nodes=1", "-vm", "img=tiny", "job.sh", cwd=self.dir)
        self.id = proc.stdout.strip()
        assert self.id.isdigit(), proc.stdout + proc.stderr
        FaultJob.submitted_jobs.append(self)


def test_a_job_with_nowhere_to_move_is_requeued_and_starts_again_on_a_healthy_node(healthy_again):
    job = OneNodeJob(seconds=40)
    job.wait("running", lambda: field(job.show(), "JobState") == "RUNNING", timeout=180, every=0.5)
    node = field(job.show(), "NodeList")
    other = "c1" if node == "c2" else "c2"
    job.wait_ready(node)
    drain(node)
    done = on("head", "vtorque", "evacuate", node, timeout=120, check=False)
    print(done.stdout, done.stderr)
    assert done.returncode == 0, done
    assert "requeued, no healthy node of the job to move to: it holds no other node" in done.stdout, done.stdout
    show = job.show()
    assert field(show, "Restarts") == "1", show
    assert f"node {node} was taken out ({REASON}" in comment_of(job)
    # Slurm holds a requeued job back (BeginTime, ~2 min): the operator lets it go now
    job.wait("pending again", lambda: field(job.show(), "JobState") == "PENDING", timeout=120, every=0.5)
    on("head", "scontrol", "update", f"JobId={job.id}", "StartTime=now")
    job.wait(f"running on {other}", lambda: field(job.show(), "JobState") == "RUNNING"
             and field(job.show(), "NodeList") == other, timeout=180, every=0.5)
    show = job.wait_done(timeout=300)
    assert "JobState=COMPLETED" in show, show
    assert f"vt-{job.id}-{node}-0" not in domains(node)
    wait_nothing_left(job)
