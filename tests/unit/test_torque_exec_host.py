"""exec_host, qstat -f and accounting records, parsed (shared/torque_exec_host.py, shared/scheduler.py)."""

from pathlib import Path

import pytest

from vtorque.shared.scheduler import parse_qstat_f
from vtorque.shared.torque_exec_host import ExecHostError, parse_accounting, parse_core_list, parse_exec_host

RECORDED = Path(__file__).parents[1] / "data" / "torque-recorded" / "accounting" / "20261126"


@pytest.mark.parametrize("text, want", [
    ("vm/0-1", {"vm": [0, 1]}),
    ("vm/0", {"vm": [0]}),
    ("n1/0-1+n2/2-3", {"n1": [0, 1], "n2": [2, 3]}),
    ("n1.cluster/0+n1.cluster/1+n2/0", {"n1": [0, 1], "n2": [0]}),  # the older one-slot-per-entry form
    ("n2/4,6-7+n1/0", {"n2": [4, 6, 7], "n1": [0]}),
])
def test_exec_host_gives_hosts_in_order_with_their_cores(text, want):
    got = parse_exec_host(text)
    assert dict(got) == want
    assert list(got) == list(want)  # the mother superior first


@pytest.mark.parametrize("text", ["", "vm", "vm/", "/0", "vm/a", "vm/3-1", "vm/0-1+"])
def test_bad_exec_host_says_so(text):
    with pytest.raises(ExecHostError):
        parse_exec_host(text)


def test_core_list_keeps_order_and_drops_repeats():
    assert parse_core_list("3,0-1,1") == [3, 0, 1]


def test_qstat_f_unfolds_long_values():
    text = ("Job Id: 7.vm\n    Job_Name = big\n    exec_host = n1/0-1+n2/0-1+n3/0-1+n4/0-1+n5/0-1+n6/0-1+n7/0\n"
            "\t-1+n8/0-1\n    Resource_List.nodes = 8:ppn=2\n")
    attrs = parse_qstat_f(text)
    assert attrs["Job_Name"] == "big"
    assert parse_exec_host(attrs["exec_host"])["n7"] == [0, 1]
    assert list(parse_exec_host(attrs["exec_host"]))[-1] == "n8"
    assert attrs["Resource_List.nodes"] == "8:ppn=2"


def test_recorded_accounting_records_parse():
    records = parse_accounting(RECORDED.read_text())
    starts = [r for r in records if r.type == "S"]
    # The first run's job 1 (the server db was re-created later: run2's ids start from 0 again).
    assert next(r.attrs["exec_host"] for r in starts if r.job_id == "1.vm") == "vm/0-1"
    assert parse_exec_host(starts[0].attrs["exec_host"]) == {"vm": [0]}
    ended: dict[str, str] = {}
    for r in records:
        if r.type == "E":
            ended.setdefault(r.job_id, r.attrs["Exit_status"])
    assert ended["1.vm"] == "3" and ended["3.vm"] == "-2"
    requeued = [int(r.attrs["start_count"]) for r in starts if r.job_id == "4.vm"]
    assert max(requeued) > 100  # the recorded endless requeue of `exit -1`
