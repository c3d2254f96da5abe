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
