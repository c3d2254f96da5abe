"""OpenTelemetry set-up per process, W3C trace context in AMQP headers, and messaging spans.

Spans follow the OpenTelemetry messaging conventions for RabbitMQ. Every span of a job carries `pbs.job_id`.
With no OTLP endpoint configured, spans are appended as OTLP-JSON lines to <tracing.dir>/<service>.<uid>.jsonl
so `vtorque trace JOBID` can always read a job's spans back.

Short-lived processes (the hooks, vsub, the launcher) pay for what this module loads on every VM job, so it loads
only what a process uses: the OTLP-JSON lines are written by `otlp_json` here (no protobuf: its pure-Python
build took ~0.1 s to import at a hook's exit), the OTLP/HTTP exporter is imported by the export thread on its
first batch (not on the caller's path), and the metrics SDK only where `setup_tracing(metrics=True)` (the
services; a hook's or vsub's publishes record no metric).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from vtorque.shared.config import TracingConfig
from vtorque.shared.logs import current_job_id, job_context
from vtorque.shared.own_file import append_own

JOB_ID = "pbs.job_id"
GUEST, NODE, IMAGE_DIGEST = "vtorque.guest", "vtorque.node", "vtorque.image.digest"
# What a child span takes over from its parent in the same process when it does not say otherwise: a boot
# phase or a publish inside "boot guest" belongs to the same guest, node and image.
INHERITED = (JOB_ID, GUEST, NODE, IMAGE_DIGEST)
# Events that say a step of a job failed: the span that publishes one ends ERROR (see publish_span).
FAILURE_EVENTS = frozenset({"JobRejected", "GuestFailed", "ImageStageFailed", "CommandExpired"})
_provider: TracerProvider | None = None


class JobIdSpanProcessor(SpanProcessor):
    """Stamps `pbs.job_id` on every span started while a job is being handled (see logs.job_context), and
    carries the job, guest, node and image digest down from a local parent span."""

    def on_start(self, span, parent_context=None) -> None:
        if not span.is_recording():
            return
        own = span.attributes or {}
        job_id = current_job_id()
        if job_id and JOB_ID not in own:
            span.set_attribute(JOB_ID, job_id)
        parent = trace.get_current_span(parent_context)
        inherited = getattr(parent, "attributes", None)  # only SDK spans of this process have attributes
        if inherited:
            for key in INHERITED:
                if key not in own and key not in (span.attributes or {}) and inherited.get(key):
                    span.set_attribute(key, inherited[key])


class OtlpJsonFileExporter(SpanExporter):
    """One ExportTraceServiceRequest per line, in the OTLP/JSON encoding (hex ids)."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        line = json.dumps(otlp_json(spans), separators=(",", ":")) + "\n"
        try:
            with self._lock:
                append_own(self.path, line)  # never a file planted under this predictable name
        except OSError:
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


class _ExporterMadeOnFirstUse(SpanExporter):
    """An exporter built by the export thread when its first batch comes, so that its imports (OTLP/HTTP:
    protobuf, requests) are never on the path of the process that only starts spans."""

    def __init__(self, make: Callable[[], SpanExporter]):
        self._make = make
        self._inner: SpanExporter | None = None
        self._lock = threading.Lock()

    def _exporter(self) -> SpanExporter:
        with self._lock:
            inner = self._inner
            if inner is None:
                inner = self._inner = self._make()
            return inner

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self._exporter().export(spans)

    def shutdown(self) -> None:
        if self._inner is not None:
            self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True if self._inner is None else self._inner.force_flush(timeout_millis)


# -- OTLP/JSON, as protobuf's JSON mapping of ExportTraceServiceRequest gives it (ids in hex, as OTLP/JSON
# says): what the OTLP exporter's encoder and json_format.MessageToDict made, field for field
# (tests/unit/test_tracing_json.py compares them) ---------------------------------------------------------

_KINDS = {SpanKind.INTERNAL: "SPAN_KIND_INTERNAL", SpanKind.SERVER: "SPAN_KIND_SERVER",
          SpanKind.CLIENT: "SPAN_KIND_CLIENT", SpanKind.PRODUCER: "SPAN_KIND_PRODUCER",
          SpanKind.CONSUMER: "SPAN_KIND_CONSUMER"}
_STATUS = {StatusCode.UNSET: None, StatusCode.OK: "STATUS_CODE_OK", StatusCode.ERROR: "STATUS_CODE_ERROR"}
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200  # SpanFlags


def _value(value) -> dict:
    if value is None:
        return {}
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, str):
        return {"stringValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, bytes):
        return {"bytesValue": base64.b64encode(value).decode()}
    if isinstance(value, Sequence):
        return {"arrayValue": {"values": [_value(v) for v in value]} if value else {}}
    if isinstance(value, Mapping):
        return {"kvlistValue": {"values": _attributes(value)} if value else {}}
    raise TypeError(f"attribute value of type {type(value).__name__}")


def _attributes(attributes) -> list[dict]:
    return [{"key": str(k), "value": _value(v)} for k, v in (attributes or {}).items()]


def _put(doc: dict, key: str, value) -> dict:
    """Protobuf's JSON leaves a field at its default (0, '', empty) out."""
    if value:
        doc[key] = value
    return doc


def _flags(parent) -> int:
    return _HAS_IS_REMOTE | (_IS_REMOTE if parent is not None and parent.is_remote else 0)


def _span_json(span: ReadableSpan) -> dict:
    ctx = span.get_span_context()
    assert ctx is not None  # an SDK span always has one
    doc: dict = {"traceId": f"{ctx.trace_id:032x}", "spanId": f"{ctx.span_id:016x}"}
    if ctx.trace_state:
        doc["traceState"] = ",".join(f"{k}={v}" for k, v in ctx.trace_state.items())
    if span.parent is not None:
        doc["parentSpanId"] = f"{span.parent.span_id:016x}"
    _put(doc, "name", span.name)
    _put(doc, "kind", _KINDS[span.kind])
    _put(doc, "startTimeUnixNano", str(span.start_time) if span.start_time else "")
    _put(doc, "endTimeUnixNano", str(span.end_time) if span.end_time else "")
    _put(doc, "attributes", _attributes(span.attributes))
    _put(doc, "droppedAttributesCount", span.dropped_attributes)
    _put(doc, "events", [_put(_put(_put({"timeUnixNano": str(e.timestamp)} if e.timestamp else {}, "name", e.name),
                                   "attributes", _attributes(e.attributes)),
                              "droppedAttributesCount", e.dropped_attributes) for e in span.events])
    _put(doc, "droppedEventsCount", span.dropped_events)
    _put(doc, "links", [_put(_put({"traceId": f"{ln.context.trace_id:032x}", "spanId": f"{ln.context.span_id:016x}"},
                                  "attributes", _attributes(ln.attributes)),
                             "droppedAttributesCount", ln.dropped_attributes) | {"flags": _flags(ln.context)}
                        for ln in span.links])
    _put(doc, "droppedLinksCount", span.dropped_links)
    status: dict = {}
    if span.status is not None:
        _put(status, "message", span.status.description)
        _put(status, "code", _STATUS[span.status.status_code])
        doc["status"] = status
    doc["flags"] = _flags(span.parent)
    return doc


def otlp_json(spans: Sequence[ReadableSpan]) -> dict:
    """An ExportTraceServiceRequest in OTLP/JSON: spans grouped by resource, then by instrumentation scope."""
    grouped: dict = {}
    for span in spans:
        grouped.setdefault(span.resource, {}).setdefault(span.instrumentation_scope or None, []).append(span)
    out = []
    for resource, scopes in grouped.items():
        scope_spans = []
        for scope, members in scopes.items():
            scope_doc = {} if scope is None else _put(_put(_put({}, "name", scope.name), "version", scope.version),
                                                      "attributes", _attributes(scope.attributes))
            scope_spans.append(_put({"scope": scope_doc, "spans": [_span_json(s) for s in members]},
                                    "schemaUrl", scope.schema_url if scope else ""))
        out.append(_put({"resource": _put({}, "attributes", _attributes(resource.attributes)),
                         "scopeSpans": scope_spans}, "schemaUrl", resource.schema_url))
    return _put({}, "resourceSpans", out)


def trace_file(config: TracingConfig, service: str) -> Path:
    return Path(config.dir) / f"{service}.{os.getuid()}.jsonl"


def setup_tracing(service: str, config: TracingConfig, metrics: bool = True) -> TracerProvider:
    """Install the process-wide tracer provider for `service` (service.name). Idempotent per process.
    `metrics`: also the meter provider (shared/metrics.py); the hooks, vsub and the launcher say False: they
    publish no event that records a metric, and the metrics SDK is ~20 ms of every VM job's start."""
    global _provider
    if _provider is not None:
        return _provider
    import socket

    resource = Resource.create({"service.name": service, "service.instance.id": uuid.uuid4().hex[:12],
                                "host.name": socket.gethostname()})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(JobIdSpanProcessor())
    exporter: SpanExporter
    if config.otlp_endpoint:
        endpoint = config.otlp_endpoint.rstrip("/") + "/v1/traces"

        def otlp_http() -> SpanExporter:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            return OTLPSpanExporter(endpoint=endpoint, timeout=5)

        exporter = _ExporterMadeOnFirstUse(otlp_http)
    else:
        path = trace_file(config, service)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass
        exporter = OtlpJsonFileExporter(path)
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    trace.set_tracer_provider(provider)
    _provider = provider
    if metrics:
        from vtorque.shared import metrics as metrics_setup

        # Metrics go where the spans go (same endpoint or same directory).
        metrics_setup.setup_metrics(service, config, resource)
    return provider


def shutdown_tracing() -> None:
    if _provider is not None:
        _provider.force_flush(5000)
        _provider.shutdown()
    if _metrics() is not None:
        _metrics().shutdown_metrics()


def _metrics():
    """shared/metrics.py if this process set metrics up (only then can there be anything to record), else None."""
    return sys.modules.get("vtorque.shared.metrics")


def tracer() -> _StatusTracer:
    """vtorque's tracer. Every span it starts ends with a real status (see `span`): the services, hooks, vsub
    and the launcher all start theirs here, so this is the one place where a span's status is decided."""
    return _StatusTracer(trace.get_tracer("vtorque"))


def end_status(span, exc: BaseException | None = None) -> None:
    """Give `span` its final status as it ends: ERROR with the exception when one escapes (unless the code
    already marked the span with its own reason), else OK unless the code marked it ERROR. A span left UNSET
    says nothing to the operator ("did this step work?"), so none is."""
    status = getattr(span, "status", None)  # only SDK spans have one; a non-recording span has nothing to set
    if status is None or not span.is_recording():
        return
    if exc is not None and not (isinstance(exc, SystemExit) and exc.code in (0, None)):
        if status.status_code is not StatusCode.ERROR:
            mark_error(span, exc if not isinstance(exc, SystemExit) else f"exit {exc.code}")
    elif status.status_code is StatusCode.UNSET:
        span.set_status(Status(StatusCode.OK))


@contextlib.contextmanager
def span(name: str, *, kind: SpanKind = SpanKind.INTERNAL, attributes: Mapping | None = None,
         links: Sequence[Link] | None = (), start_time: int | None = None,
         context: otel_context.Context | None = None, end_on_exit: bool = True) -> Iterator[trace.Span]:
    """A span as the current span that ends OK, or ERROR with the reason: the exception that escaped it, or
    what the code gave `mark_error` before it ended."""
    with trace.get_tracer("vtorque").start_as_current_span(
            name, context=context, kind=kind, attributes=attributes, links=links, start_time=start_time,
            record_exception=False, set_status_on_exception=False, end_on_exit=end_on_exit) as current:
        try:
            yield current
        except BaseException as exc:
            end_status(current, exc)
            raise
        if end_on_exit:  # else the caller ends it, and decides then
            end_status(current)


class _StatusTracer:
    """The SDK tracer, but its spans end with a status (`span` for the context-manager form; `start_span`
    returns a span whose `end()` sets OK unless it was marked ERROR)."""

    def __init__(self, inner: trace.Tracer):
        self._inner = inner

    def start_as_current_span(self, name: str, context=None, kind: SpanKind = SpanKind.INTERNAL,
                              attributes=None, links=(), start_time=None, record_exception: bool = True,
                              set_status_on_exception: bool = True, end_on_exit: bool = True):
        return span(name, kind=kind, attributes=attributes, links=links, start_time=start_time,
                    context=context, end_on_exit=end_on_exit)

    def start_span(self, name: str, context=None, kind: SpanKind = SpanKind.INTERNAL, attributes=None,
                   links=(), start_time=None, record_exception: bool = True,
                   set_status_on_exception: bool = True) -> _EndsWithStatus:
        return _EndsWithStatus(self._inner.start_span(name, context=context, kind=kind, attributes=attributes,
                                                      links=links, start_time=start_time))

    def __getattr__(self, name):
        return getattr(self._inner, name)


class _EndsWithStatus:
    """A span started with `start_span`: ended by hand, so its status is set in `end()`."""

    def __init__(self, inner):
        self._inner = inner

    def end(self, end_time: int | None = None) -> None:
        end_status(self._inner)
        self._inner.end(end_time)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        end_status(self._inner, exc)
        self._inner.end()

    def __getattr__(self, name):
        return getattr(self._inner, name)


# -- context in AMQP headers ------------------------------------------------------------------------------

def inject(headers: dict | None = None) -> dict:
    headers = {} if headers is None else headers
    propagate.inject(headers)
    return headers


def extract(headers: Mapping | None) -> otel_context.Context:
    carrier = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in (headers or {}).items()
               if isinstance(v, (str, bytes))}
    return propagate.extract(carrier)


def context_from_traceparent(traceparent: str | None) -> otel_context.Context:
    return extract({"traceparent": traceparent} if traceparent else {})


@contextlib.contextmanager
def job_trace(job_id: str, traceparent: str | None):
    """Work for one job, continuing the job's trace (the context vsub put in its script header): spans started
    inside are children of that context and carry pbs.job_id."""
    token = otel_context.attach(context_from_traceparent(traceparent))
    try:
        with job_context(job_id):
            yield
    finally:
        otel_context.detach(token)


def current_traceparent() -> str | None:
    return inject({}).get("traceparent")


# -- messaging spans --------------------------------------------------------------------------------------

def _message_attributes(message, destination: str, routing_key: str, operation: str, op_type: str) -> dict:
    attrs = {
        "messaging.system": "rabbitmq",
        "messaging.operation.name": operation,
        "messaging.operation.type": op_type,
        "messaging.destination.name": destination,
        "messaging.rabbitmq.destination.routing_key": routing_key,
        "messaging.message.id": message.message_id,
        "vtorque.message.type": type(message).__name__,
        JOB_ID: message.job_id,
    }
    # The message's own guest/node/image, where it names one (GuestReady, BootGuests, StageImage, ...).
    for field, key in (("guest", GUEST), ("node", NODE), ("digest", IMAGE_DIGEST)):
        value = getattr(message, field, None)
        if isinstance(value, str) and value:
            attrs[key] = value
    # A plan's or boot command's guests: their one image digest (what the node worker's spans then inherit).
    digests = {getattr(g, "image_digest", "") for g in getattr(message, "guests", None) or ()
               if not isinstance(g, str)}
    if len(digests) == 1 and IMAGE_DIGEST not in attrs and next(iter(digests)):
        attrs[IMAGE_DIGEST] = digests.pop()
    # A job's one BootGuests names its guests' image once, in its template.
    template_digest = getattr(getattr(message, "guest", None), "image_digest", None)
    if isinstance(template_digest, str) and template_digest and IMAGE_DIGEST not in attrs:
        attrs[IMAGE_DIGEST] = template_digest
    return attrs


@contextlib.contextmanager
def publish_span(message, exchange: str, routing_key: str) -> Iterator[dict]:
    """A PRODUCER span around one publish; yields the AMQP headers carrying its context.

    A message of no job (a node heartbeat) gets no span: a root span every few seconds per node would bury
    the jobs' traces."""
    if _metrics() is not None:
        _metrics().observe_published(message)
    if not message.job_id:
        yield {}
        return
    attrs = _message_attributes(message, exchange, routing_key, "publish", "send")
    enclosing = trace.get_current_span()
    with span(f"publish {exchange}", kind=SpanKind.PRODUCER, attributes=attrs):
        yield inject({})
    if type(message).__name__ in FAILURE_EVENTS:
        # The publish worked; the work it reports on did not: the span of that work (a handler's process
        # span, a guest's boot) ends ERROR with the reason, unless it already has its own.
        status = getattr(enclosing, "status", None)
        if enclosing.is_recording() and status is not None and status.status_code is not StatusCode.ERROR:
            mark_error(enclosing, f"{type(message).__name__}: {getattr(message, 'reason', '') or 'see the event'}")


@contextlib.contextmanager
def process_span(message, queue: str, routing_key: str, headers: Mapping | None, exchange: str = ""):
    """A CONSUMER span for handling one delivery: child of the producer span, and linked to it.

    A message of no job (a heartbeat) gets none, as in `publish_span`: the bridge consumes every node's
    heartbeats, and a root span for each would bury the jobs' traces."""
    if not message.job_id:
        if _metrics() is not None:
            _metrics().observe_delivery(message, queue)
        yield trace.INVALID_SPAN
        return
    parent = extract(headers)
    producer = trace.get_current_span(parent).get_span_context()
    links = [Link(producer)] if producer.is_valid else []
    attrs = _message_attributes(message, exchange, routing_key, "process", "process")
    attrs["messaging.destination.subscription.name"] = queue
    if _metrics() is not None:
        _metrics().observe_delivery(message, queue)
    token = otel_context.attach(parent)
    try:
        with span(f"process {queue}", kind=SpanKind.CONSUMER, attributes=attrs, links=links) as current:
            yield current
    finally:
        otel_context.detach(token)


def mark_error(span: trace.Span, exc: BaseException | str) -> None:
    """ERROR with the reason (an exception: its text, recorded as an event, and error.type)."""
    span.set_status(
        Status(StatusCode.ERROR, str(exc) or (type(exc).__name__ if isinstance(exc, BaseException) else "error"))
    )
    if isinstance(exc, BaseException):
        span.record_exception(exc)
        span.set_attribute("error.type", type(exc).__name__)
