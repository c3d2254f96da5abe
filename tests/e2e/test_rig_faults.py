"""Faults on the rig (issue 12 items 5, 7, 8; docs/benchmarks.md "Faults on the rig"): each test runs a real VM
job (vsub on head, the tiny guest, one guest on each compute host, through the rig's Slurm) and breaks one part
of the cluster under it with deploy/rig/rig.sh:
  a) a broker node stopped gracefully, another killed -9, both mid-job;
  b) a compute host's node worker killed -9 mid-boot (its supervisor restarts it);
  c) a compute host cut off the cluster network while its guests run, then put back;
  d) the scheduler bridge killed -9 while it holds a job's JobStarted, and right after it planned one;
  e) libvirtd stopped and started again under a running node worker.
Each job must complete (or fail with a reason the user reads in its output), no guest may boot twice unless the
fault interrupted its boot, nothing of the job may be left one reconcile period after its end, and the services
must be back at work by themselves. Times are printed (pytest -s) for the fault table.

Run (root, the rig down; ~8 min):
  flock /tmp/vtorque-e2e.lock /opt/vtorque/venv/bin/python -m pytest -s -m slow tests/e2e/test_rig_faults.py
"""

from __future__ import annotations

import time

import pytest

from .rig_support import (
    COMPUTE,
    RIG_DIR,
    FaultJob,
    cancel_unfinished,
    consumers,
    dead_letters,
    heartbeat_ages,
    log_lines,
    log_size,
    on,
    rig,
    service_pids,
    wait_consuming,
    wait_nothing_left,
)
from .test_rig import cluster  # noqa: F401 - the rig, up for this module and always taken down

HEARTBEAT_INTERVAL = 5.0  # the rig's [node] heartbeat_interval (deploy/rig/rig.sh)

pytestmark = [pytest.mark.slow]

# "within 10 s of the broker node (libvirtd) returning" (issue 12 item 5)
BACK_AT_WORK = 10.0


@pytest.fixture(autouse=True)
def no_job_left_running(cluster):  # noqa: F811 - the fixture imported above
    yield
    cancel_unfinished()


@pytest.fixture
def baseline(cluster):  # noqa: F811 - the fixture imported above
    """Every service queue's consumers before the fault, as a node the test never breaks (c2) sees them, once
    every node beats. Right after `rig.sh up` (the services logged "consuming") a quorum queue may not count its
    consumers yet: up to 30 s for the stager's four."""
    need = {"vtorque.bridge": 1, "vtorque.stager": 4, "vtorque.stager.cancel": 1,
            **{f"vtorque.node.{c}": 1 for c in COMPUTE}}
    end = time.monotonic() + 30
    while True:
        base = {q: n for q, n in consumers("c2").items() if n > 0}
        missing = {q: base.get(q, 0) for q, n in need.items() if base.get(q, 0) < n}
        # and every node beating (the last test's fault may have kept one quiet): the bridge plans only for
        # nodes it heard from
        ages = heartbeat_ages("head")
        stale = {c: ages.get(c, float("inf")) for c in COMPUTE if ages.get(c, float("inf")) > 2 * HEARTBEAT_INTERVAL}
        if not missing and not stale:
            return base
        assert time.monotonic() < end, (f"before the fault, consumers missing (queue: count): {missing}; "
                                        f"all: {base}; nodes not beating (age, s): {stale}")
        time.sleep(0.5)


def wait_heartbeat_since(node: str, since: float, timeout: float) -> float:
    """Seconds from `since` (monotonic) until a heartbeat of `node` sent after it is heard (`vtorque nodes` on
    head, as the bridge hears them); fails after `timeout`."""
    end = since + timeout
    while time.monotonic() < end:
        asked = time.monotonic()
        age = heartbeat_ages("head").get(node, float("inf"))
        if asked - age >= since:
            return asked - since
        time.sleep(0.5)
    pytest.fail(f"no heartbeat of {node} in {timeout:.0f} s: ages {heartbeat_ages('head')}")


def report(fault: str, **figures) -> None:
    print(f"FAULT-TABLE {fault}: " + ", ".join(f"{k}={v:.1f}s" if isinstance(v, float) else f"{k}={v}"
                                               for k, v in figures.items()))


def test_a_broker_node_stopped_and_another_killed_mid_job(baseline):
    """rabbit@head (the bridge's, the stager's and the hooks' first node) stopped as an operator stops it, then
    rabbit@c1 (c1's node worker's own) killed -9, both while the job runs: the job completes once, and every
    consumer of every service is back within 10 s of each node's return, in the same process (no restart)."""
    pids = service_pids()
    dead = dead_letters()
    job = FaultJob(sleep=40)
    t_boot = job.wait_booting()

    rig("broker-stop", "head")
    t_stopped = time.monotonic()
    assert job.running(), "the graceful stop did not land mid-job"
    time.sleep(2)
    rig("broker-start", "head")
    t_head_back = time.monotonic()
    back_head = wait_consuming(baseline, via="c2", timeout=BACK_AT_WORK)

    assert job.running(), "the kill did not land mid-job"
    rig("broker-kill", "c1")
    t_killed = time.monotonic()
    time.sleep(2)
    rig("broker-start", "c1")
    back_c1 = wait_consuming(baseline, via="c2", timeout=BACK_AT_WORK)

    outcome = job.outcome()
    t_done = time.monotonic()
    assert outcome == "completed", outcome
    for c in COMPUTE:
        assert job.boots(c) == 1, f"{job.guest(c)} booted {job.boots(c)} times"
    # every service rode out both faults in the process it had: none died (the supervisor would hide that)
    assert service_pids() == pids
    assert dead_letters() == dead, "dead-lettered"
    left = wait_nothing_left(job)
    report("a) broker stop + kill", outcome=outcome, head_stopped_for=t_head_back - t_stopped,
           consumers_back_after_head=back_head, consumers_back_after_c1=back_c1,
           job_done_after_kill=t_done - t_killed, boot_to_done=t_done - t_boot, leftovers_gone=left)


def test_b_node_worker_killed_mid_boot(baseline):
    """c1's node worker killed -9 while its guest boots (domain defined, not ready): supervise.sh restarts it,
    BootGuests is redelivered, the half-booted guest is removed and booted again within one boot time (the
    uninterrupted guest's on c2, same job); nothing is left after the job."""
    offset = log_size("c1", "node-worker")
    job = FaultJob(sleep=0)
    t_boot = job.wait_booting("c1")
    assert not job.ready_file("c1").exists()
    rig("kill", "c1", "node-worker")
    t_killed = time.monotonic()

    def restarted() -> bool:
        return any(line.get("msg") == "consuming" for line in log_lines("c1", "node-worker", offset))
    t_restarted = job.wait("c1's node worker consuming again", restarted, timeout=60)
    t_ready_c2 = job.wait_ready("c2")
    t_ready_c1 = job.wait_ready("c1")
    outcome = job.outcome()
    boot_c2 = t_ready_c2 - t_boot  # the same job's guest on c2, booted from the same moment, not interrupted
    reboot_c1 = t_ready_c1 - t_restarted
    report("b) node worker kill -9 mid-boot", outcome=outcome, restart=t_restarted - t_killed,
           interrupted_boot_done_after_restart=reboot_c1, one_boot_time=boot_c2, kill_to_ready=t_ready_c1 - t_killed)
    assert outcome == "completed", outcome
    assert job.boots("c2") == 1
    # 1 s of slack: the two times are sampled every 0.1 s and the two hosts share two cores
    assert reboot_c1 <= boot_c2 + 1.0, (
        f"the interrupted boot took {reboot_c1:.1f}s after the restart, one boot {boot_c2:.1f}s")
    left = wait_nothing_left(job)
    report("b) leftovers", gone_after_job_end=left)


def test_c_host_cut_off_the_network_while_its_guests_run(baseline):
    """c2's port on the rig's switch down for 20 s while both guests run and the job ends (the epilogue's
    teardown of c2 waits for it), then up again."""
    job = FaultJob(sleep=10)
    for c in COMPUTE:
        job.wait_ready(c)
    rig("link-down", "c2")
    t_down = time.monotonic()
    try:
        time.sleep(20)
        assert job.running(), "the link came back only after the job had ended"
    finally:
        rig("link-up", "c2")
    t_up = time.monotonic()
    back = wait_consuming(baseline, via="c2", timeout=30)
    # A heartbeat of c2 made since the link's return (issue 12 item 5): a publisher stuck on the cut connection
    # (7efc7da) kept c2 silent for ~30 s, and the bridge refused the next job.
    beating = wait_heartbeat_since("c2", t_up, timeout=30)
    outcome = job.outcome()
    t_done = time.monotonic()
    left = wait_nothing_left(job)
    report("c) c2 link down 20 s", outcome=outcome, down=t_up - t_down, consumers_back_after_link_up=back,
           heartbeat_after_link_up=beating, job_done_after_link_up=t_done - t_up, leftovers_gone=left)
    # Back at work (consuming) within 10 s, and heard at its next beat once the broker takes messages again (a
    # beat resent for 30 s with its old time came 14.5 s after, 7.7 s after the consumers; a reader that missed
    # every beat behind a resent one, > 30 s).
    assert back <= BACK_AT_WORK, f"c2's consumers were back {back:.1f} s after its link was up again"
    assert beating <= back + HEARTBEAT_INTERVAL, (f"c2's first heartbeat came {beating:.1f} s after its link was up "
                                                  f"again, {beating - back:.1f} s after its consumers")
    assert outcome == "completed" or outcome.startswith("failed: "), outcome
    for c in COMPUTE:
        assert job.boots(c) == 1, f"{job.guest(c)} booted {job.boots(c)} times"


STALL = """#!/bin/sh
# rig fault (tests/e2e/test_rig_faults.py): the bridge's first `scontrol show job` hangs, so the bridge is
# caught holding a JobStarted it has not planned yet; everyone else's scontrol, and the bridge's next, run.
if [ ! -e /run/vtorque-fault/stalled ] && tr '\\0' ' ' </proc/$PPID/cmdline | grep -q 'vtorque run bridge'; then
  echo $$ >/run/vtorque-fault/stalled
  exec sleep 300
fi
exec /run/vtorque-fault/scontrol.real "$@"
"""


@pytest.mark.parametrize("when", ["holding-the-job", "after-the-plan"])
def test_d_bridge_killed_between_plan_and_boot(baseline, when):
    """holding-the-job: killed while its handler of the job's JobStarted runs (the broker redelivers it to the
    restarted bridge, which plans it); after-the-plan: killed the moment it logs the plan it published (the
    node workers boot without it, the restarted bridge handles the job's end)."""
    offset = log_size("head", "bridge")
    fault_dir = RIG_DIR / "hosts" / "head" / "run" / "vtorque-fault"  # head's /run/vtorque-fault
    if when == "holding-the-job":
        fault_dir.mkdir(exist_ok=True)
        (fault_dir / "stalled").unlink(missing_ok=True)
        (fault_dir / "scontrol").write_text(STALL)
        (fault_dir / "scontrol").chmod(0o755)
        # a copy of the real one for the wrapper (the Slurm hooks run as slurm: /proc/1/root is not theirs)
        on("head", "cp", "/usr/bin/scontrol", "/run/vtorque-fault/scontrol.real")
        on("head", "mount", "--bind", "/run/vtorque-fault/scontrol", "/usr/bin/scontrol")
    try:
        job = FaultJob(sleep=0)
        if when == "holding-the-job":
            job.wait("the bridge stalled in the job's handler", (fault_dir / "stalled").exists, timeout=120)
        else:
            job.wait("the bridge's plan", lambda: any(line.get("msg") == "job planned" and line.get("job_id") == job.id
                                                      for line in log_lines("head", "bridge", offset)), 120, 0.02)
        rig("kill", "head", "bridge")
        t_killed = time.monotonic()
    finally:
        if when == "holding-the-job":
            stalled = (fault_dir / "stalled").read_text().strip() if (fault_dir / "stalled").exists() else ""
            if stalled:
                on("head", "kill", stalled, check=False)
            on("head", "umount", "/usr/bin/scontrol", check=False)
    outcome = job.outcome()
    t_done = time.monotonic()
    planned = [line for line in log_lines("head", "bridge", offset)
               if line.get("msg") == "job planned" and line.get("job_id") == job.id]
    back = wait_consuming(baseline, via="c2", timeout=30)
    left = wait_nothing_left(job)
    report(f"d) bridge kill -9 {when}", outcome=outcome, job_done_after_kill=t_done - t_killed,
           plans=len(planned), bridge_back=back, leftovers_gone=left)
    assert outcome == "completed", outcome
    for c in COMPUTE:
        assert job.boots(c) == 1, f"{job.guest(c)} booted {job.boots(c)} times"
    # holding-the-job: no plan before the kill, one after it (the redelivery); after-the-plan: a repeated plan
    # (the kill landed before the ack) must still boot each guest once, checked above
    assert len(planned) == 1 if when == "holding-the-job" else len(planned) >= 1, planned


def test_e_libvirtd_restarted_under_a_running_node_worker(baseline):
    """c1's libvirtd stopped for longer than three heartbeat intervals while the job's guests run, then started:
    its guest's QEMU keeps running, the node worker reconnects, the job completes; no command is dead-lettered;
    c1's heartbeats go on while libvirt is away (they may say it is down, they must not stop: a node whose
    heartbeats stop is rejected by the bridge as 'no node worker heard from'); a job submitted right after
    libvirtd's return is neither rejected nor requeued."""
    dead = dead_letters()
    pids = service_pids()
    job = FaultJob(sleep=30)
    for c in COMPUTE:
        job.wait_ready(c)
    interval = HEARTBEAT_INTERVAL
    rig("libvirtd-stop", "c1")
    t_stop = time.monotonic()
    worst = 0.0
    try:
        while time.monotonic() - t_stop < 3 * interval + 3:
            worst = max(worst, heartbeat_ages("head").get("c1", float("inf")))
            time.sleep(1)
    finally:
        rig("libvirtd-start", "c1")
    t_back = time.monotonic()
    second = FaultJob(sleep=0)  # the bridge plans it from heartbeats heard while libvirtd was away or since
    outcome = job.outcome()
    outcome2 = second.outcome()
    beats_again = min(heartbeat_ages("head").get("c1", float("inf")), 999.0)
    left = wait_nothing_left(job)
    wait_nothing_left(second)
    report("e) libvirtd stop 18 s + start", outcome=outcome, next_job=outcome2, oldest_heartbeat_while_down=worst,
           down=t_back - t_stop, latest_heartbeat_age_after=beats_again, leftovers_gone=left)
    assert outcome == "completed", outcome
    assert dead_letters() == dead, "dead-lettered"
    assert service_pids() == pids, "a service died (its supervisor restarted it)"
    assert worst <= 2 * interval + 1, (f"c1's heartbeats stopped while libvirtd was down (the latest was {worst:.0f}s "
                                       f"old, interval {interval:.0f}s): the bridge takes such a node for one "
                                       f"without a node worker; the next job: {outcome2}")
    assert outcome2 == "completed", outcome2
