"""Live migration on the cluster rig (issue 14 item 3; deploy/rig/rig.sh, services/node_worker/migrate.py):
`vtorque migrate JOBID --from c2 --to c1` moves a running job's guest between two rig hosts' libvirtds (TLS,
peer to peer, the overlay's blocks by NBD) while programs in it keep running.

The job holds c1 and c2 (one tiny guest on each); c1 is the node the scheduler gave the job that the guest
moves to. While guest 0's job script pings guest 1 over the job network every second, and a counter started
in guest 1 counts every second into a file of its own, guest 1 moves from c2 to c1. Then: the guest runs on c1
and nothing of it is left on c2 (domain, directory, job file, the job's network there); its counter has no
gap and its kernel's uptime went on (the same running guest, not a new boot); the job's pings carried on (its
private network followed the guest); the trace has the move with its pre-copy rounds and its downtime; the job
completes and nothing of it is left after its end. An ordinary user's `vtorque migrate` is refused with one
line, and a target the job does not hold is refused."""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid

import pytest

from vtorque.services.node_worker.reconcile import GRACE

from .rig_support import (
    RECONCILE_PERIOD,
    FaultJob,
    cancel_unfinished,
    consumers,
    domains,
    leftovers,
    wait_consuming,
    wait_nothing_left,
)
from .test_rig import PREFIX, RIG, RIG_DIR, cluster, on, rig  # noqa: F401 - the rig, up for this module

pytestmark = [pytest.mark.slow]

PINGS = 45


def script(pings: int) -> str:
    """Guest 0 pings the job's second guest once a second over the job network, `pings` times."""
    return f"""#!/bin/sh
echo "MIG-JOB-RAN on $(hostname)"
peer=$(sed -n 2p "$PBS_NODEFILE")
ping -c {pings} -W 2 "$peer"
echo MIG-JOB-END
"""
# In the background, out of the ssh session's reach (its end hangs up the session: SIGHUP ignored, no terminal).
COUNTER = ("trap '' HUP; (i=0; while :; do i=$((i+1)); echo \"$i $(cut -d' ' -f1 /proc/uptime)\" >> /tmp/count; "
           "sleep 1; done) </dev/null >/dev/null 2>&1 &")


class MigrateJob(FaultJob):
    """A 2-host VM job whose script pings its second guest over the job network (vsub on head, the tiny guest)."""

    def __init__(self, pings: int = PINGS):
        self.dir = RIG_DIR / "jobs" / f"test-rig-{uuid.uuid4().hex[:8]}"
        self.dir.mkdir(parents=True)
        self.dir.chmod(0o755)
        (self.dir / "job.sh").write_text(script(pings))
        self.submitted = time.monotonic()
        proc = on("head", "vsub", "-l", "nodes=2", "-vm", "img=tiny", "job.sh", cwd=self.dir)
        self.id = proc.stdout.strip()
        assert self.id.isdigit(), proc.stdout + proc.stderr
        FaultJob.submitted_jobs.append(self)


def job_key(job_id: str) -> str:
    """The job's private key as root's home on the rig hosts names it (vsub keeps it there: `job` says whose)."""
    keys = RIG_DIR / "shared" / "root-home" / ".vtorque" / "keys"
    # the newest: the rig's Slurm numbers jobs from 1 again at every `up`, and root's home is kept
    mine = sorted((d for d in keys.iterdir() if (d / "job").exists() and (d / "job").read_text().strip() == job_id),
                  key=lambda d: d.stat().st_mtime)
    if not mine:
        pytest.fail(f"no key of job {job_id} in {keys}")
    return f"/root/.vtorque/keys/{mine[-1].name}/id_ed25519"


def in_guest(host: str, guest: str, key: str, command: str) -> str:
    """A command in the guest as root, through its ssh link on the host it runs on."""
    code = ("import subprocess, sys; from vtorque.cli.launcher_ssh import ssh_argv; "
            f"p = subprocess.run(ssh_argv({key!r}, '/var/lib/vtorque/guests/{guest}/ssh.sock', 'root', "
            f"{command!r}), capture_output=True, text=True, timeout=40); "
            "sys.stdout.write(p.stdout); sys.stderr.write(p.stderr); sys.exit(p.returncode)")
    return on(host, "python", "-c", code, timeout=60).stdout


def counts(text: str) -> list[tuple[int, float]]:
    return [(int(a), float(b)) for a, b in re.findall(r"^(\d+) ([0-9.]+)$", text, re.M)]


@pytest.fixture
def no_job_left_behind(cluster):  # noqa: F811 - the fixture imported above
    yield
    cancel_unfinished()


def test_a_running_guest_moves_to_another_node_of_its_job_and_keeps_running(no_job_left_behind):
    job = MigrateJob()
    job.wait_ready("c1")
    job.wait_ready("c2")
    moving = job.guest("c2")
    key = job_key(job.id)
    in_guest("c2", moving, key, COUNTER)
    time.sleep(4)
    before = counts(in_guest("c2", moving, key, "cat /tmp/count"))
    assert before, "the counter did not start"

    # an ordinary user is refused, with one line and a non-zero exit
    refused = on("head", "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "vtorque", "migrate",
                 job.id, "--from", "c2", "--to", "c1", check=False)
    assert refused.returncode != 0 and "only root" in refused.stderr, refused
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    # a target the job does not hold is refused before anything moves
    elsewhere = on("head", "vtorque", "migrate", job.id, "--from", "c2", "--to", "c9", check=False)
    assert elsewhere.returncode != 0 and "not one of the job's nodes" in elsewhere.stderr, elsewhere

    t0 = time.monotonic()
    moved = on("head", "vtorque", "migrate", job.id, "--from", "c2", "--to", "c1", timeout=300)
    took = time.monotonic() - t0
    print(moved.stdout, moved.stderr, f"vtorque migrate took {took:.2f}s")
    line = re.search(rf"{moving}: c2 -> c1 in ([0-9.]+)s, downtime (\d+) ms, (\d+) pre-copy rounds", moved.stdout)
    assert line, moved.stdout + moved.stderr

    # where it runs: on c1 only; nothing of it left on c2
    assert moving in on("c1", "virsh", "-q", "list", "--name").stdout.split()
    assert moving not in domains("c2")
    assert not (RIG_DIR / "hosts" / "c2" / "vtorque" / "lib" / "guests" / moving).exists()
    assert not (RIG_DIR / "hosts" / "c2" / "vtorque" / "lib" / "jobs" / job.id / f"{moving}.json").exists()
    doc = json.loads((RIG_DIR / "hosts" / "c1" / "vtorque" / "lib" / "jobs" / job.id / f"{moving}.json").read_text())
    assert doc["node"] == "c1" and doc["guest"] == moving
    assert "vtj" not in on("c2", "ip", "-br", "link").stdout  # the job's network there went with its last guest

    # the same guest ran on: its counter has no gap, its uptime went on, and it still counts
    time.sleep(3)
    after = counts(in_guest("c1", moving, key, "cat /tmp/count"))
    assert [i for i, _ in after] == list(range(1, len(after) + 1)), after
    assert len(after) > len(before) + 2 and after[-1][1] > before[-1][1], (before, after)
    gaps = [b[1] - a[1] for a, b in zip(after, after[1:], strict=False)]
    print(f"counter: {len(after)} counts, largest gap {max(gaps):.2f}s of guest uptime")

    # the job's pings over its network carried on, the job ends as it should, and nothing of it is left
    show = job.wait_done(timeout=240)
    out = job.output()
    print(out[-1500:])
    assert "JobState=COMPLETED" in show and "MIG-JOB-END" in out, show + out
    replies = re.findall(r"seq=(\d+) ttl", out)
    lost = PINGS - len(replies)
    print(f"pings answered {len(replies)} of {PINGS}")
    assert lost <= 3, out
    wait_nothing_left(job)
    assert not leftovers(job)

    # the trace: the move, its pre-copy rounds and its downtime (the source's node worker's spans)
    spans = []
    for f in (RIG_DIR / "hosts" / "c2" / "vtorque" / "lib" / "traces").glob("vtorque-node-worker.*.jsonl"):
        spans += [s for line in f.read_text().splitlines() for s in _spans(line)]
    move = [s for s in spans if s["name"] == "migrate guest"]
    assert move, [s["name"] for s in spans]
    events = [e["name"] for s in move for e in s.get("events", [])]
    assert "target ready" in events and "pre-copy round" in events and "downtime" in events, events


def _spans(line: str) -> list[dict]:
    try:
        doc = json.loads(line)
    except ValueError:
        return []
    return [s for rs in doc.get("resourceSpans", []) for ss in rs.get("scopeSpans", []) for s in ss.get("spans", [])]


# -- faults (issue 14 item 5): a move cut short leaves exactly one running copy and nothing else ----------------

LOAD = ("trap '' HUP; (while :; do dd if=/dev/zero of=/dev/shm/vt-load bs=1M count=64 2>/dev/null; done) "
        "</dev/null >/dev/null 2>&1 &")


def running(host: str) -> list[str]:
    return on(host, "virsh", "-q", "list", "--name").stdout.split()


def start_move(job: MigrateJob, source: str, target: str) -> subprocess.Popen:
    """`vtorque migrate` of the job's guest on `source`, in the background."""
    return subprocess.Popen([str(RIG), "exec", "head", "env", f"PATH={PREFIX}/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                             "vtorque", "migrate", job.id, "--from", source, "--to", target, "--guest",
                             job.guest(source)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_incoming(job: MigrateJob, guest: str, host: str, timeout: float = 60.0) -> None:
    """Until the incoming guest's domain exists on `host` (the move has started)."""
    job.wait("the incoming domain", lambda: guest in domains(host), timeout=timeout, every=0.1)


def test_the_targets_node_worker_killed_mid_move_leaves_the_guest_running_there_and_kept(no_job_left_behind):
    job = MigrateJob(pings=90)
    job.wait_ready("c1")
    job.wait_ready("c2")
    guest = job.guest("c2")
    move = start_move(job, "c2", "c1")
    wait_incoming(job, guest, "c1")
    rig("kill", "c1", "node-worker")  # SIGKILL; its supervisor starts it again after 1 s
    out, err = move.communicate(timeout=400)
    print(out, err)
    # libvirtd finished the move on its own: one running copy, on the target
    assert move.returncode == 0 and f"{guest}: c2 -> c1" in out, out + err
    assert guest in running("c1") and guest not in domains("c2")
    assert not (RIG_DIR / "hosts" / "c2" / "vtorque" / "lib" / "guests" / guest).exists()
    # the restarted worker's reconciliation keeps it (a guest of a running job, ready: its job file is there)
    time.sleep(RECONCILE_PERIOD + 5)
    assert guest in running("c1"), "the migrated guest was reconciled away"
    assert (RIG_DIR / "hosts" / "c1" / "vtorque" / "lib" / "jobs" / job.id / f"{guest}.json").exists()
    show = job.wait_done(timeout=240)
    assert "JobState=COMPLETED" in show, show + job.output()
    wait_nothing_left(job)


def test_a_move_to_a_target_cut_off_the_network_leaves_the_guest_running_where_it_was(no_job_left_behind):
    baseline = consumers("head")
    job = MigrateJob(pings=150)
    job.wait_ready("c1")
    job.wait_ready("c2")
    guest, key = job.guest("c2"), job_key(job.id)
    in_guest("c2", guest, key, LOAD)
    time.sleep(2)
    move = start_move(job, "c2", "c1")
    wait_incoming(job, guest, "c1")
    rig("link-down", "c1")
    cut = time.monotonic()
    try:
        out, err = move.communicate(timeout=400)
    finally:
        print(f"vtorque migrate returned {time.monotonic() - cut:.1f}s after the cut")
        rig("link-up", "c1")
    # c1's node worker lost its broker connection with the link: it is back by itself (the next test's job
    # would otherwise be requeued by its prologue for want of a consumer on c1's queue)
    print(f"every consumer back {wait_consuming(baseline, via='head', timeout=240):.1f}s after the link came up")
    print(out, err)
    assert move.returncode != 0 and "not moved" in err, out + err
    # one running copy: the source's; the target's incoming domain and what its worker made go
    assert guest in running("c2")
    job.wait("the target's incoming domain gone", lambda: guest not in domains("c1"), timeout=120, every=0.5)
    job.wait("the target's made-ready directory gone",
             lambda: not (RIG_DIR / "hosts" / "c1" / "vtorque" / "lib" / "guests" / guest).exists(),
             timeout=RECONCILE_PERIOD + 130, every=0.5)
    assert guest in running("c2")
    on("head", "scancel", job.id)
    job.wait_done(timeout=240)
    wait_nothing_left(job)


def test_the_sources_node_worker_killed_mid_move_leaves_one_running_copy_and_nothing_else(no_job_left_behind):
    """The source's worker drives the move (libvirt peer to peer from its libvirtd): killed mid-move, whichever
    way the move ends, exactly one copy of the guest runs, on one host, with its files there and none on the
    other once reconciliation has been round; the job completes."""
    job = MigrateJob(pings=240)  # running past the CLI's wait and a reconcile period
    job.wait_ready("c1")
    job.wait_ready("c2")
    guest = job.guest("c2")
    move = subprocess.Popen([str(RIG), "exec", "head", "env", f"PATH={PREFIX}/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                             "vtorque", "migrate", job.id, "--from", "c2", "--to", "c1", "--timeout", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_incoming(job, guest, "c1")
    rig("kill", "c2", "node-worker")  # SIGKILL; its supervisor starts it again after 1 s
    out, err = move.communicate(timeout=400)
    print(out, err, f"vtorque migrate exit {move.returncode}")

    def where() -> list[str]:
        return [h for h in ("c1", "c2") if guest in running(h)]

    job.wait("one running copy", lambda: len(where()) == 1, timeout=120, every=0.5)
    time.sleep(RECONCILE_PERIOD + 5)  # the restarted worker's reconciliation has been round, and the target's
    (host,) = where()
    other = "c2" if host == "c1" else "c1"
    print(f"the guest runs on {host}")
    assert guest not in domains(other), f"a second, defined copy on {other}"
    # The files the killed worker did not remove: reconciliation's, once they are past its grace (two minutes
    # after the guest's boot wrote them: a directory without a domain may be a boot's) and a period.
    job.wait(f"the guest's directory on {other} removed",
             lambda: not (RIG_DIR / "hosts" / other / "vtorque" / "lib" / "guests" / guest).exists(),
             timeout=GRACE.total_seconds() + RECONCILE_PERIOD + 10, every=1.0)
    assert (RIG_DIR / "hosts" / host / "vtorque" / "lib" / "guests" / guest).exists()
    assert job.running(), "the job ended before the check"
    show = job.wait_done(timeout=400)
    assert "JobState=COMPLETED" in show, show + job.output()
    wait_nothing_left(job)
