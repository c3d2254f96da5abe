"""Every log line is one JSON object carrying the job id and, inside a span, the trace id."""

import io
import json
import logging

from opentelemetry.sdk.trace import TracerProvider

from vtorque.shared.logs import JsonFormatter, job_context, log


def _capture():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("vtorque-test"))
    logger = logging.getLogger("vtorque.test.logs")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, stream


def test_job_id_and_trace_id_on_every_line_where_there_is_one():
    logger, stream = _capture()
    tracer = TracerProvider().get_tracer("t")  # a local provider: the test does not touch the global one
    log(logger, logging.INFO, "no job yet")
    with job_context("12.srv"):
        log(logger, logging.INFO, "job, no span")
        with tracer.start_as_current_span("s") as span:
            log(logger, logging.WARNING, "job and span", guest="g0", password="hunter2")
            ids = span.get_span_context()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [d["msg"] for d in lines] == ["no job yet", "job, no span", "job and span"]
    assert "job_id" not in lines[0] and "trace_id" not in lines[0]
    assert lines[1]["job_id"] == "12.srv" and "trace_id" not in lines[1]
    assert lines[2]["job_id"] == "12.srv" and lines[2]["trace_id"] == format(ids.trace_id, "032x")
    assert lines[2]["span_id"] == format(ids.span_id, "016x") and lines[2]["guest"] == "g0"
    assert lines[2]["password"] == "***" and lines[2]["level"] == "warning"


def test_a_thread_crash_is_a_json_line_too():
    import subprocess
    import sys

    code = ("import threading\nfrom vtorque.shared.logs import setup_logging\nsetup_logging('vtorque-test')\n"
            "t = threading.Thread(target=lambda: 1 / 0, name='worker-1'); t.start(); t.join()\n")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30).stderr
    lines = [json.loads(line) for line in err.splitlines()]  # every line is JSON, the traceback inside
    (crash,) = lines
    assert crash["level"] == "critical" and "worker-1" in crash["msg"] and "ZeroDivisionError" in crash["exc"]
