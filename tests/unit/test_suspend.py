"""Suspend and resume through the scheduler (services/node_worker/suspend.py, reconcile.py): what the node does with
a guest given the scheduler's word for its job, the domain's state and root's record of it (pure); walltime stands
still while the job is suspended; one reconcile round with a stand-in hypervisor pauses or saves the guests of a
suspended job and brings back what it suspended, never a guest paused by anything else; the records and saved
memory are root's alone and go with their guest; the clock is sent on the host's whole second."""

from __future__ import annotations

import os
import socket
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import libvirt
import pytest

from vtorque.services.node_worker import suspend
from vtorque.services.node_worker.identity_channel import IdentityChannel
from vtorque.services.node_worker.reconcile import GONE, Domain, Reconciler, alive_of, decide
from vtorque.services.node_worker.service import NodeWorker
from vtorque.services.node_worker.suspend import Suspension, action
from vtorque.shared.config import Config, ImagesConfig, NodeConfig

NODE = "n1"
NOW = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
ME = Suspension(job_id="7", mode="pause", since=1000.0, total=5.0)


# -- what to do with one guest (pure) ---------------------------------------------------------------------------

@pytest.mark.parametrize("job,dom,record,mode,want", [
    ("suspended", "running", None, "pause", "pause"),
    ("suspended", "running", None, "save", "save"),
    ("suspended", "running", Suspension("7", total=30.0), "pause", "pause"),  # suspended again later
    ("suspended", "paused", ME, "pause", "none"),  # done already
    ("suspended", "saved", ME, "save", "none"),
    ("suspended", "paused", None, "pause", "none"),  # paused by something else: left as it is
    ("running", "paused", ME, "pause", "resume"),
    ("running", "saved", Suspension("7", mode="save", since=1.0), "pause", "restore"),  # the mode it was saved in
    ("running", "running", ME, "pause", "settle"),  # resumed, then the worker stopped before its clock and record
    ("running", "paused", None, "pause", "none"),  # never suspended here (a pooled guest, a boot under way)
    ("running", "paused", Suspension("7", total=9.0), "pause", "none"),  # resumed already, paused by another
    ("running", "running", None, "pause", "none"),
    ("running", "other", ME, "pause", "none"),  # shut off without its save file: reconciliation's business
    (None, "running", None, "pause", "none"),  # the scheduler could not be asked: nothing changes
    (None, "paused", ME, "pause", "none"),
    ("queued", "paused", ME, "pause", "none"),  # requeued, ended, gone: removal, not resume
    ("exiting", "paused", ME, "pause", "none"),
    ("completed", "saved", ME, "save", "none"),
    (GONE, "paused", ME, "pause", "none"),
])
def test_what_the_node_does_with_a_guest(job, dom, record, mode, want):
    assert action(job, dom, record, mode) == want


def test_domain_states_from_libvirt():
    assert suspend.domain_state(libvirt.VIR_DOMAIN_RUNNING, False) == "running"
    assert suspend.domain_state(libvirt.VIR_DOMAIN_PAUSED, True) == "paused"
    assert suspend.domain_state(libvirt.VIR_DOMAIN_SHUTOFF, True) == "saved"
    assert suspend.domain_state(libvirt.VIR_DOMAIN_SHUTOFF, False) == "other"  # no save file: not ours to restore


def test_suspended_time_adds_up_over_suspensions():
    assert suspend.suspended_seconds(None, 5000.0) == 0.0
    assert suspend.suspended_seconds(ME, 1010.0) == 15.0  # 5 s before, 10 s now
    first = suspend.started(None, "7", "pause", 100.0)
    back = suspend.ended(first, 130.0)
    assert (back.since, back.total) == (None, 30.0)
    again = suspend.started(back, "7", "save", 200.0)
    assert suspend.suspended_seconds(again, 210.0) == 40.0 and again.mode == "save"
    assert suspend.suspended_seconds(suspend.ended(again, 220.0), 9999.0) == 50.0


def test_a_record_survives_its_encoding_and_garbage_is_no_record():
    assert suspend.decode(suspend.encode(ME)) == ME
    assert suspend.decode(b"{") is None and suspend.decode(b'{"mode": "pause"}') is None
    assert suspend.decode(b'{"job_id": "7", "mode": "rm -rf"}').mode == "pause"


# -- walltime (pure: reconcile.decide) --------------------------------------------------------------------------

def dom(job="7", end_by=NOW - HOUR, **kw) -> Domain:
    return Domain(name=f"vt-{job}-n1-0", job_id=job, boot_deadline=None, end_by=end_by, ready=True, **kw)


def test_a_suspended_jobs_guest_is_never_removed_for_its_walltime():
    removals, _ = decide([dom(job_suspended=True)], {}, set(), lambda j: True, NOW, 0)
    assert removals == []
    # The scheduler not answering: the time it has been suspended moves its end (the record's since → now).
    removals, _ = decide([dom(suspended_s=2 * 3600)], {}, set(), lambda j: None, NOW, 0)
    assert removals == []


def test_a_resumed_jobs_end_moves_by_the_time_it_spent_suspended():
    grace = timedelta(minutes=2)
    end = NOW - grace - timedelta(seconds=30)  # 30 s past end + grace, by the wall clock
    removals, _ = decide([dom(end_by=end, suspended_s=60.0)], {}, set(), lambda j: True, NOW, 0, grace)
    assert removals == []  # suspended 60 s: 30 s left
    removals, _ = decide([dom(end_by=end, suspended_s=20.0)], {}, set(), lambda j: True, NOW, 0, grace)
    assert [r.reason for r in removals] == ["job 7 passed its walltime"]


def test_a_suspended_job_that_the_scheduler_ends_goes_as_any_job():
    removals, _ = decide([dom(end_by=None, job_suspended=False)], {}, set(), lambda j: alive_of("cancelled"), NOW, 0)
    assert [r.reason for r in removals] == ["job 7 is no longer running"]
    assert alive_of("suspended") is True and alive_of(None) is None and alive_of(GONE) is False


# -- one reconcile round, a stand-in hypervisor ----------------------------------------------------------------

class Dom:
    def __init__(self, hv, name, state):
        self.hv, self.name, self.st = hv, name, state

    def state(self):
        return [self.st, 0]

    def suspend(self):
        self.hv.calls.append(("suspend", self.name))
        self.st = libvirt.VIR_DOMAIN_PAUSED

    def save(self, path):
        self.hv.calls.append(("save", self.name))
        Path(path).write_bytes(b"the owner's memory")
        os.chmod(path, 0o644)  # as libvirt may leave it: the node worker makes it 0600
        self.st = libvirt.VIR_DOMAIN_SHUTOFF


class StandInHypervisor:
    """Domains of jobs 7 and 8 on node n1 with the calls reconciliation and suspend.py make."""

    change_timeout = start_timeout = 60.0

    def __init__(self, states: dict[str, int]):
        self.doms = {name: Dom(self, name, st) for name, st in states.items()}
        self.calls: list[tuple[str, str]] = []
        self.conn = self

    def vtorque_domains(self):
        return {name: {"job": name.split("-")[1], "node": NODE} for name in self.doms}

    def lookup(self, name):
        return self.doms.get(name)

    def timed(self, what, fn, *args, timeout=None):
        return fn(*args)

    def resume(self, dom):
        self.calls.append(("resume", dom.name))
        dom.st = libvirt.VIR_DOMAIN_RUNNING

    def restore(self, path):
        name = Path(path).name.removesuffix(".save")
        self.calls.append(("restore", name))
        self.doms[name].st = libvirt.VIR_DOMAIN_RUNNING

    def remove(self, name):
        self.calls.append(("remove", name))
        return self.doms.pop(name, None) is not None

    def kill(self, name):
        return False

    def active_names(self):
        return {n for n, d in self.doms.items() if d.st == libvirt.VIR_DOMAIN_RUNNING}


def site(tmp_path: Path, hv, mode="pause") -> NodeWorker:
    root = tmp_path / "site"
    root.mkdir(mode=0o711)
    config = Config(state_dir=str(root / "state"), images=ImagesConfig(store=str(root / "images")),
                    node=NodeConfig(name=NODE, guest_dir=str(root / "guests"), ramdisk_dir=str(root / "shm"),
                                    suspend=mode))
    w = NodeWorker(config, None, hypervisor=hv, store=object())
    w.remove_idle_networks = lambda: []  # no job network on this stand-in
    return w


def round_with(w: NodeWorker, states: dict[str, str]) -> list:
    asked = []

    def state(job):
        asked.append(job)
        return states.get(job, GONE)

    removals = Reconciler(w, threading.Event(), 60.0, states=state).run_once()
    assert sorted(asked) == sorted(set(asked))  # one question per job per round
    return removals


RUNNING = libvirt.VIR_DOMAIN_RUNNING


def test_a_suspended_jobs_guests_pause_and_come_back_with_their_job(tmp_path):
    hv = StandInHypervisor({"vt-7-n1-0": RUNNING, "vt-7-n1-1": RUNNING, "vt-8-n1-0": RUNNING})
    w = site(tmp_path, hv)
    assert round_with(w, {"7": "suspended", "8": "running"}) == []
    assert sorted(hv.calls) == [("suspend", "vt-7-n1-0"), ("suspend", "vt-7-n1-1")]  # job 8's left alone
    record = w.suspender.record("vt-7-n1-0")
    assert record is not None and record.since is not None and record.mode == "pause"
    hv.calls.clear()
    assert round_with(w, {"7": "suspended", "8": "running"}) == [] and hv.calls == []  # nothing twice
    round_with(w, {"7": "running", "8": "running"})
    assert sorted(hv.calls) == [("resume", "vt-7-n1-0"), ("resume", "vt-7-n1-1")]
    back = w.suspender.record("vt-7-n1-0")
    assert back is not None and back.since is None and back.total >= 0.0  # kept: the job's end moved by it
    hv.calls.clear()
    round_with(w, {"7": "running", "8": "running"})
    assert hv.calls == []


def test_a_guest_paused_by_something_else_is_never_resumed(tmp_path):
    hv = StandInHypervisor({"vt-7-n1-0": libvirt.VIR_DOMAIN_PAUSED})
    w = site(tmp_path, hv)
    round_with(w, {"7": "running"})
    assert hv.calls == []


def test_save_mode_keeps_the_memory_root_only_and_it_goes_with_the_restore_or_the_job(tmp_path):
    hv = StandInHypervisor({"vt-7-n1-0": RUNNING, "vt-8-n1-0": RUNNING})
    w = site(tmp_path, hv, mode="save")
    round_with(w, {"7": "suspended", "8": "suspended"})
    assert sorted(hv.calls) == [("save", "vt-7-n1-0"), ("save", "vt-8-n1-0")]
    top = w.suspender.root
    assert stat.S_IMODE(top.stat().st_mode) == 0o700 and top.stat().st_uid == 0
    for name in ("vt-7-n1-0.save", "vt-7-n1-0.json", "vt-8-n1-0.save"):
        st = (top / name).stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600), name
    # Job 7 resumes: restored, its memory file gone. Job 8 ends while saved: its guest and its memory go.
    hv.calls.clear()
    removals = round_with(w, {"7": "running"})
    assert [r.name for r in removals] == ["vt-8-n1-0"]
    assert ("restore", "vt-7-n1-0") in hv.calls and ("remove", "vt-8-n1-0") in hv.calls
    assert sorted(p.name for p in top.iterdir()) == ["vt-7-n1-0.json"]
    # Its teardown takes the record too.
    w.teardown_job("7")
    assert list(top.iterdir()) == []


def test_files_whose_guest_is_gone_are_removed(tmp_path):
    """(A planted or opened-up directory, links and files not root's: tests/security/test_suspend_files.py.)"""
    hv = StandInHypervisor({"vt-7-n1-0": RUNNING})
    w = site(tmp_path, hv, mode="save")
    top = w.suspender.directory()
    (top / "vt-9-n1-0.save").write_bytes(b"memory of a guest removed while the worker was down")
    (top / "vt-9-n1-0.json").write_bytes(suspend.encode(Suspension("9", mode="save", since=1.0)))
    (top / "notes.txt").write_text("not ours")
    (top / ".vt-9-n1-1.save.tmp").write_bytes(b"a save cut short by a worker that died in it")
    round_with(w, {"7": "running"})
    assert sorted(p.name for p in top.iterdir()) == ["notes.txt"]


# -- the clock ---------------------------------------------------------------------------------------------------

def test_the_clock_goes_on_the_hosts_whole_second_with_time_for_the_guest_to_be_reading():
    ours, theirs = socket.socketpair()
    slept = []
    with IdentityChannel(ours) as channel:
        assert channel.send_clock(clock=lambda: 1000.25, sleep=slept.append) == 1001
        assert channel.send_clock(clock=lambda: 1000.9, sleep=slept.append) == 1002  # 0.1 s is too short
    assert slept == [pytest.approx(0.75), pytest.approx(1.1)]
    assert theirs.recv(100) == b"CLOCK 1001\nCLOCK 1002\n"
    theirs.close()


def test_a_cold_guest_has_the_host_channel_for_its_clock_but_no_generation_id():
    import xml.etree.ElementTree as ET

    from unit.test_warm_pure import BOOT, GUEST, META, disks_in
    from vtorque.services.node_worker.domain import IDENTITY_CHANNEL, domain_xml

    cold = ET.fromstring(domain_xml(GUEST, disks_in("/g/x"), BOOT, META, host_channel=True))
    channel = cold.find("devices/channel")
    assert cold.find("genid") is None and channel is not None and channel.get("type") == "unix"
    assert channel.find("target").get("name") == IDENTITY_CHANNEL
    assert channel.find("source").get("path") == "/g/x/identity.sock"


def test_the_log_says_paused_and_resumed_with_the_job_id_and_the_jobs_trace_id(tmp_path):
    import io
    import json
    import logging

    from vtorque.shared.logs import JsonFormatter

    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    hv = StandInHypervisor({"vt-7-n1-0": RUNNING})
    w = site(tmp_path, hv)
    jobs = w.config.job_dir("7")
    jobs.mkdir(parents=True)
    (jobs / "vt-7-n1-0.json").write_text(json.dumps({"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}))
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter("vtorque-node-worker"))
    logger = logging.getLogger("vtorque.node_worker.suspend")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        round_with(w, {"7": "suspended"})
        round_with(w, {"7": "running"})
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    said = {line["msg"]: line for line in lines}
    for msg in ("guest paused", "guest resumed"):
        assert said[msg]["job_id"] == "7" and said[msg]["trace_id"] == trace_id and said[msg]["guest"] == "vt-7-n1-0"
    assert said["guest resumed"]["clock"].startswith("not set")  # the stand-in has no channel


def test_a_jobs_guests_come_back_side_by_side(tmp_path, monkeypatch):
    """A clock waits for the host's next whole second: eight guests one after the other would take seconds."""
    import time

    names = [f"vt-7-n1-{i}" for i in range(4)]
    hv = StandInHypervisor(dict.fromkeys(names, RUNNING))
    w = site(tmp_path, hv)
    round_with(w, {"7": "suspended"})
    monkeypatch.setattr(w.suspender, "set_clock", lambda name: time.sleep(0.5) or "set")
    t0 = time.monotonic()
    round_with(w, {"7": "running"})
    assert time.monotonic() - t0 < 1.5 and sorted(n for what, n in hv.calls if what == "resume") == names
