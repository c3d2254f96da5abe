"""The same refusals on the real path: a hand-built BootGuests published to the node's queue on the broker
(the session's own vhost, tests/conftest.py), consumed by an in-process node worker on a site of its own. The
refusal comes back as GuestFailed on the job's events; no domain is defined, no guest directory made."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from integration.guests import node_worker  # tests/ is on sys.path (rootdir conftest)

from vtorque.shared import messages as m
from vtorque.shared.bus import EventWaiter, Publisher
from vtorque.shared.messages import domain_name

from .conftest import KEY, hand_built


def test_a_published_boot_for_root_with_a_path_name_is_refused(test_site, test_guest, broker_url, users):
    a, _ = users
    test_site.catalog = {"tiny": test_guest}
    with node_worker(test_site, "sec-", allow_system_owners=False) as (config, svc):  # a real site's default
        job = f"sec-{uuid.uuid4().hex[:6]}"
        entry = config.images.catalog["tiny"]
        attacks = {
            "root": dict(owner=m.Owner(user="root", uid=0, gid=0)),
            # A guest name is made by the node, never sent (a path in a node name: test_command_checks.py).
            "path": dict(image="../../state"),
            "uid": dict(owner=m.Owner(user=a.name, uid=0, gid=a.gid)),
        }
        waiter = EventWaiter(broker_url, [f"job.{m.routing_word(job)}.#"])
        publisher = Publisher(broker_url)
        try:
            for what, changes in attacks.items():
                plan = m.GuestPlan(**{**dict(name=domain_name(job, config.node.name, 0), node=config.node.name,
                                              index=0, image="tiny", image_digest=entry.sha256, vcpus=1,
                                              ram_mib=128, cores=None, owner=a.owner(),
                                              ssh_authorized_keys=[KEY]), **changes})
                publisher.publish(hand_built(job, [plan]))
                event = waiter.next(time.monotonic() + 30)
                assert isinstance(event, m.GuestFailed), (what, event)
                assert not event.retryable and event.reason.startswith("refused by node"), (what, event.reason)
        finally:
            waiter.close()
            publisher.close()
        assert [n for n, meta in svc.hv.vtorque_domains().items() if meta.get("job") == job] == []
        assert not any(p.name.startswith("vt-") for p in Path(config.node.guest_dir).iterdir())
