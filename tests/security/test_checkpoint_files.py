"""Attacks on what root keeps of a checkpointed job (services/node_worker/checkpoint.py): the guests' memory and
disks are the owner's data in root's hands, and what a boot restores becomes a guest of the job. A checkpoint
directory someone else made or can write is never read nor written into; a record, memory or disk file that is a
link, not root's or not whole is not taken; a checkpoint of another job or another owner is never restored into
this job; a half-written checkpoint (a rank without its record, a save cut short) is never restored; a job id or
an epoch that is a path names nothing."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from unit.test_checkpoint import RUNNING, StandIn, job, node, part, plan, teardown  # noqa: F401 - shared stand-ins

from vtorque.services.node_worker import checkpoint as ck
from vtorque.shared import messages as m
from vtorque.shared.config import ImageEntry

USER = 65534  # nobody: a user of the node


def _checkpointed(tmp_path, jobs=("7",)):
    """A node whose job 7 (one guest) was requeued and checkpointed (epoch r1)."""
    tmp_path.mkdir(mode=0o711, exist_ok=True)
    hv = StandIn({f"vt-{j}-n1-0": RUNNING for j in jobs})
    w = node(tmp_path, hv, {j: job("queued", 1, "PENDING") for j in jobs})
    for j in jobs:
        teardown(w, j)
    return w, hv


class Boot:
    """What of a BootGuests a restore reads."""

    def __init__(self, job_id: str, count: int = 1):
        self.job_id, self.network = job_id, None
        self.peers = [m.GuestPeer(name=f"vt-{job_id}-n2-{i}", index=i, node="n2", vcpus=1, address="10.254.0.1")
                      for i in range(count)]


def _restores(w, job_id: str = "7", **changes) -> bool:
    """Whether a boot of the job's rank 0 would take a checkpoint (the restore itself stubbed: what it would take)."""
    taken = []
    w.checkpoints._restore = lambda cmd, guest, entry, base, p, nic, deadline, t0: taken.append(p) or ("t", "s")
    guest = plan(0, **changes)
    guest = m.GuestPlan(**{**{f: getattr(guest, f) for f in guest.__struct_fields__}, "name": f"vt-{job_id}-n2-0"})
    got = w.checkpoints.try_restore(Boot(job_id), guest, ImageEntry(source="/x", sha256="a" * 64), Path("/x"),
                                    None, time.monotonic() + 5, time.monotonic())
    return got is not None


def test_the_checkpoint_as_root_wrote_it_is_restored(tmp_path):
    w, _ = _checkpointed(tmp_path)
    assert _restores(w)  # the baseline every attack below must break


def test_a_checkpoint_directory_others_can_write_is_never_read_nor_written_into(tmp_path):
    w, _ = _checkpointed(tmp_path)
    os.chmod(w.checkpoints.root, 0o777)  # as if a user had made it first, or root's was opened up
    assert w.checkpoints.epochs("7") == {} and not _restores(w)
    w2, _ = _checkpointed(tmp_path / "b")
    os.chmod(w2.checkpoints.job_dir("7"), 0o777)
    assert w2.checkpoints.epochs("7") == {}


def test_a_checkpoint_directory_a_user_owns_is_never_used(tmp_path):
    hv = StandIn({"vt-7-n1-0": RUNNING})
    w = node(tmp_path, hv, {"7": job("queued", 1, "PENDING")})
    root = w.checkpoints.root
    root.mkdir(mode=0o700, parents=True)
    os.chown(root, USER, USER)  # planted before root made it
    teardown(w, "7")
    assert list(root.iterdir()) == []  # no memory written where a user can read it
    assert ("save", "vt-7-n1-0") not in hv.calls and "vt-7-n1-0" not in hv.doms  # and the teardown went on


def test_a_record_memory_or_disk_that_is_a_link_or_not_roots_is_not_taken(tmp_path):
    for kind in (ck.RECORD, ck.SAVE, ck.DISK):
        w, _ = _checkpointed(tmp_path / kind.strip("."))
        edir = w.checkpoints.job_dir("7") / "r1"
        real = edir / f"0{kind}"
        planted = tmp_path / f"planted{kind}"
        planted.write_bytes(real.read_bytes())
        real.unlink()
        real.symlink_to(planted)
        assert w.checkpoints.epochs("7") == {} and not _restores(w), kind  # never through a link
        real.unlink()
        os.link(planted, real)  # a hard link to a file elsewhere: not root's own file either
        os.chown(planted, USER, USER)
        assert w.checkpoints.epochs("7") == {} and not _restores(w), kind
        real.unlink()
        real.write_bytes(planted.read_bytes())
        os.chown(real, USER, USER)  # not written by root
        assert w.checkpoints.epochs("7") == {} and not _restores(w), kind


def test_a_checkpoint_of_another_job_or_owner_is_never_restored_into_this_job(tmp_path):
    w, _ = _checkpointed(tmp_path, jobs=("7", "8"))
    # Job 8's checkpoint moved into job 7's place: its record says job 8.
    j7, j8 = w.checkpoints.job_dir("7"), w.checkpoints.job_dir("8")
    os.rename(j7, tmp_path / "j7-aside")
    os.rename(j8, j7)
    assert w.checkpoints.epochs("7") == {} and not _restores(w)
    os.rename(j7, j8)
    os.rename(tmp_path / "j7-aside", j7)
    assert _restores(w)
    # Another owner's (or uid's) job 7: the same files, the record naming someone else.
    record = j7 / "r1" / "0.json"
    doc = ck.decode_part(record.read_bytes())
    record.write_bytes(ck.encode(ck.Part(**{**doc.__dict__, "uid": 1001, "user": "mallory"})))
    assert not _restores(w)  # not alice's, whose job 7 this boot is


def test_a_half_written_checkpoint_is_never_restored(tmp_path):
    w, _ = _checkpointed(tmp_path)
    edir = w.checkpoints.job_dir("7") / "r1"
    save = edir / "0.save"
    whole = save.read_bytes()
    save.write_bytes(whole[:-5])  # a save cut short under its record: not the size the record says
    assert w.checkpoints.epochs("7") == {} and not _restores(w)
    save.write_bytes(whole)
    (edir / "0.json").unlink()  # the record (written last) never came: the worker died in the save
    assert w.checkpoints.epochs("7") == {} and not _restores(w)
    # A job of two guests of which one node's part is written: not complete, nothing restored, even for rank 0.
    w2, _ = _checkpointed(tmp_path / "two")
    record = w2.checkpoints.job_dir("7") / "r1" / "0.json"
    doc = ck.decode_part(record.read_bytes())
    record.write_bytes(ck.encode(ck.Part(**{**doc.__dict__, "count": 2})))
    w2.checkpoints._restore = lambda *a: pytest.fail("restored half a checkpoint")
    guest = plan(0)
    guest = m.GuestPlan(**{**{f: getattr(guest, f) for f in guest.__struct_fields__}, "name": "vt-7-n2-0"})
    assert w2.checkpoints.try_restore(Boot("7", count=2), guest, ImageEntry(source="/x", sha256="a" * 64),
                                      Path("/x"), None, time.monotonic() + 5, time.monotonic()) is None


def test_a_job_id_or_epoch_that_is_a_path_names_nothing(tmp_path):
    w, _ = _checkpointed(tmp_path)
    for bad in ("../7", "7/../../etc", "..", "/etc"):
        assert w.checkpoints.epochs(bad) == {}
        assert not w.checkpoints.remove_job(bad)
    jdir = w.checkpoints.job_dir("7")
    (jdir / "r1").rename(jdir / "..r1")  # not an epoch's name: not looked into
    assert w.checkpoints.epochs("7") == {}
    (jdir / "..r1").rename(jdir / "r2")
    assert w.checkpoints.epochs("7") == {}  # its records say r1: not this epoch's
    (jdir / "r2").rename(jdir / "r1")
    os.chown(jdir / "r1", USER, USER)  # an epoch directory not root's
    assert w.checkpoints.epochs("7") == {}
