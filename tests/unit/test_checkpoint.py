"""Checkpoint across a requeue (services/node_worker/checkpoint.py, shared/spec.py `checkpoint`): the spec key; which
end of a job is a requeue (the scheduler's state and restart count against the count the job booted with); which
checkpoint a boot may restore (the newest complete one, of this job, owner and shape: never half of one); when a
periodic one is due; the records; and, with a stand-in hypervisor, a teardown that checkpoints a requeued job's
guests (all paused first, then each saved with its disks, its record last: root's files in root's directories),
a teardown of a job that ended for good and reconciliation removing its checkpoints, a periodic checkpoint that
brings the guests back. (Attacks on the files: tests/security/test_checkpoint_files.py; a real Slurm requeue and
a real guest: tests/e2e/test_checkpoint_requeue.py.)"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import libvirt
import pytest

from vtorque.services.node_worker import checkpoint as ck
from vtorque.services.node_worker import save_image
from vtorque.services.node_worker.checkpoint import Note, Part
from vtorque.services.node_worker.reconcile import GONE, Reconciler
from vtorque.services.node_worker.service import NodeWorker
from vtorque.shared import messages as m
from vtorque.shared.config import Config, ImageEntry, ImagesConfig, NodeConfig, SpecConfig
from vtorque.shared.scheduler import JobInfo
from vtorque.shared.slurm import slurm_job_info
from vtorque.shared.spec import SpecError, validate
from vtorque.shared.testing import FakeClock
from vtorque.shared.torque import job_info_from_attrs

NODE = "n1"
DIGEST = "a" * 64
RUNNING, PAUSED, SHUTOFF = libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_SHUTOFF


# -- the spec key ------------------------------------------------------------------------------------------------

def _config(**spec) -> Config:
    return Config(images=ImagesConfig(catalog={"tiny": ImageEntry(source="/x", sha256=DIGEST)}),
                  spec=SpecConfig(**spec))


@pytest.mark.parametrize("text,want", [("requeue", 0), ("preempt", 0), ("yes", 0), ("off", None), ("false", None),
                                       ("30m", 1800), ("2h", 7200), ("900s", 900), ("1d", 86400), ("600", 600)])
def test_the_checkpoint_key(text, want):
    spec = validate({"img": "tiny", "checkpoint": text}, _config())
    assert spec.checkpoint == want
    assert validate(spec.as_options(), _config()).checkpoint == want  # normalised, it reads back the same


@pytest.mark.parametrize("text", ["5m", "59s", "0s", "every hour", "1y", "-5m", "30 m"])
def test_an_interval_below_the_sites_least_or_not_an_interval_is_refused_naming_the_key(text):
    with pytest.raises(SpecError) as err:
        validate({"img": "tiny", "checkpoint": text}, _config())
    assert str(err.value).startswith(f"-vm checkpoint={text}: ") and "10m" in str(err.value)


def test_the_site_decides_the_default_and_may_forbid_it():
    assert validate({"img": "tiny"}, _config()).checkpoint is None
    assert validate({"img": "tiny"}, _config(default_checkpoint="requeue")).checkpoint == 0
    assert validate({"img": "tiny", "checkpoint": "off"}, _config(default_checkpoint="1h")).checkpoint is None
    with pytest.raises(SpecError, match="disabled on this site"):
        validate({"img": "tiny", "checkpoint": "requeue"}, _config(checkpoint_enabled=False))
    assert validate({"img": "tiny", "checkpoint": "5m"}, _config(min_checkpoint_interval="5m")).checkpoint == 300


# -- a requeue, from the scheduler's answer ---------------------------------------------------------------------

def job(state, restarts=None, raw="X") -> JobInfo:
    return JobInfo(job_id="7", state=state, raw_state=raw, restarts=restarts)


@pytest.mark.parametrize("info,at_boot,want", [
    (job("queued", 1, "PENDING"), 0, True),  # requeued, the epilogue already done
    (job("queued", None, "Q"), None, True),  # Torque's qrerun: queued again
    (job("exiting", 1, "COMPLETING"), 0, True),  # Slurm counts the requeue at once, while COMPLETING
    (job("exiting", 0, "COMPLETING"), 0, False),  # an ordinary end, its epilogue running
    (job("running", 2, "RUNNING"), 1, True),  # requeued and started again before the old teardown came
    (job("completed", 3, "COMPLETED"), 0, False),
    (job("cancelled", 1, "CANCELLED"), 0, False),
    (job("failed", 1, "NODE_FAIL"), 0, False),
    (job("exiting", 1, "COMPLETING"), None, False),  # the count at boot unknown: not a guess
    (None, 0, False),  # the scheduler no longer knows the job: it ended
])
def test_which_end_is_a_requeue(info, at_boot, want):
    assert ck.is_requeue(info, at_boot) is want


def test_a_requeues_checkpoint_has_the_same_name_on_every_node():
    assert ck.requeue_epoch(job("queued", 3), 1000.9) == "r3"
    assert ck.requeue_epoch(job("queued", None), 1000.9) == "t1000"  # no count: this node's own name


def test_the_restart_counts_schedulers_give():
    line = ("JobId=7 JobName=wrap UserId=u(1000) JobState=COMPLETING Reason=None Requeue=1 Restarts=1 "
            "BatchFlag=1 ExitCode=0:0 NodeList=n1 BatchHost=n1")
    assert slurm_job_info("7", line).restarts == 1
    assert slurm_job_info("7", line.replace("Restarts=1 ", "")).restarts is None
    assert job_info_from_attrs("7.s", {"job_state": "Q", "start_count": "2"}).restarts == 1
    assert job_info_from_attrs("7.s", {"job_state": "R"}).restarts is None


# -- which checkpoint a boot takes -------------------------------------------------------------------------------

OWNER = m.Owner(user="alice", uid=1000, gid=1000)


def part(index=0, count=1, epoch="r1", taken=100.0, **kw) -> Part:
    doc = {"job_id": "7", "epoch": epoch, "index": index, "count": count, "uid": 1000, "user": "alice",
           "digest": DIGEST, "vcpus": 1, "ram_mib": 128, "saved_dir": f"/g/vt-7-n1-{index}", "save_size": 10,
           "disk_size": 5, "data_name": None, "data_size": 0, "node": NODE, "taken": taken, **kw}
    return Part(**doc)


def plan(index=0, **kw) -> m.GuestPlan:
    return m.GuestPlan(name=f"vt-7-n2-{index}", node="n2", index=index, image="tiny", image_digest=DIGEST, vcpus=1,
                       ram_mib=128, cores=None, owner=OWNER, ssh_authorized_keys=["k"], checkpoint=0, **kw)


def test_the_newest_complete_checkpoint_is_taken_and_never_half_of_one():
    both = [part(0, 2), part(1, 2)]
    assert ck.choose({"r1": both}, "7", plan(1), 2)[0] == both[1]
    # A newer one of which only rank 0 was written (its other node died mid-way): the older, complete one.
    got, why = ck.choose({"r1": both, "r2": [part(0, 2, "r2", taken=200.0)]}, "7", plan(0), 2)
    assert got == both[0] and why == "checkpoint r1"
    got, why = ck.choose({"r2": [part(0, 2, "r2")]}, "7", plan(0), 2)
    assert got is None and why.startswith("no complete checkpoint of job 7")
    assert ck.choose({}, "7", plan(0), 1) == (None, "no checkpoint of job 7")


@pytest.mark.parametrize("changed,why", [
    ({"uid": 1001}, "is not alice's"), ({"user": "mallory"}, "is not alice's"),
    ({"job_id": "8"}, "is not job 7's"), ({"ram_mib": 256}, "another shape"), ({"vcpus": 2}, "another shape"),
    ({"digest": "b" * 64}, "another shape"), ({"data_name": "data.qcow2"}, "another shape"),
])
def test_a_checkpoint_of_another_job_owner_or_shape_is_never_restored(changed, why):
    got, said = ck.choose({"r1": [part(**changed)]}, "7", plan(0), 1)
    assert got is None and why in said


def test_a_checkpoint_of_a_job_of_another_size_is_not_restored():
    got, why = ck.choose({"r1": [part(0, 1)]}, "7", plan(0), 2)
    assert got is None and "another shape" in why  # a checkpoint of a one-guest job
    assert ck.choose({"r1": [part(0, 2), part(1, 2)]}, "7", plan(0), 3)[0] is None


def test_parts_of_two_jobs_owners_or_sizes_are_no_complete_checkpoint():
    assert ck.complete([part(0, 2), part(1, 2)])
    assert not ck.complete([part(0, 2), part(1, 2, uid=1001)])
    assert not ck.complete([part(0, 2), part(1, 3)])
    assert not ck.complete([part(0, 2), part(0, 2)])
    assert not ck.complete([])


def test_a_vrdma_guest_is_never_checkpointed():
    assert ck.why_not(plan(0, vrdma=True)) and ck.why_not(plan(0)) is None


def test_a_periodic_checkpoint_is_due_once_its_interval_passed():
    note = Note(job_id="7", index=0, count=1, interval=600, restarts=0, last=1000.0, uid=1000, user="alice",
                digest=DIGEST, vcpus=1, ram_mib=128)
    assert not ck.periodic_due(note, 1599.0) and ck.periodic_due(note, 1600.0)
    assert not ck.periodic_due(Note(**{**note.__dict__, "interval": 0}), 99999.0)  # on a requeue only


def test_records_survive_their_encoding_and_anything_else_is_no_record():
    assert ck.decode_part(ck.encode(part())) == part()
    assert ck.decode_part(b"{") is None and ck.decode_part(None) is None
    doc = ck.encode(part()).replace(b'"index": 0', b'"index": "0"')
    assert ck.decode_part(doc) is None  # a string for a number
    assert ck.decode_part(ck.encode(part()).replace(b'"count": 1', b'"count": true')) is None
    assert ck.decode_part(b'{"job_id": "7"}') is None


# -- one node, a stand-in hypervisor ------------------------------------------------------------------------------

class Dom:
    def __init__(self, hv, name, state):
        self.hv, self.name, self.st = hv, name, state

    def state(self):
        return [self.st, 0]

    def suspend(self):
        self.hv.calls.append(("suspend", self.name))
        self.st = PAUSED

    def save(self, path):
        job = self.name.split("-")[1]
        assert all(d.st != RUNNING for n, d in self.hv.doms.items() if n.split("-")[1] == job), "one still runs"
        self.hv.calls.append(("save", self.name))
        head = save_image.build(save_image.SaveHeader(2, 4096, 0, 0, 0, "", b""), f"<domain><name>{self.name}"
                                "</name></domain>")
        Path(path).write_bytes(head + b"the owner's memory")
        os.chmod(path, 0o644)  # as libvirt may leave it
        self.st = SHUTOFF


class StandIn:
    change_timeout = start_timeout = 60.0

    def __init__(self, states):
        self.doms = {n: Dom(self, n, s) for n, s in states.items()}
        self.calls: list[tuple[str, str]] = []
        self.conn = self

    def vtorque_domains(self):
        return {n: {"job": n.split("-")[1], "node": NODE} for n in self.doms}

    def lookup(self, name):
        return self.doms.get(name)

    def timed(self, what, fn, *args, timeout=None):
        return fn(*args)

    def resume(self, dom):
        self.calls.append(("resume", dom.name))
        dom.st = RUNNING

    def restoreFlags(self, path, dxml, flags):  # noqa: N802 - libvirt's name
        name = self._named(path)
        self.calls.append(("restore", name))
        self.doms[name].st = PAUSED if flags & libvirt.VIR_DOMAIN_SAVE_PAUSED else RUNNING

    def _named(self, path):
        head = save_image.read_header(path)
        return head.xml.split("<name>")[1].split("</name>")[0]

    def remove(self, name):
        self.calls.append(("remove", name))
        return self.doms.pop(name, None) is not None

    def kill(self, name):
        return False

    def active_names(self):
        return {n for n, d in self.doms.items() if d.st == RUNNING}


class Scheduler:
    kind = "slurm"

    def __init__(self, answers):
        self.answers = answers

    def job(self, job_id):
        return self.answers.get(job_id)


def node(tmp_path: Path, hv, answers) -> NodeWorker:
    root = tmp_path / "site"
    root.mkdir(mode=0o711)
    config = Config(state_dir=str(root / "state"), images=ImagesConfig(store=str(root / "images")),
                    node=NodeConfig(name=NODE, guest_dir=str(root / "guests"), ramdisk_dir=str(root / "shm")))
    w = NodeWorker(config, _Sent(), hypervisor=hv, store=object(), scheduler=Scheduler(answers))
    w.remove_idle_networks = lambda: []  # no job network on this stand-in
    for name in hv.doms:
        gdir = Path(config.node.guest_dir) / name
        gdir.mkdir(parents=True, mode=0o711)
        (gdir / "root.qcow2").write_bytes(b"the guest's disk " + name.encode())
        (gdir / "job").write_text(name.split("-")[1])
        index, count = int(name.rsplit("-", 1)[1]), sum(n.split("-")[1] == name.split("-")[1] for n in hv.doms)
        note = Note(job_id=name.split("-")[1], index=index, count=count, interval=600, restarts=0, last=0.0,
                    uid=1000, user="alice", digest=DIGEST, vcpus=1, ram_mib=128)
        (gdir / ck.NOTE).write_bytes(ck.encode(note))
    return w


class _Sent:
    def __init__(self):
        self.sent = []

    def publish(self, message):
        self.sent.append(message)

    def close(self):
        pass


def teardown(w, job_id):
    w.on_teardown_guests(m.TeardownGuests.new(job_id=job_id, deadline=60.0, node=NODE))
    for thread in w.teardown_threads:
        thread.join(10)


def test_a_requeued_jobs_guests_are_paused_all_then_saved_each_with_their_disks_records_last(tmp_path):
    hv = StandIn({"vt-7-n1-0": RUNNING, "vt-7-n1-1": RUNNING, "vt-8-n1-0": RUNNING})
    w = node(tmp_path, hv, {"7": job("exiting", 1, "COMPLETING")})
    teardown(w, "7")
    saves = [i for i, c in enumerate(hv.calls) if c[0] == "save"]
    suspends = [i for i, c in enumerate(hv.calls) if c[0] == "suspend"]
    assert len(saves) == 2 and len(suspends) == 2 and max(suspends) < min(saves)  # all paused, then saved
    assert ("suspend", "vt-8-n1-0") not in hv.calls  # another job's guest is left alone
    epochs = w.checkpoints.epochs("7")
    assert sorted(p.index for p in epochs["r1"]) == [0, 1] and ck.complete(epochs["r1"])
    edir = w.checkpoints.job_dir("7") / "r1"
    assert (edir / "1.qcow2").read_bytes() == b"the guest's disk vt-7-n1-1"
    for path in (w.checkpoints.root, edir.parent, edir):
        assert (path.stat().st_uid, stat.S_IMODE(path.stat().st_mode)) == (0, 0o700)
    for path in edir.iterdir():
        assert (path.stat().st_uid, stat.S_IMODE(path.stat().st_mode)) == (0, 0o600), path.name
    assert sorted(p.name for p in edir.iterdir()) == ["0.json", "0.qcow2", "0.save", "1.json", "1.qcow2", "1.save"]
    assert "vt-7-n1-0" not in hv.doms and "vt-8-n1-0" in hv.doms  # and the job's guests are gone


def test_a_job_that_ends_for_good_has_its_checkpoints_removed(tmp_path):
    hv = StandIn({"vt-7-n1-0": RUNNING})
    w = node(tmp_path, hv, {"7": job("queued", 1, "PENDING")})
    teardown(w, "7")
    assert w.checkpoints.epochs("7")
    w.scheduler.answers["7"] = job("completed", 1, "COMPLETED")  # requeued, ran again, done
    teardown(w, "7")
    assert not w.checkpoints.job_dir("7").exists()


def test_a_teardown_redelivered_after_the_requeued_job_started_again_keeps_its_checkpoint(tmp_path):
    hv = StandIn({"vt-7-n1-0": RUNNING})
    w = node(tmp_path, hv, {"7": job("queued", 1, "PENDING")})
    teardown(w, "7")
    w.scheduler.answers["7"] = job("running", 1, "RUNNING")  # started again elsewhere; the old command again
    teardown(w, "7")
    assert w.checkpoints.epochs("7")


def test_an_ordinary_end_keeps_nothing_and_a_job_that_never_asked_is_not_asked_about(tmp_path):
    hv = StandIn({"vt-7-n1-0": RUNNING, "vt-9-n1-0": RUNNING})
    w = node(tmp_path, hv, {"7": job("exiting", 0, "COMPLETING")})
    os.unlink(Path(w.config.node.guest_dir) / "vt-9-n1-0" / ck.NOTE)  # job 9 did not ask for checkpoints
    asked = []
    w.scheduler.job = lambda j: asked.append(j) or w.scheduler.answers.get(j)
    teardown(w, "9")
    teardown(w, "7")
    assert asked == ["7"] and not w.checkpoints.job_dir("7").exists() and ("save", "vt-7-n1-0") not in hv.calls


def test_reconciliation_removes_the_checkpoints_of_a_job_that_ended_that_this_node_wrote(tmp_path):
    hv = StandIn({"vt-7-n1-0": RUNNING})
    w = node(tmp_path, hv, {"7": job("queued", 1, "PENDING")})
    teardown(w, "7")
    other = w.checkpoints.job_dir("12")
    other.mkdir(mode=0o700)
    (other / ck.JOB_RECORD).write_text('{"job_id": "12", "node": "n9", "uid": 1000}')  # another node's to judge
    states = {"7": "queued", "12": GONE}
    Reconciler(w, threading.Event(), 60.0, states=lambda j: states.get(j, GONE)).run_once()
    assert w.checkpoints.epochs("7") and other.exists()  # still queued: kept
    states["7"] = "cancelled"  # cancelled while waiting to run again
    Reconciler(w, threading.Event(), 60.0, states=lambda j: states.get(j, GONE)).run_once()
    assert not w.checkpoints.job_dir("7").exists() and other.exists()


def test_a_checkpoint_without_its_job_record_is_judged_by_a_node_that_wrote_a_part(tmp_path):
    hv = StandIn({"vt-7-n1-0": RUNNING})
    w = node(tmp_path, hv, {"7": job("queued", 1, "PENDING")})
    teardown(w, "7")
    (w.checkpoints.job_dir("7") / ck.JOB_RECORD).unlink()  # rank 0's node died before it wrote the record
    Reconciler(w, threading.Event(), 60.0, states=lambda j: "queued").run_once()
    assert w.checkpoints.epochs("7")
    Reconciler(w, threading.Event(), 60.0, states=lambda j: GONE).run_once()
    assert not w.checkpoints.job_dir("7").exists()


def test_a_periodic_checkpoint_brings_the_guests_back_and_replaces_the_older_one(tmp_path):
    hv = StandIn({"vt-7-n1-0": RUNNING})
    w = node(tmp_path, hv, {})
    w.clock = FakeClock(start=5000.0)
    Reconciler(w, threading.Event(), 60.0, states=lambda j: "running").run_once()
    assert [c[0] for c in hv.calls] == ["suspend", "save", "restore", "resume"]
    assert hv.doms["vt-7-n1-0"].st == RUNNING and list(w.checkpoints.epochs("7")) == ["p5000"]
    hv.calls.clear()
    Reconciler(w, threading.Event(), 60.0, states=lambda j: "running").run_once()
    assert hv.calls == []  # not due again yet
    w.clock.advance(600.0)
    Reconciler(w, threading.Event(), 60.0, states=lambda j: "running").run_once()
    assert list(w.checkpoints.epochs("7")) == ["p5600"]  # the older one went once this one was complete


def test_a_periodic_checkpoint_of_a_job_spread_over_nodes_is_not_taken(tmp_path):
    hv = StandIn({"vt-7-n1-0": RUNNING})
    w = node(tmp_path, hv, {})
    gdir = Path(w.config.node.guest_dir) / "vt-7-n1-0"
    note = ck.decode_note((gdir / ck.NOTE).read_bytes())
    (gdir / ck.NOTE).write_bytes(ck.encode(Note(**{**note.__dict__, "count": 2})))  # rank 1 is on another node
    Reconciler(w, threading.Event(), 60.0, states=lambda j: "running").run_once()
    assert hv.calls == [] and not w.checkpoints.epochs("7")
