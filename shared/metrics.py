"""OpenTelemetry metrics of every vtorque process, recorded where the facts already are.

Most numbers come from the contract's own events at the moment they are published (GuestReady carries the
boot phase timings, ImageStaged the bytes and seconds, the failure events their reasons) and from each
delivery's age when a consumer starts on it, so the services need no metric code of their own: shared/
tracing.py calls `observe_published` and `observe_delivery`. Guests running per node is a gauge the node
worker's heartbeat feeds (`set_guests_running`).

Export: OTLP/HTTP to <tracing.otlp_endpoint>/v1/metrics, or, with no endpoint, OTLP-JSON lines appended to
<tracing.dir>/<service>.<uid>.metrics.jsonl (the same fallback as the spans'). Names and units are listed in
docs/operations.md; `INSTRUMENTS` below is the one list both are checked against.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource

from vtorque.shared.own_file import append_own

# name → (instrument kind, unit, description). The documented set: docs/operations.md lists exactly these.
INSTRUMENTS: dict[str, tuple[str, str, str]] = {
    "vtorque.guest.boot.phase.duration": (
        "histogram", "s", "Seconds one boot phase of one guest took (attribute vtorque.boot.phase)"),
    "vtorque.guest.boot.duration": (
        "histogram", "s", "Seconds from the node worker taking a boot command to the guest answering ssh"),
    "vtorque.image.staged.size": ("counter", "By", "Bytes the image stager made available, by cache hit or not"),
    "vtorque.image.staging.duration": ("histogram", "s", "Seconds one staging took, by cache hit or not"),
    "vtorque.messaging.queue.lag": (
        "histogram", "s", "Seconds from a message's creation to a consumer starting on it, per queue"),
    "vtorque.node.guests.running": ("gauge", "{guest}", "vtorque guests running on the node"),
    "vtorque.failures": ("counter", "{failure}", "Failures, by error.type (a small fixed set of reasons)"),
}

# Boot phases span from ~1 ms (define) to minutes (a cold image under TCG): default buckets stop at 10 s.
_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
PHASES = ("image", "disks", "define", "start", "kernel_up", "ready")

_provider: MeterProvider | None = None
_instruments: dict[str, object] = {}
_guests_running: dict[str, int] = {}
_lock = threading.Lock()


# -- pure: what to record --------------------------------------------------------------------------------

def phase_durations(timings) -> dict[str, float]:
    """PhaseTimings are cumulative seconds from the boot command; each phase's own duration is the step.
    kernel_up (seen on the console) is optional: without it `ready` counts from `start`."""
    out: dict[str, float] = {}
    previous = 0.0
    for phase in PHASES:
        value = getattr(timings, phase, None)
        if value is None:
            continue
        out[phase] = max(0.0, float(value) - previous)
        previous = float(value)
    return out


# error.type values: a fixed, small set so the metric's cardinality stays bounded (reasons are free text).
_REASON_RULES: tuple[tuple[str, str], ...] = (
    (r"timed out|in time|deadline", "timeout"),
    (r"not in (this|the) (stager's |node's )?catalog|unknown image|no such image", "unknown_image"),
    (r"digest|sha256|checksum|verif", "image_digest_mismatch"),
    (r"stopped during boot|reported a failure", "guest_crashed"),
    (r"no free .*port", "no_free_port"),
    (r"define failed|start failed|destroy|undefine|cannot connect to qemu|libvirt", "hypervisor"),
    (r"disk|qemu-img|no space", "disk"),
    (r"spec|vcpus|ram|img|-vm ", "bad_spec"),
    (r"broker", "broker"),
)


def failure_type(message) -> str | None:
    """The error.type of a failure event, or None when the message is no failure."""
    kind = type(message).__name__
    if kind == "CommandExpired":
        return "command_expired"
    if kind not in ("GuestFailed", "ImageStageFailed", "JobRejected"):
        return None
    reason = getattr(message, "reason", "").lower()
    if kind == "ImageStageFailed":
        prefix = "stage_"
    elif kind == "JobRejected":
        prefix = "rejected_"
    else:
        prefix = "boot_"
    for pattern, name in _REASON_RULES:
        if re.search(pattern, reason):
            return prefix + name
    return prefix + "other"


def queue_lag(created_at: datetime, now: datetime | None = None) -> float:
    now = now or datetime.now(UTC)
    return max(0.0, (now - created_at).total_seconds())


# -- recording (no-ops until setup_metrics) --------------------------------------------------------------

def _get(name: str):
    return _instruments.get(name)


def observe_published(message) -> None:
    """Record what a published event says. Called by tracing.publish_span for every publish."""
    if _provider is None:
        return
    kind = type(message).__name__
    try:
        if kind == "GuestReady":
            if message.timings.ready <= 0:
                return  # a re-announcement of a guest already up (all zero timings): no new boot
            attrs = {"vtorque.node": message.node}
            for phase, seconds in phase_durations(message.timings).items():
                _get("vtorque.guest.boot.phase.duration").record(seconds, {**attrs, "vtorque.boot.phase": phase})
            _get("vtorque.guest.boot.duration").record(float(message.timings.ready), attrs)
        elif kind == "ImageStaged":
            attrs = {"vtorque.image.name": message.image, "vtorque.image.cached": bool(message.cached)}
            _get("vtorque.image.staged.size").add(int(message.bytes), attrs)
            _get("vtorque.image.staging.duration").record(float(message.seconds), attrs)
        failure = failure_type(message)
        if failure:
            attrs = {"error.type": failure, "vtorque.message.type": kind}
            node = getattr(message, "node", None)
            if node:
                attrs["vtorque.node"] = node
            _get("vtorque.failures").add(1, attrs)
    except Exception:  # noqa: BLE001 - a metric must never break a publish
        pass


def observe_delivery(message, queue: str) -> None:
    """Record how long a delivery waited before a consumer started on it. Called by tracing.process_span."""
    if _provider is None:
        return
    try:
        _get("vtorque.messaging.queue.lag").record(queue_lag(message.created_at), {
            "messaging.destination.subscription.name": queue, "vtorque.message.type": type(message).__name__})
    except Exception:  # noqa: BLE001
        pass


def set_guests_running(node: str, count: int) -> None:
    with _lock:
        _guests_running[node] = int(count)


def _observe_guests(_options: CallbackOptions) -> Iterable[Observation]:
    with _lock:
        return [Observation(n, {"vtorque.node": node}) for node, n in _guests_running.items()]


# -- export ----------------------------------------------------------------------------------------------

class OtlpJsonMetricFileExporter(MetricExporter):
    """One ExportMetricsServiceRequest per line, in the OTLP/JSON encoding; like the spans' file fallback."""

    def __init__(self, path: Path):
        super().__init__(preferred_temporality={}, preferred_aggregation={})
        self.path = path
        self._lock = threading.Lock()

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs) -> MetricExportResult:
        from google.protobuf import json_format
        from opentelemetry.exporter.otlp.proto.common._internal.metrics_encoder import encode_metrics

        if not any(sm.metrics for rm in metrics_data.resource_metrics for sm in rm.scope_metrics):
            return MetricExportResult.SUCCESS
        line = json.dumps(json_format.MessageToDict(encode_metrics(metrics_data)), separators=(",", ":")) + "\n"
        try:
            with self._lock:
                append_own(self.path, line)  # never a file planted under this predictable name
        except OSError:
            return MetricExportResult.FAILURE
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
        pass


def metrics_file(config, service: str) -> Path:
    return Path(config.dir) / f"{service}.{os.getuid()}.metrics.jsonl"


def setup_metrics(service: str, config, resource: Resource | None = None) -> MeterProvider:
    """Install the process-wide meter provider. Idempotent per process; `config` is a TracingConfig."""
    global _provider
    if _provider is not None:
        return _provider
    exporter: MetricExporter
    if config.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics import Counter, Histogram, ObservableGauge

        # Cumulative, the OTLP default that Prometheus-style backends expect.
        exporter = OTLPMetricExporter(endpoint=config.otlp_endpoint.rstrip("/") + "/v1/metrics", timeout=5,
                                      preferred_temporality={Counter: AggregationTemporality.CUMULATIVE,
                                                             Histogram: AggregationTemporality.CUMULATIVE,
                                                             ObservableGauge: AggregationTemporality.CUMULATIVE})
    else:
        path = metrics_file(config, service)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass
        exporter = OtlpJsonMetricFileExporter(path)
    interval_ms = max(100.0, float(getattr(config, "metrics_interval", 15.0)) * 1000)
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=interval_ms)
    views = [View(instrument_name=name, aggregation=ExplicitBucketHistogramAggregation(_SECONDS_BUCKETS))
             for name, (kind, unit, _) in INSTRUMENTS.items() if kind == "histogram" and unit == "s"]
    provider = MeterProvider(resource=resource or Resource.create({"service.name": service}),
                             metric_readers=[reader], views=views)
    meter = provider.get_meter("vtorque")
    for name, (kind, unit, description) in INSTRUMENTS.items():
        if kind == "histogram":
            _instruments[name] = meter.create_histogram(name, unit=unit, description=description)
        elif kind == "counter":
            _instruments[name] = meter.create_counter(name, unit=unit, description=description)
        elif kind == "gauge":
            _instruments[name] = meter.create_observable_gauge(name, callbacks=[_observe_guests], unit=unit,
                                                               description=description)
    metrics.set_meter_provider(provider)
    _provider = provider
    return provider


def shutdown_metrics() -> None:
    """Export what is left (a hook's or CLI's process lives shorter than one export interval)."""
    global _provider
    if _provider is not None:
        try:
            _provider.shutdown(5000)  # the periodic reader collects and exports once more on shutdown
        except Exception:  # noqa: BLE001 - shutting down must not mask the process's own exit
            pass
        _provider = None  # later observations are no-ops, not warnings from a shut-down provider
