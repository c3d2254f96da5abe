"""Metrics leave a process over OTLP/HTTP (/v1/metrics) when an endpoint is configured, else as OTLP-JSON lines
beside the span files; both recorded from the messages a process publishes and consumes."""

import json
import subprocess
import sys

from .otlp_receiver import OtlpReceiver

EMIT = """
import sys
from vtorque.shared import messages as m, tracing
from vtorque.shared.config import TracingConfig
tracing.setup_tracing("vtorque-test", TracingConfig(otlp_endpoint=sys.argv[1] or None, dir=sys.argv[2],
                                                    metrics_interval=60))
t = m.PhaseTimings(image=0.1, disks=0.2, define=0.3, start=0.5, kernel_up=1.0, ready=2.0)
ready = m.GuestReady.new(job_id="9.srv", deadline=5.0, guest="g0", node="n9", index=0, address="127.0.0.1",
                         ssh_port=22000, timings=t)
with tracing.publish_span(ready, "vtorque.events", ready.routing_key()):
    pass
failed = m.GuestFailed.new(job_id="9.srv", deadline=5.0, guest="g0", node="n9", reason="boot timed out",
                           retryable=True)
with tracing.publish_span(failed, "vtorque.events", failed.routing_key()):
    pass
with tracing.process_span(ready, "vtorque.test", ready.routing_key(), {}):
    pass
tracing.shutdown_tracing()  # flushes the metrics long before the 60 s interval
"""


def test_metrics_go_to_the_configured_otlp_endpoint(tmp_path):
    with OtlpReceiver() as rx:
        subprocess.run([sys.executable, "-c", EMIT, rx.url, str(tmp_path)], check=True, timeout=60)
        points = rx.metric_points()
    assert not rx.bad_requests
    phases = {p[1]["vtorque.boot.phase"]: p[2] for p in points["vtorque.guest.boot.phase.duration"]}
    assert set(phases) == {"image", "disks", "define", "start", "kernel_up", "ready"}
    assert abs(phases["ready"].sum - 1.0) < 1e-9 and phases["ready"].count == 1
    (failure,) = points["vtorque.failures"]
    assert failure[1] == {"error.type": "boot_timeout", "vtorque.message.type": "GuestFailed", "vtorque.node": "n9"}
    assert failure[0]["service.name"] == "vtorque-test" and failure[2].as_int == 1
    (lag,) = points["vtorque.messaging.queue.lag"]
    assert lag[1]["messaging.destination.subscription.name"] == "vtorque.test"
    assert list(tmp_path.iterdir()) == []  # nothing went to the file fallback


def test_without_an_endpoint_metrics_are_otlp_json_lines(tmp_path):
    subprocess.run([sys.executable, "-c", EMIT, "", str(tmp_path)], check=True, timeout=60)
    (path,) = tmp_path.glob("vtorque-test.*.metrics.jsonl")
    names = set()
    for line in path.read_text().splitlines():
        for rm in json.loads(line)["resourceMetrics"]:
            for sm in rm["scopeMetrics"]:
                names |= {metric["name"] for metric in sm["metrics"]}
    assert {"vtorque.guest.boot.phase.duration", "vtorque.guest.boot.duration", "vtorque.failures",
            "vtorque.messaging.queue.lag"} <= names
