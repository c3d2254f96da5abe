"""A real OTLP/HTTP receiver for tests: accepts ExportTraceServiceRequest at /v1/traces and
ExportMetricsServiceRequest at /v1/metrics (protobuf, as opentelemetry-exporter-otlp-proto-http sends them),
decoded with opentelemetry-proto, and keeps everything for the test to assert on.

    with OtlpReceiver() as rx:
        ... run processes with tracing.otlp_endpoint = rx.url ...
        spans = rx.wait_for_spans(lambda spans: ..., timeout=30)
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span


def any_value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def attrs(kvs) -> dict:
    return {kv.key: any_value(kv.value) for kv in kvs}


@dataclass(frozen=True)
class ReceivedSpan:
    resource: dict
    span: Span

    @property
    def service(self) -> str:
        return self.resource.get("service.name", "?")

    @property
    def name(self) -> str:
        return self.span.name

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_id(self) -> str:
        return self.span.parent_span_id.hex()

    @property
    def kind(self) -> str:
        return Span.SpanKind.Name(self.span.kind).removeprefix("SPAN_KIND_").lower()

    @property
    def attributes(self) -> dict:
        return attrs(self.span.attributes)

    @property
    def links(self) -> list[tuple[str, str]]:
        return [(ln.trace_id.hex(), ln.span_id.hex()) for ln in self.span.links]

    def __repr__(self) -> str:
        return f"<{self.service} {self.kind} {self.name!r} {self.span_id} parent={self.parent_id or '-'}>"


class OtlpReceiver:
    def __init__(self, host: str = "127.0.0.1"):
        self._lock = threading.Lock()
        self.trace_requests: list[ExportTraceServiceRequest] = []
        self.metric_requests: list[ExportMetricsServiceRequest] = []
        self.bad_requests: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the http.server API
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.headers.get("Content-Type") != "application/x-protobuf":
                    return self._answer(415, b"", f"{self.path}: content type {self.headers.get('Content-Type')}")
                if self.path == "/v1/traces":
                    request, response = ExportTraceServiceRequest(), ExportTraceServiceResponse()
                    store = receiver.trace_requests
                elif self.path == "/v1/metrics":
                    request, response = ExportMetricsServiceRequest(), ExportMetricsServiceResponse()
                    store = receiver.metric_requests
                else:
                    return self._answer(404, b"", f"unknown path {self.path}")
                try:
                    request.ParseFromString(body)
                except Exception as exc:  # noqa: BLE001 - recorded for the test to see
                    return self._answer(400, b"", f"{self.path}: {exc}")
                with receiver._lock:
                    store.append(request)
                self._answer(200, response.SerializeToString())

            def _answer(self, code: int, body: bytes, problem: str | None = None):
                if problem:
                    with receiver._lock:
                        receiver.bad_requests.append(problem)
                self.send_response(code)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            requests = list(self.trace_requests)
        out = []
        for request in requests:
            for rs in request.resource_spans:
                resource = attrs(rs.resource.attributes)
                for ss in rs.scope_spans:
                    out += [ReceivedSpan(resource, s) for s in ss.spans]
        return out

    def metric_points(self) -> dict[str, list[tuple[dict, dict, object]]]:
        """metric name → [(resource attributes, point attributes, point)] over every request received."""
        with self._lock:
            requests = list(self.metric_requests)
        out: dict[str, list] = {}
        for request in requests:
            for rm in request.resource_metrics:
                resource = attrs(rm.resource.attributes)
                for sm in rm.scope_metrics:
                    for metric in sm.metrics:
                        data = getattr(metric, metric.WhichOneof("data"))
                        for point in data.data_points:
                            out.setdefault(metric.name, []).append((resource, attrs(point.attributes), point))
        return out

    def metric_units(self) -> dict[str, str]:
        with self._lock:
            requests = list(self.metric_requests)
        return {m.name: m.unit for r in requests for rm in r.resource_metrics for sm in rm.scope_metrics
                for m in sm.metrics}

    def wait_for(self, predicate: Callable[[], bool], timeout: float, poll: float = 0.2) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(poll)
        return predicate()
