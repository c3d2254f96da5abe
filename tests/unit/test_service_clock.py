"""Time decided by the services' clock (shared/clock.py), moved by hand: shared.testing.FakeClock in the in-memory
site (tests/unit/flow_site.py), no sleep and no patched time module. A command past its deadline, a node whose
heartbeat is too old, a guest past its walltime and the reconciler's grace, a prefetch message's deadline."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest

from vtorque.hooks.job_hook import Verdict
from vtorque.services.node_worker.reconcile import GRACE, Reconciler, scheduler_states
from vtorque.services.scheduler_bridge.accounting import SlurmPrefetch
from vtorque.shared import messages as m
from vtorque.shared.clock import SYSTEM_CLOCK
from vtorque.shared.config import Config
from vtorque.shared.job_script import JobHeader
from vtorque.shared.testing import FakeClock

from .flow_site import Site


@pytest.fixture
def site(tmp_path):
    s = Site(tmp_path)
    yield s
    s.close()


def test_a_fake_clock_moves_only_when_advanced():
    clock = FakeClock(start=1_000_000.0)
    wall, mono = clock.now(), clock.monotonic()
    assert (clock.now(), clock.monotonic()) == (wall, mono)
    clock.advance(90)
    assert clock.now() == wall + 90 and clock.monotonic() == mono + 90
    assert clock.utcnow().timestamp() == wall + 90
    with pytest.raises(ValueError):
        clock.advance(-1)


def test_services_decide_by_the_system_clock_unless_given_one(site):
    assert site.bridge.clock is site.clock and site.stager.clock is site.clock
    assert site.workers["n1"].clock is site.clock
    assert Reconciler(site.workers["n1"], threading.Event(), 60.0).clock is site.clock
    from vtorque.services.scheduler_bridge.service import SchedulerBridge

    assert SchedulerBridge(Config(), site.bus.publisher(), scheduler=site.scheduler).clock is SYSTEM_CLOCK


def test_a_command_past_its_deadline_by_the_services_clock_is_answered_expired_and_not_handled(site):
    job = site.submit("1.srv")
    outcome, _ = site.prologue(job)
    assert outcome.verdict is Verdict.READY
    teardown = m.TeardownGuests.new(job_id="1.srv", deadline=60.0, node="n1")
    site.clock.advance(61)  # the node worker's clock is past the command's deadline; the wall clock is not
    site.bus.publish(teardown)
    site.bus.settle()
    [expired] = [e for e in site.of_type(m.CommandExpired) if e.command_id == teardown.message_id]
    assert expired.command == "TeardownGuests" and expired.job_id == "1.srv"
    assert site.of_type(m.GuestsTornDown) == [] and len(site.domains()) == 1  # the handler never ran


def test_a_command_within_its_deadline_is_handled(site):
    job = site.submit("2.srv")
    assert site.prologue(job)[0].verdict is Verdict.READY
    site.clock.advance(59)
    site.bus.publish(m.TeardownGuests.new(job_id="2.srv", deadline=60.0, node="n1"))
    site.bus.settle()
    assert site.of_type(m.CommandExpired) == [] and len(site.of_type(m.GuestsTornDown)) == 1


def test_a_node_whose_heartbeat_is_older_than_three_intervals_is_counted_dead_by_the_bridge(site):
    site.clock.advance(29)  # the site's heartbeat says interval 10 s: stale after 30 s
    # (a prologue that waits longer than the clock moved: its BootGuests' deadline is the wall clock's, + 60 s)
    assert site.prologue(site.submit("3.srv"), deadline_s=60)[0].verdict is Verdict.READY
    site.clock.advance(3)
    outcome, _ = site.prologue(site.submit("4.srv"), deadline_s=60)
    assert outcome.verdict is Verdict.FAILED, outcome.reason  # retryable: its node worker may be restarting
    # (the beat was made a moment after the clock, by the wall clock: 31-and-a-bit s old)
    assert "node n1: no node worker heard from (last 31 s ago)" in outcome.reason
    [rejected] = [r for r in site.of_type(m.JobRejected) if r.job_id == "4.srv"]
    assert rejected.retryable and site.of_type(m.BootGuests)[-1].job_id == "3.srv"


def test_a_guest_past_its_walltime_goes_only_once_the_reconcilers_grace_has_passed(site):
    job = site.submit("5.srv")  # walltime 3600 s (flow_site)
    outcome, _ = site.prologue(job)
    assert outcome.verdict is Verdict.READY
    worker = site.workers["n1"]
    rounds = Reconciler(worker, threading.Event(), 60.0, states=scheduler_states(worker.config, worker.scheduler))
    site.clock.advance(3600 + GRACE.total_seconds() - 5)  # past its walltime, within the grace
    assert rounds.run_once() == [] and len(site.domains()) == 1
    site.clock.advance(10)
    [removal] = rounds.run_once()
    assert removal.name == outcome.ready[0].guest and removal.reason == "job 5.srv passed its walltime"
    assert site.domains() == {} and not (Path(worker.config.node.guest_dir) / removal.name).exists()


def test_the_reconcilers_own_grace_goes_by_the_same_clock(site):
    outcome, _ = site.prologue(site.submit("6.srv"))
    worker = site.workers["n1"]
    rounds = Reconciler(worker, threading.Event(), 60.0, states=scheduler_states(worker.config, worker.scheduler))
    rounds.grace = timedelta(seconds=40)
    site.clock.advance(3600 + 35)
    assert rounds.run_once() == []
    site.clock.advance(10)
    assert [r.name for r in rounds.run_once()] == [outcome.ready[0].guest]


def test_prefetch_stamps_its_messages_deadline_by_its_clock(tmp_path):
    clock = FakeClock(start=2_000_000_000.0)
    sent: list[m.Message] = []

    class Sent:
        def publish(self, message):
            sent.append(message)

    prefetch = SlurmPrefetch(Config(), Sent(), tmp_path / "state.json", clock=clock)
    prefetch._queued("9", JobHeader(spec={"img": "tiny"}, traceparent=None), "queued:9")
    clock.advance(30)
    prefetch._deleted("9", "cancelled while pending", "deleted:9")
    queued, deleted = sent
    assert queued.created_at.timestamp() == 2_000_000_000.0
    assert (queued.deadline - queued.created_at).total_seconds() == Config().prefetch.deadline
    assert deleted.created_at.timestamp() == 2_000_000_030.0


def test_a_boot_past_its_commands_deadline_by_the_workers_clock_does_not_wait_for_libvirt():
    from vtorque.services.node_worker.readiness import BootFailed
    from vtorque.services.node_worker.service import NodeWorker
    from vtorque.shared.config import NodeConfig
    from vtorque.shared.job_boot import NodeBoot

    class Down:
        calls = 0

        def unavailable(self) -> str:
            Down.calls += 1
            return "cannot connect to qemu:///system"

    clock = FakeClock()
    worker = NodeWorker(Config(node=NodeConfig(name="n1", domain_type="qemu")), None, hypervisor=Down(),
                        store=object(), clock=clock)
    cmd = NodeBoot(job_id="5", deadline=clock.utcnow() + timedelta(seconds=60), node="n1", guests=[], peers=[],
                   network=None)
    clock.advance(61)  # a minute on by the worker's clock; the wall clock barely moved
    with pytest.raises(BootFailed, match="did not answer before the boot's deadline") as failed:
        worker._wait_for_hypervisor(cmd, poll=5.0)  # a real wait would poll once and sleep 5 s
    assert failed.value.retryable and Down.calls == 1


def test_a_suspended_job_keeps_its_guest_past_its_walltime_and_ends_that_much_later(site):
    """Issue 14's walltime rule on the worker's clock: the time a job spends suspended (the scheduler's clock for
    it stands still) moves its end, and reconciliation removes the guest only past that end and the grace."""
    outcome, _ = site.prologue(site.submit("8.srv"), deadline_s=60)
    [guest] = [g.guest for g in outcome.ready]
    worker = site.workers["n1"]
    rounds = Reconciler(worker, threading.Event(), 60.0, states=scheduler_states(worker.config, worker.scheduler))
    site.clock.advance(600)
    site.scheduler.suspend("8.srv")
    assert rounds.run_once() == []
    assert worker.suspender.record(guest).since == site.clock.now()  # paused, on the worker's clock
    site.clock.advance(3600)  # suspended past the walltime and the grace: kept
    assert rounds.run_once() == [] and len(site.domains()) == 1
    site.scheduler.resume("8.srv")
    assert rounds.run_once() == [] and worker.suspender.record(guest).total == 3600
    site.clock.advance(3000 + GRACE.total_seconds() - 10)  # 600 + 3000 s run of its 3600: within the grace
    assert rounds.run_once() == []
    site.clock.advance(20)
    assert [(r.name, r.reason) for r in rounds.run_once()] == [(guest, "job 8.srv passed its walltime")]
