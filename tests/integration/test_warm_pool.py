"""The warm pool with real libvirt + QEMU (TCG) and the real RabbitMQ, on a site of the test's own: guests restored
from a warm image ahead of demand and kept paused, root's alone; two jobs of two owners each take one, resumed
with their own identity, and share nothing (ssh host keys, random state, owner, files); a pooled guest is never
taken twice; reconciliation keeps the current pool and removes the guests of a rebuilt warm image; a claimed
guest goes with its job."""

from __future__ import annotations

import os
import stat
import subprocess
import time
import uuid
from pathlib import Path

import libvirt
import pytest

from vtorque.services.node_worker import guest_link, warm, warm_pool
from vtorque.services.node_worker.reconcile import Reconciler
from vtorque.shared import messages as m
from vtorque.shared.bus import EventWaiter, Publisher
from vtorque.shared.job_boot import hoist

from . import test_warm_start
from .guests import expect, node_worker
from .test_warm_start import RAM_MIB, VCPUS, console, keypair, plans

pytestmark = [pytest.mark.slow, pytest.mark.guest]
owners = test_warm_start.owners  # the fixture: two job owners on the host


@pytest.fixture
def worker(test_site, test_guest):
    test_site.catalog = {"tiny": test_guest}
    with node_worker(test_site, "wp-", warm_pool=2) as started:
        config, svc = started
        try:
            yield started
        finally:
            for name in svc.hv.active_names():
                if warm_pool.is_pool_name(name) and (Path(config.node.guest_dir) / name).exists():
                    svc.remove_guest(name, None)


def pooled_names(config) -> set[str]:
    return {p.name for p in Path(config.node.guest_dir).iterdir() if warm_pool.is_pool_name(p.name)}


PROBE = """
import socket, sys
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
    sock.settimeout(10)
    sock.connect(sys.argv[1])
    _, fds, _, _ = socket.recv_fds(sock, 1, 1)
sys.exit(0 if fds else 1)
"""


def connect_as(path: str, uid: int) -> bool:
    """Whether a process of `uid` is handed the guest's sshd through `path`. A process of its own (fork and
    exec): a bare fork of this process, its libvirt connections open, broke them."""
    run = subprocess.run(["/usr/bin/python3", "-c", PROBE, path], user=uid, group=65534, extra_groups=[],
                         capture_output=True, timeout=30)
    return run.returncode == 0


def test_two_jobs_from_the_pool_share_nothing_and_no_guest_is_taken_twice(broker_url, worker, owners, tmp_path,
                                                                          monkeypatch):
    config, svc = worker
    undefined: list[tuple[str, str]] = []  # what the teardown's undefine said, for a failure's message
    remove_domain = svc._remove_domain

    def noted(name: str) -> str:
        why = remove_domain(name)
        undefined.append((name, why))
        return why

    monkeypatch.setattr(svc, "_remove_domain", noted)
    made = warm.build(config, svc.hv, svc.store, "tiny", VCPUS, RAM_MIB, svc.domain_type)
    pool = warm_pool.pool_of(svc)
    assert pool.fill_to_target() == 2
    first = pooled_names(config)
    assert len(first) == 2
    for name in first:
        gdir = Path(config.node.guest_dir) / name
        # Paused, and no job's: no vtorque metadata, root's files alone, the job's ssh socket root's.
        dom = svc.hv.lookup(name)
        assert dom is not None and dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
        assert name not in svc.hv.vtorque_domains()
        st = os.lstat(gdir / warm_pool.RECORD)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
        st = os.lstat(gdir / "root.qcow2")  # QEMU's while it runs (libvirt's DAC labelling), as any guest's disk
        assert st.st_uid in (0, guest_link.qemu_uid()) and stat.S_IMODE(st.st_mode) == 0o600
        for fname in ("ssh.sock", "identity.sock"):
            st = os.lstat(gdir / fname)
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600), fname
        assert not (gdir / warm_pool.CLAIM).exists()
    # Reconciliation recognises them: not orphans (no job's metadata), left alone.
    assert Reconciler(svc, None, 0, lambda job: False).run_once() == []
    assert pooled_names(config) == first and first <= svc.hv.active_names()

    alice, bob = owners
    key_a, key_b = keypair(tmp_path, "a"), keypair(tmp_path, "b")
    job_a, job_b = f"wp-{uuid.uuid4().hex[:6]}", f"wp-{uuid.uuid4().hex[:6]}"
    [plan_a], [plan_b] = plans(config, job_a, alice, key_a), plans(config, job_b, bob, key_b)
    waiter = EventWaiter(broker_url, [f"job.{job_a}.#", f"job.{job_b}.#"])
    publisher = Publisher(broker_url)
    try:
        publisher.publish(hoist(job_a, 300.0, [plan_a]))
        ra = expect(waiter, m.GuestReady)
        publisher.publish(hoist(job_b, 300.0, [plan_b]))
        rb = expect(waiter, m.GuestReady)
        taken = {Path(ra.address).parent.name, Path(rb.address).parent.name}
        assert taken == first, (ra.address, rb.address)  # each its own pooled guest
        assert (ra.guest, rb.guest) == (plan_a.name, plan_b.name)
        for ready, job in ((ra, job_a), (rb, job_b)):
            gdir = Path(ready.address).parent
            assert ready.timings.kernel_up is None and "restored=1" in console(config, gdir.name)
            assert (gdir / warm_pool.CLAIM).read_text() == job
            assert (gdir / "job").read_text() == job
            assert svc.hv.vtorque_domains()[gdir.name]["job"] == job  # the job's now: teardown finds it
            assert (config.job_dir(job) / f"{gdir.name}.json").exists()  # the launcher's file, by domain name
        # The guest's ssh socket is its owner's: the other job's owner is refused by the link.
        assert os.lstat(ra.address).st_uid == alice.uid and os.lstat(rb.address).st_uid == bob.uid
        assert connect_as(ra.address, alice.uid) and not connect_as(ra.address, bob.uid)
        assert connect_as(rb.address, bob.uid) and not connect_as(rb.address, alice.uid)

        test_warm_start.check_two_jobs_share_nothing(tmp_path, (key_a, ra, alice, plan_a.name),
                                                     (key_b, rb, bob, plan_b.name))

        # Job A ends: its pooled guest goes with it, as any guest, and is never pooled again.
        publisher.publish(m.TeardownGuests.new(job_id=job_a, deadline=60.0, node=config.node.name))
        gone = expect(waiter, m.GuestsTornDown, timeout=60)
        name_a = Path(ra.address).parent.name
        assert gone.guests == [name_a]
        until = time.monotonic() + 30
        while time.monotonic() < until and ((Path(config.node.guest_dir) / name_a).exists()
                                            or config.job_dir(job_a).exists()):
            time.sleep(0.1)
        assert not (Path(config.node.guest_dir) / name_a).exists() and not config.job_dir(job_a).exists(), undefined
        assert svc.hv.lookup(name_a) is None
        # The refill makes new ones: never a guest a job had.
        assert pool.fill_to_target() == 2
        second = pooled_names(config) - {Path(rb.address).parent.name}
        assert len(second) == 2 and not second & first

        # The warm image rebuilt: reconciliation removes the pooled guests of the old one, keeps job B's guest.
        rebuilt = warm.build(config, svc.hv, svc.store, "tiny", VCPUS, RAM_MIB, svc.domain_type, force=True)
        assert rebuilt.meta["created"] != made.meta["created"]
        assert Reconciler(svc, None, 0, lambda job: job == job_b).run_once() == []
        assert pooled_names(config) == {Path(rb.address).parent.name}
        for name in second:
            assert svc.hv.lookup(name) is None
        # Job B no longer running: its claimed guest goes by reconciliation as any job's guest.
        removed = Reconciler(svc, None, 0, lambda job: False).run_once()
        assert [r.name for r in removed] == [Path(rb.address).parent.name]
        assert pooled_names(config) == set()
    finally:
        waiter.close()
        publisher.close()


def test_a_pooled_guest_that_cannot_resume_falls_back_to_a_restore(broker_url, worker, owners, tmp_path):
    config, svc = worker
    warm.build(config, svc.hv, svc.store, "tiny", VCPUS, RAM_MIB, svc.domain_type)
    pool = warm_pool.pool_of(svc)
    pool.size = 1
    assert pool.fill_to_target() == 1
    [name] = pooled_names(config)
    svc.hv.kill(name)  # its QEMU gone: the claim finds no domain
    with test_warm_start.one_guest_job(broker_url, config, owners[0], tmp_path, "wp") as (plan, ready):
        assert Path(ready.address).parent.name == plan.name  # restored from the warm image under its own name
        assert ready.timings.kernel_up is None
        assert not (Path(config.node.guest_dir) / name).exists()  # the failed pooled guest removed
