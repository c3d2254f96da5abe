"""Issue 11 item 5 (node worker): every directory root uses is made by root and checked (no symlink followed,
no group/other write, owned by root). Finding 2: a user who made the ramdisk root first (/dev/shm/vtorque is in
a world-writable directory) planted a guest directory whose `.image-lease` named any file, and reconciliation
deleted that file as root. Here the ramdisk root is a directory of the test's own in a sticky 1777 directory,
as /dev/shm is, and the node worker's real code paths (boot, teardown, reconciliation) run on it."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from vtorque.services.node_worker import disks, trust
from vtorque.services.node_worker.reconcile import Reconciler
from vtorque.shared import messages as m

from .conftest import file_state, snapshot


@pytest.fixture
def shm(site):
    """A /dev/shm of the test's own: root's, mode 1777."""
    d = site.root / "shm"
    d.mkdir()
    d.chmod(0o1777)
    return d


@pytest.fixture
def canary(site):
    path = site.root / "precious"
    path.write_bytes(b"root's file, named by a planted lease\n")
    path.chmod(0o600)
    return path


def plant(user, shm: Path, node: str, canary: Path) -> Path:
    """What the attacker does, as herself: make vtorque's ramdisk root first, and a guest directory in it."""
    gdir = shm / "vtorque" / "guests" / f"vt-666-{node}-0"
    user.run("mkdir", "-p", str(gdir)).check_returncode()
    for name, text in (("job", "666"), ("node", node), (".image-lease", str(canary))):
        user.run("sh", "-c", 'printf %s "$1" > "$2"', "sh", text, str(gdir / name)).check_returncode()
    old = time.time() - 3600
    user.run("touch", "-d", f"@{old:.0f}", str(gdir / "job")).check_returncode()
    return gdir


def test_secure_dir_refuses_what_a_user_could_have_made_or_changed(site, users, shm):
    a, _ = users
    theirs = shm / "theirs"
    a.run("mkdir", str(theirs)).check_returncode()
    with pytest.raises(trust.UnsafeDir, match=f"owned by uid {a.uid}"):
        trust.secure_dir(theirs / "guests")
    assert not (theirs / "guests").exists()  # nothing made inside it
    group = site.root / "group-writable"
    group.mkdir()
    group.chmod(0o775)
    with pytest.raises(trust.UnsafeDir, match="writable by group or others"):
        trust.secure_dir(group / "guests")
    link = site.root / "link"
    link.symlink_to(site.root)
    with pytest.raises(trust.UnsafeDir, match="symlink is not followed"):
        trust.secure_dir(link / "guests")
    with pytest.raises(trust.UnsafeDir, match="writable by group or others"):
        trust.secure_dir(shm)  # the sticky 1777 directory itself is never a root of ours
    made = trust.secure_dir(shm / "vtorque" / "guests")
    for d in (shm / "vtorque", made):
        st = os.lstat(d)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o711)


def test_a_ramdisk_root_made_first_by_a_user_is_never_used_by_reconciliation(site, users, shm, canary):
    a, _ = users
    planted = plant(a, shm, site.node, canary)
    before, tree = file_state(canary), snapshot(shm)
    removals = Reconciler(site.worker, None, 30.0, lambda job: False).run_once()
    assert removals == []
    assert file_state(canary) == before
    assert snapshot(shm) == tree  # the planted tree itself is not read from, written to, or removed
    assert planted.is_dir()


def test_a_ramdisk_root_made_first_by_a_user_refuses_ramdisk_guests(site, users, shm, canary):
    a, _ = users
    plant(a, shm, site.node, canary)
    before, tree = file_state(canary), snapshot(shm)
    j = "667"
    answers = site.boot(j, site.plan(a, j, fs_type="ramdisk"))
    assert len(answers) == 1 and isinstance(answers[0], m.GuestFailed) and not answers[0].retryable
    assert f"owned by uid {a.uid}, not root" in answers[0].reason, answers[0].reason
    assert snapshot(shm) == tree and file_state(canary) == before
    site.worker.on_teardown_guests(m.TeardownGuests.new(job_id="666", deadline=60.0, node=site.node))
    assert isinstance(site.sent.sent[-1], m.GuestsTornDown) and site.sent.sent[-1].disks_removed == 0
    assert snapshot(shm) == tree and file_state(canary) == before


def test_a_lease_marker_naming_another_file_is_left_alone_even_in_roots_own_directory(site, canary):
    """Defence in depth: a marker in a guest directory of root's own is obeyed only when it names that
    guest's own lease file in the store."""
    root = trust.secure_dir(site.config.node.guest_dir)
    gdir = root / "vt-9-n-0"
    gdir.mkdir(mode=0o711)
    (gdir / "job").write_text("9")
    (gdir / ".image-lease").write_text(str(canary))
    before = file_state(canary)
    assert disks.remove(root, "vt-9-n-0", store=site.config.images.store)
    assert not gdir.exists() and file_state(canary) == before


def test_the_real_ramdisk_root_is_checked_the_same_way():
    """The default ramdisk root's parent, /dev/shm/vtorque: when it exists it must pass the same check the
    node worker applies (else the worker refuses it, as above) — never used unchecked."""
    real = Path("/dev/shm/vtorque")
    why = trust.is_safe_dir(real)
    if real.exists():
        st = os.lstat(real)
        ok = stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o022
        assert (why is None) == ok, why
    else:
        assert why is not None and "does not exist" in why
