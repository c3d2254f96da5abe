"""The whole flow of a VM job in memory, in milliseconds: vsub (cli/vsub.py itself, its wrapper) → the prologue
(the real run_prologue) → JobStarted → the bridge (scheduler check, spec, plan) → StageImage → the stager (a real copy
into a real store) and BootGuests → the node worker (its checks, domain XML on libvirt's test driver, the
readiness wait) → GuestReady → the prologue's wait; then the epilogue → JobEnded → TeardownGuests → the node
worker → GuestsTornDown. No broker, no guest (tests/unit/flow_site.py says what stands in)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from vtorque.hooks.job_hook import Verdict
from vtorque.shared import messages as m
from vtorque.shared.job_boot import expand
from vtorque.shared.scheduler import JobInfo

from .flow_site import Site


@pytest.fixture
def site(tmp_path):
    s = Site(tmp_path)
    yield s
    s.close()


def test_a_job_boots_its_guest_and_the_epilogue_removes_it(site):
    t0 = time.monotonic()
    job = site.submit("1.srv")
    outcome, lines = site.prologue(job)
    assert outcome.verdict is Verdict.READY, (outcome.reason, lines, site.bus.dead)
    [ready] = outcome.ready
    assert ready.node == "n1" and ready.guest == m.domain_name("1.srv", "n1", 0)
    assert Path(ready.address).is_socket()  # the guest's ssh socket, from the node worker
    job_file = json.loads((Path(site.workers["n1"].config.job_dir("1.srv")) / f"{ready.guest}.json").read_text())
    assert job_file["ssh_socket"] == ready.address and job_file["user"] == "root"
    assert site.domains()[ready.guest]["job"] == "1.srv"
    assert site.store.has(site.config.images.catalog["tiny"].sha256)  # staged for real, into the store
    assert any("all guests ready" in line for line in lines)

    confirmed, lines = site.epilogue(job)
    assert confirmed, lines
    site.bus.settle()
    assert site.domains() == {} and not (Path(site.workers["n1"].config.node.guest_dir) / ready.guest).exists()
    # The order that matters: asked, planned before any boot, ready before the end, torn down last. (Image
    # events come as the copy goes: the node worker may ask for the staging again while it waits, answered
    # from the one copy, even after the teardown.)
    life = (m.JobStarted, m.JobPlanned, m.BootGuests, m.GuestReady, m.JobEnded, m.TeardownGuests, m.GuestsTornDown)
    kinds = [type(x).__name__ for x in site.bus.published if x.job_id == "1.srv" and isinstance(x, life)]
    assert kinds == ["JobStarted", "JobPlanned", "BootGuests", "GuestReady", "JobEnded", "TeardownGuests",
                     "GuestsTornDown"]
    assert sum(1 for x in site.of_type(m.ImageStaged) if not x.cached) == 1
    assert site.bus.dead == []
    assert time.monotonic() - t0 < 5  # a whole job's life; through a broker and a real guest it takes minutes


def test_two_nodes_one_job_network_and_each_guest_knows_its_peer(tmp_path):
    site = Site(tmp_path, nodes=("n1", "n2"))
    try:
        job = site.submit("2.srv")
        outcome, lines = site.prologue(job)
        assert outcome.verdict is Verdict.READY, (outcome.reason, lines, site.bus.dead)
        assert sorted(r.node for r in outcome.ready) == ["n1", "n2"]
        # One BootGuests for the job, published once and delivered to both nodes' queues (each booted its guest)
        [boot] = site.of_type(m.BootGuests)
        assert boot.nodes == ["n1", "n2"] and boot.network is not None  # one segment for the job
        assert set(boot.network.endpoints) == {"n1", "n2"}
        assert [[p.node for p in expand(boot, n).peers] for n in ("n1", "n2")] == [["n1", "n2"]] * 2
        confirmed, _ = site.epilogue(job)
        assert confirmed and site.domains() == {}
    finally:
        site.close()


def test_a_job_the_scheduler_does_not_confirm_is_rejected_before_any_plan(site):
    job = site.submit("3.srv")
    site.scheduler.jobs["3.srv"] = JobInfo(job_id="3.srv", state="running", raw_state="R", owner="mallory",
                                           nodes=("n1",))
    outcome, _ = site.prologue(job)
    assert outcome.verdict is Verdict.REJECTED and "belongs to mallory, not to root" in outcome.reason
    assert not outcome.planned and site.of_type(m.BootGuests) == [] and site.domains() == {}


def test_an_image_that_fails_its_check_rejects_the_job_and_boots_nothing(tmp_path):
    site = Site(tmp_path, digest="0" * 64)  # the catalog's sha256 is not the file's
    try:
        outcome, lines = site.prologue(site.submit("4.srv"))
        assert outcome.verdict is Verdict.REJECTED, (outcome.reason, lines)
        assert "image tiny" in outcome.reason and "sha256" in outcome.reason
        site.bus.settle()
        assert site.domains() == {}
        assert not site.store.has("0" * 64)
    finally:
        site.close()


def test_a_guest_that_reports_a_failure_fails_the_job_for_good(site, monkeypatch):
    from vtorque.services.node_worker import instant
    from vtorque.services.node_worker.readiness import GUEST_FAILED

    monkeypatch.setattr(instant.InstantGuests, "boot", staticmethod(
        lambda console: Path(console).write_bytes(GUEST_FAILED + b" cloud-init failed\n")))
    outcome, lines = site.prologue(site.submit("5.srv"))
    assert outcome.verdict is Verdict.REJECTED, (outcome.reason, lines)
    assert "the guest reported a failure" in outcome.reason
    assert any("cloud-init failed" in line for line in lines)  # the console's tail reaches the job's output
    site.bus.settle()
    assert site.domains() == {}  # the node worker removed what it had defined


def test_a_redelivered_boot_announces_the_running_guest_again_and_boots_nothing_twice(site):
    job = site.submit("6.srv")
    outcome, _ = site.prologue(job)
    assert outcome.verdict is Verdict.READY
    [boot] = site.of_type(m.BootGuests)
    waiter = site.bus.channel(patterns=[f"job.{m.routing_word('6.srv')}.#"])
    site.bus.publish(boot)  # the broker redelivers it (a lost ack)
    again = waiter.next(time.monotonic() + 5)
    assert isinstance(again, m.GuestReady) and again.guest == outcome.ready[0].guest
    assert again.timings.disks == 0 and len(site.domains()) == 1
    waiter.close()


def test_a_job_whose_epilogue_never_came_is_removed_by_reconciliation(site):
    """A hook or the bridge died before the teardown: the node worker's reconciliation asks the scheduler it was
    built with (the site's FakeScheduler here) and removes the guests of a job that scheduler no longer knows."""
    import threading

    from vtorque.services.node_worker.reconcile import Reconciler, scheduler_states

    job = site.submit("7.srv")
    outcome, _ = site.prologue(job)
    assert outcome.verdict is Verdict.READY
    worker = site.workers["n1"]
    assert worker.scheduler is site.scheduler
    rounds = Reconciler(worker, threading.Event(), 60.0, states=scheduler_states(worker.config, worker.scheduler))
    assert rounds.run_once() == [] and len(site.domains()) == 1  # still running: kept
    site.scheduler.cancel("7.srv")  # ended, and forgotten, without an epilogue
    [removal] = rounds.run_once()
    assert removal.name == outcome.ready[0].guest
    assert site.domains() == {} and not (Path(worker.config.node.guest_dir) / removal.name).exists()


def test_vsubs_own_wrapper_runs_the_whole_flow(site, tmp_path, monkeypatch):
    """vsub itself (cli/vsub.py, as a user runs it on a `#PBS -vm` script) submits through the site's scheduler
    interface; the wrapper it wrote is what the prologue reads, and the job runs to its teardown."""
    import subprocess

    import msgspec

    from vtorque.cli import vsub
    from vtorque.shared import scheduler as scheduler_module
    from vtorque.shared.config import SchedulerConfig

    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\n#PBS -vm img=tiny,vcpus=1\n#PBS -N flow\necho hello\n")
    submitted: dict[str, list[str]] = {}

    def submit(args: list[str]):
        submitted["args"], submitted["wrapper"] = args, Path(args[-1]).read_text()  # the wrapper, by the script's name
        return subprocess.CompletedProcess(args, 0, "8.srv\n")

    monkeypatch.setattr(site.scheduler, "submit", submit)
    monkeypatch.setattr(scheduler_module, "scheduler_for", lambda config: site.scheduler)
    config = msgspec.structs.replace(site.config, scheduler=SchedulerConfig(kind="torque", qsub="/bin/true"))
    monkeypatch.setattr(vsub, "_load_config", lambda: config)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert vsub.main([str(script)]) == 0
    assert Path(submitted["args"][-1]).name == "job.sh" and "-N" not in submitted["args"]  # directives stay inside
    wrapper = submitted.pop("wrapper")
    assert "# vtorque-spec: " in wrapper and "#PBS -N flow" in wrapper and "vtorque-launch" in wrapper
    [key_dir] = (tmp_path / "home" / ".vtorque" / "keys").iterdir()
    assert (key_dir / "job").read_text() == "8.srv\n" and (key_dir / "cluster").read_text() == "torque:flow\n"

    job = site.started("8.srv", wrapper)
    assert job.header.ssh_pubkeys == [(key_dir / "id_ed25519.pub").read_text().strip()]
    outcome, lines = site.prologue(job)
    assert outcome.verdict is Verdict.READY, (outcome.reason, lines, site.bus.dead)
    [started] = site.of_type(m.JobStarted)
    assert started.ssh_authorized_keys == job.header.ssh_pubkeys  # vsub's key, on to the guest's seed
    confirmed, _ = site.epilogue(job)
    assert confirmed and site.domains() == {}


def test_a_guest_never_ready_times_the_prologue_out_and_the_epilogue_removes_it(site, monkeypatch):
    """The hook's own deadline: the plan came, the guest never said it was ready; the prologue gives up at its
    deadline (an infrastructure failure: a bounded requeue), and the epilogue's teardown removes what booted."""
    from vtorque.services.node_worker import instant

    monkeypatch.setattr(instant.InstantGuests, "boot", staticmethod(lambda console: None))  # silent console
    job = site.submit("9.srv")
    t0 = time.monotonic()
    outcome, lines = site.prologue(job, deadline_s=0.5)
    assert outcome.verdict is Verdict.FAILED and outcome.planned, (outcome.reason, lines)
    assert outcome.reason == "timed out after 0s waiting for 1 guest(s)"
    assert time.monotonic() - t0 < 3
    confirmed, lines = site.epilogue(job)
    assert confirmed, lines
    site.bus.settle()
    assert site.domains() == {} and site.bus.dead == []


def test_a_node_worker_refusing_the_owner_rejects_the_job_for_good(site):
    """The node worker's own check of the plan (services/node_worker/trust.py), past the bridge: a system
    account as the owner is refused on the node, the job rejected with the node's reason, nothing defined."""
    import msgspec

    worker = site.workers["n1"]
    worker.config = msgspec.structs.replace(
        worker.config, node=msgspec.structs.replace(worker.config.node, allow_system_owners=False))
    outcome, lines = site.prologue(site.submit("10.srv"))
    assert outcome.verdict is Verdict.REJECTED, (outcome.reason, lines)
    assert "allow_system_owners" in outcome.reason and "root" in outcome.reason
    site.bus.settle()
    assert site.domains() == {} and site.of_type(m.GuestReady) == []
