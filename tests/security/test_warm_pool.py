"""The warm pool's attack surface (services/node_worker/warm_pool.py): a pooled guest is root's alone until a
job claims it. A pool directory or record someone else made (or a symlink in its place) is never taken; the link
of a pooled (or restored) guest (guest_link.py) lets in root and its ssh socket's owner alone, whatever the
file's mode says, and that socket becomes the job owner's only once handed over. The fakes and the node site are
tests/unit/test_warm_pool.py's; the real guests' side (another owner refused, two jobs sharing nothing) is
tests/integration/test_warm_pool.py."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from unit.test_warm_pool import ENTRY, GUEST, claim_setup, make_pooled, site  # noqa: F401

from vtorque.services.node_worker import guest_link, warm_pool
from vtorque.services.node_worker.domain import USER_NET_MAC


def test_a_planted_pool_directory_is_never_taken(site, monkeypatch):  # noqa: F811 - the imported fixture
    pool, guests, hv = site
    claim_setup(monkeypatch, pool)
    name = make_pooled(guests, hv, "00000001")
    os.chown(guests / name / warm_pool.RECORD, 1001, 1001)  # a record root did not write
    monkeypatch.setattr(pool, "_resume", lambda *_a: pytest.fail("taken"))
    assert pool.claim_for(SimpleNamespace(job_id="1.srv", network=None), GUEST, ENTRY, None, 1e9, 0.0)[0] is None
    os.chown(guests / name / warm_pool.RECORD, 0, 0)
    (guests / name / warm_pool.RECORD).unlink()
    (guests / name / warm_pool.RECORD).symlink_to("/etc/hostname")  # a link: never followed
    assert pool.claim_for(SimpleNamespace(job_id="1.srv", network=None), GUEST, ENTRY, None, 1e9, 0.0)[0] is None


def _connect_as(path: Path, uid: int) -> str:
    """What a process of `uid` meets at the link's socket: "denied" (the file's mode), else "connected"."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(str(path))
                got = b"connected"
        except PermissionError:
            got = b"denied"
        except OSError as exc:
            got = repr(exc).encode()
        os.write(w, got)
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    out = os.read(r, 200).decode()
    os.close(r)
    return out


def _refused(gdir: Path, uid: int, timeout: float = 3.0) -> bool:
    """The link's own record of a peer it refused (its log, root's, in the guest directory)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = (gdir / guest_link.LOG_FILE).read_text()
        if f"refused uid {uid}" in log:
            return True
        time.sleep(0.05)
    return False


def test_a_restored_or_pooled_guests_link_is_root_s_until_handed_over_and_then_the_owner_s_alone():
    """The real link process, started as for a restored or pooled guest (owner uid 0): its socket is root's 0600,
    so the job's owner-to-be cannot open it; with its mode widened (a mistake, or an attacker who got a file
    mode changed) the link itself refuses them. Handed over to uid 1001, 1001 is let in and 1002 still refused;
    hand_over gives away nothing but the link's own root-owned socket."""
    if os.geteuid() != 0:
        pytest.fail("runs as root, as the node worker does")
    top = Path(tempfile.mkdtemp(prefix="vtorque-link-", dir="/tmp"))  # pytest's own tmp is root's alone
    top.chmod(0o711)
    gdir = top / "vt-pool-0123456789ab-00000001"
    gdir.mkdir(mode=0o711)
    try:
        guest_link.start(gdir, 0, USER_NET_MAC)
        sock = gdir / guest_link.SSH_SOCKET
        st = os.lstat(sock)
        assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)
        assert _connect_as(sock, 1001) == "denied"
        os.chmod(sock, 0o666)
        assert _connect_as(sock, 1001) == "connected" and _refused(gdir, 1001)
        guest_link.hand_over(gdir, 1001, 1001)
        assert os.lstat(sock).st_uid == 1001
        assert _connect_as(sock, 1002) == "connected" and _refused(gdir, 1002)
        before = (gdir / guest_link.LOG_FILE).read_text().count("refused uid 1001")
        assert _connect_as(sock, 1001) == "connected"
        time.sleep(1.0)  # the link takes a connection within milliseconds: a refusal would be in its log by now
        assert (gdir / guest_link.LOG_FILE).read_text().count("refused uid 1001") == before  # let in
        # Handed over once: the socket is no longer root's, so it cannot be handed to anyone else.
        with pytest.raises(guest_link.LinkError):
            guest_link.hand_over(gdir, 1002, 1002)
        # Anything but the link's own socket in its place is never given away.
        (gdir / "other").write_text("root's")
        os.rename(gdir / "other", sock)
        with pytest.raises(guest_link.LinkError):
            guest_link.hand_over(gdir, 1001, 1001)
        assert os.lstat(sock).st_uid == 0
    finally:
        shutil.rmtree(top, ignore_errors=True)  # the link exits when its guest directory goes

