"""The launcher's re-attach (cli/launcher.py): after a requeue, the batch step starts again on a guest restored
from a checkpoint, with the job's script still running there, and the launcher goes on with the script's
output where the job's output files already have it: no line twice, none lost. These are the pure parts: the
record of what was written (resume_offsets, encode/decode_record) and the remote command's shape; the guest's
side runs for real in tests/e2e/test_checkpoint_requeue.py."""

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
import zlib
from pathlib import Path

import pytest

from vtorque.cli.launcher import (
    RECORD_SIZE,
    FileNow,
    decode_record,
    encode_record,
    guest_run_dir,
    job_command,
    record_path,
    resume_offsets,
)

OUT = FileNow(dev=1, ino=10, size=100)
ERR = FileNow(dev=1, ino=11, size=7)


def record(done_out=40, done_err=7, pending=None, job="7", out=(1, 10, 90), err=(1, 11, 7)):
    return {"job": job, "done": {"out": done_out, "err": done_err},
            "file": {"out": list(out) if out else None, "err": list(err) if err else None}, "pending": pending}


def files(out=OUT, err=ERR):
    return {"out": out, "err": err}


def no_read(*_):
    raise AssertionError("nothing to read")


def test_a_first_run_starts_both_streams_at_zero():
    assert resume_offsets(None, "7", files(), no_read) == {"out": 0, "err": 0}
    assert resume_offsets(record(job="8"), "7", files(), no_read) == {"out": 0, "err": 0}  # another job's


def test_what_was_written_before_the_last_note_goes_on_from_there():
    assert resume_offsets(record(), "7", files(), no_read) == {"out": 40, "err": 7}


def test_the_noted_write_counts_only_if_the_file_has_those_bytes_there():
    chunk = b"count 9\n"
    pending = ["out", 90, len(chunk), zlib.crc32(chunk)]
    written = files(out=FileNow(1, 10, 98))
    assert resume_offsets(record(pending=pending), "7", written, lambda s, at, n: chunk) == {"out": 48, "err": 7}
    # Killed between the note and the write, and slurmstepd's own line came after: the size is there, not the bytes.
    other = b"*** JOB\n"
    assert resume_offsets(record(pending=pending), "7", files(out=FileNow(1, 10, 120)),
                          lambda s, at, n: other) == {"out": 40, "err": 7}
    # Killed before the write, nothing after it: the file is shorter than the chunk's end.
    assert resume_offsets(record(pending=pending), "7", files(out=FileNow(1, 10, 90)), no_read) == {
        "out": 40, "err": 7}
    # The file cannot be read back: the write is taken as not done (a line twice rather than one lost).
    assert resume_offsets(record(pending=pending), "7", written, lambda *_: None) == {"out": 40, "err": 7}


def test_a_new_or_truncated_output_file_has_none_of_it():
    assert resume_offsets(record(), "7", files(out=FileNow(1, 99, 500)), no_read) == {"out": 0, "err": 7}
    assert resume_offsets(record(), "7", files(out=FileNow(1, 10, 12)), no_read) == {"out": 0, "err": 7}
    assert resume_offsets(record(), "7", files(out=None), no_read) == {"out": 0, "err": 7}  # a pipe now
    assert resume_offsets(record(out=None), "7", files(), no_read) == {"out": 0, "err": 7}  # was a pipe
    # The pending write of a stream whose file is new is not looked for in the new file.
    pending = ["out", 90, 8, 0]
    assert resume_offsets(record(pending=pending), "7", files(out=FileNow(1, 99, 500)), no_read)["out"] == 0


def test_stdout_and_stderr_in_one_file_each_keep_their_count():
    same = FileNow(1, 10, 130)
    rec = record(done_out=80, done_err=20, out=(1, 10, 110), err=(1, 10, 130))
    assert resume_offsets(rec, "7", {"out": same, "err": same}, no_read) == {"out": 80, "err": 20}


def test_a_damaged_record_starts_again_from_zero():
    assert resume_offsets({"job": "7", "done": {}}, "7", files(), no_read) == {"out": 0, "err": 0}
    assert resume_offsets(record(pending=["out", "x"]), "7", files(), no_read) == {"out": 0, "err": 0}
    assert decode_record(b"{not json") is None and decode_record(b" " * RECORD_SIZE) is None
    assert decode_record(b"[1, 2]") is None


def test_the_record_is_one_fixed_size_write():
    raw = encode_record(record(pending=["err", 7, 3, 12345]))
    assert len(raw) == RECORD_SIZE and decode_record(raw) == record(pending=["err", 7, 3, 12345])


def test_the_record_is_beside_the_jobs_key():
    assert str(record_path("/h/.vtorque/keys/ab/id_ed25519")) == "/h/.vtorque/keys/ab/id_ed25519.stream"


def test_the_guest_directory_is_the_jobs_and_a_safe_name():
    assert guest_run_dir("12.server") == "/tmp/vtorque-job.12.server"
    assert guest_run_dir("12[3]") == "/tmp/vtorque-job.12_3_"
    assert guest_run_dir("../x y") == "/tmp/vtorque-job..._x_y"  # no slash: one directory of /tmp


def test_the_remote_command_carries_the_offsets_as_numbers_and_the_job_quoted():
    cmd = job_command("7'; rm -rf /", 12, 3)
    assert "VT_OUT=12 VT_ERR=3;" in cmd
    assert "export PBS_JOBID='7'\"'\"'; rm -rf /'" in cmd
    assert "setsid" in cmd and "vtorque-run started" in cmd and "vtorque-run attached" in cmd


# -- the launcher and the guest's side together, the guest played by a local shell ----------------------------

COUNT = (b"#!/bin/sh\ni=0\nwhile [ $i -lt 10 ]; do i=$((i + 1)); echo \"count $i\"; echo \"err $i\" >&2; "
         b"sleep 0.2; done\nexit 3\n")


def _launcher(tmp_path, shell, job, checkpoint=True):
    """`vtorque-launch` whose `ssh` runs the remote command in `shell` here: the guest's side, without a guest.
    `checkpoint`: what the node worker's job file says of the guest."""
    jdir = tmp_path / "state" / "jobs" / job
    jdir.mkdir(parents=True, exist_ok=True)
    (jdir / "vt-x-n1-0.json").write_text(json.dumps({"guest": "vt-x-n1-0", "index": 0, "node": "n1", "user": "u",
                                                     "ssh_socket": "/nonexistent", "checkpoint": checkpoint}))
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "ssh").write_text(f'#!/bin/sh\nfor a; do last=$a; done\nexec {shell} -c "$last"\n')
    (bindir / "ssh").chmod(0o755)
    (tmp_path / "vtorque.toml").write_text(f'state_dir = "{tmp_path}/state"\n[tracing]\ndir = "{tmp_path}"\n')
    key = tmp_path / "home" / "id_ed25519"
    key.parent.mkdir(exist_ok=True)
    key.write_text("k")
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "VTORQUE_CONFIG": str(tmp_path / "vtorque.toml"), "PBS_JOBID": job,
           "PBS_NUM_NODES": "1", "HOME": str(tmp_path)}
    out = open(tmp_path / "job.out", "ab")  # as the scheduler opens a job's output: appended, one file for both
    try:
        return subprocess.Popen([sys.executable, "-m", "vtorque.cli.launcher", "--ssh-key", str(key), "--wait", "1"],
                                stdin=subprocess.PIPE, stdout=out, stderr=out, env=env), key
    finally:
        out.close()


@pytest.mark.parametrize("shell", ["busybox sh", "/bin/sh"])
def test_a_batch_step_killed_and_started_again_re_attaches_without_a_line_twice(tmp_path, shell):
    if shutil.which(shell.split()[0]) is None:
        pytest.fail(f"{shell} is needed (busybox-static: the test guest's shell)")
    job = f"t{uuid.uuid4().hex[:8]}"
    try:
        first, key = _launcher(tmp_path, shell, job)
        first.stdin.write(base64.b64encode(COUNT))
        first.stdin.close()
        deadline = time.monotonic() + 30
        while b"count 4" not in (tmp_path / "job.out").read_bytes():
            assert time.monotonic() < deadline and first.poll() is None, (tmp_path / "job.out").read_bytes()
            time.sleep(0.05)
        first.send_signal(signal.SIGTERM)  # the batch step killed, as at a requeue: the script goes on
        assert first.wait(10) == -signal.SIGTERM
        assert Path(f"{key}.stream").exists()  # the record stays for the next batch step
        again, _ = _launcher(tmp_path, shell, job)
        again.communicate(base64.b64encode(COUNT), timeout=60)
        assert again.returncode == 3  # the script's own exit status, once
        lines = (tmp_path / "job.out").read_text().splitlines()
        assert sorted(ln for ln in lines if ln.startswith("count")) == sorted(f"count {i}" for i in range(1, 11))
        assert sorted(ln for ln in lines if ln.startswith("err")) == sorted(f"err {i}" for i in range(1, 11))
        assert [ln for ln in lines if ln.startswith("count")] == [f"count {i}" for i in range(1, 11)]  # in order
        assert not Path(f"{key}.stream").exists()  # the run ended: its record went
    finally:
        shutil.rmtree(f"/tmp/vtorque-job.{job}", ignore_errors=True)


def test_a_normal_run_keeps_the_scripts_output_and_exit_status(tmp_path):
    job = f"t{uuid.uuid4().hex[:8]}"
    try:
        proc, key = _launcher(tmp_path, "/bin/sh", job)
        proc.communicate(base64.b64encode(b"#!/bin/sh\necho out; echo err >&2; exit 7\n"), timeout=60)
        assert proc.returncode == 7
        assert sorted((tmp_path / "job.out").read_text().splitlines()) == ["err", "out"]
        assert not Path(f"{key}.stream").exists()
    finally:
        shutil.rmtree(f"/tmp/vtorque-job.{job}", ignore_errors=True)


TRAPPED = b"#!/bin/sh\ntrap 'echo terminated > \"$MARK\"; exit 143' TERM\necho up\nwhile :; do sleep 0.1; done\n"


@pytest.mark.parametrize("checkpoint", [False, True])
def test_the_batch_steps_kill_reaches_the_script_unless_a_requeue_checkpoints_it(tmp_path, checkpoint):
    job = f"t{uuid.uuid4().hex[:8]}"
    mark = tmp_path / "mark"
    script = TRAPPED.replace(b"$MARK", str(mark).encode())
    try:
        proc, _ = _launcher(tmp_path, "busybox sh", job, checkpoint=checkpoint)
        proc.stdin.write(base64.b64encode(script))
        proc.stdin.close()
        deadline = time.monotonic() + 30
        while b"up" not in (tmp_path / "job.out").read_bytes():
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "job.out").read_bytes()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # scancel, or a requeue
        assert proc.wait(20) == -signal.SIGTERM  # the launcher ends by the signal, as before
        time.sleep(1)
        if checkpoint:
            assert not mark.exists()  # left running for the checkpoint (its guests' end ends it)
            assert not Path(f"/tmp/vtorque-job.{job}/rc").exists()
        else:
            assert mark.read_text() == "terminated\n"  # the script got the signal, as on a host
            assert Path(f"/tmp/vtorque-job.{job}/rc").read_text() == "143\n"
    finally:
        pid = Path(f"/tmp/vtorque-job.{job}/pid")
        if pid.exists() and not Path(f"/tmp/vtorque-job.{job}/rc").exists():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(pid.read_text()), signal.SIGKILL)  # the runner we started: its own group
        shutil.rmtree(f"/tmp/vtorque-job.{job}", ignore_errors=True)
