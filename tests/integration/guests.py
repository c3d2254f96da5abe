"""Helpers for tests that run a node worker in-process against the real broker and libvirt."""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
import uuid
from pathlib import Path

import pytest

from vtorque.services.image_stager.store import ImageStore
from vtorque.services.node_worker.service import NodeWorker
from vtorque.shared import messages as m
from vtorque.shared.bus import Publisher, ServiceRunner
from vtorque.shared.config import Config, ImageEntry, ImagesConfig, NodeConfig, SpecConfig, load_config


@contextlib.contextmanager
def node_worker(broker_url: str, node_name: str, job_prefix: str, spec: SpecConfig | None = None,
                images: dict[str, ImageEntry] | None = None, **node):
    """A NodeWorker consuming `vtorque.node.<node_name>`, with a state root of its own under the site's
    state_dir (QEMU runs as libvirt-qemu and must traverse to the guest files: not pytest's tmp), the site's
    test image (or `images`) staged into its own store. Yields (config, worker); removes its guests of
    `job_prefix`* after."""
    site = load_config()
    if images is None and "tiny" not in site.images.catalog:
        pytest.fail("no image 'tiny' in /etc/vtorque/vtorque.toml: `make test` configures it")
    catalog = images if images is not None else site.images.catalog
    root = Path(site.state_dir) / f"test-{uuid.uuid4().hex[:8]}"
    root.mkdir(mode=0o711)
    config = Config(state_dir=str(root), broker=site.broker, tracing=site.tracing,
                    images=ImagesConfig(store=str(root / "images"), catalog=catalog),
                    node=NodeConfig(name=node_name, guest_dir=str(root / "guests"), **{"boot_timeout": 120, **node}),
                    spec=spec or SpecConfig())
    for entry in ([catalog["tiny"]] if images is None else catalog.values()):
        ImageStore(config.images.store).stage(entry.source, entry.sha256)
    svc = NodeWorker(config, Publisher(broker_url))
    runner = ServiceRunner(broker_url, svc.queues(), svc.handlers())
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    assert runner.ready.wait(15)
    try:
        yield config, svc
    finally:
        runner.stop()
        thread.join(30)
        for name, meta in svc.hv.vtorque_domains().items():
            if meta.get("job", "").startswith(job_prefix):
                svc.hv.remove(name)
        shutil.rmtree(root, ignore_errors=True)


def expect(waiter, kind, timeout: float = 150):
    """The next event of `kind`; a GuestFailed on the way fails the test with the guest's console."""
    deadline = time.monotonic() + timeout
    while (event := waiter.next(deadline)) is not None:
        if isinstance(event, kind):
            return event
        if isinstance(event, m.GuestFailed) and kind is not m.GuestFailed:
            pytest.fail(f"guest failed: {event.reason}\n{event.console_tail}")
    pytest.fail(f"no {kind.__name__} within {timeout}s")
