"""Suspend and resume through the scheduler (issue 14 item 1) on a real Slurm with a real guest: `vtorque suspend
JOBID` asks Slurm (`scontrol suspend`), the node worker's reconciler sees the job SUSPENDED and pauses the job's
guest (or saves it to disk, `[node] suspend = "save"`) within one reconcile period; the program in the guest (a
counter with its clock) does not advance while suspended; `vtorque resume` brings it back, the counter carries on
from where it stopped, and the guest's clock is the host's within a second. Saved memory is root's alone and
goes with the restore, or with the job when it ends suspended (teardown and reconciliation alike). An ordinary
user (the job's owner included) is refused by Slurm, in one line, and nothing happens to the guest.

The single-host stack's Slurm is not touched: this test starts a slurmctld and slurmd of its own (own ports,
state and spool, the stack's munge: tests/e2e/own_slurm.py), and stops them by their pids. The
node worker is a real one (no broker: its handlers are called with the commands, as in tests/security), with its
reconciler on a short period.

Boots guests and runs Slurm jobs: run under the lock,
    flock /tmp/vtorque-e2e.lock python -m pytest tests/e2e/test_suspend_resume.py
"""

from __future__ import annotations

import logging
import shutil
import stat
import subprocess
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import libvirt
import pytest
from security.conftest import base_image, make_site, users  # noqa: F401 - fixtures used here

from vtorque.cli.launcher_ssh import ssh_argv
from vtorque.services.node_worker.reconcile import Reconciler, scheduler_states
from vtorque.shared import messages as m
from vtorque.shared.config import SchedulerConfig
from vtorque.shared.scheduler import scheduler_for

from .conftest import PREFIX
from .own_slurm import HOST, OwnSlurm, own_slurm, slurm_conf

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.guest]

PERIOD = 2.0  # the test's reconcile period
SLURM_CONF = slurm_conf("vtsusp", """
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
""")
COUNTER = 'i=0; while :; do i=$((i + 1)); echo "$i $(date +%s)"; sleep 0.5; done'


@pytest.fixture(scope="module")
def our_slurm():
    with own_slurm(SLURM_CONF, "vtorque-suspslurm-") as slurm:
        yield slurm


class Node:
    """A node worker of the test's own (its guests' directories, its suspend directory) with its reconciler, and
    the site's scheduler: our own Slurm, or Torque's stand-ins."""

    def __init__(self, site, mode: str, scheduler: SchedulerConfig, env: dict, slurm: OwnSlurm | None = None):
        self.site, self.slurm, self.env = site, slurm, env
        site.config.node.suspend = mode
        site.config.node.reconcile_interval = PERIOD
        site.config.scheduler = scheduler
        self.toml = site.root / "vtorque.toml"
        binaries = "".join(f'{k} = "{v}"\n' for k in ("qstat", "qsig") if (v := getattr(scheduler, k)))
        self.toml.write_text(f'state_dir = "{site.config.state_dir}"\n[scheduler]\nkind = "{scheduler.kind}"\n'
                             f'{binaries}[node]\nreconcile_interval = {PERIOD}\n')
        self.toml.chmod(0o644)
        self.stop = threading.Event()
        self.reconciler = Reconciler(site.worker, self.stop, PERIOD, states=scheduler_states(site.config))

    def reconciling(self):
        """Its reconciler running while the test does (a fixture's body); then its guests and files gone."""
        self.reconciler.start()
        try:
            yield self
        finally:
            self.stop.set()
            self.reconciler.thread.join(30)
            for name in self.site.domains():
                self.site.worker.hv.remove(name)
            shutil.rmtree(self.site.root, ignore_errors=True)

    def job_state(self, job: str) -> str | None:
        info = scheduler_for(self.site.config).job(job)
        return None if info is None else info.state

    def vtorque(self, *args: str, user=None) -> subprocess.CompletedProcess:
        kw = {"user": user.uid, "group": user.gid, "extra_groups": [], "cwd": user.home} if user else {}
        env = {**self.env, "VTORQUE_CONFIG": str(self.toml)}
        return subprocess.run([f"{PREFIX}/venv/bin/vtorque", *args], env=env, capture_output=True, text=True,
                              timeout=60, **kw)

    def state(self, name: str) -> int | None:
        dom = self.site.worker.hv.lookup(name)
        return None if dom is None else dom.state()[0]

    def wait_state(self, name: str, want: int | None, timeout: float) -> float:
        t0 = time.monotonic()
        while self.state(name) != want:
            assert time.monotonic() - t0 < timeout, f"{name}: state {self.state(name)}, want {want}"
            time.sleep(0.05)
        return time.monotonic() - t0

    def wait_saved(self, name: str, timeout: float) -> float:
        """Shut off with its memory in its save file (libvirt says shut off moments before its save returns and
        the node worker gives the file its name)."""
        t0 = time.monotonic()
        self.wait_state(name, libvirt.VIR_DOMAIN_SHUTOFF, timeout)
        while not self.site.worker.suspender.path(name, ".save").exists():
            assert time.monotonic() - t0 < timeout, f"{name}: shut off, no save file"
            time.sleep(0.05)
        return time.monotonic() - t0


@pytest.fixture
def node(request, our_slurm, base_image, test_guest, monkeypatch):  # noqa: F811 - the fixture imported above
    monkeypatch.setenv("SLURM_CONF", our_slurm.env["SLURM_CONF"])  # the reconciler's scontrol asks our Slurm
    site = make_site(base_image, entry=test_guest, boot_timeout=150.0)
    n = Node(site, getattr(request, "param", "pause"), SchedulerConfig(kind="slurm"), our_slurm.env, our_slurm)
    yield from n.reconciling()


class Counter:
    """The guest's program: a counter with the guest's clock, read over the owner's ssh as it prints."""

    def __init__(self, owner, key: Path, sock: Path):
        self.lines: list[tuple[float, int, int]] = []  # (host time received, count, guest's time)
        self.proc = subprocess.Popen(ssh_argv(key, sock, owner.name, COUNTER), user=owner.uid, group=owner.gid,
                                     extra_groups=[], cwd=owner.home, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            count, guest_time = line.split()
            self.lines.append((time.time(), int(count), int(guest_time)))

    def since(self, t: float) -> list[tuple[float, int, int]]:
        return [entry for entry in self.lines if entry[0] >= t]

    def wait_count(self, more_than: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.lines or self.lines[-1][1] <= more_than:
            assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
            assert time.monotonic() < deadline, f"the counter stands at {self.lines[-1:]}"
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _key(user) -> Path:
    key = user.home / f"job_key_{uuid.uuid4().hex[:6]}"
    assert user.run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)).returncode == 0
    return key


def _job_with_a_guest(node: Node, owner, job: str | None = None) -> tuple[str, str, Counter]:
    if job is None:
        assert node.slurm is not None
        job = node.slurm.submit(owner, "-c", "1")
        node.slurm.wait_running(job)
    key = _key(owner)
    guest = node.site.plan(owner, job, vcpus=1, ssh_authorized_keys=[key.with_suffix(".pub").read_text().strip()])
    answers = node.site.boot(job, guest)
    assert len(answers) == 1 and isinstance(answers[0], m.GuestReady), answers
    counter = Counter(owner, key, Path(answers[0].address))
    counter.wait_count(3)
    return job, guest.name, counter


def _clock_behind(counter: Counter, after: float) -> float:
    """How far the guest's clock is behind the host's, from the counter's lines after `after`: each line's guest
    second is at most its host arrival time, later by the line's way here (ssh, a loaded box), so the least
    difference is the guest's lag, in [0, 1) for a guest whose clock is the host's (whole seconds)."""
    lines = counter.since(after)
    assert lines, "no line of the counter"
    return min(host - guest for host, _, guest in lines)


def _suspend_and_resume(node: Node, owner, paused_state: int | None, job: str | None = None) -> dict:
    job, name, counter = _job_with_a_guest(node, owner, job)
    try:
        # A cold guest starts with the host's time as its kernel read it from the RTC: whole seconds, so up to a
        # second behind, and the counter's `date +%s` truncates another (CI once saw 1.85 s here).
        assert -0.5 < _clock_behind(counter, 0) < 2.5
        asked = node.vtorque("suspend", job)
        assert asked.returncode == 0, asked.stderr
        assert node.job_state(job) == "suspended"
        took = (node.wait_saved(name, PERIOD + 30) if paused_state == libvirt.VIR_DOMAIN_SHUTOFF
                else node.wait_state(name, paused_state, PERIOD + 3))
        paused_at = time.time()
        count = counter.lines[-1][1]
        time.sleep(6)
        assert [c for _, c, _ in counter.since(paused_at + 1.0)] == []  # the program stood still
        assert node.job_state(job) == "suspended"
        back = node.vtorque("resume", job)
        assert back.returncode == 0, back.stderr
        resumed = node.wait_state(name, libvirt.VIR_DOMAIN_RUNNING, PERIOD + 30)
        at = time.time()
        counter.wait_count(count + 3)
        after = [c for _, c, _ in counter.since(at - 1.0)]
        assert after[0] <= count + 2, (count, after)  # carried on where it was, not from the start
        time.sleep(3)
        assert -0.5 < _clock_behind(counter, at + 2.5) < 1.5  # its clock set right (it stood still ~8 s)
        return {"job": job, "name": name, "counter": counter, "suspend_s": took, "resume_s": resumed}
    except BaseException:
        counter.stop()
        raise


def test_a_suspended_jobs_guest_pauses_and_carries_on_with_its_clock_set(node, users):  # noqa: F811 - fixture
    attacker, owner = users
    got = _suspend_and_resume(node, owner, libvirt.VIR_DOMAIN_PAUSED)
    got["counter"].stop()
    assert got["suspend_s"] <= PERIOD + 3
    # Nobody but Slurm's operators: neither another user nor the job's owner makes root pause the guest.
    for who in (attacker, owner):
        refused = node.vtorque("suspend", got["job"], user=who)
        assert refused.returncode != 0
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"Error: scontrol suspend {got['job']}: "), refused.stderr
    time.sleep(PERIOD + 1)
    assert node.slurm.state(got["job"]) == "RUNNING"
    assert node.state(got["name"]) == libvirt.VIR_DOMAIN_RUNNING
    node.slurm.run("scancel", got["job"])


def test_a_suspended_job_past_its_walltime_ends_as_slurm_says(node, users, caplog):  # noqa: F811 - fixture
    """Issue 14 item 5: a job with 60 s of walltime, suspended after 5 s and kept suspended until its walltime and
    the reconciler's grace have passed by the wall clock: its guest stays (paused), as Slurm keeps the job; once
    resumed, Slurm ends it when its 60 s of run time are used (TIMEOUT), and only then does its guest go, for
    that reason (not for its walltime: the time it spent suspended moved its end)."""
    _, owner = users
    grace = 40.0  # above slurmctld's 30 s between time-limit checks: its TIMEOUT comes first
    node.reconciler.grace = timedelta(seconds=grace)
    job = node.slurm.submit(owner, "-c", "1", "-t", "1")
    node.slurm.wait_running(job)
    start = datetime.now(UTC)
    key = _key(owner)
    guest = node.site.plan(owner, job, vcpus=1, ssh_authorized_keys=[key.with_suffix(".pub").read_text().strip()],
                           end_by=start + timedelta(seconds=60))
    (ready,) = node.site.boot(job, guest)
    assert isinstance(ready, m.GuestReady), ready
    time.sleep(5)
    assert node.vtorque("suspend", job).returncode == 0
    node.wait_state(guest.name, libvirt.VIR_DOMAIN_PAUSED, PERIOD + 3)
    past = start + timedelta(seconds=60 + grace + 3 * PERIOD)
    while datetime.now(UTC) < past:
        assert node.state(guest.name) == libvirt.VIR_DOMAIN_PAUSED, "removed while its job was suspended"
        time.sleep(1)
    assert node.job_state(job) == "suspended"
    caplog.set_level(logging.WARNING, logger="vtorque.node_worker.reconcile")
    assert node.vtorque("resume", job).returncode == 0
    node.wait_state(guest.name, libvirt.VIR_DOMAIN_RUNNING, PERIOD + 3)
    deadline = time.monotonic() + 180
    while (state := node.job_state(job)) in ("running", "suspended"):
        assert node.state(guest.name) == libvirt.VIR_DOMAIN_RUNNING, "removed before Slurm ended its job"
        assert time.monotonic() < deadline, "Slurm never ended the job"
        time.sleep(0.5)
    assert node.slurm.run("scontrol", "show", "job", job).stdout.split("JobState=")[1].split()[0] == "TIMEOUT", state
    node.wait_state(guest.name, None, PERIOD + 30)
    reasons = [r.fields.get("reason") for r in caplog.records if r.getMessage() == "reconcile: removing guest"
               and getattr(r, "fields", {}).get("guest") == guest.name]
    assert reasons == [f"job {job} is no longer running"], reasons


@pytest.mark.parametrize("node", ["save"], indirect=True)
def test_save_mode_frees_the_memory_keeps_it_root_only_and_removes_it(node, users):  # noqa: F811 - fixture
    _, owner = users
    suspender = node.site.worker.suspender
    job, name, counter = _job_with_a_guest(node, owner)
    try:
        asked = node.vtorque("suspend", job)
        assert asked.returncode == 0, asked.stderr
        node.wait_saved(name, PERIOD + 30)
        save = suspender.path(name, ".save")
        st, top = save.stat(), suspender.root.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600) and st.st_size > 16 << 20  # the guest's memory
        assert (top.st_uid, stat.S_IMODE(top.st_mode)) == (0, 0o700)
        assert name not in node.site.worker.hv.active_names()  # no QEMU: the node's memory is free
    finally:
        counter.stop()
    # The job ends while saved: its teardown (the epilogue's) removes the guest and its memory.
    node.slurm.run("scancel", job)
    node.site.worker.on_teardown_guests(m.TeardownGuests.new(job_id=job, deadline=60.0, node=node.site.node))
    for thread in node.site.worker.teardown_threads:
        thread.join(60)
    assert node.site.worker.hv.lookup(name) is None
    assert not save.exists() and not suspender.path(name, ".json").exists()


@pytest.mark.parametrize("node", ["save"], indirect=True)
def test_save_mode_restores_the_guest_and_its_program_carries_on(node, users):  # noqa: F811 - fixture
    _, owner = users
    got = _suspend_and_resume(node, owner, libvirt.VIR_DOMAIN_SHUTOFF)
    got["counter"].stop()
    assert not node.site.worker.suspender.path(got["name"], ".save").exists()  # not kept once restored
    # Suspended and saved again, then ended: reconciliation removes the guest and its memory by itself.
    assert node.vtorque("suspend", got["job"]).returncode == 0
    node.wait_saved(got["name"], PERIOD + 30)
    node.slurm.run("scancel", got["job"])
    node.wait_state(got["name"], None, PERIOD + 30)
    deadline = time.monotonic() + 5  # the domain first, then its files: the same round, moments later
    while list(node.site.worker.suspender.root.iterdir()):
        assert time.monotonic() < deadline, list(node.site.worker.suspender.root.iterdir())
        time.sleep(0.05)


@pytest.fixture
def torque_node(base_image, test_guest, users, tmp_path):  # noqa: F811 - the fixture imported above
    """The node worker on a Torque site, whose qstat and qsig are the contract's stand-ins (torque_replay.py):
    `qstat -f` shows `job_state = S` once root has `qsig -s suspend`ed the job, as pbs_server does."""
    _, owner = users
    yield from torque_node_of(make_site(base_image, entry=test_guest, boot_timeout=150.0), owner,
                              "pause").reconciling()


def torque_node_of(site, owner, mode: str) -> Node:
    """A Node on a Torque site with one job of `owner`'s that qstat knows (its `torque_job`, and the stand-ins'
    `torque_answers`): bench/suspend_resume.py's node too."""
    from integration.torque_replay import suspendable_stand_ins

    job = f"{uuid.uuid4().int % 100000}.tq"
    bin_dir = site.root / "torque-bin"
    bin_dir.mkdir(mode=0o755)
    qstat, qsig = suspendable_stand_ins(bin_dir, job, {"owner": f"{owner.name}@{HOST}", "queue": "batch",
                                                      "exec_host": f"{site.node}/0", "jobname": "counter"})
    n = Node(site, mode, SchedulerConfig(kind="torque", qstat=str(qstat), qsig=str(qsig)),
             {"PATH": f"{PREFIX}/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin"})
    n.torque_job, n.torque_answers = job, bin_dir / "qstat-answers"  # type: ignore[attr-defined]
    return n


def test_on_torque_qsig_suspends_and_the_guest_follows_job_state_s(torque_node, users):  # noqa: F811 - fixture
    attacker, owner = users
    job = torque_node.torque_job
    got = _suspend_and_resume(torque_node, owner, libvirt.VIR_DOMAIN_PAUSED, job=job)
    got["counter"].stop()
    assert got["suspend_s"] <= PERIOD + 3
    refused = torque_node.vtorque("suspend", job, user=attacker)
    assert refused.returncode != 0
    assert refused.stderr.strip().splitlines() == [
        f"Error: qsig -s suspend {job}: Unauthorized Request  MSG=operation not permitted {job}"]
    # Torque forgets the job (it ended): reconciliation removes its guest, as for any job.
    (torque_node.torque_answers / job).unlink()
    torque_node.wait_state(got["name"], None, PERIOD + 30)
