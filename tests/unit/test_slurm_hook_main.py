"""The Slurm PrologSlurmctld's answers, run through its real entry point (hooks/slurm/ main) with fake Slurm
client binaries (a script that records its argv) and a fake bus channel: Comment, exit code, deadline, the
node-worker check. The real Slurm is in tests/e2e/test_slurm_failure_reason.py."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from vtorque.hooks import slurm
from vtorque.hooks.slurm import comment as slurm_comment
from vtorque.shared import messages as m
from vtorque.shared.hook_channel import BrokerUnreachable, missing_node_workers

DIGEST = "b" * 64
FAKE_SCONTROL = """#!/bin/sh
printf '%s\\n' "$*" >> "$FAKE_LOG"
case "$1 $2" in
  "show config") printf 'PrologEpilogTimeout     = %s\\n' "$FAKE_TIMEOUT" ;;
  "show job") printf 'JobId=%s JobName=x\\n   Comment=%s\\n' "$4" "$FAKE_COMMENT"
              printf '     Nodes=vm CPU_IDs=0-1 Mem=100 GRES=\\n' ;;
  "update JobId="*) [ -z "$FAKE_UPDATE_FAILS" ] || { echo "Access/permission denied" >&2; exit 1; } ;;
esac
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("scontrol", "scancel"):
        path = bin_dir / name
        fake_scancel = '#!/bin/sh\nprintf "scancel %s\\n" "$*" >> "$FAKE_LOG"\n'
        path.write_text(FAKE_SCONTROL if name == "scontrol" else fake_scancel)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    state = tmp_path / "state" / "hash.2" / "job.12"
    state.mkdir(parents=True)
    (state / "script").write_text("#!/bin/sh\n# vtorque-job: 1\n# vtorque-spec: img=tiny\n")
    config = tmp_path / "vtorque.toml"
    config.write_text(f"""state_dir = "{tmp_path}/var"
[tracing]
dir = "{tmp_path}/traces"
[scheduler]
kind = "slurm"
bin_dir = "{bin_dir}"
[hooks]
prologue_timeout = 240
max_requeues = 2
[images.catalog.tiny]
source = "/nonexistent/tiny.qcow2"
sha256 = "{DIGEST}"
""")
    log = tmp_path / "scontrol.log"
    for key, value in {"VTORQUE_CONFIG": str(config), "FAKE_LOG": str(log), "FAKE_TIMEOUT": "300",
                       "FAKE_COMMENT": "(null)"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("FAKE_UPDATE_FAILS", raising=False)
    env = {"SLURM_JOB_ID": "12", "SLURM_JOB_NODELIST": "vm", "SLURM_JOB_CPUS_PER_NODE": "2",
           "SLURM_JOB_USER": "alice", "SLURM_JOB_UID": "1001", "SLURM_JOB_GID": "1001",
           "SLURM_JOB_RESTART_COUNT": "0", "VTORQUE_SLURM_STATE": str(tmp_path / "state")}
    return env, log


def updates(log: Path) -> list[str]:
    return [line.split("Comment=", 1)[1] for line in log.read_text().splitlines() if line.startswith("update ")]


class FakeChannel:
    """What the bus answers: `script` is a list of events, or an exception to raise when connecting."""

    script: list | Exception = []
    seen: list = []

    def __init__(self, url, patterns, attempts=3, timeout=5.0):
        if isinstance(self.script, Exception):
            raise self.script

    def publish(self, event):
        FakeChannel.seen.append(event)

    def events(self, deadline):
        FakeChannel.deadline_left = deadline - time.monotonic()
        for event in self.script:
            yield event, {}

    def close(self):
        pass


def channel(script):
    return type("Scripted", (FakeChannel,), {"script": script})


def test_a_staging_failure_is_told_in_the_comment_and_the_job_is_left_to_fail_in_its_batch_step(site):
    env, log = site
    failed = m.ImageStageFailed.new(job_id="12", deadline=60, image="tiny", digest=DIGEST,
                                    reason="sha256 mismatch: catalog bbbb…, file 1234…")
    code = slurm.main(["prolog"], env, channel_factory=channel([failed]))
    assert code == 0  # the batch step runs, as the owner: vtorque-launch prints the reason into the .e file
    (comment,) = updates(log)
    assert comment == "vtorque: not started: image tiny: sha256 mismatch: catalog bbbb…, file 1234…"
    assert slurm_comment.refusal_line("12", comment) == (
        "vtorque: job 12 did not start: image tiny: sha256 mismatch: catalog bbbb…, file 1234…")
    assert "scancel" not in log.read_text()  # a scancel would SIGKILL this hook and the job's EpilogSlurmctld


def test_an_infrastructure_failure_requeues_with_the_reason_then_refuses(site, monkeypatch):
    env, log = site
    monkeypatch.setenv("FAKE_COMMENT", "my run 7")
    down = channel(BrokerUnreachable("broker unreachable after 3 attempts"))
    assert slurm.main(["prolog"], env, channel_factory=down) == 1  # Slurm requeues
    assert updates(log) == ["vtorque: requeued (1 of 2): broker unreachable after 3 attempts | your comment: my run 7"]

    monkeypatch.setenv("FAKE_COMMENT", updates(log)[-1])
    assert slurm.main(["prolog"], {**env, "SLURM_JOB_RESTART_COUNT": "1"}, channel_factory=down) == 1
    assert updates(log)[-1].startswith("vtorque: requeued (2 of 2): ")

    monkeypatch.setenv("FAKE_COMMENT", updates(log)[-1])
    assert slurm.main(["prolog"], {**env, "SLURM_JOB_RESTART_COUNT": "2"}, channel_factory=down) == 0
    assert updates(log)[-1] == ("vtorque: not started: broker unreachable after 3 attempts (after 2 requeues)"
                                " | your comment: my run 7")


def test_a_job_that_starts_after_a_requeue_gets_the_owners_comment_back(site, monkeypatch):
    env, log = site
    monkeypatch.setenv("FAKE_COMMENT", "vtorque: requeued (1 of 2): boot timed out | your comment: my run 7")
    plan = m.JobPlanned.new(job_id="12", deadline=60, guests=[])
    assert slurm.main(["prolog"], {**env, "SLURM_JOB_RESTART_COUNT": "1"}, channel_factory=channel([plan])) == 0
    assert updates(log) == ["my run 7"]


def test_the_wait_ends_before_slurms_prolog_timeout(site, monkeypatch):
    env, log = site
    monkeypatch.setenv("FAKE_TIMEOUT", "40")  # far below hooks.prologue_timeout = 240
    FakeChannel.seen = []
    slurm.main(["prolog"], env, channel_factory=channel([]))
    assert 25 < FakeChannel.deadline_left <= 40 - slurm.PROLOG_MARGIN
    (started,) = [e for e in FakeChannel.seen if isinstance(e, m.JobStarted)]
    assert (started.deadline - started.created_at).total_seconds() <= 40 - slurm.PROLOG_MARGIN  # workers stop too
    # and the job was not left to loop: timed out = infrastructure, requeued with the reason
    assert updates(log)[-1].startswith("vtorque: requeued (1 of 2): timed out after ")


def test_a_prolog_timeout_that_leaves_no_room_refuses_at_once(site, monkeypatch):
    env, log = site
    monkeypatch.setenv("FAKE_TIMEOUT", "5")
    FakeChannel.seen = []
    assert slurm.main(["prolog"], env, channel_factory=channel([])) == 0
    assert FakeChannel.seen == []  # nothing published: no guest boots for a hook Slurm would kill
    assert "PrologEpilogTimeout=5" in updates(log)[-1] and updates(log)[-1].startswith("vtorque: not started: ")


def test_if_slurm_refuses_the_comment_the_job_is_cancelled_instead(site, monkeypatch):
    env, log = site
    monkeypatch.setenv("FAKE_UPDATE_FAILS", "1")
    failed = m.ImageStageFailed.new(job_id="12", deadline=60, image="tiny", digest=DIGEST, reason="gone")
    assert slurm.main(["prolog"], env, channel_factory=channel([failed])) == 1
    assert "scancel 12" in log.read_text()


def test_an_unreadable_job_is_refused_with_its_reason_not_requeued_forever(site):
    env, log = site
    del env["SLURM_JOB_UID"]
    assert slurm.main(["prolog"], env, channel_factory=channel([])) == 0
    assert updates(log)[-1].startswith("vtorque: not started: the prologue could not read the job")


class FakeQueue:
    def __init__(self, consumers):
        self.method = type("M", (), {"consumer_count": consumers})


class FakeConn:
    """pika BlockingConnection enough for missing_node_workers: vm has a worker, n2 has a queue but none, n3 none."""

    def __init__(self, consumers):
        self.consumers, self.slept = consumers, 0.0

    def channel(self):
        conn = self

        class Ch:
            is_closed, is_open = False, True

            def queue_declare(self, name, passive):
                import pika.exceptions

                host = name.removeprefix("vtorque.node.")
                if host not in conn.consumers:
                    self.is_closed, self.is_open = True, False
                    raise pika.exceptions.ChannelClosedByBroker(404, "NOT_FOUND")
                return FakeQueue(conn.consumers[host])

            def close(self):
                self.is_open = False

        return Ch()

    def sleep(self, s):
        self.slept += s
        time.sleep(0.01)


def test_a_refused_look_is_a_broker_problem_not_a_missing_node_worker():
    import pika.exceptions

    class Refusing(FakeConn):
        def channel(self):
            ch = super().channel()

            def refuse(name, passive):
                raise pika.exceptions.ChannelClosedByBroker(403, "ACCESS_REFUSED")
            ch.queue_declare = refuse
            return ch

    with pytest.raises(pika.exceptions.ChannelClosedByBroker):
        missing_node_workers(Refusing({}), ["vm"], grace=0.05)


def test_nodes_without_a_node_worker_are_named_after_the_grace():
    conn = FakeConn({"vm": 1, "n2": 0})
    assert missing_node_workers(conn, ["vm", "n2", "n3", "vm"], grace=0.05) == ["n2", "n3"]
    assert missing_node_workers(FakeConn({"vm": 1}), ["vm"], grace=5) == []


def test_the_hook_fails_fast_without_a_node_worker(monkeypatch):
    import vtorque.shared.hook_channel as hc

    def fake_init(self, url, patterns, attempts=3, timeout=5.0, **kw):
        self.conn = FakeConn({"vm": 1})

    monkeypatch.setattr(hc.HookChannel, "__init__", fake_init)
    monkeypatch.setattr(hc.HookChannel, "close", lambda self: None)
    factory = slurm.slurm_channel_factory(["vm", "n2"], grace=0.05)
    t0 = time.monotonic()
    with pytest.raises(BrokerUnreachable, match="no node worker is running on n2"):
        factory("amqp://x//", [])
    assert time.monotonic() - t0 < 2
    assert isinstance(slurm.slurm_channel_factory(["vm"], grace=0.05)("amqp://x//", []), hc.HookChannel)


def test_a_broken_config_refuses_a_vm_job_but_never_touches_a_plain_one(site, tmp_path, monkeypatch):
    env, log = site
    broken = tmp_path / "broken.toml"
    broken.write_text(f'[scheduler]\nkind = "slurm"\nbin_dir = "{tmp_path}/bin"\nnosuch = 1\n')
    monkeypatch.setenv("VTORQUE_CONFIG", str(broken))
    monkeypatch.setenv("PATH", f"{tmp_path}/bin:{os.environ['PATH']}")  # no [scheduler] then: found on PATH
    assert slurm.main(["prolog"], env, channel_factory=channel([])) == 0
    assert updates(log)[-1].startswith("vtorque: not started: the prologue could not read the job: ")
    log.write_text("")
    script = tmp_path / "state" / "hash.2" / "job.12" / "script"
    script.write_text("#!/bin/sh\necho plain job\n")
    assert slurm.main(["prolog"], env, channel_factory=channel([])) == 0
    assert updates(log) == []  # a job without -vm keeps its Comment


def test_both_prologues_make_the_one_node_worker_check(monkeypatch):
    """shared/hook_channel.NodeWorkerChannel is the check's one home: the Slurm prologue's channel is it, the
    Torque prologue's adds its cancel to it and leaves the check out only where `[torque] require_node_workers`
    says so; a broker that will not say is BrokerUnreachable too (a bounded requeue), never a crash."""
    import pika.exceptions

    import vtorque.shared.hook_channel as hc
    from vtorque.hooks.torque.channel import TorqueChannel, torque_channel_factory
    from vtorque.shared.config import Config, TorqueConfig

    conns = iter([FakeConn({"vm": 1}), FakeConn({"vm": 1}), FakeConn({"vm": 1}), None])

    def fake_init(self, url, patterns, attempts=3, timeout=5.0, **kw):
        self.conn = next(conns)

    closed = []
    monkeypatch.setattr(hc.EventChannel, "__init__", fake_init)
    monkeypatch.setattr(hc.EventChannel, "close", lambda self: closed.append(self))
    factories = [slurm.slurm_channel_factory(["vm", "n2"], grace=0.05),
                 torque_channel_factory(Config(torque=TorqueConfig(node_worker_grace=0.05)), ["vm", "n2"])]
    for factory in factories:
        with pytest.raises(hc.NodeWorkersMissing, match="no node worker is running on n2"):
            factory("amqp://x//", [])
    assert len(closed) == 2
    unchecked = torque_channel_factory(Config(torque=TorqueConfig(require_node_workers=False)), ["n2"])
    assert isinstance(unchecked("amqp://x//", []), TorqueChannel)  # n2 has none, and nobody asked

    class Refused:
        def channel(self):
            raise pika.exceptions.ChannelClosedByBroker(403, "ACCESS_REFUSED")

    conns = iter([Refused()])
    with pytest.raises(BrokerUnreachable, match="cannot ask the broker for the node workers: the broker refused: 403"):
        slurm.slurm_channel_factory(["vm"], grace=0.05)("amqp://x//", [])


def test_both_prologues_take_their_node_worker_grace_from_one_key(site, tmp_path, monkeypatch):
    """`[hooks] node_worker_grace` is the one home of the grace both prologues give a node's worker (5 s by
    default); Torque's documented `[torque] node_worker_grace`, where set, still wins for the Torque prologue."""
    from vtorque.hooks.torque.channel import torque_channel_factory
    from vtorque.shared.config import load_config

    def graces(text: str, env=None) -> tuple[float, float]:
        path = tmp_path / "grace.toml"
        path.write_text(text)
        config = load_config(str(path), env or {})
        return (slurm.slurm_channel_factory(["vm"], config.hooks.node_worker_grace).keywords["grace"],
                torque_channel_factory(config, ["vm"]).keywords["grace"])

    assert graces("") == (5.0, 5.0)
    assert graces("[hooks]\nnode_worker_grace = 2.5\n") == (2.5, 2.5)
    assert graces("[hooks]\nnode_worker_grace = 2.5\n[torque]\nnode_worker_grace = 8\n") == (2.5, 8.0)
    assert graces("[torque]\nnode_worker_grace = 8\n") == (5.0, 8.0)
    assert graces("", {"VTORQUE_HOOKS__NODE_WORKER_GRACE": "1.5"}) == (1.5, 1.5)

    # The Slurm prologue itself opens its channel with the configured grace.
    env, _ = site
    config = Path(os.environ["VTORQUE_CONFIG"])
    config.write_text(config.read_text().replace("max_requeues = 2\n", "max_requeues = 2\nnode_worker_grace = 0.5\n"))
    asked = []
    plan = m.JobPlanned.new(job_id="12", deadline=60, guests=[])

    def factory(hosts, grace):
        asked.append((hosts, grace))
        return channel([plan])

    monkeypatch.setattr(slurm, "slurm_channel_factory", factory)
    slurm.main(["prolog"], env)
    assert asked == [(["vm"], 0.5)]
