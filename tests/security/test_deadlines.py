"""Issue 11 item 4 / finding 9: nothing a user supplies blocks the node worker or libvirt. Every libvirt call
has a deadline: a wedged libvirtd (here: a define that never returns) costs one boot its retryable failure
within the deadline, and the node worker goes on answering."""

from __future__ import annotations

import threading
import time

import pytest

from vtorque.services.node_worker.hypervisor import Hypervisor, HypervisorError
from vtorque.shared import messages as m


def test_a_libvirt_call_that_never_returns_is_abandoned_at_its_deadline():
    hv = Hypervisor("test:///default", query_timeout=0.5)
    release = threading.Event()
    hv._lookup = lambda name: release.wait(30)  # a libvirtd that stopped answering
    started = time.monotonic()
    try:
        with pytest.raises(HypervisorError, match="did not answer lookup"):
            hv.lookup("vt-x")
        assert time.monotonic() - started < 2
    finally:
        release.set()


def test_a_wedged_define_fails_the_boot_retryably_within_the_deadline(site, users):
    a, _ = users
    hv = Hypervisor("test:///default", change_timeout=1.0)
    release = threading.Event()
    hv._define = lambda xml: release.wait(60)
    site.worker.hv = hv
    j = "9191.dl"
    started = time.monotonic()
    try:
        answers = site.boot(j, site.plan(a, j))
    finally:
        release.set()
    assert time.monotonic() - started < 15
    assert len(answers) == 1 and isinstance(answers[0], m.GuestFailed), answers
    assert answers[0].retryable and "did not answer define within 1s" in answers[0].reason
    assert [p.name for p in (site.root / "guests").iterdir()] == []  # its guest files: removed


def test_a_wedged_stats_call_fails_an_iocm_round_at_its_deadline_and_the_next_round_runs():
    """IOcm's own libvirt calls (a guest's I/O counters, its pinning) have the same deadline: a libvirtd that
    stops answering them costs the controller a round, not its thread."""
    from vtorque.services.node_worker import iocm

    release = threading.Event()

    class Dom:
        def isActive(self):
            return True

        def blockStats(self, dev):
            release.wait(30)  # libvirtd stopped answering
            return (0, 0, 0, 0, 0)

    class Hv(Hypervisor):
        def vtorque_domains(self):
            return {"vt-io-1": {"iocm-cores": "1", "job": "1"}}

        def lookup(self, name):
            return Dom()

        def xml(self, dom):
            return ("<domain><iothreads>1</iothreads><cputune><iothreadpin iothread='1' cpuset='1'/></cputune>"
                    "<devices><disk><driver iothread='1'/><target dev='vda'/></disk></devices></domain>")

    hv = Hv("test:///default", query_timeout=0.5)
    controller = iocm.IocmController(hv=hv, stop=threading.Event(), backend=iocm.LibvirtIocm())
    started = time.monotonic()
    try:
        assert iocm.guest_iocm(hv.xml(None), {"iocm-cores": "1"}) is not None  # the round does reach the stats
        with pytest.raises(HypervisorError, match="did not answer vt-io-1's I/O counters within"):
            controller.step()
        assert time.monotonic() - started < 2
    finally:
        release.set()
    controller.step()  # libvirtd answers again: the next round samples the guest
    assert "vt-io-1" in controller._last
