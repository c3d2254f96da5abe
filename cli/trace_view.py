"""Reading a job's spans back from the OTLP-JSON files and drawing them as a waterfall. Pure but for `load`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


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
                    rows.append(SpanRow(
                        trace_id=s.get("traceId", ""), span_id=s.get("spanId", ""),
                        parent_id=s.get("parentSpanId", ""), service=str(res.get("service.name", "?")),
                        name=s.get("name", ""), kind=s.get("kind", "SPAN_KIND_INTERNAL").replace("SPAN_KIND_", "").lower(),
                        start_ns=int(s.get("startTimeUnixNano", 0)), end_ns=int(s.get("endTimeUnixNano", 0)),
                        status=s.get("status", {}).get("code", "STATUS_CODE_UNSET").replace("STATUS_CODE_", "").lower(),
                        attributes={a["key"]: _value(a["value"]) for a in s.get("attributes", [])},
                        links=len(s.get("links", []))))
    return rows


def load(trace_dir: str | Path) -> list[SpanRow]:
    rows: list[SpanRow] = []
    for path in sorted(Path(trace_dir).glob("*.jsonl")):
        try:
            with open(path, encoding="utf-8") as fh:
                rows += parse_lines(fh)
        except OSError:
            continue
    return rows


def job_spans(rows: list[SpanRow], job_id: str) -> list[SpanRow]:
    """Every span of the traces that carry the job's id (a span without the attribute still belongs)."""
    traces = {r.trace_id for r in rows if r.attributes.get("pbs.job_id") == job_id}
    return sorted((r for r in rows if r.trace_id in traces), key=lambda r: r.start_ns)


def waterfall(spans: list[SpanRow], width: int = 40) -> str:
    if not spans:
        return "no spans"
    t0 = min(s.start_ns for s in spans)
    t1 = max(s.end_ns for s in spans)
    total = max(t1 - t0, 1)
    by_id = {s.span_id: s for s in spans}

    def depth(s: SpanRow) -> int:
        d, seen = 0, set()
        while s.parent_id in by_id and s.parent_id not in seen:
            seen.add(s.parent_id)
            s, d = by_id[s.parent_id], d + 1
        return d

    out = [f"{'service':<19} {'span':<42} {'start':>8} {'duration':>9} {'status':<6} timeline"]
    for s in spans:
        a = int((s.start_ns - t0) / total * width)
        b = max(a + 1, int((s.end_ns - t0) / total * width))
        name = ("  " * depth(s) + s.name)[:42]
        out.append(f"{s.service[:19]:<19} {name:<42} {(s.start_ns - t0) / 1e9:7.2f}s {(s.end_ns - s.start_ns) / 1e9:8.3f}s "
                   f"{s.status:<6} {' ' * a}{'█' * (b - a)}")
    return "\n".join(out)


def by_service(spans: list[SpanRow]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in spans:
        counts[s.service] = counts.get(s.service, 0) + 1
    return counts
