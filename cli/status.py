"""`vtorque status JOBID` and `vtorque nodes`.

The scheduler is the truth for a job's state and exit code: `vtorque status` asks it (shared/scheduler.py)
and merges its answer with the job's trace. The trace adds what only vtorque knows: every message the
services published for the job is a PRODUCER span named by its type (vtorque.message.type), so the spans are
the job's event log — what was planned, staged, booted, failed, torn down — and the "boot guest" spans hold
each guest's node and phase timings. When the scheduler no longer knows the job (Slurm forgets a job
MinJobAge seconds after it ended; Torque after keep_completed) or cannot be asked, the status says so and
falls back to the trace. Pure but for `ask_scheduler` and `read_heartbeats`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import msgspec

from vtorque.cli.trace_view import SpanRow, queue_wait
from vtorque.shared.scheduler import FORGETS, JobInfo

# The job's phase is the furthest one its published messages reached (later entries win).
_PHASES = (
    ("vsub submit", "queued"),
    ("prologue", "prologue"),  # the hook's span, before it published anything
    ("JobStarted", "prologue"),
    ("JobPlanned", "planned"),
    ("BootGuests", "booting"),
    ("ready", "running"),  # every planned guest ready ("all guests ready")
    ("run job in guest", "running"),  # the launcher's span
    ("epilogue", "epilogue"),  # the hook's span, before it published anything
    ("JobEnded", "epilogue"),
    ("torn_down", "done"),
)
FAILED = {"JobRejected": "rejected", "GuestFailed": "failed", "ImageStageFailed": "failed",
          "CommandExpired": "failed"}


@dataclass
class GuestStatus:
    guest: str
    node: str = ""
    image_digest: str = ""
    state: str = "planned"  # planned, booting, ready, failed, torn down
    boot_s: float | None = None
    phases: dict[str, float] = field(default_factory=dict)  # phase span name → seconds
    reason: str = ""


@dataclass
class JobStatus:
    job_id: str
    phase: str
    trace_ids: list[str]
    nodes: list[str]
    guests: list[GuestStatus]
    failure: str = ""
    timings: dict[str, float] = field(default_factory=dict)  # seconds: queue_wait, prologue, epilogue, run...
    # The scheduler's word on the job (merged in by `with_scheduler`); from the trace when it has none.
    state: str = "unknown"  # shared/scheduler.py's State: queued, running, ..., completed, failed, cancelled
    exit_code: int | None = None
    state_from: str = "trace"  # "scheduler", or "trace" when the scheduler does not know the job
    scheduler: dict | None = None  # its answer: kind, raw_state, reason, owner, nodes, stdout, stderr, ...
    notes: list[str] = field(default_factory=list)  # why the state is from the trace; what does not add up

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SchedulerAnswer:
    """What `Scheduler.job` said: the job (None: it does not know it), or why it could not be asked."""
    kind: str
    info: JobInfo | None = None
    error: str = ""


def ask_scheduler(config, job_id: str) -> SchedulerAnswer:
    from vtorque.shared.scheduler import SchedulerError, scheduler_for

    sched = scheduler_for(config)
    try:
        return SchedulerAnswer(sched.kind, sched.job(job_id))
    except SchedulerError as exc:
        return SchedulerAnswer(sched.kind, error=str(exc))


_STARTED = {"prologue", "planned", "booting", "running"}


def _run_exit_code(spans: list[SpanRow]) -> int | None:
    """The user script's exit status as the launcher recorded it on "run job in guest"."""
    for s in reversed(spans):
        if s.name == "run job in guest" and isinstance(s.attributes.get("vtorque.exit_code"), int):
            return s.attributes["vtorque.exit_code"]
    return None


def _state_from_trace(st: JobStatus, spans: list[SpanRow], ended: bool) -> tuple[str, int | None]:
    """The trace's best guess at the scheduler's state; `ended`: the scheduler no longer knows the job, so it
    is over whatever the trace says."""
    code = _run_exit_code(spans)
    if st.phase in ("rejected", "failed"):
        return "failed", code
    if st.phase == "done" or (ended and st.phase == "epilogue"):
        if code is None:
            return ("unknown" if ended else "exiting"), None
        return ("completed" if code == 0 else "failed"), code
    if ended:
        return "unknown", code
    if st.phase == "epilogue":
        return "exiting", code
    return ("running" if st.phase in _STARTED else "queued"), code


def with_scheduler(st: JobStatus, spans: list[SpanRow], answer: SchedulerAnswer | None) -> JobStatus:
    """Merge the scheduler's answer into a status read from the trace: the scheduler's state and exit code
    win; the trace keeps the phases and guests. Notes say where the state came from when it is not the
    scheduler, and what the two disagree on."""
    notes = list(st.notes)
    info = answer.info if answer else None
    if answer is not None and info is not None:
        st.state, st.exit_code, st.state_from = info.state, info.exit_code, "scheduler"
        st.scheduler = {"kind": answer.kind, **msgspec.to_builtins(info)}
        if not st.nodes and info.nodes:
            st.nodes = list(info.nodes)
        if spans and not info.alive and not any(s.name == "prologue" for s in spans):
            notes.append(f"{answer.kind} ran the job but vtorque's prologue never did: it ran without its guests")
        elif not info.alive and st.phase in _STARTED:
            notes.append(f"{answer.kind} says the job ended; its trace stops at {st.phase!r} "
                         "(no epilogue recorded yet, or it never ran)")
    else:
        if answer is None:
            notes.append("the scheduler was not asked; state from the trace")
        elif answer.error:
            notes.append(f"cannot ask {answer.kind}: {answer.error}; state from the trace")
        else:
            notes.append(f"{answer.kind} no longer knows job {st.job_id} ({FORGETS.get(answer.kind, 'it ended')}): "
                         "state and exit code from the trace")
            if spans and not any(s.name == "prologue" for s in spans):
                notes.append("its trace has no prologue: vtorque's hook never ran for it (it ran without its "
                             "guests, or was cancelled while queued)")
        ended = answer is not None and not answer.error
        st.state, st.exit_code = _state_from_trace(st, spans, ended)
        st.state_from = "trace"
    st.notes = notes
    return st


def _published(spans: list[SpanRow], kind: str) -> list[SpanRow]:
    return [s for s in spans if s.kind == "producer" and s.attributes.get("vtorque.message.type") == kind]


def job_status(job_id: str, spans: list[SpanRow], scheduler: SchedulerAnswer | None = None) -> JobStatus:
    """The job's status from its trace, merged with the scheduler's answer (see `with_scheduler`)."""
    return with_scheduler(trace_status(job_id, spans), spans, scheduler)


def trace_status(job_id: str, spans: list[SpanRow]) -> JobStatus:
    seen = {s.attributes.get("vtorque.message.type") for s in spans if s.kind == "producer"}
    names = {s.name for s in spans}
    seen |= names
    if "all guests ready" in names:
        seen.add("ready")
    if "GuestsTornDown" in seen:
        seen.add("torn_down")
    phase = "unknown"
    for marker, name in _PHASES:
        if marker in seen:
            phase = name
    failure = ""
    for kind, verdict in FAILED.items():
        failed = _published(spans, kind)
        if failed and phase not in ("epilogue", "done"):
            phase = verdict
            failure = kind
    prologue = [s for s in spans if s.name == "prologue"]
    if prologue and prologue[-1].status == "error" and not failure:
        failure = str(prologue[-1].attributes.get("vtorque.verdict", "error"))

    guests: dict[str, GuestStatus] = {}
    by_id = {s.span_id: s for s in spans}
    for s in spans:
        if s.name != "boot guest":
            continue
        name = str(s.attributes.get("vtorque.guest", "?"))
        g = guests.setdefault(name, GuestStatus(guest=name))
        g.node = str(s.attributes.get("vtorque.node", g.node))
        g.image_digest = str(s.attributes.get("vtorque.image.digest", g.image_digest))
        g.boot_s = round((s.end_ns - s.start_ns) / 1e9, 3)
        g.state = "failed" if s.status == "error" else "ready"
        for child in spans:
            if child.parent_id == s.span_id and child.kind == "internal":
                g.phases[child.name] = round((child.end_ns - child.start_ns) / 1e9, 3)
    for s in _published(spans, "GuestFailed"):
        name = str(s.attributes.get("vtorque.guest", "?"))
        g = guests.setdefault(name, GuestStatus(guest=name, node=str(s.attributes.get("vtorque.node", ""))))
        g.state = "failed"
        parent = by_id.get(s.parent_id)
        if parent is not None and parent.status == "error":
            g.reason = str(parent.attributes.get("error.type", "")) or "see the trace"
    for s in _published(spans, "BootGuests"):
        node = str(s.attributes.get("vtorque.node", ""))
        if node and not any(g.node == node for g in guests.values()):
            guests.setdefault(f"(on {node})", GuestStatus(guest=f"(on {node})", node=node, state="booting"))
    for s in _published(spans, "GuestsTornDown"):
        node = str(s.attributes.get("vtorque.node", ""))
        for g in guests.values():
            if g.node == node:
                g.state = "torn down"

    timings: dict[str, float] = {}
    wait = queue_wait(spans)
    if wait:
        timings["queue_wait"] = round((wait[1] - wait[0]) / 1e9, 3)
    for name, key in (("prologue", "prologue"), ("run job in guest", "run"), ("epilogue", "epilogue")):
        found = [s for s in spans if s.name == name]
        if found:
            timings[key] = round(sum(s.end_ns - s.start_ns for s in found) / 1e9, 3)
    if spans:
        timings["total"] = round((max(s.end_ns for s in spans) - min(s.start_ns for s in spans)) / 1e9, 3)
    nodes = sorted({g.node for g in guests.values() if g.node})
    return JobStatus(job_id=job_id, phase=phase, trace_ids=sorted({s.trace_id for s in spans}), nodes=nodes,
                     guests=sorted(guests.values(), key=lambda g: g.guest), failure=failure, timings=timings)


def render_status(st: JobStatus) -> str:
    head = f"job {st.job_id}: {st.state}"
    if st.exit_code is not None:
        head += f", exit code {st.exit_code}"
    sched = st.scheduler or {}
    if sched:
        head += (
            f"  ({sched['kind']}: {sched['raw_state']}" + (f", {sched['reason']}" if sched.get("reason") else "") + ")"
        )
    else:
        head += "  (from the trace)"
    if st.trace_ids:
        out = [head, f"  vtorque  {st.phase}" + (f" ({st.failure})" if st.failure else ""),
               f"  trace    {', '.join(st.trace_ids)}"]
    else:  # a job without -vm (vsub passed it to qsub untouched), or its spans are not written yet
        out = [head, "  vtorque  - (no trace of this job)"]
    out.append(f"  nodes    {', '.join(st.nodes) or '-'}")
    if sched.get("stdout") or sched.get("stderr"):
        out.append(f"  output   {sched.get('stdout') or '-'}")
        if sched.get("stderr") and sched.get("stderr") != sched.get("stdout"):
            out.append(f"  errors   {sched['stderr']}")
    if st.timings:
        out.append("  times    " + "  ".join(f"{k} {v:.2f}s" for k, v in st.timings.items()))
    if st.guests:
        out.append(f"  {'guest':<24} {'node':<14} {'state':<10} {'boot':>8}  phases")
        for g in st.guests:
            boot = f"{g.boot_s:.2f}s" if g.boot_s is not None else "-"
            phases = "  ".join(f"{k} {v:.2f}s" for k, v in g.phases.items())
            out.append(f"  {g.guest[:24]:<24} {g.node[:14]:<14} {g.state:<10} {boot:>8}  {phases}"
                       + (f"  [{g.reason}]" if g.reason else ""))
    out += [f"  note: {n}" for n in st.notes]
    return "\n".join(out)


# -- nodes -----------------------------------------------------------------------------------------------

def render_nodes(beats: list, now=None) -> str:
    from vtorque.shared.messages import utcnow
    from vtorque.shared.node_registry import is_stale

    now = now or utcnow()
    out = [
        f"{'node':<20} {'state':<6} {'cores':>5} {'mem free':>9} {'guests':>6} {'accel':<5} {'seen':>6}  capabilities"
    ]
    for b in beats:
        age = (now - b.created_at).total_seconds()
        state = "stale" if is_stale(b, now) else "up"
        accel = "kvm" if b.domain_type == "kvm" else "tcg"
        out.append(f"{b.node[:20]:<20} {state:<6} {b.cores:>5} {b.mem_free_mib:>6}MiB {b.guests_running:>6} "
                   f"{accel:<5} {age:>5.0f}s  {','.join(b.capabilities)}")
    return "\n".join(out)

