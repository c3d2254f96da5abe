"""10,000 generated malformed and hostile messages into each service's queue (bridge, stager, a node worker), on
the real broker, consumed by the real services in-process (the node worker on libvirt's test driver): none
crashes a consumer, and every message is either answered with a rejection naming why or dead-lettered with
its reason, never "handler crashed". And 10,000 generated -vm specs: each is a valid spec or a SpecError that
names the key.

Deterministic (seeded); a vhost of its own, so the dead-letter queue counts only this test's messages."""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from dataclasses import replace

import kombu
import pytest

from vtorque.services.image_stager.service import ImageStager
from vtorque.services.node_worker.hypervisor import Hypervisor
from vtorque.services.node_worker.instant import instant_segments
from vtorque.services.node_worker.service import NodeWorker
from vtorque.services.scheduler_bridge.service import SchedulerBridge
from vtorque.shared import messages as m
from vtorque.shared import topology as t
from vtorque.shared.bus import COMMANDS, EVENTS, EventWaiter, ServiceRunner, declare_topology, table_queue
from vtorque.shared.config import load_config
from vtorque.shared.spec import SpecError, validate

pytestmark = pytest.mark.slow
N = 10_000
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG2dXW1vjFpNu2d0dw7Fqt5fLwRY7FTl1Qb4mK3xqQ9n test"
HOSTILE_WORDS = ["../../etc", "/etc/shadow", "a" * 300, "", " ", "$(id)", "`id`", "x;rm -rf /", "\x00", "é" * 40,
                 "-1", "0", "99999999999999999999", "1e309", "nan", "tiny", "root", "${HOME}", "%2e%2e", "\n"]


@pytest.fixture
def site(test_site, private_broker):
    """The test site on a vhost of its own (tests/conftest.py), so the dead-letter queue counts only this test's."""
    with private_broker() as broker:
        own = replace(test_site, broker_url=broker.url)
        own.sections.setdefault("node", {}).update({"libvirt_uri": "test:///default", "allow_system_owners": False})
        yield own


def _word(rng: random.Random) -> str:
    return rng.choice(HOSTILE_WORDS) if rng.random() < 0.6 else "".join(
        rng.choice("abcXYZ019._-/%$ ") for _ in range(rng.randint(0, 30)))


def _envelope(rng: random.Random, kind: str, job: str) -> dict:
    now = m.utcnow()
    return {"type": kind, "message_id": uuid.uuid4().hex, "job_id": job, "created_at": now.isoformat(),
            "deadline": (now.replace(year=now.year + 1)).isoformat()}


def _malformed(rng: random.Random, kind: str, job: str) -> bytes:
    """Bodies no decoder should accept: garbage, other JSON, the wrong or a missing type, bad fields."""
    choice = rng.randrange(8)
    if choice == 0:
        return rng.randbytes(rng.randint(0, 500))
    if choice == 1:
        return json.dumps(rng.choice([None, 1, -1.5, "x", [], [1, 2], True])).encode()
    body = _envelope(rng, kind, job)
    if choice == 2:
        body["type"] = _word(rng)
    elif choice == 3:
        del body[rng.choice(["type", "message_id", "job_id", "created_at", "deadline"])]
    elif choice == 4:
        body[_word(rng) or "x"] = _word(rng)  # an unknown field
    elif choice == 5:
        body["deadline"] = _word(rng)
    elif choice == 6:
        body["job_id"] = rng.choice([1, None, [], {"a": 1}])
    else:
        return json.dumps(body)[: rng.randint(1, 60)].encode()  # cut short
    return json.dumps(body).encode()


def _hostile_spec(rng: random.Random) -> dict[str, str]:
    keys = ["img", "vcpus", "ram", "vms_per_node", "disk", "fs_type", "distro", "vcpu_pinning", "vrdma", "iocm",
            "iocm_min_cores", "iocm_max_cores", "vm_prologue", "metadata", "auto_shutdown", "arch"]
    return {rng.choice(keys + [_word(rng)]): _word(rng) for _ in range(rng.randint(0, 6))}


def _hostile(rng: random.Random, queue: str, job: str, node: str, digest: str):
    """Well-formed messages with hostile content; each must be answered with a rejection."""
    if queue == "bridge":
        user = rng.choice(["root", "nobody", _word(rng) or "u", "daemon"])
        return m.JobStarted.new(
            job_id=job, deadline=60.0, scheduler=rng.choice(["torque", "slurm"]),
            owner=m.Owner(user=user, uid=rng.choice([0, 1, 65534, 1000, -1]), gid=rng.choice([0, 1000])),
            nodes=[m.NodeAllocation(host=rng.choice([node, _word(rng) or "n"]), ncpus=rng.randint(-1, 5000))
                   for _ in range(rng.randint(0, 3))],
            spec=_hostile_spec(rng), ssh_authorized_keys=[rng.choice([KEY, _word(rng)])])
    if queue == "stager":
        return m.StageImage.new(job_id=job, deadline=60.0, image=_word(rng),
                                digest=rng.choice([digest[::-1], _word(rng), "0" * 64]))
    # A job's one BootGuests: hostile guest fields said once, and a node list and core layout that may not fit
    # (this node missing, named twice, a node named like a path, no or too many guests, cores for other nodes).
    guest = m.GuestTemplate(image=_word(rng), image_digest=rng.choice([digest, _word(rng)]),
                            vcpus=rng.randint(-2, 10_000), ram_mib=rng.randint(-5, 10**9),
                            owner=m.Owner(user=rng.choice(["root", _word(rng) or "x"]), uid=rng.choice([0, 1, -1]),
                                          gid=0), ssh_authorized_keys=[_word(rng)])
    nodes = rng.choice([[node], [node, node], [_word(rng) or "n"], [node, _word(rng) or "n"], [], [f"{node}x"]])
    cores = m.NodeCores(guests=[rng.choice([None, [rng.randint(-1, 70_000)]]) for _ in range(rng.randint(0, 300))],
                        emulator=rng.choice([None, [rng.randint(-1, 70_000)]]))
    layout = rng.choice([{"cores": cores}, {"node_cores": [cores] * rng.randint(0, 3)},
                         {"cores": cores, "node_cores": [cores]}, {}])
    return m.BootGuests.new(job_id=job, deadline=60.0, guest=guest, nodes=nodes, **layout)


def _drain_dead(url: str) -> list:
    out = []
    with kombu.Connection(url) as conn:
        queue = table_queue(t.DEAD_QUEUE)(conn.channel())
        while (raw := queue.get(no_ack=True)) is not None:
            out.append(raw.headers.get("x-vtorque-reason", ""))
    return out


@pytest.mark.parametrize("queue", ["bridge", "stager", "node"])
def test_ten_thousand_generated_messages_crash_nothing_and_each_gets_a_named_reason(site, test_guest, queue,
                                                                                       tmp_path):
    site.catalog = {"tiny": test_guest}
    config = load_config(site.write(), env={})
    url = site.broker_url
    node = config.node.name
    rng = random.Random(f"vtorque-{queue}")
    from vtorque.shared.bus import Publisher

    publisher = Publisher(url)
    if queue == "bridge":
        svc = SchedulerBridge(config, publisher)
        target, kind = (EVENTS.name, "job.{job}.job_started"), "JobStarted"
    elif queue == "stager":
        svc = ImageStager(config, publisher)
        target, kind = (COMMANDS.name, "stager"), "StageImage"
    else:
        # Job networks only as commands: a generated message that passed every check must not make a bridge in
        # this machine's own network namespace.
        svc = NodeWorker(config, publisher, hypervisor=Hypervisor("test:///default"),
                         segments=instant_segments(tmp_path))
        target, kind = (COMMANDS.name, f"node.{node}"), "BootGuests"
    runner = ServiceRunner(url, svc.queues()[:1], svc.handlers())
    waiter = EventWaiter(url, ["job.#", "image.#"])  # the stager answers on image.<digest>.…
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    assert runner.ready.wait(20)
    sent_hostile, hostile_jobs = 0, set()
    try:
        with kombu.Connection(url, transport_options={"confirm_publish": True}) as conn:
            channel = conn.channel()
            declare_topology(channel)
            producer = kombu.Producer(channel)
            for i in range(N):
                job = f"fz{i}"
                if rng.random() < 0.5:
                    body = _malformed(rng, kind, job)
                else:
                    body = m.encode(_hostile(rng, queue, job, node, test_guest.sha256))
                    sent_hostile += 1
                    hostile_jobs.add(job)
                producer.publish(body, exchange=target[0], routing_key=target[1].format(job=job),
                                 content_type="application/json", retry=False)
        answered: set[str] = set()
        deadline = time.monotonic() + 600
        dead: list[str] = []
        while time.monotonic() < deadline:
            while (event := waiter.next(time.monotonic() + 0.2)) is not None:
                if isinstance(event, (m.JobRejected, m.ImageStageFailed, m.GuestFailed, m.CommandExpired)):
                    answered.add(event.job_id)
            dead += _drain_dead(url)
            if len(answered) + len(dead) >= N:
                break
            assert thread.is_alive(), "the consumer died"
        assert thread.is_alive() and runner.check_senders is False
        crashed = [r for r in dead if r.startswith("handler crashed")]
        assert not crashed, crashed[:5]
        assert all(dead), "a dead letter without its reason"
        # Each message accounted for once: a hostile one answered with a rejection, or (a field no routing key
        # or file name could hold: a 300-byte digest, a node named "../x") refused at decoding like a malformed one.
        assert len(answered) + len(dead) == N, (len(answered), len(dead))
        assert answered <= hostile_jobs and len(answered) > sent_hostile // 3
        assert len(dead) >= N - sent_hostile
    finally:
        runner.stop()
        thread.join(30)
        waiter.close()


def test_ten_thousand_generated_specs_are_each_valid_or_refused_by_key(test_site, test_guest):
    test_site.catalog = {"tiny": test_guest}
    config = test_site.config()
    rng = random.Random("vtorque-specs")
    refused = 0
    for _ in range(N):
        spec = _hostile_spec(rng)
        try:
            validate(spec, config)
        except SpecError as exc:
            text = str(exc)
            assert text and "\n" not in text and len(text) < 1000, text
            refused += 1
    assert refused > N // 2  # what it generates is mostly hostile: most must be refused
