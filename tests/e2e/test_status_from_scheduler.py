"""`vtorque status` takes a job's state and exit code from the real Slurm and its phases from the trace;
`vtorque trace` shows the user's phases first, every span with a real status (issue 10 items 4 and 11)."""

import json
import re
import subprocess
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.guest]


def _status(slurm, job_id: str) -> dict:
    proc = slurm.run("vtorque", "status", "--json", job_id)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_a_job_that_exits_3_is_failed_with_exit_code_3(slurm):
    slurm.write("three.sh", "#!/bin/sh\necho before\nsleep 3\nexit 3\n")
    proc = slurm.run("vsub", "-vm", "img=tiny", "three.sh")
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()

    # While it runs in its guest: Slurm says running, the trace says its guests are up.
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        st = _status(slurm, job_id)
        # (the node worker's spans reach the files up to 0.5 s after the hook's: wait for the guest's too)
        if st["state"] == "running" and st["phase"] == "running" and [g["state"] for g in st["guests"]] == ["ready"]:
            break
        assert st["state"] in ("queued", "running"), st
        time.sleep(0.3)
    else:
        pytest.fail(f"job {job_id} never showed running: {st}")
    assert st["state_from"] == "scheduler" and st["exit_code"] is None
    assert st["scheduler"]["raw_state"] == "RUNNING"

    slurm.wait(job_id)
    deadline = time.monotonic() + 15  # the services export spans every 0.5 s; the epilogue's come last
    while (st := _status(slurm, job_id))["phase"] != "done" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert (st["state"], st["exit_code"], st["state_from"], st["phase"]) == ("failed", 3, "scheduler", "done"), st
    assert st["scheduler"]["raw_state"] == "FAILED"
    out = slurm.workdir / f"three.sh.o{job_id}"
    assert st["scheduler"]["stdout"] == str(out) and "before" in out.read_text()
    assert st["guests"] and all(g["state"] == "torn down" for g in st["guests"]) and st["notes"] == []

    text = slurm.run("vtorque", "status", job_id, check=True).stdout
    assert text.splitlines()[0] == f"job {job_id}: failed, exit code 3  (slurm: FAILED, NonZeroExitCode)", text
    assert f"output   {out}" in text

    # The trace: the user's phases first, with durations; no publish/process rows unless --all.
    trace = slurm.run("vtorque", "trace", job_id, check=True).stdout
    lines = trace.splitlines()
    assert re.match(r"phase\s+start\s+duration\s+status", lines[1]), trace
    phase_rows = lines[2:lines.index("")]
    assert [re.split(r"\s{2,}", r.strip())[0] for r in phase_rows] == [
        "queue wait", "prologue: boot guests", f"vt-{job_id}-vm-0 on vm", "run in guest", "epilogue: tear down",
        "total (submit to last span)"], trace
    assert re.search(r"^run in guest\s+\d+\.\d+s\s+[3-9]\.\d+s\s+ok\s+exit code 3$", trace, re.M), trace
    assert not re.search(r"\b(publish|process) vtorque", trace) and "--all" in lines[-1]
    full = slurm.run("vtorque", "trace", "--all", job_id, check=True).stdout
    assert re.search(r"\bpublish vtorque\.events\b", full) and re.search(r"\bprocess vtorque\.bridge\b", full)

    # Every span ends with a real status.
    spans = [
        json.loads(line) for line in slurm.run("vtorque", "trace", "--json", job_id, check=True).stdout.splitlines()
    ]
    assert {s["status"] for s in spans} <= {"ok", "error"}, [(s["service"], s["name"]) for s in spans
                                                             if s["status"] not in ("ok", "error")]
    assert all(s["status_message"] for s in spans if s["status"] == "error")


def test_a_job_without_vm_has_the_schedulers_status_and_no_trace(slurm):
    slurm.write("plain.sh", "#!/bin/sh\nexit 4\n")
    job_id = slurm.run("vsub", "plain.sh", check=True).stdout.strip()
    slurm.wait(job_id)
    st = _status(slurm, job_id)
    assert (st["state"], st["exit_code"], st["state_from"]) == ("failed", 4, "scheduler")
    assert st["trace_ids"] == [] and any("no spans" in n for n in st["notes"]), st


def test_a_job_no_one_knows_is_an_error(slurm):
    proc = slurm.run("vtorque", "status", "999999")
    assert proc.returncode == 1
    assert "job 999999: slurm does not know it; no spans for job 999999" in proc.stderr


def _otlp_line(service: str, spans: list[dict]) -> str:
    return json.dumps({"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
        "scopeSpans": [{"spans": spans}]}]})


def _otlp_span(name, sid, parent, start_s, end_s, **attrs):
    values = [{"key": k, "value": {"intValue": str(v)} if isinstance(v, int) else {"stringValue": v}}
              for k, v in attrs.items()]
    return {"traceId": "ab" * 16, "spanId": sid * 16, "parentSpanId": parent * 16 if parent else "", "name": name,
            "kind": "SPAN_KIND_INTERNAL", "startTimeUnixNano": str(int(start_s * 1e9)),
            "endTimeUnixNano": str(int(end_s * 1e9)), "status": {"code": "STATUS_CODE_OK"}, "attributes": values}


def test_a_job_slurm_has_forgotten_is_told_from_its_trace_and_says_so(slurm, tmp_path):
    """The real scontrol's answer for a job it does not know (as after MinJobAge), with a trace of that job."""
    job_id = "987654"  # far above any id the single-host Slurm gives in a test run
    assert slurm.run("scontrol", "show", "job", job_id).returncode != 0
    t = time.time() - 3600
    (tmp_path / "vtorque-test.0.jsonl").write_text(_otlp_line("vtorque-hook", [
        _otlp_span("vsub submit", "1", "", t, t + 0.1, **{"pbs.job_id": job_id}),
        _otlp_span("prologue", "2", "1", t + 1, t + 9, **{"pbs.job_id": job_id}),
        _otlp_span("run job in guest", "3", "1", t + 10, t + 12, **{"pbs.job_id": job_id, "vtorque.exit_code": 3}),
        _otlp_span("epilogue", "4", "1", t + 13, t + 14, **{"pbs.job_id": job_id}),
    ]) + "\n")
    env = {**slurm.env, "VTORQUE_TRACING__DIR": str(tmp_path)}
    proc = subprocess.run(["vtorque", "status", job_id], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"job {job_id}: failed, exit code 3  (from the trace)", proc.stdout
    assert f"note: slurm no longer knows job {job_id}" in proc.stdout and "MinJobAge" in proc.stdout
