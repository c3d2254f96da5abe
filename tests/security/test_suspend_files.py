"""Attacks on what root keeps of a suspended job (services/node_worker/suspend.py, guest_link.py): the saved
memory and the records are the owner's data in root's hands. A suspend directory someone else made or can write
is never used; a record or save file that is a link, or not root's, is not taken; a guest link never takes a
`saved` mark that is not root's own file for "the guest is only saved, wait for it"."""

from __future__ import annotations

import os

from unit.test_suspend import RUNNING, StandInHypervisor, round_with, site  # noqa: F401 - shared stand-ins

from vtorque.services.node_worker import guest_link, suspend
from vtorque.services.node_worker.suspend import Suspension

USER = 65534  # nobody: a user of the node


def test_a_suspend_directory_others_can_write_is_never_read_nor_saved_into(tmp_path):
    hv = StandInHypervisor({"vt-7-n1-0": RUNNING})
    w = site(tmp_path, hv, mode="save")
    top = w.suspender.directory()
    os.chmod(top, 0o777)  # as if a user had made it first, or root's was opened up
    (top / "vt-7-n1-0.json").write_bytes(suspend.encode(Suspension("7", since=1.0)))
    assert w.suspender.record("vt-7-n1-0") is None
    round_with(w, {"7": "suspended"})
    assert hv.calls == [] and hv.doms["vt-7-n1-0"].st == RUNNING  # no memory written where others can read
    assert not (top / "vt-7-n1-0.save").exists()


def test_a_suspend_directory_a_user_owns_is_never_used(tmp_path):
    hv = StandInHypervisor({"vt-7-n1-0": RUNNING})
    w = site(tmp_path, hv, mode="save")
    top = w.suspender.directory()
    os.chown(top, USER, USER)
    try:
        round_with(w, {"7": "suspended"})
        assert hv.calls == [] and not (top / "vt-7-n1-0.save").exists()
    finally:
        os.chown(top, 0, 0)


def test_a_record_or_save_file_that_is_a_link_or_not_roots_is_not_taken(tmp_path):
    hv = StandInHypervisor({"vt-7-n1-0": RUNNING})
    w = site(tmp_path, hv, mode="save")
    top = w.suspender.directory()
    elsewhere = tmp_path / "planted.json"
    elsewhere.write_bytes(suspend.encode(Suspension("7", mode="save", since=1.0)))
    (top / "vt-7-n1-0.json").symlink_to(elsewhere)
    assert w.suspender.record("vt-7-n1-0") is None  # never read through a link
    (top / "vt-7-n1-0.json").unlink()
    (top / "vt-7-n1-0.json").write_bytes(suspend.encode(Suspension("7", mode="save", since=1.0)))
    os.chown(top / "vt-7-n1-0.json", USER, USER)
    assert w.suspender.record("vt-7-n1-0") is None  # not written by root
    (top / "vt-7-n1-0.save").symlink_to(tmp_path / "memory-elsewhere")
    assert not w.suspender.has_save("vt-7-n1-0")
    # A guest name that is a path is refused before any file is named by it.
    assert w.suspender.record("../../etc/passwd") is None and not w.suspender.has_save("../x")


def test_a_guest_link_takes_only_roots_own_saved_mark(tmp_path):
    gdir = tmp_path / "vt-7-n1-0"
    gdir.mkdir(mode=0o711)
    assert not guest_link._saved(gdir)
    (gdir / guest_link.SAVED_MARK).symlink_to(tmp_path / "anything")
    assert not guest_link._saved(gdir)  # a link: the link process would wait for a QEMU that never comes
    (gdir / guest_link.SAVED_MARK).unlink()
    (gdir / guest_link.SAVED_MARK).write_text("")
    os.chown(gdir / guest_link.SAVED_MARK, USER, USER)
    assert not guest_link._saved(gdir)
    os.chown(gdir / guest_link.SAVED_MARK, 0, 0)
    assert guest_link._saved(gdir)
