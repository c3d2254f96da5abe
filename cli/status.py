"""`vtorque status JOBID` and `vtorque nodes`.

A job's status is read from its trace: every message the services published for it is a PRODUCER span named
by its type (vtorque.message.type), so the spans are the job's event log — what was planned, staged, booted,
failed, torn down — and the "boot guest" spans hold each guest's node and phase timings. Nothing else keeps
job state (the services are stateless by design). Pure but for `read_heartbeats`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from vtorque.cli.trace_view import SpanRow, queue_wait

# The job's phase is the furthest one its published messages reached (later entries win).
_PHASES = (
    ("vsub submit", "queued"),
    ("JobStarted", "prologue"),
    ("JobPlanned", "planned"),
    ("BootGuests", "booting"),
    ("ready", "running"),  # every planned guest ready ("all guests ready")
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

    def to_json(self) -> dict:
        return asdict(self)


def _published(spans: list[SpanRow], kind: str) -> list[SpanRow]:
    return [s for s in spans if s.kind == "producer" and s.attributes.get("vtorque.message.type") == kind]


def job_status(job_id: str, spans: list[SpanRow]) -> JobStatus:
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
    out = [f"job {st.job_id}: {st.phase}" + (f" ({st.failure})" if st.failure else ""),
           f"  trace  {', '.join(st.trace_ids) or '-'}",
           f"  nodes  {', '.join(st.nodes) or '-'}"]
    if st.timings:
        out.append("  times  " + "  ".join(f"{k} {v:.2f}s" for k, v in st.timings.items()))
    if st.guests:
        out.append(f"  {'guest':<24} {'node':<14} {'state':<10} {'boot':>8}  phases")
        for g in st.guests:
            boot = f"{g.boot_s:.2f}s" if g.boot_s is not None else "-"
            phases = "  ".join(f"{k} {v:.2f}s" for k, v in g.phases.items())
            out.append(f"  {g.guest[:24]:<24} {g.node[:14]:<14} {g.state:<10} {boot:>8}  {phases}"
                       + (f"  [{g.reason}]" if g.reason else ""))
    return "\n".join(out)


# -- nodes -----------------------------------------------------------------------------------------------

def render_nodes(beats: list, now=None) -> str:
    from vtorque.shared.node_registry import is_stale
    from vtorque.shared.messages import utcnow

    now = now or utcnow()
    out = [f"{'node':<20} {'state':<6} {'cores':>5} {'mem free':>9} {'guests':>6} {'accel':<5} {'seen':>6}  capabilities"]
    for b in beats:
        age = (now - b.created_at).total_seconds()
        state = "stale" if is_stale(b, now) else "up"
        accel = "kvm" if b.domain_type == "kvm" else "tcg"
        out.append(f"{b.node[:20]:<20} {state:<6} {b.cores:>5} {b.mem_free_mib:>6}MiB {b.guests_running:>6} "
                   f"{accel:<5} {age:>5.0f}s  {','.join(b.capabilities)}")
    return "\n".join(out)

