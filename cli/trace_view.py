"""Reading a job's spans back and drawing them: from the local OTLP-JSON files, or from Jaeger's query service
when [tracing] query_endpoint is set. Pure but for `load` and `jaeger_job_spans`.

What a user sees first is the job's own phases (`phases`, `render_phases`): queue wait, prologue (the guests'
boot), run, epilogue, each with its duration and status. The waterfall below it leaves out the messaging
plumbing (every publish and process span) unless asked for it (`vtorque trace --all`)."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Jaeger searches per service: these are the services whose spans carry pbs.job_id in every job's trace.
JAEGER_SERVICES = ("vtorque-hook", "vtorque-bridge", "vtorque-node-worker")


@dataclass(frozen=True)
class SpanRow:
    trace_id: str
    span_id: str
    parent_id: str
    service: str
    name: str
    kind: str
    start_ns: int
    end_ns: int
    status: str
    attributes: dict
    links: int
    link_ids: list = field(default_factory=list)  # "traceid:spanid" of each link
    resource: dict = field(default_factory=dict)
    status_message: str = ""  # the reason of an ERROR status

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["duration_ns"] = self.end_ns - self.start_ns
        return doc


def _value(v: dict):
    for key in ("stringValue", "boolValue", "doubleValue"):
        if key in v:
            return v[key]
    if "intValue" in v:
        return int(v["intValue"])
    return None


def parse_lines(lines) -> list[SpanRow]:
    rows = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        for rs in doc.get("resourceSpans", []):
            res = {a["key"]: _value(a["value"]) for a in rs.get("resource", {}).get("attributes", [])}
            for ss in rs.get("scopeSpans", []):
                for s in ss.get("spans", []):
                    rows.append(
                        SpanRow(
                            trace_id=s.get("traceId", ""),
                            span_id=s.get("spanId", ""),
                            parent_id=s.get("parentSpanId", ""),
                            service=str(res.get("service.name", "?")),
                            name=s.get("name", ""),
                            kind=s.get("kind", "SPAN_KIND_INTERNAL").replace("SPAN_KIND_", "").lower(),
                            start_ns=int(s.get("startTimeUnixNano", 0)),
                            end_ns=int(s.get("endTimeUnixNano", 0)),
                            status=s.get("status", {})
                            .get("code", "STATUS_CODE_UNSET")
                            .replace("STATUS_CODE_", "")
                            .lower(),
                            status_message=s.get("status", {}).get("message", ""),
                            attributes={a["key"]: _value(a["value"]) for a in s.get("attributes", [])},
                            links=len(s.get("links", [])),
                            link_ids=[f"{ln.get('traceId', '')}:{ln.get('spanId', '')}" for ln in s.get("links", [])],
                            resource=res,
                        )
                    )
    return rows


# -- Jaeger ----------------------------------------------------------------------------------------------

def parse_jaeger(doc: dict) -> list[SpanRow]:
    """Spans of Jaeger's query API answer (`/api/traces`: {"data": [{"spans", "processes"}]}).

    Jaeger keeps the OTLP kind and status as tags (span.kind, otel.status_code), the parent as a CHILD_OF
    reference and every OTLP link as a FOLLOWS_FROM reference."""
    rows = []
    for tr in doc.get("data") or []:
        processes = tr.get("processes", {})
        for s in tr.get("spans", []):
            tags = {t["key"]: t.get("value") for t in s.get("tags", [])}
            proc = processes.get(s.get("processID", ""), {})
            resource = {t["key"]: t.get("value") for t in proc.get("tags", [])}
            resource["service.name"] = proc.get("serviceName", "?")
            parent, links = "", []
            for ref in s.get("references", []):
                if ref.get("refType") == "CHILD_OF" and not parent and ref.get("traceID") == s.get("traceID"):
                    parent = ref.get("spanID", "")
                else:
                    links.append(f"{ref.get('traceID', '')}:{ref.get('spanID', '')}")
            start_ns = int(s.get("startTime", 0)) * 1000  # Jaeger: microseconds
            status = str(tags.pop("otel.status_code", "unset")).lower()
            status_message = str(tags.pop("otel.status_description", "") or "")
            if tags.pop("error", False) and status == "unset":
                status = "error"
            rows.append(SpanRow(
                trace_id=s.get("traceID", "").rjust(32, "0"), span_id=s.get("spanID", "").rjust(16, "0"),
                parent_id=parent.rjust(16, "0") if parent else "", service=resource["service.name"],
                name=s.get("operationName", ""), kind=str(tags.pop("span.kind", "internal")).lower(),
                start_ns=start_ns, end_ns=start_ns + int(s.get("duration", 0)) * 1000, status=status,
                attributes={k: v for k, v in tags.items() if not k.startswith(("otel.", "internal."))},
                links=len(links), link_ids=links, resource=resource, status_message=status_message))
    return rows


def _get_json(url: str, timeout: float) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - an operator-configured http URL
        return json.load(resp)


class QueryError(Exception):
    pass


def jaeger_job_spans(endpoint: str, job_id: str, lookback: str = "7d", timeout: float = 10.0) -> list[SpanRow]:
    """The job's traces from Jaeger: search each service for pbs.job_id, then fetch every trace found whole."""
    base = endpoint.rstrip("/")
    trace_ids: set[str] = set()
    try:
        for service in JAEGER_SERVICES:
            query = urllib.parse.urlencode({"service": service, "tags": json.dumps({"pbs.job_id": job_id}),
                                            "lookback": lookback, "limit": 50})
            found = _get_json(f"{base}/api/traces?{query}", timeout)
            trace_ids |= {t.get("traceID", "") for t in found.get("data") or []}
        rows: list[SpanRow] = []
        for trace_id in sorted(filter(None, trace_ids)):
            rows += parse_jaeger(_get_json(f"{base}/api/traces/{trace_id}", timeout))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise QueryError(f"tracing.query_endpoint {endpoint}: {exc}") from None
    return newest_job(sorted(rows, key=lambda r: r.start_ns))


def load(trace_dir: str | Path) -> list[SpanRow]:
    rows: list[SpanRow] = []
    for path in sorted(Path(trace_dir).glob("*.jsonl")):
        try:
            with open(path, encoding="utf-8") as fh:
                rows += parse_lines(fh)
        except OSError:
            continue
    return rows


def job_spans(rows: list[SpanRow], job_id: str, every_trace: bool = False) -> list[SpanRow]:
    """Every span of the job's traces (a span without the job id attribute still belongs to them).

    A job's life is one trace rooted at "vsub submit"; a few messages published outside it (a prefetch
    cancel, an expired command) start traces of their own that carry the job id. The same id in an older
    trace rooted at "vsub submit" is another job that the scheduler gave the id before (Slurm starts from 1
    again when its state is wiped): left out unless `every_trace`."""
    traces = {r.trace_id for r in rows if r.attributes.get("pbs.job_id") == job_id}
    spans = sorted((r for r in rows if r.trace_id in traces), key=lambda r: r.start_ns)
    return spans if every_trace else newest_job(spans)


def newest_job(spans: list[SpanRow]) -> list[SpanRow]:
    """The spans of the last submission's trace and of the traces that began after it."""
    submits = [s for s in spans if s.name == "vsub submit" and not s.parent_id]
    if len({s.trace_id for s in submits}) <= 1:
        return spans
    last = max(submits, key=lambda s: s.start_ns)
    began: dict[str, int] = {}
    for s in spans:
        began[s.trace_id] = min(began.get(s.trace_id, s.start_ns), s.start_ns)
    submitted = {s.trace_id for s in submits}
    keep = {t for t, start in began.items() if t == last.trace_id or (t not in submitted and start >= last.start_ns)}
    return [s for s in spans if s.trace_id in keep]


def queue_wait(spans: list[SpanRow]) -> tuple[int, int] | None:
    """(start, end) ns of the job's wait in the scheduler's queue: the prologue's "queue wait" span, or for
    jobs submitted before vsub recorded its submit time, from the end of the submission span to the start of
    the first hook span."""
    recorded = [s for s in spans if s.name == "queue wait"]
    if recorded:
        return recorded[0].start_ns, recorded[0].end_ns
    submit = [s for s in spans if s.name == "vsub submit"]
    hooks = [s for s in spans if s.name == "prologue"]
    if not submit or not hooks:
        return None
    start, end = min(s.end_ns for s in submit), min(s.start_ns for s in hooks)
    return (start, end) if end > start else None


# -- what the user sees first: the job's phases -------------------------------------------------------------

PLUMBING = ("producer", "consumer")  # publish/process spans: how the services talk, not what the job did


def is_plumbing(s: SpanRow) -> bool:
    return s.kind in PLUMBING


@dataclass(frozen=True)
class Phase:
    name: str
    start_ns: int | None  # None: not in the trace
    end_ns: int | None
    status: str = ""  # ok, error, unset; "" for the queue wait (no one was alive during it)
    detail: str = ""  # the reason of an error, an exit code, the guests' boot steps
    level: int = 0  # 1: a part of the phase above (one guest's boot)

    @property
    def duration_s(self) -> float | None:
        return None if self.start_ns is None or self.end_ns is None else (self.end_ns - self.start_ns) / 1e9


def _boot_steps(spans: list[SpanRow], boot: SpanRow) -> str:
    steps = [c for c in spans if c.parent_id == boot.span_id and not is_plumbing(c)]
    return "  ".join(f"{c.name} {(c.end_ns - c.start_ns) / 1e9:.2f}s" for c in steps)


def _span_phase(name: str, s: SpanRow, detail: str = "") -> Phase:
    reason = s.status_message if s.status == "error" else ""
    return Phase(name, s.start_ns, s.end_ns, s.status, "; ".join(x for x in (reason, detail) if x))


def phases(spans: list[SpanRow]) -> list[Phase]:
    """The job's life as its user knows it: queue wait, prologue (with each guest's boot under it), run,
    epilogue. A phase missing from the trace is listed as such (a job that ran without its prologue shows
    it at once). A requeued Torque job has one prologue per attempt."""
    out: list[Phase] = []
    wait = queue_wait(spans)
    out.append(Phase("queue wait", *wait) if wait else Phase("queue wait", None, None))
    prologues = [s for s in spans if s.name == "prologue"]
    boots = [s for s in spans if s.name == "boot guest"]
    for i, pro in enumerate(prologues):
        name = "prologue: boot guests" + (f" (attempt {i + 1})" if len(prologues) > 1 else "")
        out.append(_span_phase(name, pro, str(pro.attributes.get("vtorque.verdict", "")) if pro.status == "error"
                               else ""))
        until = prologues[i + 1].start_ns if i + 1 < len(prologues) else None
        for b in boots:
            if b.start_ns >= pro.start_ns and (until is None or b.start_ns < until):
                guest = f"{b.attributes.get('vtorque.guest', '?')} on {b.attributes.get('vtorque.node', '?')}"
                out.append(Phase(guest, b.start_ns, b.end_ns, b.status, "; ".join(
                    x for x in (b.status_message if b.status == "error" else "", _boot_steps(spans, b)) if x), 1))
    if not prologues:
        out.append(Phase("prologue: boot guests", None, None))
    runs = [s for s in spans if s.name == "run job in guest"]
    for r in runs:
        code = r.attributes.get("vtorque.exit_code")
        out.append(_span_phase("run in guest", r, f"exit code {code}" if code is not None else ""))
    if not runs:
        out.append(Phase("run in guest", None, None))
    epilogues = [s for s in spans if s.name == "epilogue"]
    for e in epilogues:
        out.append(_span_phase("epilogue: tear down", e))
    if not epilogues:
        out.append(Phase("epilogue: tear down", None, None))
    return out


def render_phases(spans: list[SpanRow]) -> str:
    if not spans:
        return "no spans"
    t0 = min(s.start_ns for s in spans)
    out = [f"{'phase':<32} {'start':>8} {'duration':>9}  {'status':<6} detail"]
    for p in phases(spans):
        name = ("  " * p.level + p.name)[:32]
        if p.start_ns is None:
            out.append(f"{name:<32} {'-':>8} {'-':>9}  {'':<6} not in the trace")
            continue
        out.append(
            f"{name:<32} {(p.start_ns - t0) / 1e9:7.2f}s {p.duration_s:8.2f}s  {p.status:<6} {p.detail}".rstrip()
        )
    total = (max(s.end_ns for s in spans) - t0) / 1e9
    out.append(f"{'total (submit to last span)':<32} {'':>8} {total:8.2f}s")
    return "\n".join(out)


def waterfall(spans: list[SpanRow], width: int = 40, plumbing: bool = True) -> str:
    """Every span (or, with plumbing=False, all but publish/process) as a row under its nearest shown
    ancestor, with a bar on one time axis; an ERROR row ends with its reason."""
    if not spans:
        return "no spans"
    t0 = min(s.start_ns for s in spans)
    t1 = max(s.end_ns for s in spans)
    total = max(t1 - t0, 1)
    by_id = {s.span_id: s for s in spans}
    shown = [s for s in spans if plumbing or not is_plumbing(s)]

    def depth(s: SpanRow) -> int:
        d, seen = 0, set()
        while s.parent_id in by_id and s.parent_id not in seen:
            seen.add(s.parent_id)
            s = by_id[s.parent_id]
            d += 1 if plumbing or not is_plumbing(s) else 0
        return d

    out = [f"{'service':<19} {'span':<42} {'start':>8} {'duration':>9} {'status':<6} timeline"]
    wait = None if any(s.name == "queue wait" for s in spans) else queue_wait(spans)
    for s in shown:
        if wait and s.name == "prologue" and s.start_ns == wait[1]:
            a = int((wait[0] - t0) / total * width)
            b = max(a + 1, int((wait[1] - t0) / total * width))
            out.append(f"{'(scheduler)':<19} {'  (queue wait)':<42} {(wait[0] - t0) / 1e9:7.2f}s "
                       f"{(wait[1] - wait[0]) / 1e9:8.3f}s {'':<6} {' ' * a}{'░' * (b - a)}")
            wait = None
        a = int((s.start_ns - t0) / total * width)
        b = max(a + 1, int((s.end_ns - t0) / total * width))
        name = ("  " * depth(s) + s.name)[:42]
        bar = f"{' ' * a}{'█' * (b - a)}"
        reason = f"{' ' * (width - b)}  {s.status_message}" if s.status == "error" and s.status_message else ""
        out.append(
            f"{s.service[:19]:<19} {name:<42} {(s.start_ns - t0) / 1e9:7.2f}s {(s.end_ns - s.start_ns) / 1e9:8.3f}s "
            f"{s.status:<6} {bar}{reason}"
        )
    return "\n".join(out)
