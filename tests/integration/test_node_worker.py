"""The node worker with real libvirt + QEMU (TCG) and the real RabbitMQ, on a site of its own (the session's vhost,
a node name of its own, directories under a temporary root)."""

import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from vtorque.cli.launcher_ssh import ssh_argv
from vtorque.shared import messages as m
from vtorque.shared.bus import EventWaiter, Publisher
from vtorque.shared.job_boot import hoist

from .guests import expect, node_worker

pytestmark = [pytest.mark.slow, pytest.mark.guest]


@pytest.fixture
def worker(test_site, test_guest):
    test_site.catalog = {"tiny": test_guest}
    with node_worker(test_site, "nw-") as started:
        yield started


@pytest.fixture(scope="module")
def ssh_key(tmp_path_factory):
    key = tmp_path_factory.mktemp("key") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


def guest(config, job, key, digest=None):
    entry = config.images.catalog["tiny"]
    return m.GuestPlan(
        name=f"vt-{job}-{config.node.name}-0",
        node=config.node.name,
        index=0,
        image="tiny",
        image_digest=digest or entry.sha256,
        vcpus=2,
        ram_mib=192,
        cores=None,
        owner=m.Owner(user="root", uid=0, gid=0),
        ssh_authorized_keys=[key.with_suffix(".pub").read_text().strip()],
    )


def test_boot_reannounce_and_teardown(broker_url, worker, ssh_key):
    config, svc = worker
    job = f"nw-{uuid.uuid4().hex[:6]}"
    plan = guest(config, job, ssh_key)
    waiter = EventWaiter(broker_url, [f"job.{job}.#"])
    publisher = Publisher(broker_url)
    try:
        publisher.publish(hoist(job, 300.0, [plan]))
        ready = expect(waiter, m.GuestReady)
        assert ready.guest == plan.name and ready.node == config.node.name
        t = ready.timings
        assert 0 <= t.image <= t.disks <= t.define <= t.start <= t.ready and t.kernel_up and t.kernel_up <= t.ready
        dom = svc.hv.lookup(plan.name)
        state, max_kib, _, vcpus, _ = dom.info()
        assert (vcpus, max_kib) == (2, 192 * 1024)
        first_id = dom.ID()
        job_file = config.job_dir(job) / f"{plan.name}.json"
        assert job_file.exists()
        # Only the job's key gets in, and it reaches the guest's own kernel.
        run = subprocess.run(
            ssh_argv(ssh_key, ready.address, "root", "uname -r; nproc"), capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 0, run.stderr
        assert run.stdout.split() == [run.stdout.split()[0], "2"] and run.stdout.split()[0] != os.uname().release

        # A redelivered command re-announces the running guest instead of booting it twice.
        publisher.publish(hoist(job, 300.0, [plan]))
        again = expect(waiter, m.GuestReady)
        # Re-announced: no phase ran again (ready is only the time spent finding it up).
        assert (again.timings.define, again.timings.start) == (0, 0) and again.timings.ready < 30
        assert again.address == ready.address
        assert svc.hv.lookup(plan.name).ID() == first_id

        publisher.publish(m.TeardownGuests.new(job_id=job, deadline=60.0, node=config.node.name))
        gone = expect(waiter, m.GuestsTornDown, timeout=60)
        assert gone.guests == [plan.name] and gone.disks_removed == 1
        # Answered once the guest's QEMU has exited; its domain and files go right after, off the queue.
        assert f"guest={plan.name},".encode() not in b"\n".join(_argvs()), "the guest's QEMU still runs"
        for thread in svc.teardown_threads:
            thread.join(60)
        assert svc.hv.lookup(plan.name) is None
        assert not (Path(config.node.guest_dir) / plan.name).exists()
        assert not config.job_dir(job).exists()

        # Teardown again: nothing left, still confirmed.
        publisher.publish(m.TeardownGuests.new(job_id=job, deadline=60.0, node=config.node.name))
        assert expect(waiter, m.GuestsTornDown, timeout=60).guests == []
    finally:
        waiter.close()
        publisher.close()


def _argvs() -> list[bytes]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            found.append(cmdline.read_bytes())
        except OSError:
            pass  # gone meanwhile
    return found


def test_an_image_this_node_does_not_know_fails_cleanly(broker_url, worker, ssh_key):
    config, svc = worker
    job = f"nw-{uuid.uuid4().hex[:6]}"
    plan = guest(config, job, ssh_key, digest="f" * 64)
    waiter = EventWaiter(broker_url, [f"job.{job}.#"])
    try:
        Publisher(broker_url).publish(hoist(job, 60.0, [plan]))
        deadline = time.monotonic() + 30
        event = waiter.next(deadline)
        assert isinstance(event, m.GuestFailed) and not event.retryable
        assert "catalog" in event.reason
        assert svc.hv.lookup(plan.name) is None
        assert not (Path(config.node.guest_dir) / plan.name).exists()
    finally:
        waiter.close()
