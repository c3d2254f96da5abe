"""Torque accounting records and the prefetch decisions, on the log recorded from a real TORQUE 6.1
(../shared/reference/torque-recorded/accounting/20261126); Slurm's queue states."""

from datetime import datetime
from pathlib import Path

import pytest

from vtorque.services.scheduler_bridge.accounting import Action, PrefetchBook, later_logs, slurm_changes, still_queued
from vtorque.shared.slurm import parse_squeue
from vtorque.shared.torque import parse_attrs, parse_record

RECORDED = Path(__file__).parents[1] / "data" / "torque-recorded" / "accounting" / "20261126"


@pytest.fixture(scope="module")
def lines():
    if not RECORDED.exists():
        pytest.fail(f"{RECORDED} missing: the recorded Torque accounting log")
    return RECORDED.read_text().splitlines(keepends=True)


def test_every_recorded_line_is_a_record(lines):
    records = [parse_record(line) for line in lines]
    assert None not in records
    kinds = {}
    for rec in records:
        kinds[rec.type] = kinds.get(rec.type, 0) + 1
    assert kinds == {"Q": 17, "S": 144, "E": 17, "D": 7}


def test_a_started_record_in_full(lines):
    rec = parse_record(next(line for line in lines if ";S;1.vm;" in line))
    assert rec.when == datetime(2026, 11, 26, 0, 22, 32)
    assert rec.job_id == "1.vm"
    assert rec.attrs["exec_host"] == "vm/0-1"
    assert rec.attrs["Resource_List.nodes"] == "1:ppn=2"
    assert rec.attrs["account"] == "acct42"
    assert rec.attrs["start_count"] == "1"


def test_deleted_and_queued_records(lines):
    deleted = parse_record(next(line for line in lines if ";D;5.vm;" in line))
    assert deleted.attrs == {"requestor": "root@localhost"}
    queued = parse_record("11/26/2026 00:22:03;Q;0.vm;queue=batch\n")
    assert (queued.type, queued.job_id, queued.attrs) == ("Q", "0.vm", {"queue": "batch"})


@pytest.mark.parametrize("line", [
    "", "\n", "garbage\n", "11/26/2026 00:22:03;Q\n", "11/26/2026 00:22;Q;1.vm;queue=batch\n",
    "11/26/2026 00:22:03;QQ;1.vm;x=y\n", "11/26/2026 00:22:03;Q;;x=y\n", "11/26/2026 00:22:03;Q;a b;x\n",
    "13/45/2026 00:22:03;Q;1.vm;queue=batch\n",
])
def test_lines_that_are_not_records(line):
    assert parse_record(line) is None


def test_attrs_keep_equals_signs_in_values_and_ignore_loose_words():
    assert parse_attrs("a=b c=d=e loose Resource_List.nodes=1:ppn=2") == {
        "a": "b", "c": "d=e", "Resource_List.nodes": "1:ppn=2"}


def test_nothing_is_still_queued_at_the_end_of_the_recorded_day(lines):
    assert still_queued(parse_record(line) for line in lines) == []


def test_still_queued_follows_reused_job_ids(lines):
    head = [parse_record(line) for line in lines if ";Q;" in line or ";S;0.vm;" in line][:3]
    assert [r.job_id for r in head] == ["0.vm", "0.vm", "1.vm"]  # Q 0.vm, S 0.vm, Q 1.vm
    assert still_queued(head) == ["1.vm"]
    later = parse_record("11/27/2026 00:00:00;Q;0.vm;queue=batch")
    assert still_queued(head + [later]) == ["1.vm", "0.vm"]


def test_prefetch_decisions_over_the_recorded_day(lines):
    book = PrefetchBook()
    actions = []
    for line in lines:
        actions += book.on_record(parse_record(line), is_vm=lambda job_id: job_id != "2.vm")
    queued = [a.job_id for a in actions if a.kind == "queued"]
    deleted = [a for a in actions if a.kind == "deleted"]
    assert queued == ["0.vm", "1.vm", "3.vm", "4.vm", "5.vm", "6.vm", "7.vm", "8.vm", "9.vm", "10.vm", "11.vm",
                      "12.vm", "0.vm", "1.vm", "3.vm"]  # 2.vm is no VM job (twice)
    # A job deleted twice (6.vm) is withdrawn once; deletions after the E record are not (10.vm before it is).
    assert deleted == [Action("deleted", j, "deleted by root@localhost") for j in
                       ("4.vm", "5.vm", "6.vm", "9.vm", "10.vm", "3.vm")]
    assert book.vm_jobs == {}


def test_an_aborted_job_is_withdrawn():
    book = PrefetchBook()
    book.on_record(parse_record("11/26/2026 00:00:01;Q;7.vm;queue=batch"), lambda j: True)
    assert book.on_record(parse_record("11/26/2026 00:00:02;A;7.vm;"), lambda j: True) == [
        Action("deleted", "7.vm", "aborted")]


def test_day_files_in_order():
    names = ["20261126", "20261127", "20261125", "README", "20261127.gz", "2026112"]
    assert later_logs(names, None) == ["20261125", "20261126", "20261127"]
    assert later_logs(names, "20261126") == ["20261127"]
    assert later_logs(names, "20261127") == []


def test_squeue_states():
    assert parse_squeue("12|PENDING\n13|RUNNING\n14_2|PENDING\n15+1|PENDING\n\nbad\n") == {
        "12": "PENDING", "13": "RUNNING"}


def test_slurm_changes():
    known = {"1": "vm", "2": "vm", "3": "plain", "4": "vm", "9": "vm"}
    states = {"1": "PENDING", "2": "RUNNING", "3": "CANCELLED", "4": "COMPLETED", "5": "PENDING", "10": "PENDING",
              "6": "RUNNING"}
    new, withdrawn, done = slurm_changes(known, states)
    assert new == ["5", "10"]
    assert withdrawn == ["3", "9"]  # cancelled, and gone from slurmctld without being seen to start
    assert done == ["2", "4"]
