"""Spans leave a process over OTLP/HTTP when an endpoint is configured, and as OTLP-JSON lines when not."""

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from vtorque.cli.trace_view import job_spans, parse_lines

EMIT = """
import sys
from vtorque.shared import tracing
from vtorque.shared.config import TracingConfig
from vtorque.shared.logs import job_context
tracing.setup_tracing("vtorque-test", TracingConfig(otlp_endpoint=sys.argv[1] or None, dir=sys.argv[2]))
with job_context("42.srv"):
    with tracing.tracer().start_as_current_span("outer"):
        with tracing.tracer().start_as_current_span("inner"):
            pass
tracing.shutdown_tracing()
"""


@pytest.fixture
def receiver():
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server API
            body = self.rfile.read(int(self.headers["Content-Length"]))
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            received.append((self.path, self.headers.get("Content-Type"), request))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", received
    server.shutdown()


def test_spans_go_to_the_configured_otlp_http_endpoint(receiver, tmp_path):
    url, received = receiver
    subprocess.run([sys.executable, "-c", EMIT, url, str(tmp_path)], check=True, timeout=60)
    assert received and all(path == "/v1/traces" for path, _, _ in received)
    assert received[0][1] == "application/x-protobuf"
    spans, services = [], set()
    for _, _, request in received:
        for rs in request.resource_spans:
            services |= {a.value.string_value for a in rs.resource.attributes if a.key == "service.name"}
            for ss in rs.scope_spans:
                spans += list(ss.spans)
    assert services == {"vtorque-test"}
    by_name = {s.name: s for s in spans}
    assert by_name["inner"].parent_span_id == by_name["outer"].span_id
    for span in spans:
        assert {a.key: a.value.string_value for a in span.attributes}["pbs.job_id"] == "42.srv"
    assert list(tmp_path.iterdir()) == []  # nothing went to the file fallback


def test_without_an_endpoint_spans_are_otlp_json_lines(tmp_path):
    subprocess.run([sys.executable, "-c", EMIT, "", str(tmp_path)], check=True, timeout=60)
    files = list(tmp_path.glob("vtorque-test.*.jsonl"))
    assert len(files) == 1
    lines = files[0].read_text().splitlines()
    doc = json.loads(lines[0])
    span = doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert len(span["traceId"]) == 32 and len(span["spanId"]) == 16  # hex, as OTLP/JSON wants
    rows = job_spans(parse_lines(lines), "42.srv")
    assert {r.name for r in rows} == {"outer", "inner"} and {r.service for r in rows} == {"vtorque-test"}


STATUSES = """
import sys
from vtorque.shared import messages as m, tracing
from vtorque.shared.config import TracingConfig
from vtorque.shared.logs import job_context
tracing.setup_tracing("vtorque-test", TracingConfig(otlp_endpoint=None, dir=sys.argv[1]))
with job_context("43.srv"):
    with tracing.tracer().start_as_current_span("worked"):
        pass
    try:
        with tracing.tracer().start_as_current_span("raised"):
            raise RuntimeError("disk full")
    except RuntimeError:
        pass
    with tracing.tracer().start_as_current_span("marked") as span:
        tracing.mark_error(span, "guest never became ready")
    try:
        with tracing.tracer().start_as_current_span("marked then raised") as span:
            tracing.mark_error(span, "own reason")
            raise ValueError("other")
    except ValueError:
        pass
    tracing.tracer().start_span("by hand").end()
    with tracing.span("helper"):
        pass
    msg = m.JobEnded.new(job_id="43.srv", deadline=5.0, scheduler="slurm", nodes=["n1"])
    with tracing.publish_span(msg, "vtorque.events", "job.43.job_ended") as headers:
        pass
    try:
        with tracing.process_span(msg, "vtorque.bridge", "job.43.job_ended", headers):
            raise KeyError("no plan")
    except KeyError:
        pass
    # a handler that reports a failure by an event (the bridge rejecting a job): its span ends ERROR
    with tracing.tracer().start_as_current_span("handler rejects"):
        rejected = m.JobRejected.new(job_id="43.srv", deadline=5.0, reason="image nosuch is not in the catalog")
        with tracing.publish_span(rejected, "vtorque.events", "job.43.job_rejected"):
            pass
    with tracing.tracer().start_as_current_span("handler with its own reason") as span:
        tracing.mark_error(span, "own")
        with tracing.publish_span(rejected, "vtorque.events", "job.43.job_rejected"):
            pass
beat = m.NodeHeartbeat.new(job_id="", deadline=30.0, node="n1", cores=2, mem_free_mib=100, guests_running=0,
                           domain_type="qemu", capabilities=[], interval=10.0)
with tracing.publish_span(beat, "vtorque.events", "node.n1.heartbeat") as headers:
    pass
with tracing.process_span(beat, "vtorque.bridge.nodes.x", "node.n1.heartbeat", headers) as span:
    tracing.mark_error(span, "ignored: no span")
tracing.shutdown_tracing()
"""


def test_every_span_ends_ok_or_error_with_its_reason(tmp_path):
    subprocess.run([sys.executable, "-c", STATUSES, str(tmp_path)], check=True, timeout=60)
    docs = [json.loads(line) for f in tmp_path.glob("vtorque-test.*.jsonl") for line in f.read_text().splitlines()]
    spans = {
        s["name"]: s for d in docs for rs in d.get("resourceSpans", []) for ss in rs["scopeSpans"] for s in ss["spans"]
    }
    status = {name: (s.get("status", {}).get("code", "STATUS_CODE_UNSET"), s.get("status", {}).get("message", ""))
              for name, s in spans.items()}
    assert "process vtorque.bridge.nodes.x" not in spans  # a heartbeat (no job) makes no span either way
    ok = ("STATUS_CODE_OK", "")
    assert status == {
        "worked": ok, "by hand": ok, "helper": ok, "publish vtorque.events": ok,
        "raised": ("STATUS_CODE_ERROR", "disk full"),
        "marked": ("STATUS_CODE_ERROR", "guest never became ready"),
        "marked then raised": ("STATUS_CODE_ERROR", "own reason"),
        "process vtorque.bridge": ("STATUS_CODE_ERROR", "'no plan'"),
        "handler rejects": ("STATUS_CODE_ERROR", "JobRejected: image nosuch is not in the catalog"),
        "handler with its own reason": ("STATUS_CODE_ERROR", "own"),
    }, status
    raised = spans["raised"]
    assert [e["name"] for e in raised.get("events", [])] == ["exception"]  # recorded once, not twice
    attrs = {a["key"]: a["value"].get("stringValue") for a in raised["attributes"]}
    assert attrs["error.type"] == "RuntimeError"
    assert len(spans["marked then raised"].get("events", [])) == 0  # the code's own reason stands
    rows = {r.name: r for r in parse_lines([json.dumps(d) for d in docs])}
    assert rows["worked"].status == "ok" and rows["raised"].status == "error"
