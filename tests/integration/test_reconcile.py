"""Reconciliation with real guests: a job whose epilogue never came loses its guests within one reconcile
period; a node worker killed mid-boot and restarted does not boot the guest twice. The node workers are
`vtorque run node-worker` processes on a site of the test's own (the session's vhost, node names of their own,
directories under a temporary root); the scheduler they ask is a fake `scontrol` that knows exactly the jobs
the test names, or none that can be asked (the test site's default), never the stack's Slurm."""

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import fake_scheduler

from vtorque.services.node_worker.hypervisor import Hypervisor
from vtorque.shared import messages as m
from vtorque.shared.bus import EventWaiter, Publisher
from vtorque.shared.job_boot import hoist

pytestmark = [pytest.mark.slow, pytest.mark.guest]
PERIOD = 3.0


def start_worker(site, tmp_path):
    env = site.env(VTORQUE_NODE__RECONCILE_INTERVAL=str(PERIOD))
    name = site.node
    log = tmp_path / f"{name}.{time.monotonic_ns()}.log"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "vtorque"), "run", "node-worker"], env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while "consuming" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    proc.log = log  # read back in a failure's message: CI keeps no temporary files
    return proc


def plan(config, job, node, key):
    entry = config.images.catalog["tiny"]
    guest = m.GuestPlan(name=f"vt-{job}-{node}-0", node=node, index=0, image="tiny", image_digest=entry.sha256,
                        vcpus=1, ram_mib=128, cores=None, owner=m.Owner(user="root", uid=0, gid=0),
                        ssh_authorized_keys=[key])
    return hoist(job, 240.0, [guest])


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out: {what}")


@pytest.fixture
def site(test_site, test_guest):
    """The test site with its image in the store; its scheduler cannot be asked (reconciliation must then
    remove nothing for that reason) unless a test installs fake_scheduler."""
    test_site.catalog = {"tiny": test_guest}
    test_site.stage()
    return test_site


@pytest.fixture
def key():
    return "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG2dXW1vjFpNu2d0dw7Fqt5fLwRY7FTl1Qb4mK3xqQ9n test"


def test_guests_of_a_job_that_ended_without_epilogue_are_removed(site, broker_url, tmp_path, key):
    fake_scheduler(site.root / "scheduler")  # knows no job at all
    site.sections["scheduler"] = {"kind": "slurm", "bin_dir": str(site.root / "scheduler")}
    config = site.config()
    node, job = site.node, str(900000 + int(uuid.uuid4().int % 90000))  # unknown to the scheduler
    hv = Hypervisor(config.node.libvirt_uri)
    stray = Path(config.node.guest_dir) / f"vt-stray-{node}-0"
    stray.mkdir(parents=True)
    (stray / "job").write_text("stray")
    (stray / "node").write_text(node)
    os.utime(stray / "job", (time.time() - 600, time.time() - 600))
    waiter = EventWaiter(broker_url, [f"job.{job}.#"])
    worker = start_worker(site, tmp_path)
    try:
        Publisher(broker_url).publish(plan(config, job, node, key))
        event = waiter.next(time.monotonic() + 120)
        assert isinstance(event, m.GuestReady), event
        ready_at = time.monotonic()
        # No epilogue ever comes: the scheduler does not know the job, so reconciliation removes it all.
        # One period to notice, plus slack for squeue and libvirt on a loaded 2-core box.
        wait_for(lambda: hv.lookup(event.guest) is None, PERIOD + 15, "the domain to be reconciled away")
        assert time.monotonic() - ready_at <= PERIOD + 15
        wait_for(lambda: not (Path(config.node.guest_dir) / event.guest).exists(), PERIOD, "its files")
        wait_for(lambda: not stray.exists(), 2 * PERIOD, "the stray guest files")
        assert not config.job_dir(job).exists()
    finally:
        waiter.close()
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
        shutil.rmtree(stray, ignore_errors=True)
        hv.remove(f"vt-{job}-{node}-0")
        shutil.rmtree(Path(config.node.guest_dir) / f"vt-{job}-{node}-0", ignore_errors=True)


def test_a_worker_killed_mid_boot_does_not_boot_the_guest_twice(site, broker_url, tmp_path, key):
    config = site.config()
    node, job = site.node, f"kill{uuid.uuid4().hex[:6]}"
    hv = Hypervisor(config.node.libvirt_uri)
    name = f"vt-{job}-{node}-0"
    waiter = EventWaiter(broker_url, [f"job.{job}.#"])
    first = start_worker(site, tmp_path)
    Publisher(broker_url).publish(plan(config, job, node, key))
    try:
        wait_for(lambda: hv.is_active(name), 60, "the guest to start")
        domain_id = hv.lookup(name).ID()
        first.kill()  # mid-boot: the command is not acked
        first.wait()
        second = start_worker(site, tmp_path)
        try:
            event = waiter.next(time.monotonic() + 120)
            assert isinstance(event, m.GuestReady), (event, first.log.read_text(), second.log.read_text())
            assert hv.lookup(name).ID() == domain_id  # the same QEMU, not a second boot
            Publisher(broker_url).publish(m.TeardownGuests.new(job_id=job, deadline=60.0, node=node))
            done = waiter.next(time.monotonic() + 60)
            assert isinstance(done, m.GuestsTornDown) and done.guests == [name], (done, second.log.read_text())
            # Answered once its QEMU has exited; the domain is undefined right after, off the node's queue.
            gone_by = time.monotonic() + 30
            while hv.lookup(name) is not None and time.monotonic() < gone_by:
                time.sleep(0.2)
            assert hv.lookup(name) is None
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(30)
    finally:
        waiter.close()
        hv.remove(name)
        shutil.rmtree(Path(config.node.guest_dir) / name, ignore_errors=True)
