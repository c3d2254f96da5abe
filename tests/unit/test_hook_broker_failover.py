"""A hook whose broker node is lost mid-wait (a RabbitMQ cluster lost one node, issue 12.2): it reconnects,
asks again with the same JobStarted/JobEnded (idempotent: no second boot), and keeps what it already heard."""

import pytest

from vtorque.hooks import job_hook
from vtorque.hooks.job_hook import JobContext, Verdict, run_epilogue, run_prologue
from vtorque.shared import messages as m
from vtorque.shared.config import Config, ImageEntry
from vtorque.shared.hook_channel import BrokerUnreachable
from vtorque.shared.job_script import JobHeader

DIGEST = "d" * 64
OWNER = m.Owner(user="root", uid=0, gid=0)


def config() -> Config:
    c = Config()
    c.images.catalog = {"tiny": ImageEntry(source="/nonexistent", sha256=DIGEST)}
    return c


def plan(job_id):
    return m.JobPlanned.new(job_id=job_id, deadline=60.0, guests=[
        m.GuestPlan(name=f"vt-{job_id}-{n}-0", node=n, index=i, image="tiny", image_digest=DIGEST, vcpus=1,
                    ram_mib=128, cores=None, owner=OWNER, ssh_authorized_keys=[]) for i, n in enumerate(["c1", "c2"])])


def ready(job_id, node, index):
    return m.GuestReady.new(job_id=job_id, deadline=60.0, guest=f"vt-{job_id}-{node}-0", node=node, index=index,
                            address="10.0.0.1", ssh_port=22000 + index,
                            timings=m.PhaseTimings(image=0, disks=0, define=0, start=0, kernel_up=None, ready=1))


class Scripted:
    """Channels that deliver a script of events each; BrokerUnreachable in a script is the node lost there."""

    def __init__(self, *scripts):
        self.scripts, self.published, self.opened = list(scripts), [], 0

    def __call__(self, url, patterns, attempts=3, timeout=5.0):
        self.opened += 1
        script = self.scripts.pop(0)
        factory = self

        class Channel:
            def publish(self, event):
                factory.published.append(event)

            def events(self, deadline):
                for item in script:
                    if isinstance(item, Exception):
                        raise item
                    yield item, {}

            def close(self):
                pass

        return Channel()


@pytest.fixture(autouse=True)
def no_wait(monkeypatch):
    monkeypatch.setattr(job_hook, "_retry_delay", lambda lost: 0.0)


def job():
    return JobContext(scheduler="slurm", job_id="7", owner=OWNER, header=JobHeader(spec={"img": "tiny"}),
                      nodes=[m.NodeAllocation(host=h, ncpus=1) for h in ("c1", "c2")])


def test_the_prologue_asks_again_on_another_node_and_keeps_what_it_heard():
    lost = BrokerUnreachable("lost the broker while waiting: StreamLostError")
    channels = Scripted([plan("7"), ready("7", "c1", 0), lost], [plan("7"), ready("7", "c2", 1)])
    lines = []
    outcome = run_prologue(job(), config(), 60, lines.append, channel_factory=channels)
    assert outcome.verdict is Verdict.READY, (outcome.reason, lines)
    assert [r.node for r in outcome.ready] == ["c1", "c2"]  # c1's readiness heard before the loss still counts
    started = [e for e in channels.published if isinstance(e, m.JobStarted)]
    assert len(started) == 2 and started[0].message_id == started[1].message_id  # the same ask, not a new job
    assert any("reconnecting to the broker and asking again" in line for line in lines)


def test_the_prologue_gives_up_after_three_tries_per_broker_attempt():
    lost = BrokerUnreachable("lost the broker while waiting")
    c = config()
    c.hooks.broker_attempts = 2
    channels = Scripted(*[[lost]] * 10)
    outcome = run_prologue(job(), c, 60, lambda _: None, channel_factory=channels)
    assert outcome.verdict is Verdict.FAILED and channels.opened == 1 + 3 * 2


def test_a_nacked_ask_again_is_tried_again():
    """Right after a node's loss the quorum queues may have no leader yet: the broker nacks the publish."""
    class Nacking(Scripted):
        def __call__(self, *args, **kw):
            channel = super().__call__(*args, **kw)
            if self.opened == 2:
                def refuse(event):
                    raise BrokerUnreachable("publish of JobStarted failed: NackError")
                channel.publish = refuse
            return channel

    channels = Nacking([plan("7"), BrokerUnreachable("lost")], [], [ready("7", "c1", 0), ready("7", "c2", 1)])
    outcome = run_prologue(job(), config(), 60, lambda _: None, channel_factory=channels)
    assert outcome.verdict is Verdict.READY, outcome.reason
    assert channels.opened == 3


def test_the_epilogue_asks_again_for_the_teardown():
    torn = [
        m.GuestsTornDown.new(job_id="7", deadline=60.0, node=n, guests=[f"vt-7-{n}-0"], disks_removed=1)
        for n in ("c1", "c2")
    ]
    channels = Scripted([torn[0], BrokerUnreachable("lost")], [torn[1]])
    assert run_epilogue(job(), config(), 0, lambda _: None, channel_factory=channels)
    ended = [e for e in channels.published if isinstance(e, m.JobEnded)]
    assert len(ended) == 2 and ended[0].message_id == ended[1].message_id


def test_what_only_a_valid_job_gets_is_done_once_after_the_one_validation(monkeypatch):
    """The prologue's process validates the spec once (run_prologue) and hands the result to the adapter's
    `on_valid` (Torque: the cancel watcher): a bad spec is rejected with no watcher and nothing published."""
    from vtorque.shared import spec as spec_module

    calls = []
    real = spec_module.validate
    monkeypatch.setattr(spec_module, "validate", lambda *a: calls.append(a) or real(*a))
    valid = []
    channels = Scripted([plan("7"), ready("7", "c1", 0), ready("7", "c2", 1)])
    outcome = run_prologue(job(), config(), 60, lambda _: None, channel_factory=channels, on_valid=valid.append)
    assert outcome.verdict is Verdict.READY and [s.img for s in valid] == ["tiny"] and len(calls) == 1

    bad = JobContext(scheduler="torque", job_id="8", owner=OWNER, header=JobHeader(spec={"img": "nope"}),
                     nodes=[m.NodeAllocation(host="c1", ncpus=1)])
    channels, valid = Scripted([]), []
    outcome = run_prologue(bad, config(), 60, lambda _: None, channel_factory=channels, on_valid=valid.append)
    assert outcome.verdict is Verdict.REJECTED and "bad VM spec: -vm img=nope" in outcome.reason
    assert valid == [] and channels.published == [] and channels.opened == 0
