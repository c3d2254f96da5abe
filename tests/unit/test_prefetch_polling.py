"""The Slurm prefetch asks slurmctld (`squeue`) only while queued VM jobs are watched, backing off while nothing
changes, and not at all while none is queued: a submission wakes it (inotify on slurmctld's state directory,
where every new job's script is written). Before, it ran `squeue -t all` every second forever."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from vtorque.services.scheduler_bridge import accounting
from vtorque.services.scheduler_bridge.accounting import MAX_POLL, SlurmPrefetch, SlurmSubmissions, next_poll


def test_the_poll_backs_off_while_nothing_changes_and_stops_when_no_vm_job_is_queued():
    intervals, interval = [], 1.0
    for _ in range(8):
        interval = next_poll(interval, 1.0, changed=False, watching=True)
        intervals.append(interval)
    assert intervals == [2.0, 4.0, 8.0, 16.0, MAX_POLL, MAX_POLL, MAX_POLL, MAX_POLL]
    assert next_poll(MAX_POLL, 1.0, changed=True, watching=True) == 1.0  # a job came, started or went
    assert next_poll(1.0, 1.0, changed=True, watching=False) is None  # nothing queued to watch: no squeue


def test_a_submission_is_seen_and_slurmctlds_own_state_files_are_not(tmp_path):
    (tmp_path / "hash.3").mkdir()
    watch = SlurmSubmissions(str(tmp_path))
    try:
        assert watch.wait(0) is False
        (tmp_path / "job_state.new").write_text("x")  # rewritten on every job change: not a submission
        (tmp_path / "job_state.new").rename(tmp_path / "job_state")
        assert watch.wait(0.2) is False
        (tmp_path / "hash.3" / "job.13").mkdir()
        assert watch.wait(1.0) is True
        assert watch.wait(0) is False  # read once
        (tmp_path / "hash.7").mkdir()  # the first job of that hash: its directory is made, then the job's
        assert watch.wait(1.0) is True
        (tmp_path / "hash.7" / "job.17").mkdir()
        assert watch.wait(1.0) is True  # and the new hash directory is watched from then on
    finally:
        watch.close()


def until(condition, within: float = 15.0) -> bool:
    deadline = time.monotonic() + within
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def test_squeue_runs_only_while_a_vm_job_is_queued_or_after_a_submission(tmp_path, monkeypatch):
    """One look at start, then none while nothing is queued; a submission makes it look (and once more, in
    case squeue did not show the job yet); a queued VM job is watched until it starts."""
    queue: dict[str, str] = {}
    asked: list[dict] = []

    class Slurm:
        def __init__(self, _config):
            pass

        def queue_states(self):
            asked.append(dict(queue))
            return dict(queue)

    monkeypatch.setattr(accounting, "Slurm", Slurm)
    (tmp_path / "hash.5").mkdir()
    config = SimpleNamespace(prefetch=SimpleNamespace(poll_interval=0.2, deadline=60.0), scheduler=None)
    prefetch = SlurmPrefetch(config, publisher=None, state_path=tmp_path / "slurm.json", state_dir=str(tmp_path))
    monkeypatch.setattr(prefetch, "_header", lambda job_id: object() if job_id == "15" else None)
    monkeypatch.setattr(prefetch, "_queued", lambda job_id, header, key: None)
    stop = threading.Event()
    thread = threading.Thread(target=prefetch.run, args=(stop,), daemon=True)
    thread.start()
    try:
        time.sleep(1.5)
        assert asked == [{}]  # the look at start, then nothing queued: slurmctld is left alone
        queue["15"] = "PENDING"  # a VM job, submitted
        (tmp_path / "hash.5" / "job.15").mkdir()
        assert until(lambda: prefetch.known == {"15": "vm"})
        looks = len(asked)
        assert until(lambda: len(asked) > looks + 1)  # watched while it is queued (backing off)
        queue["15"] = "RUNNING"
        assert until(lambda: prefetch.known == {})  # started: nothing left to watch
        looks = len(asked)
        time.sleep(1.5)
        assert len(asked) == looks  # and no more squeue
    finally:
        stop.set()
        thread.join(5)
