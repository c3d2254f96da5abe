"""The Torque hook's pure parts: deadlines from $prologalarm, names, exit codes (hooks/torque/). What Torque's
walltime, node file and exec_host say is shared/torque.py's: tests/unit/test_torque_exec_host.py."""

from datetime import UTC, datetime

import pytest

from vtorque.hooks.job_hook import Outcome, Verdict
from vtorque.hooks.torque import cancel, deadline, exit_codes, job, owner_notes, state_files


def test_deadline_keeps_the_margin_below_torques_kill():
    assert deadline.prologue_deadline(300, 15, 240) == 240  # hooks.prologue_timeout caps it
    assert deadline.prologue_deadline(300, 15, 1000) == 275
    assert deadline.prologue_deadline(30, 5, 240) == 15
    assert deadline.prologue_deadline(30, 5, 240, elapsed=12.5) == 2.5  # a chained site prologue took 12.5 s
    assert deadline.prologue_deadline(300, 15, 1.0, elapsed=0.5) == 1.0  # the cap is for the wait alone
    assert deadline.prologue_room(12, 5) < 1  # nothing fits: the hook aborts and says so


@pytest.mark.parametrize("name, job_id, want", [
    ("hooktest", "1.vm", "hooktest.v1"),
    ("arr", "12[3].vm", "arr.v12-3"),
    ("a/b", "5.vm", "job.v5"),
    ("", "5.vm", "job.v5"),
])
def test_reason_file_sits_beside_the_output_names(name, job_id, want):
    assert owner_notes.reason_file_name(name, job_id) == want


@pytest.mark.parametrize("job_id, ok", [("1.vm", True), ("12[3].vm", True), ("..", False), ("a/b", False),
                                        (".hidden", False), ("", False)])
def test_job_ids_usable_as_a_file_name(job_id, ok):
    assert cancel.safe_job_id(job_id) is ok


def test_torque_home_from_the_hooks_own_path():
    assert str(job.torque_home("/var/spool/torque/mom_priv/prologue", "/x")) == "/var/spool/torque"
    assert str(job.torque_home("/opt/t/mom_priv/epilogue", "/x")) == "/opt/t"
    assert str(job.torque_home("/work/main/hooks/torque/prologue", "/cfg")) == "/cfg"
    assert str(job.torque_home(None, "/cfg")) == "/cfg"


def test_every_failure_is_bounded():
    failed, rejected = Outcome(Verdict.FAILED, "x"), Outcome(Verdict.REJECTED, "x")
    for max_requeues in (0, 1, 2, 5):
        codes = [exit_codes.prologue_exit_code(failed, n, max_requeues) for n in range(max_requeues + 3)]
        assert codes == [exit_codes.REQUEUE] * max_requeues + [exit_codes.ABORT] * 3
        assert exit_codes.prologue_exit_code(rejected, 0, max_requeues) == exit_codes.ABORT


def test_unreadable_requeue_counter_counts_as_exhausted(tmp_path):
    counter = tmp_path / "1%2Evm.requeues"
    assert state_files.read_requeues(counter, 2) == 0
    counter.write_text("1\n")
    assert state_files.read_requeues(counter, 2) == 1
    counter.write_text("garbage")
    assert state_files.read_requeues(counter, 2) == 2


def test_reason_text_says_what_happens_next():
    when = datetime(2026, 11, 26, 0, 23, 1, tzinfo=UTC)
    abort = owner_notes.reason_text("3.vm", "pexit1", exit_codes.ABORT, "bad VM spec: -vm img: unknown", 1, 2, "vm",
                                    when)
    assert abort.splitlines()[0] == "vtorque: job 3.vm (pexit1) did not start: bad VM spec: -vm img: unknown"
    assert "not delivered" in abort and "vtorque trace 3.vm" in abort
    requeue = owner_notes.reason_text("4.vm", "j", exit_codes.REQUEUE, "boot timeout", 1, 2, "vm", when)
    assert "requeue 1 of 2" in requeue


def test_the_final_reason_file_says_the_final_outcome():
    """Torque delivers the .o/.e of every requeued attempt: what vtorque writes last must not promise
    another start that will not come, nor say "did not start" of a job that started."""
    when = datetime(2026, 11, 26, 0, 23, 1, tzinfo=UTC)
    requeue = owner_notes.reason_text("4.vm", "j", exit_codes.REQUEUE, "boot timeout", 2, 2, "vm", when)
    assert "not the job's end" in requeue
    last = owner_notes.reason_text("4.vm", "j", exit_codes.ABORT, "boot timeout", 3, 2, "vm", when)
    assert "after 2 requeue(s)): this is its end" in last and "not the last word" in last
    started = owner_notes.started_text("4.vm", "j", 2, "vm", when)
    assert started.startswith("vtorque: job 4.vm (j) started on attempt 2, after 1 requeue(s)")
    note = owner_notes.final_note("4.vm", exit_codes.ABORT, "boot timeout", 3, "/home/u/j.v4")
    assert note == "vtorque: FINAL: job 4.vm was aborted on attempt 3, not requeued again: boot timeout " \
                   "(see /home/u/j.v4)\n"
    assert owner_notes.final_note("4.vm", exit_codes.REQUEUE, "x", 2, None) == ""


