"""Pure parts of issue 7's observability: metric derivation, Jaeger parsing, job status, heartbeats, doctor."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

from vtorque.cli import doctor, status, trace_view
from vtorque.cli.trace_view import SpanRow
from vtorque.services.node_worker import heartbeat
from vtorque.shared import messages as m
from vtorque.shared import metrics, node_registry

DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def test_phase_durations_are_steps_of_the_cumulative_timings():
    t = m.PhaseTimings(image=0.5, disks=0.6, define=0.7, start=1.0, kernel_up=2.0, ready=5.0)
    got = metrics.phase_durations(t)
    assert list(got) == ["image", "disks", "define", "start", "kernel_up", "ready"]
    assert abs(sum(got.values()) - 5.0) < 1e-9 and abs(got["ready"] - 3.0) < 1e-9
    without = metrics.phase_durations(m.PhaseTimings(image=0, disks=0, define=0, start=1.0, kernel_up=None, ready=4.0))
    assert "kernel_up" not in without and without["ready"] == 3.0


def test_failure_types_are_a_small_fixed_set():
    def failed(reason, cls=m.GuestFailed):
        extra = {"guest": "g", "node": "n", "retryable": True} if cls is m.GuestFailed else {}
        extra |= {"image": "tiny", "digest": "a" * 64} if cls is m.ImageStageFailed else {}
        return cls.new(job_id="1.x", deadline=5.0, reason=reason, **extra)

    assert metrics.failure_type(failed("boot timed out: no readiness signal")) == "boot_timeout"
    assert metrics.failure_type(failed("the guest stopped during boot")) == "boot_guest_crashed"
    assert metrics.failure_type(failed("image tiny is not in this node's catalog")) == "boot_unknown_image"
    assert metrics.failure_type(failed("sha256 mismatch", m.ImageStageFailed)) == "stage_image_digest_mismatch"
    assert metrics.failure_type(failed("bad VM spec: -vm vcpus: not a number", m.JobRejected)) == "rejected_bad_spec"
    assert metrics.failure_type(failed("something new")) == "boot_other"
    expired = m.CommandExpired.new(job_id="1.x", deadline=1.0, command="BootGuests", command_id="c")
    assert metrics.failure_type(expired) == "command_expired"
    assert metrics.failure_type(m.TeardownGuests.new(job_id="1", deadline=1.0, node="n")) is None


def test_queue_lag_never_negative():
    now = m.utcnow()
    assert metrics.queue_lag(now - timedelta(seconds=2), now) == 2.0
    assert metrics.queue_lag(now + timedelta(seconds=2), now) == 0.0


def test_every_instrument_is_documented_with_its_unit():
    text = DOCS.read_text()
    for name, (_, unit, _) in metrics.INSTRUMENTS.items():
        row = [line for line in text.splitlines() if f"`{name}`" in line]
        assert row, f"{name} is not in docs/operations.md"
        assert f"`{unit}`" in row[0], f"{name}: unit {unit} not on its docs row"


JAEGER = {
    "data": [
        {
            "traceID": "abc",
            "processes": {
                "p1": {"serviceName": "vtorque-hook", "tags": [{"key": "host.name", "value": "n1"}]},
                "p2": {"serviceName": "vtorque-bridge", "tags": []},
            },
            "spans": [
                {
                    "traceID": "abc",
                    "spanID": "1",
                    "operationName": "prologue",
                    "references": [],
                    "startTime": 1_000_000,
                    "duration": 5_000_000,
                    "processID": "p1",
                    "tags": [{"key": "pbs.job_id", "value": "7.srv"}],
                },
                {
                    "traceID": "abc",
                    "spanID": "2",
                    "operationName": "process vtorque.bridge",
                    "startTime": 1_100_000,
                    "duration": 1000,
                    "processID": "p2",
                    "references": [
                        {"refType": "CHILD_OF", "traceID": "abc", "spanID": "1"},
                        {"refType": "FOLLOWS_FROM", "traceID": "abc", "spanID": "1"},
                    ],
                    "tags": [
                        {"key": "span.kind", "value": "consumer"},
                        {"key": "otel.status_code", "value": "ERROR"},
                        {"key": "otel.status_description", "value": "no plan"},
                        {"key": "pbs.job_id", "value": "7.srv"},
                    ],
                },
            ],
        }
    ]
}


def test_parse_jaeger_keeps_parents_links_kinds_status():
    rows = {r.name: r for r in trace_view.parse_jaeger(JAEGER)}
    pro, proc = rows["prologue"], rows["process vtorque.bridge"]
    assert pro.trace_id == "abc".rjust(32, "0") and pro.parent_id == "" and pro.kind == "internal"
    assert pro.service == "vtorque-hook" and pro.end_ns - pro.start_ns == 5_000_000_000
    assert proc.parent_id == pro.span_id and proc.kind == "consumer" and proc.status == "error"
    assert proc.status_message == "no plan" and pro.status_message == ""
    assert proc.links == 1 and proc.attributes == {"pbs.job_id": "7.srv"}
    assert trace_view.job_spans(list(rows.values()), "7.srv") == [pro, proc]


def _span(name, sid, parent="", kind="internal", start=0, end=1, status="ok", message="", trace="t" * 32,
          **attrs):
    return SpanRow(trace_id=trace, span_id=sid, parent_id=parent, service="s", name=name, kind=kind,
                   start_ns=int(start * 1e9), end_ns=int(end * 1e9), status=status, attributes=attrs, links=0,
                   status_message=message)


def _pub(kind, sid, parent, start, **attrs):
    return _span("publish x", sid, parent, "producer", start, start + 0.001, **{"vtorque.message.type": kind, **attrs})


def test_job_status_from_the_trace():
    spans = [
        _span("vsub submit", "a", start=0, end=0.1),
        _span("prologue", "b", "a", start=2.1, end=8),
        _pub("JobStarted", "c", "b", 2.2), _pub("JobPlanned", "d", "b", 2.3),
        _pub("BootGuests", "e", "d", 2.4, **{"vtorque.node": "n1"}),
        _span("boot guest", "f", "e", start=2.5, end=7.5, **{"vtorque.guest": "vt-1-n1-0", "vtorque.node": "n1"}),
        _span("start domain", "g", "f", start=3, end=3.5),
        _pub("GuestReady", "h", "f", 7.5), _span("all guests ready", "i", "b", start=7.9, end=7.9),
    ]
    st = status.job_status("1.srv", spans)
    assert st.phase == "running" and st.nodes == ["n1"] and not st.failure
    (g,) = st.guests
    assert (g.guest, g.state, g.boot_s, g.phases) == ("vt-1-n1-0", "ready", 5.0, {"start domain": 0.5})
    assert st.timings["queue_wait"] == 2.0 and st.timings["prologue"] == 5.9
    assert "vt-1-n1-0" in status.render_status(st)
    ended = spans + [_pub("JobEnded", "j", "a", 20), _pub("GuestsTornDown", "k", "j", 21, **{"vtorque.node": "n1"})]
    st = status.job_status("1.srv", ended)
    assert st.phase == "done" and st.guests[0].state == "torn down"
    failed = spans[:5] + [_pub("GuestFailed", "x", "e", 9, **{"vtorque.guest": "vt-1-n1-0", "vtorque.node": "n1"})]
    st = status.job_status("1.srv", failed)
    assert st.phase == "failed" and st.failure == "GuestFailed" and st.guests[0].state == "failed"


def test_waterfall_shows_the_queue_wait():
    spans = [_span("vsub submit", "a", start=0, end=0.1), _span("prologue", "b", "a", start=2.1, end=3)]
    text = trace_view.waterfall(spans)
    assert re.search(r"\(queue wait\)\s+0\.10s\s+2\.000s", text), text


def _beat(node="n1", age=0.0, interval=10.0):
    beat = m.NodeHeartbeat.new(job_id="", deadline=30.0, node=node, cores=2, mem_free_mib=100, guests_running=1,
                               domain_type="qemu", capabilities=["tcg"], interval=interval)
    return beat, beat.created_at + timedelta(seconds=age)


def test_heartbeat_is_an_event_of_no_job_with_its_own_routing_key():
    beat, _ = _beat("node.1")
    assert beat.routing_key() == "node.node%2E1.heartbeat"
    assert m.decode(m.encode(beat)) == beat


def test_heartbeat_pure_parts():
    assert heartbeat.mem_available_mib("MemTotal: 100 kB\nMemAvailable:   2097152 kB\n") == 2048
    assert heartbeat.mem_available_mib("") == 0
    assert heartbeat.capabilities("kvm", 0, True) == ["kvm", "hugepages"]
    assert heartbeat.capabilities("qemu", 1, False) == ["tcg", "direct-kernel-boot"]
    beat, now = _beat(age=29)
    assert not node_registry.is_stale(beat, now)
    assert node_registry.is_stale(beat, now + timedelta(seconds=2))


def test_nodes_table_keeps_the_latest_beat_per_node():
    old, _ = _beat("n1")
    new, now = _beat("n1", age=0)
    other, _ = _beat("n2")
    latest = node_registry.latest_per_node([new, other, old])
    assert [b.node for b in latest] == ["n1", "n2"] and latest[0] is new
    text = status.render_nodes(latest, now)
    assert "n1" in text and "tcg" in text and "up" in text


def test_skew_bounds_and_a_crashing_check():
    assert doctor.skew_bounds(0.5, 10) == (-0.5, 9.5)  # fresh beat: cannot be far off
    assert doctor.skew_bounds(-5, 10)[0] == 5  # a beat from the future: that node is ahead by ≥5 s

    def check_boom(config):
        raise RuntimeError("boom")

    (result,) = doctor.run_checks(None, [check_boom])
    assert result.status == doctor.FAIL and result.name == "boom" and "boom" in result.detail
    assert "FAIL" in doctor.render([result])


# -- status merged with the scheduler's answer (issue 10 item 4) ---------------------------------------------

from vtorque.shared.scheduler import JobInfo  # noqa: E402


def _life(exit_code=0):
    """A whole VM job as its trace tells it: submitted, queued, booted, run (exit_code), torn down."""
    return [
        _span("vsub submit", "a", start=0, end=0.1, **{"pbs.job_id": "5"}),
        _span("queue wait", "q", "a", start=0.05, end=2.0),
        _span("prologue", "b", "a", start=2.0, end=8),
        _pub("JobStarted", "c", "b", 2.2), _pub("JobPlanned", "d", "b", 2.3),
        _pub("BootGuests", "e", "d", 2.4, **{"vtorque.node": "n1"}),
        _span("process vtorque.node.n1", "e2", "e", "consumer", start=2.45, end=7.6),
        _span("boot guest", "f", "e2", start=2.5, end=7.5, **{"vtorque.guest": "vt-5-n1-0", "vtorque.node": "n1"}),
        _span("start domain", "g", "f", start=3, end=3.5),
        _span("wait until ready", "g2", "f", start=3.5, end=7.4),
        _pub("GuestReady", "h", "f", 7.5), _span("all guests ready", "i", "b", start=7.9, end=7.9),
        _span("run job in guest", "r", "a", start=8.2, end=9.2, **{"vtorque.exit_code": exit_code}),
        _span("epilogue", "j0", "a", start=9.5, end=10.5),
        _pub("JobEnded", "j", "j0", 9.6), _pub("GuestsTornDown", "k", "j", 10.4, **{"vtorque.node": "n1"}),
    ]


def _slurm(state, raw, code, reason=None):
    return status.SchedulerAnswer("slurm", JobInfo(job_id="5", state=state, raw_state=raw, exit_code=code,
                                                   owner="alice", nodes=("n1",), reason=reason,
                                                   stdout="/home/alice/three.sh.o5",
                                                   stderr="/home/alice/three.sh.e5"))


def test_the_scheduler_gives_state_and_exit_code_the_trace_the_phases():
    st = status.job_status("5", _life(3), _slurm("failed", "FAILED", 3, "NonZeroExitCode"))
    assert (st.state, st.exit_code, st.state_from, st.phase) == ("failed", 3, "scheduler", "done")
    assert st.scheduler["raw_state"] == "FAILED" and st.scheduler["kind"] == "slurm" and st.notes == []
    assert st.guests[0].state == "torn down" and st.timings["run"] == 1.0
    text = status.render_status(st)
    assert text.splitlines()[0] == "job 5: failed, exit code 3  (slurm: FAILED, NonZeroExitCode)", text
    assert "output   /home/alice/three.sh.o5" in text and "errors   /home/alice/three.sh.e5" in text
    assert st.to_json()["exit_code"] == 3 and st.to_json()["state"] == "failed"


def test_the_scheduler_wins_over_the_trace():
    # the trace alone would say "running": the guests are up, nothing ended yet in the trace
    running = _life()[:12]
    st = status.job_status("5", running, _slurm("cancelled", "CANCELLED", 143))
    assert (st.state, st.exit_code, st.phase) == ("cancelled", 143, "running")
    assert any("trace stops at 'running'" in n for n in st.notes), st.notes
    # a job that failed without vtorque's prologue (the hook was not installed): never "queued"
    st = status.job_status("5", _life()[:1], _slurm("failed", "FAILED", 1, "NonZeroExitCode"))
    assert (st.state, st.exit_code) == ("failed", 1)
    assert any("prologue never did" in n for n in st.notes), st.notes
    st = status.job_status("5", _life()[:3], _slurm("queued", "CONFIGURING", None))
    assert (st.state, st.exit_code, st.phase, st.notes) == ("queued", None, "prologue", [])
    assert "job 5: queued  (slurm: CONFIGURING)" in status.render_status(st)


def test_a_forgotten_job_falls_back_to_the_trace_and_says_so():
    forgot = status.SchedulerAnswer("slurm", None)
    st = status.job_status("5", _life(3), forgot)
    assert (st.state, st.exit_code, st.state_from) == ("failed", 3, "trace")
    assert "slurm no longer knows job 5" in st.notes[0] and "MinJobAge" in st.notes[0]
    text = status.render_status(st)
    assert text.splitlines()[0] == "job 5: failed, exit code 3  (from the trace)" and "note: slurm no longer" in text
    assert status.job_status("5", _life(0), forgot).state == "completed"
    st = status.job_status("5", _life()[:1], forgot)  # ended (Slurm forgot it) but the hook never ran
    assert st.state == "unknown" and st.exit_code is None and "never ran" in st.notes[1]


def test_a_scheduler_that_cannot_be_asked_falls_back_to_the_trace():
    down = status.SchedulerAnswer("slurm", error="scontrol exit 1: Unable to contact slurm controller")
    st = status.job_status("5", _life()[:3], down)
    assert (st.state, st.state_from) == ("running", "trace")
    assert st.notes == ["cannot ask slurm: scontrol exit 1: Unable to contact slurm controller; state from the trace"]
    assert status.job_status("5", _life()[:1], down).state == "queued"
    assert status.job_status("5", _life(0), down).state == "completed"


def test_ask_scheduler_turns_errors_into_an_answer(monkeypatch):
    from vtorque.shared import scheduler, slurm
    from vtorque.shared.config import Config, SchedulerConfig

    def fail(argv, timeout, env=None):
        raise scheduler.SchedulerError("scontrol: no such file")

    monkeypatch.setattr(slurm, "run_client", fail)
    answer = status.ask_scheduler(Config(scheduler=SchedulerConfig(kind="slurm")), "5")
    assert answer == status.SchedulerAnswer("slurm", None, "scontrol: no such file")


# -- the trace's phases first, the plumbing on request (issue 10 item 11) ------------------------------------

def test_phases_are_the_users_steps_with_durations_and_status():
    got = trace_view.phases(_life(3))
    assert [(p.name, round(p.duration_s, 3), p.status) for p in got] == [
        ("queue wait", 1.95, ""), ("prologue: boot guests", 6.0, "ok"), ("vt-5-n1-0 on n1", 5.0, "ok"),
        ("run in guest", 1.0, "ok"), ("epilogue: tear down", 1.0, "ok")]
    assert got[2].level == 1 and got[2].detail == "start domain 0.50s  wait until ready 3.90s"
    assert got[3].detail == "exit code 3"
    text = trace_view.render_phases(_life(3))
    assert re.search(r"^run in guest\s+8\.20s\s+1\.00s\s+ok\s+exit code 3$", text, re.M), text
    assert re.search(r"^total \(submit to last span\)\s+10\.50s$", text, re.M), text


def test_a_missing_or_failed_phase_says_so():
    failed = [_span("vsub submit", "a", start=0, end=0.1),
              _span("prologue", "b", "a", start=2, end=5, status="error", message="image tiny: sha256 mismatch",
                    **{"vtorque.verdict": "rejected"})]
    got = {p.name: p for p in trace_view.phases(failed)}
    assert got["prologue: boot guests"].status == "error"
    assert got["prologue: boot guests"].detail == "image tiny: sha256 mismatch; rejected"
    assert got["run in guest"].start_ns is None and got["epilogue: tear down"].start_ns is None
    text = trace_view.render_phases(failed)
    assert re.search(r"^run in guest\s+-\s+-\s+not in the trace$", text, re.M), text
    requeued = failed + [_span("prologue", "c", "a", start=30, end=40)]
    names = [p.name for p in trace_view.phases(requeued)]
    assert names[1:3] == ["prologue: boot guests (attempt 1)", "prologue: boot guests (attempt 2)"]


def test_the_waterfall_hides_the_plumbing_unless_asked():
    spans = _life()
    short = trace_view.waterfall(spans, plumbing=False)
    rows = short.splitlines()[1:]
    assert not any("publish x" in r or "process vtorque" in r for r in rows)
    assert len(rows) == len([s for s in spans if s.kind == "internal"])
    # boot guest sits under the prologue it serves, though its parents are publish/process spans
    boot = next(r for r in rows if "boot guest" in r)
    assert re.search(r"^s\s{19}    boot guest", boot), boot
    full = trace_view.waterfall(spans).splitlines()[1:]
    assert len(full) == len(spans) and any("publish x" in r for r in full)


def test_an_error_row_says_why():
    spans = [_span("vsub submit", "a", start=0, end=1),
             _span("epilogue", "b", "a", start=1, end=2, status="error", message="teardown not confirmed")]
    row = trace_view.waterfall(spans).splitlines()[-1]
    assert row.split()[4] == "error" and row.endswith("  teardown not confirmed"), row


def test_a_reused_job_id_shows_the_newest_job_only():
    old = [_span("vsub submit", "o", start=0, end=0.1, trace="1" * 32, **{"pbs.job_id": "1"}),
           _span("publish x", "o2", start=0.5, end=0.6, kind="producer", trace="3" * 32, **{"pbs.job_id": "1"})]
    new = [_span("vsub submit", "n", start=100, end=100.1, trace="2" * 32, **{"pbs.job_id": "1"}),
           _span("prologue", "p", "n", start=101, end=102, trace="2" * 32)]
    # a message published outside the job's trace (a prefetch cancel): a trace of its own, still the job's
    stray = [_span("publish x", "c", start=103, end=103.1, kind="producer", trace="4" * 32, **{"pbs.job_id": "1"})]
    assert trace_view.job_spans(old + new + stray, "1") == new + stray
    assert trace_view.job_spans(new + stray, "1") == new + stray
    assert len(trace_view.job_spans(old + new + stray, "1", every_trace=True)) == 5


def test_a_job_without_a_trace_has_the_schedulers_status():
    st = status.job_status("5", [], _slurm("completed", "COMPLETED", 0))
    assert (st.state, st.exit_code, st.phase, st.notes) == ("completed", 0, "unknown", [])
    text = status.render_status(st)
    assert text.splitlines()[:3] == ["job 5: completed, exit code 0  (slurm: COMPLETED)",
                                     "  vtorque  - (no trace of this job)", "  nodes    n1"], text
