"""Issue 11 item 4: a user's files are opened as their owner, once. The node worker never opens a user's
disk image by path as root: a child that became the owner opens it (O_NOFOLLOW, O_NONBLOCK), checks what it
opened, and copies it into root's own 0600 file, which alone QEMU and libvirt ever see. Each attack: refused
with its reason, the canary's owner, mode and hash unchanged, no domain, within the deadline."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from vtorque.services.node_worker import disks
from vtorque.shared.user_files import UserFileRefused, copy_user_image, image_refusal

from .conftest import file_state, snapshot

DEADLINE = 10.0


@pytest.fixture
def canary(site):
    """A root-only secret, as /etc/shadow is."""
    path = site.root / "shadow"
    path.write_bytes(b"root:$6$secret-hash:19000:0:99999:7:::\n" * 100)
    path.chmod(0o600)
    return path


@pytest.fixture
def home(users):
    """A fresh directory in the attacker's home, hers, removed after."""
    a, _ = users
    d = a.home / f"t{uuid.uuid4().hex[:6]}"
    d.mkdir()
    os.chown(d, a.uid, a.gid)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def as_user(user, path: Path) -> Path:
    os.lchown(path, user.uid, user.gid)
    return path


def copy(user, path: Path, fmt: str, dest_dir: Path, timeout: float = DEADLINE) -> bytes:
    dest = dest_dir / f"copy-{uuid.uuid4().hex[:6]}"
    fd = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        copy_user_image("disk", str(path), fmt, user.uid, user.gid, str(user.home), [], fd, timeout=timeout)
        return dest.read_bytes()
    finally:
        os.close(fd)


def boot_with_disk(site, user, path: Path):
    j = f"{uuid.uuid4().int % 10**6}.img"
    from vtorque.shared import messages as m

    plan = site.plan(user, j, disk=m.DataDisk(image=str(path)))
    started = time.monotonic()
    answers = site.boot(j, plan)
    return answers, time.monotonic() - started, plan.name


def assert_refused(answers, word: str):
    from vtorque.shared import messages as m

    assert len(answers) == 1 and isinstance(answers[0], m.GuestFailed), answers
    assert not answers[0].retryable and word in answers[0].reason, answers[0].reason


def test_the_owners_own_image_is_copied_into_roots_private_file(site, users, home):
    """The control: a plain qcow2 of the owner's is accepted, and what QEMU gets is root's 0600 copy."""
    a, _ = users
    img = home / "data.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"], check=True)
    as_user(a, img)
    before = file_state(img)
    (site.root / "g").mkdir()
    data = copy(a, img, "qcow2", site.root / "g")
    assert data[:4] == b"QFI\xfb" and image_refusal(data[:65536], "qcow2") is None
    assert file_state(img) == before  # the user's file: not chowned, not relabelled, not changed


def test_a_qcow2_naming_a_host_file_as_backing_file_is_refused(site, users, home, canary):
    a, _ = users
    img = home / "evil.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", str(canary), "-F", "raw", str(img),
                    "1M"], check=True)
    as_user(a, img)
    before, tree = file_state(canary), snapshot(site.root)
    answers, took, name = boot_with_disk(site, a, img)
    assert_refused(answers, "backing file")
    assert took < DEADLINE + 5
    assert file_state(canary) == before
    assert site.worker.hv.lookup(name) is None
    assert not any((site.root / "guests").iterdir())  # the half-made guest directory is gone again
    assert snapshot(site.root)["shadow"] == tree["shadow"]


def test_a_qcow2_with_an_external_data_file_is_refused(site, users, home, canary):
    a, _ = users
    img = home / "evil2.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={canary},data_file_raw=on",
                    str(img), "1M"], check=True, capture_output=True)
    as_user(a, img)
    before = file_state(canary)
    with pytest.raises(UserFileRefused, match="external data file"):
        copy(a, img, "qcow2", site.root)
    assert file_state(canary) == before


def test_a_fifo_as_disk_is_refused_without_blocking(site, users, home):
    a, _ = users
    fifo = home / "data.img"
    a.run("mkfifo", str(fifo)).check_returncode()
    answers, took, name = boot_with_disk(site, a, fifo)
    assert_refused(answers, "not a FIFO")
    assert took < 5
    assert site.worker.hv.lookup(name) is None


def test_a_fifo_as_backing_file_is_refused_without_blocking(site, users, home):
    """Finding 9: a FIFO behind a qcow2 wedged create() and libvirtd for ten minutes."""
    a, _ = users
    fifo = home / "pipe"
    a.run("mkfifo", str(fifo)).check_returncode()
    img = home / "chain.qcow2"
    a.run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", str(fifo), "-F", "raw", str(img), "1M"
          ).check_returncode()
    answers, took, _ = boot_with_disk(site, a, img)
    assert_refused(answers, "backing file")
    assert took < 5


def test_a_device_node_as_disk_is_refused(site, users, home):
    a, _ = users
    dev = home / "disk.img"
    os.mknod(dev, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero's numbers, the user's own node
    as_user(a, dev)
    answers, _, _ = boot_with_disk(site, a, dev)
    assert_refused(answers, "not a device")
    link = home / "zero.img"
    link.symlink_to("/dev/zero")
    as_user(a, link)
    answers, _, _ = boot_with_disk(site, a, link)
    assert_refused(answers, "must be under")


def test_a_socket_as_disk_is_refused(site, users, home):
    import socket

    a, _ = users
    path = home / "sock.img"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        as_user(a, path)
        answers, _, _ = boot_with_disk(site, a, path)
    assert_refused(answers, "disk=")
    assert "not a socket" in answers[0].reason or "cannot be opened" in answers[0].reason  # ENXIO


def test_another_users_file_is_never_copied(site, users, home):
    """Named directly, through a symlink, or through a hard link (owner checked on the open file)."""
    a, b = users
    secret = b.home / "secret.img"
    secret.write_bytes(b"victim's data " * 1000)
    as_user(b, secret)
    secret.chmod(0o600)
    before = file_state(secret)
    (home / "link.img").symlink_to(secret)
    as_user(a, home / "link.img")
    for path, word in ((secret, "must be under"), (home / "link.img", "must be under")):
        with pytest.raises(UserFileRefused, match=word):
            copy(a, path, "raw", site.root)
    public = b.home / "public.img"
    public.write_bytes(b"b's readable file")
    as_user(b, public)
    public.chmod(0o644)
    with pytest.raises(UserFileRefused, match="must be under"):
        copy(a, public, "raw", site.root)
    assert file_state(secret) == before


def test_a_symlink_swapped_between_check_and_use_never_yields_the_victims_file(site, users, home):
    """Finding 5: the path flips between the owner's own file and a symlink to the victim's 0600 file, as
    fast as a thread can flip it, while the node worker copies. Every copy is the owner's data or a refusal;
    the victim's bytes never appear, her file keeps owner, mode and hash."""
    a, b = users
    secret = b.home / "secret2.img"
    secret.write_bytes(b"VICTIM" * 4096)
    as_user(b, secret)
    secret.chmod(0o600)
    before = file_state(secret)
    own = home / "own.img"
    own.write_bytes(b"MINE" * 4096)
    as_user(a, own)
    target = home / "data.img"
    stop = threading.Event()

    def swap():
        link, real = home / ".l", home / ".r"
        while not stop.is_set():
            for make, tmp in ((lambda p: p.symlink_to(secret), link), (lambda p: os.link(own, p), real)):
                tmp.unlink(missing_ok=True)
                make(tmp)
                os.rename(tmp, target)

    thread = threading.Thread(target=swap, daemon=True)
    thread.start()
    outcomes = {"mine": 0, "refused": 0}
    try:
        for _ in range(30):
            try:
                data = copy(a, target, "raw", site.root)
            except UserFileRefused:
                outcomes["refused"] += 1
                continue
            assert b"VICTIM" not in data
            assert data == own.read_bytes()
            outcomes["mine"] += 1
    finally:
        stop.set()
        thread.join(5)
    assert outcomes["refused"] + outcomes["mine"] == 30
    print("swap outcomes", outcomes)
    assert file_state(secret) == before


def test_a_copy_that_takes_too_long_is_stopped_at_its_deadline(site, users, home):
    """Nothing a user supplies holds the node worker past its deadline: a copy still running at it is killed
    (with its process group) and refused."""
    a, _ = users
    big = home / "big.img"
    with open(big, "wb") as fh:
        for _ in range(64):
            fh.write(os.urandom(1 << 20))
    as_user(a, big)
    started = time.monotonic()
    with pytest.raises(UserFileRefused, match="not read within|too long"):
        copy(a, big, "raw", site.root, timeout=0.05)
    assert time.monotonic() - started < 5


def test_guest_files_are_roots_and_private(site, users, home):
    """Finding 6: overlays and seeds were 0644 under predictable names."""
    a, _ = users
    img = home / "mine.img"
    img.write_bytes(b"x" * 4096)
    as_user(a, img)
    base = site.worker.store.path(site.config.images.catalog["tiny"].sha256)
    files = disks.prepare(site.config.node.guest_dir, "vt-1-n-0", "1", base, "raw", {"user-data": b"secret"},
                          user_image=disks.UserImage(str(img), a.uid, a.gid, str(a.home)),
                          store=site.config.images.store, node="n")
    try:
        gdir = Path(files.overlay).parent
        assert stat.S_IMODE(os.stat(gdir).st_mode) == 0o711 and os.stat(gdir).st_uid == 0
        for path in (files.overlay, files.seed, files.console_log, files.data, gdir / "job"):
            st = os.stat(path)
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600), path
        assert Path(files.data).read_bytes() == img.read_bytes() and files.data_format == "raw"
    finally:
        assert disks.remove(site.config.node.guest_dir, "vt-1-n-0", store=site.config.images.store)


def test_an_image_larger_than_the_sites_max_disk_is_refused(site, users, home):
    """A sparse 2 GiB file (max_disk is 1G here) would land in the guest root, perhaps the ramdisk: refused."""
    a, _ = users
    big = home / "huge.img"
    with open(big, "wb") as fh:
        fh.truncate(2 << 30)
    as_user(a, big)
    answers, took, _ = boot_with_disk(site, a, big)
    assert_refused(answers, "is larger than")
    assert took < 5
