"""The OTLP-JSON lines of the span files (shared/tracing.py `otlp_json`) are what the OTLP exporter's protobuf
encoder and protobuf's JSON mapping made before (ids in hex): written without protobuf now, field for field
the same, so `vtorque trace`, Jaeger's OTLP/JSON import and older files all read them alike."""

from __future__ import annotations

import base64
import subprocess
import sys

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from vtorque.shared import tracing


def _spans():
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "vtorque-test", "host.name": "n1"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("vtorque", "1.2", schema_url="https://opentelemetry.io/schemas/1.21.0")
    remote = SpanContext(trace_id=0x0123456789ABCDEF0123456789ABCDEF, span_id=0x1122334455667788, is_remote=True,
                         trace_flags=TraceFlags(1), trace_state=TraceState([("vt", "1")]))
    parent_ctx = trace.set_span_in_context(trace.NonRecordingSpan(remote))
    with tracer.start_as_current_span("prologue", context=parent_ctx, kind=SpanKind.PRODUCER, attributes={
            "pbs.job_id": "7", "n": 3, "x": 0.5, "ok": True, "list": ["a", "b"], "ints": [1, 2], "empty": ""}) as s:
        s.add_event("boot", {"phase": "kernel"})
        s.add_event("bare")
        with tracer.start_as_current_span("child", links=[Link(remote, {"why": "fan-in"}), Link(remote)]) as c:
            c.set_status(Status(StatusCode.ERROR, "guest failed"))
        s.set_status(Status(StatusCode.OK))
    other = provider.get_tracer("other")  # a second scope, no version
    other.start_span("unset status", kind=SpanKind.CONSUMER).end()
    return memory.get_finished_spans()


def _by_protobuf(spans) -> dict:
    from google.protobuf import json_format
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    doc = json_format.MessageToDict(encode_spans(spans))
    for rs in doc.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                for item in [span, *span.get("links", [])]:
                    for key in ("traceId", "spanId", "parentSpanId"):
                        if item.get(key):
                            item[key] = base64.b64decode(item[key]).hex()
    return doc


def test_the_same_document_as_protobufs_json_mapping():
    spans = _spans()
    assert tracing.otlp_json(spans) == _by_protobuf(spans)


def test_no_span_at_all():
    assert tracing.otlp_json([]) == _by_protobuf([])


def test_the_spans_are_read_back_by_vtorque_trace(tmp_path):
    from vtorque.cli.trace_view import load

    exporter = tracing.OtlpJsonFileExporter(tmp_path / "t.jsonl")
    exporter.export(_spans())
    rows = {r.name: r for r in load(tmp_path)}
    assert rows["prologue"].attributes["pbs.job_id"] == "7" and rows["prologue"].kind == "producer"
    assert rows["child"].parent_id == rows["prologue"].span_id and rows["child"].status == "error"
    assert rows["child"].link_ids == ["0123456789abcdef0123456789abcdef:1122334455667788"] * 2


def test_a_hook_process_loads_neither_protobuf_nor_the_metrics_sdk(tmp_path):
    """What a hook, vsub and the launcher do with tracing (set up without metrics, spans, a publish span, the
    flush at exit) loads no protobuf and no metrics SDK; a service's set-up still has its metrics."""
    code = f"""
import sys
from vtorque.shared import messages as m, tracing
from vtorque.shared.config import TracingConfig
tracing.setup_tracing("vtorque-hook", TracingConfig(dir={str(tmp_path)!r}), metrics=False)
with tracing.job_trace("7", None), tracing.span("prologue"):
    with tracing.publish_span(m.JobEnded.new(job_id="7", deadline=5, scheduler="slurm", nodes=["n1"]), "e", "k"):
        pass
tracing.shutdown_tracing()
print(sorted(n for n in sys.modules if n.startswith(("google.protobuf", "opentelemetry.sdk.metrics",
                                                      "vtorque.shared.metrics", "opentelemetry.exporter"))))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert '"name":"prologue"' in (tmp_path / "vtorque-hook.{}.jsonl".format(__import__("os").getuid())).read_text()
