"""Exact pinning, IOcm and vRDMA on a real guest (libvirt + QEMU/TCG, real RabbitMQ): one boot per fake host.

The guest's vCPU goes on core 0, QEMU's emulator threads on core 1 (the host reserve), and its I/O cores are
[1, 0] with iocm_min_cores=1, iocm_max_cores=2, so the controller has room to widen the I/O threads' pinning
from {1} to {0,1} under load and narrow it back when idle. That needs real cores 0 and 1 (any machine of
2 cores or more); everything else the node worker reads of the host (NUMA nodes, sKVM's IOcm interface, RDMA
devices) is injected: the test runs on a fake 2-core one-NUMA-node host and on a fake 16-core two-node host
(tests/conftest.py), whatever this machine is.
"""

import os
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from vtorque.cli.launcher_ssh import ssh_argv
from vtorque.services.node_worker import iocm, vrdma
from vtorque.shared import messages as m
from vtorque.shared.bus import EventWaiter, Publisher
from vtorque.shared.config import SpecConfig
from vtorque.shared.job_boot import hoist

from .guests import expect, node_worker

pytestmark = [pytest.mark.slow, pytest.mark.guest]


@pytest.fixture
def worker(test_site, test_guest, fake_host):
    test_site.catalog = {"tiny": test_guest}
    with node_worker(test_site, "io-", spec=SpecConfig(vrdma_require=[]), iocm_interval=0.5,
                     iocm_widen_mib_s=2.0, iocm_narrow_mib_s=0.25, iocm_widen_samples=2,
                     iocm_narrow_samples=4) as started:
        yield started


@pytest.fixture(scope="module")
def ssh_key(tmp_path_factory):
    key = tmp_path_factory.mktemp("key") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


def cores(cpumap) -> list[int]:
    return [i for i, on in enumerate(cpumap) if on]


def iothread_cores(dom) -> dict[int, list[int]]:
    return {tid: cores(cpumap) for tid, cpumap in dom.ioThreadInfo(0)}


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(0.25)
    pytest.fail(f"not within {timeout}s: {what}")


def test_pinning_iocm_and_vrdma_on_a_running_guest(broker_url, worker, ssh_key, fake_host):
    config, svc = worker
    if not {0, 1} <= os.sched_getaffinity(0):
        pytest.fail(f"this test pins a real guest to cores 0 and 1; this process may use {os.sched_getaffinity(0)}")
    job = f"io-{uuid.uuid4().hex[:6]}"
    entry = config.images.catalog["tiny"]
    plan = m.GuestPlan(name=f"vt-{job}-{config.node.name}-0", node=config.node.name, index=0, image="tiny",
                       image_digest=entry.sha256, vcpus=1, ram_mib=160, cores=[0], emulator_cores=[1],
                       io_cores=[1, 0], iocm_min_cores=1, iocm_max_cores=2, vrdma=True,
                       owner=m.Owner(user="root", uid=0, gid=0),
                       ssh_authorized_keys=[ssh_key.with_suffix(".pub").read_text().strip()])
    waiter = EventWaiter(broker_url, [f"job.{job}.#"])
    publisher = Publisher(broker_url)
    stop = threading.Event()
    try:
        publisher.publish(hoist(job, 300.0, [plan]))
        ready = expect(waiter, m.GuestReady)
        dom = svc.hv.lookup(plan.name)

        # Exact pinning, as the libvirt API reports it on the running guest.
        assert [cores(c) for c in dom.vcpuPinInfo(0)] == [[0]]
        assert cores(dom.emulatorPinInfo(0)) == [1]
        assert iothread_cores(dom) == {1: [1], 2: [1]}
        xml = dom.XMLDesc(0)
        if fake_host.host.numa_nodes == 1:
            assert "<numatune" not in xml  # nothing to place on a host of one NUMA node
        else:  # core 0 is on the fake host's node 0: the guest's memory is bound there
            assert "<memory mode='strict' nodeset='0'/>" in xml, xml
        # vRDMA: the backend the host has (ivshmem: no RDMA hardware), and the guest sees the device (Red Hat
        # 1af4:1110).
        assert vrdma.available(vrdma.probe()) == [vrdma.IVSHMEM]
        region = vrdma.shmem_name(job, vrdma.node_secret(svc.config.state_dir))
        assert f"<shmem name='{region}'>" in xml and "ivshmem-plain" in xml
        shm = Path("/dev/shm") / region  # made by root before QEMU, QEMU's own, for no one else to read
        assert shm.exists() and shm.stat().st_mode & 0o077 == 0

        def ssh(command, timeout=60):
            return subprocess.run(
                ssh_argv(ssh_key, ready.address, "root", command), capture_output=True, text=True, timeout=timeout
            )

        pci = ssh("cat /sys/bus/pci/devices/*/vendor /sys/bus/pci/devices/*/device | tr '\\n' ' '")
        assert pci.returncode == 0, pci.stderr
        assert "0x1af4" in pci.stdout and "0x1110" in pci.stdout

        # IOcm: the node worker's controller, as `vtorque run node-worker` starts it, with thresholds this
        # TCG guest's disk reaches, sampling every 0.5 s.
        ctl = iocm.start(svc, stop)
        assert (ctl.interval, ctl.policy.high, ctl.policy.down_samples) == (0.5, 2 * 2**20, 4)
        time.sleep(2)
        assert iothread_cores(dom) == {1: [1], 2: [1]}, "widened without load"

        load = subprocess.Popen(
            ssh_argv(ssh_key, ready.address, "root",
                     "rm -f /tmp/stop; while [ ! -e /tmp/stop ]; do "
                     "dd if=/dev/vda of=/dev/null bs=64k count=512 iflag=direct 2>/dev/null; done"),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            t0 = time.monotonic()
            widened = wait_for(lambda: iothread_cores(dom) == {1: [0, 1], 2: [0, 1]}, 60, "I/O cores widened")
            print(f"widened {widened - t0:.1f}s after the load started")
        finally:
            assert ssh("touch /tmp/stop").returncode == 0
            load.wait(30)
        t1 = time.monotonic()
        narrowed = wait_for(lambda: iothread_cores(dom) == {1: [1], 2: [1]}, 60, "I/O cores narrowed")
        print(f"narrowed {narrowed - t1:.1f}s after the load stopped")
        assert (plan.name, 1, 2) in ctl.changes and (plan.name, 2, 1) in ctl.changes
        # The vCPU and emulator pinning were never touched.
        assert [cores(c) for c in dom.vcpuPinInfo(0)] == [[0]] and cores(dom.emulatorPinInfo(0)) == [1]
        # Teardown removes the job's shared memory too (QEMU leaves it behind).
        svc.on_teardown_guests(m.TeardownGuests.new(job_id=job, deadline=60.0, node=config.node.name))
        assert not shm.exists()
    finally:
        stop.set()
        waiter.close()
        publisher.close()


def test_a_node_without_the_required_vrdma_fails_before_any_boot(broker_url, worker, ssh_key):
    config, svc = worker
    config.spec.vrdma_require = ["sriov-vf"]  # neither fake host has RDMA hardware
    job = f"io-{uuid.uuid4().hex[:6]}"
    entry = config.images.catalog["tiny"]
    plan = m.GuestPlan(name=f"vt-{job}-{config.node.name}-0", node=config.node.name, index=0, image="tiny",
                       image_digest=entry.sha256, vcpus=1, ram_mib=128, cores=None, vrdma=True,
                       owner=m.Owner(user="root", uid=0, gid=0),
                       ssh_authorized_keys=[ssh_key.with_suffix(".pub").read_text().strip()])
    waiter = EventWaiter(broker_url, [f"job.{job}.#"])
    try:
        started = time.monotonic()
        Publisher(broker_url).publish(hoist(job, 60.0, [plan]))
        failed = expect(waiter, m.GuestFailed, timeout=30)
        assert time.monotonic() - started < 10
        assert not failed.retryable and failed.guest == plan.name
        assert failed.reason.startswith(f"node {config.node.name} has no usable vRDMA backend")
        assert "SR-IOV: no RDMA virtual functions" in failed.reason
        assert svc.hv.lookup(plan.name) is None
        assert not (Path(config.node.guest_dir) / plan.name).exists()
    finally:
        waiter.close()
