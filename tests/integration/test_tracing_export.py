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
