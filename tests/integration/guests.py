"""Helpers for tests that run a node worker in-process against the real broker and libvirt, on a site of the
test's own (tests/conftest.py `test_site`: the session's vhost, a node name of its own, directories under a
temporary root), never the single-host stack's."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from vtorque.services.node_worker.service import NodeWorker
from vtorque.shared import messages as m
from vtorque.shared.bus import Publisher, ServiceRunner
from vtorque.shared.config import ImageEntry, SpecConfig


@contextlib.contextmanager
def node_worker(site, job_prefix: str, spec: SpecConfig | None = None, images: dict[str, ImageEntry] | None = None,
                **node):
    """A NodeWorker consuming `vtorque.node.<site.node>` with the site's config (`node` keys added to its
    [node] section, `spec` as its [spec]), the catalog's images (or `images`) staged into the site's store.
    Yields (config, worker); removes its guests of `job_prefix`* after."""
    if images is not None:
        site.catalog = dict(images)
    if not site.catalog:
        pytest.fail("node_worker needs images: put the test_guest fixture's entry in site.catalog")
    site.sections.setdefault("node", {}).update({"boot_timeout": 120, **node})
    config = site.config()
    if spec is not None:
        config.spec = spec
    site.stage()
    svc = NodeWorker(config, Publisher(site.broker_url))
    runner = ServiceRunner(site.broker_url, svc.queues(), svc.handlers())
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    assert runner.ready.wait(15)
    try:
        yield config, svc
    finally:
        runner.stop()
        thread.join(30)
        for name, meta in svc.hv.vtorque_domains().items():
            if meta.get("job", "").startswith(job_prefix) and meta.get("node") == config.node.name:
                svc.hv.remove(name)


def expect(waiter, kind, timeout: float = 150):
    """The next event of `kind`; a GuestFailed on the way fails the test with the guest's console."""
    deadline = time.monotonic() + timeout
    while (event := waiter.next(deadline)) is not None:
        if isinstance(event, kind):
            return event
        if isinstance(event, m.GuestFailed) and kind is not m.GuestFailed:
            pytest.fail(f"guest failed: {event.reason}\n{event.console_tail}")
    pytest.fail(f"no {kind.__name__} within {timeout}s")
