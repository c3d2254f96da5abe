"""Slurm hook: what the owner is told when a VM job does not start (Comment, the launcher's one line), and the
deadline taken from Slurm's own PrologEpilogTimeout (pure parts)."""

import pytest

from vtorque.hooks import slurm
from vtorque.hooks.job_hook import Outcome, Verdict
from vtorque.hooks.slurm import comment as slurm_comment

CONFIG_22_05 = """Configuration data as of 2026-12-01T17:58:10
AccountingStorageBackupHost = (null)
PrologEpilogTimeout     = 300
PrologFlags             = Alloc
PrologSlurmctld         = /opt/vtorque/hooks/slurm/prolog_slurmctld
"""

SHOW_JOB = """JobId=12 JobName=bad.sh
   UserId=alice(1001) GroupId=alice(1001) MCS_label=N/A
   JobState=PENDING Reason=BeginTime Dependency=(null)
   Requeue=1 Restarts=1 BatchFlag=1 Reboot=0 ExitCode=0:0
   Comment=vtorque: requeued (1 of 2): broker unreachable | your comment: my run 7
   StdErr=/home/alice/bad.sh.e12
"""


def test_the_timeout_is_read_from_scontrol_show_config():
    assert slurm.prolog_epilog_timeout(CONFIG_22_05) == 300
    assert slurm.prolog_epilog_timeout("PrologEpilogTimeout     = 65534\n") is None  # unset: no limit
    assert slurm.prolog_epilog_timeout("PrologFlags = Alloc\n") is None
    assert slurm.prolog_epilog_timeout("PrologEpilogTimeout = 0\n") is None


@pytest.mark.parametrize("timeout,cap,elapsed,want", [
    (300, 240.0, 0.0, 240.0),  # Slurm leaves more than hooks.prologue_timeout
    (60, 240.0, 0.0, 50.0),  # Slurm's kill comes first: never wait past it (less the margin)
    (60, 240.0, 5.0, 45.0),  # what the hook already spent counts
    (None, 240.0, 5.0, 240.0),  # no PrologEpilogTimeout: the cap alone
])
def test_the_deadline_never_passes_slurms_kill(timeout, cap, elapsed, want):
    assert slurm.prolog_deadline(timeout, slurm.PROLOG_MARGIN, cap, elapsed) == want


def test_no_room_at_all_is_said_as_such():
    assert slurm.prolog_room(10, slurm.PROLOG_MARGIN, 0.5) < 1
    assert slurm.prolog_room(None, slurm.PROLOG_MARGIN, 0.5) is None


def test_decisions_are_bounded():
    assert slurm.decide(Outcome(Verdict.READY), 5, 2) == "run"
    assert slurm.decide(Outcome(Verdict.FAILED), 0, 2) == "requeue"
    assert slurm.decide(Outcome(Verdict.FAILED), 1, 2) == "requeue"
    assert slurm.decide(Outcome(Verdict.FAILED), 2, 2) == "refuse"  # the last failure: never a loop
    assert slurm.decide(Outcome(Verdict.REJECTED), 0, 2) == "refuse"


def test_the_comment_is_parsed_with_its_spaces():
    assert slurm.job_comment(SHOW_JOB) == "vtorque: requeued (1 of 2): broker unreachable | your comment: my run 7"
    assert slurm.job_comment("   Comment=(null) \n") == ""
    assert slurm.job_comment("JobId=1\n") == ""


def test_the_owners_own_comment_is_kept_across_requeues():
    first = slurm_comment.comment_with("my run 7", slurm_comment.requeue_comment("broker unreachable", 1, 2))
    assert first == "vtorque: requeued (1 of 2): broker unreachable | your comment: my run 7"
    final = slurm_comment.comment_with(first, slurm_comment.not_started_comment("image tiny: sha256 mismatch", 2))
    assert final == ("vtorque: not started: image tiny: sha256 mismatch (after 2 requeues)"
                     " | your comment: my run 7")
    assert slurm_comment.users_comment(final) == "my run 7"
    assert slurm_comment.comment_with("", slurm_comment.not_started_comment("x", 0)) == "vtorque: not started: x"


def test_the_reason_is_one_bounded_line():
    text = slurm_comment.not_started_comment("guest g0 failed:\nkernel panic\n" + "x" * 2000, 0)
    assert "\n" not in text and len(text) < 450


def test_the_launcher_prints_one_line_for_a_refused_job_and_nothing_otherwise():
    comment = slurm_comment.comment_with("mine", slurm_comment.not_started_comment("image tiny: sha256 mismatch", 1))
    line = slurm_comment.refusal_line("12", comment)
    assert line == "vtorque: job 12 did not start: image tiny: sha256 mismatch (after 1 requeue)"
    assert slurm_comment.refusal_line("12", "vtorque: requeued (1 of 2): broker unreachable") is None
    assert slurm_comment.refusal_line("12", "mine") is None
    assert slurm_comment.refusal_line("12", "") is None


def test_the_process_age_is_small_for_this_process_and_zero_for_none():
    assert 0 < slurm.process_age() < 3600 * 24 * 365
    assert slurm.process_age(2**22 + 12345) == 0.0


def test_the_launchers_check_does_not_import_the_bus_client():
    """vtorque-launch calls refusal() for every Slurm VM job: no pika (~0.2 s) for that."""
    import subprocess
    import sys

    code = "import sys, vtorque.hooks.slurm as s; assert s.refusal; print('pika' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
