"""What the rig's fault tests (test_rig_faults.py) share beyond test_rig.py's helpers: a VM job with a script of
their own, when its guests boot and become ready, what the services consume, and what a job leaves behind.

The rig itself (its fixture `cluster`, `rig`, `on`, `queues`) is test_rig.py's, imported, not copied: one rig
definition for every rig test."""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from .test_rig import COMPUTE, HOSTS, PREFIX, RIG, RIG_DIR, on, queues, rig  # noqa: F401 - re-exported

# The rig's node workers run with the default [node] reconcile_interval (shared/config.py).
RECONCILE_PERIOD = 30.0
SERVICES = [("head", "bridge"), ("head", "stager"), *((c, "node-worker") for c in COMPUTE)]


def script(sleep: float) -> str:
    """Prints where it ran and the node file, then keeps the job running `sleep` s (a fault lands mid-job)."""
    return f"""#!/bin/sh
echo "RIG-JOB-RAN on $(hostname)"
cat "$PBS_NODEFILE"
sleep {sleep}
echo RIG-JOB-END
"""


class FaultJob:
    """A 2-host VM job (vsub on head, the tiny guest, one guest on each compute host)."""

    submitted_jobs: list[FaultJob] = []

    def __init__(self, sleep: float = 0):
        self.dir = RIG_DIR / "jobs" / f"test-rig-{uuid.uuid4().hex[:8]}"
        self.dir.mkdir(parents=True)
        self.dir.chmod(0o755)
        (self.dir / "job.sh").write_text(script(sleep))
        self.submitted = time.monotonic()
        proc = on("head", "vsub", "-l", "nodes=2", "-vm", "img=tiny", "job.sh", cwd=self.dir)
        self.id = proc.stdout.strip()
        assert self.id.isdigit(), proc.stdout + proc.stderr
        FaultJob.submitted_jobs.append(self)

    def guest(self, host: str) -> str:
        return f"vt-{self.id}-{host}-0"

    def guests(self) -> list[str]:
        return [self.guest(c) for c in COMPUTE]

    def domain_exists(self, host: str) -> bool:
        return self.guest(host) in domains(host)

    def ready_file(self, host: str) -> Path:
        """Written by the node worker when its guest is ready (sshd answers), removed at teardown."""
        return RIG_DIR / "hosts" / host / "vtorque" / "lib" / "jobs" / self.id / f"{self.guest(host)}.json"

    def wait(self, what: str, cond, timeout: float = 180.0, every: float = 0.1) -> float:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                return time.monotonic()
            time.sleep(every)
        pytest.fail(f"job {self.id}: {what} not seen after {timeout:.0f}s: {self.show()}")

    def wait_booting(self, host: str = "c1") -> float:
        return self.wait(f"a guest booting on {host}", lambda: self.domain_exists(host))

    def wait_ready(self, host: str, timeout: float = 180.0) -> float:
        return self.wait(f"{self.guest(host)} ready", lambda: self.ready_file(host).exists(), timeout)

    def running(self) -> bool:
        return self.id in on("head", "squeue", "-h", "-o", "%i").stdout.split()

    def show(self) -> str:
        return on("head", "scontrol", "show", "job", self.id, check=False).stdout

    def wait_done(self, timeout: float = 300.0) -> str:
        self.wait("the job's end", lambda: not self.running(), timeout, every=0.5)
        return self.show()

    def output(self, kind: str = "o") -> str:
        f = self.dir / f"job.sh.{kind}{self.id}"
        return f.read_text() if f.exists() else ""

    def boots(self, host: str) -> int:
        """How often the guest's QEMU was started on that host (libvirt's per-domain log)."""
        log = RIG_DIR / "hosts" / host / "log" / "libvirt" / "qemu" / f"{self.guest(host)}.log"
        return log.read_text().count("starting up") if log.exists() else 0

    def outcome(self) -> str:
        """'completed' (ran once, its output is the script's), 'completed after N requeue(s)', or 'failed:
        <reason the user reads>'; anything else (failed without a word to the user, wrong output) fails here."""
        show = self.wait_done()
        restarts = re.search(r"Restarts=(\d+)", show)
        if "JobState=COMPLETED" in show and restarts and restarts.group(1) != "0":
            # requeued by its prologue: Slurm gives the owner's Comment back once the job starts, so the reasons
            # are taken from the services' logs (the bridge's rejections, the node workers' failed guests)
            return f"completed after {restarts.group(1)} requeue(s): {'; '.join(self.failures()) or 'no reason logged'}"
        if "JobState=COMPLETED" in show:
            assert "ExitCode=0:0" in show, show
            out = self.output()
            assert f"RIG-JOB-RAN on {self.guest('c1')}" in out and "RIG-JOB-END" in out, out
            assert sorted(out.split()[-3:-1]) == self.guests(), out  # the node file names both hosts' guests
            return "completed"
        # A failure the user can read: the launcher prints the hook's reason into the job's own error file.
        err = self.output("e")
        reason = re.search(r"vtorque: job \S+ did not start: (.+)", err)
        assert "JobState=FAILED" in show and reason, f"job {self.id} neither completed nor told why: {show}\n{err}"
        return f"failed: {reason.group(1)}"


    def failures(self) -> list[str]:
        out = []
        for h, s in SERVICES:
            out += [f"{h}/{s}: {line['msg']}: {line.get('reason')}" for line in log_lines(h, s)
                    if line.get("job_id") == self.id and line.get("msg") in ("job rejected", "guest failed")]
        return out


def domains(host: str) -> list[str]:
    return on(host, "virsh", "-q", "-c", "qemu:///system", "list", "--all", "--name").stdout.split()


def leftovers(job: FaultJob) -> list[str]:
    """Whatever of the job is still on its hosts: domains, guest directories (disk and RAM disk), ready files."""
    left = []
    for c in COMPUTE:
        left += [f"{c}: domain {d}" for d in domains(c) if d.startswith(f"vt-{job.id}-")]
        for root in (RIG_DIR / "hosts" / c / "vtorque" / "lib" / "guests", Path(f"/dev/shm/vtorque-rig-{c}/guests")):
            left += [f"{c}: guest dir {p}" for p in root.glob(f"vt-{job.id}-*")] if root.exists() else []
        jobs = RIG_DIR / "hosts" / c / "vtorque" / "lib" / "jobs" / job.id
        left += [f"{c}: ready file {p.name}" for p in jobs.glob("*.json")] if jobs.exists() else []
    return left


def wait_nothing_left(job: FaultJob, period: float = RECONCILE_PERIOD) -> float:
    """Seconds after the job's end until nothing of it is left; fails after one reconcile period (+ 5 s for a
    round that started just before the job ended and the removal itself)."""
    t0 = time.monotonic()
    while left := leftovers(job):
        assert time.monotonic() - t0 < period + 5, f"left after one reconcile period ({period:.0f}s): {left}"
        time.sleep(0.5)
    return time.monotonic() - t0


def consumers(via: str) -> dict[str, int]:
    """Consumers per service queue, as one broker node reports them. The hooks' own queues come and go with
    jobs; the bridge's heartbeat queue is named anew by each bridge process."""
    out = {}
    for name, q in queue_stats(via).items():
        if name.startswith("vtorque.hook."):
            continue
        out[re.sub(r"^vtorque\.bridge\.nodes\..*", "vtorque.bridge.nodes.*", name)] = q["consumers"]
    return out


def missing_consumers(baseline: dict[str, int], via: str) -> dict[str, tuple[int, int]]:
    now = consumers(via)
    return {q: (n, now.get(q, 0)) for q, n in baseline.items() if now.get(q, 0) < n}


def wait_consuming(baseline: dict[str, int], via: str, timeout: float) -> float:
    """Seconds until every queue has at least its baseline's consumers again (each consumer thread of every
    service is back); fails after `timeout`."""
    t0 = time.monotonic()
    while True:
        try:
            missing = missing_consumers(baseline, via)
        except AssertionError as exc:  # rabbitmqctl on a node still starting
            missing = {"rabbitmqctl": str(exc)[:200]}
        if not missing:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, (
            f"consumers missing {timeout:.0f}s later (queue: before, now): {missing}")
        time.sleep(0.25)


def service_pids() -> dict[str, str]:
    """The process of each vtorque service (the child of its supervisor): a service that died and was restarted
    by supervise.sh has a new one."""
    pids = {}
    for h, s in SERVICES:
        sup = (RIG_DIR / "hosts" / h / f"vtorque-{s}.pid").read_text().strip()
        pids[f"{h}/{s}"] = subprocess.run(["pgrep", "-P", sup, "-f", f"vtorque run {s}"], capture_output=True,
                                          text=True).stdout.strip()
    return pids


def log_lines(host: str, service: str, offset: int = 0) -> list[dict]:
    text = (RIG_DIR / "hosts" / host / "log" / f"rig-vtorque-{service}.log").read_text()[offset:]
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # supervise.sh's own lines, a traceback's
    return out


def log_size(host: str, service: str) -> int:
    return len((RIG_DIR / "hosts" / host / "log" / f"rig-vtorque-{service}.log").read_text())


def heartbeat_ages(via: str = "head") -> dict[str, float]:
    """Seconds since each node's latest heartbeat (the retained ones in vtorque.nodes, as `vtorque nodes`
    reads them; one older than three intervals has expired there and the node is missing)."""
    now = datetime.now(UTC)
    ages = {}
    for line in on(via, "vtorque", "nodes", "--json").stdout.splitlines():
        beat = json.loads(line)
        ages[beat["node"]] = (now - datetime.fromisoformat(beat["created_at"].replace("Z", "+00:00"))).total_seconds()
    return ages


def queue_stats(via: str = "head") -> dict[str, dict]:
    out = on(via, "rabbitmqctl", "-q", "list_queues", "-p", "vtorque", "name", "messages", "consumers",
             "--formatter", "json").stdout
    return {q["name"]: q for q in json.loads(out)}


def dead_letters() -> list[str]:
    """Every message a service dead-lettered (bus.py logs each, with its reason). Not vtorque.dead's depth: the
    broker dead-letters there too (a quorum queue's message past its delivery limit, not a service's doing)."""
    return [f"{h}/{s}: {line.get('reason')}" for h, s in SERVICES for line in log_lines(h, s)
            if line.get("msg") == "dead-lettering a message"]


def cancel_unfinished() -> list[str]:
    """scancel every fault job still queued or running (a failed test's), so it cannot run into the next test
    (a requeued job starts again two minutes later, on the same hosts)."""
    left = [job.id for job in FaultJob.submitted_jobs if job.running()]
    if left:
        on("head", "scancel", *left, check=False)
    FaultJob.submitted_jobs.clear()
    return left
