"""The warm pool's attack surface (services/node_worker/warm_pool.py): a pooled guest is root's alone until a
job claims it. A pool directory or record someone else made (or a symlink in its place) is never taken; the relay
that serves a pooled guest's ssh socket lets in root and the socket's owner (the claiming job's owner) alone,
whatever the file's mode says. The fakes and the node site are tests/unit/test_warm_pool.py's; the real guests'
side (another owner refused, two jobs sharing nothing) is tests/integration/test_warm_pool.py."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from unit.test_warm_pool import ENTRY, GUEST, _connect_as, _link, claim_setup, make_pooled, site  # noqa: F401

from vtorque.services.node_worker import warm_pool


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


def test_the_relay_hands_the_guest_to_root_and_its_owner_alone():
    if os.geteuid() != 0:
        pytest.fail("runs as root, as the node worker does")
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="vtorque-relay-", dir="/tmp"))  # pytest's own tmp is root's alone
    top.chmod(0o711)
    gdir = top / "vt-pool-0123456789ab-00000001"
    gdir.mkdir(mode=0o711)
    stop = threading.Event()
    link = threading.Thread(target=_link, args=(gdir / "ssh.sock", stop), daemon=True)
    link.start()
    try:
        while not (gdir / "ssh.sock").exists():
            time.sleep(0.01)
        warm_pool.start_relay(gdir)
        sock = gdir / warm_pool.JOB_SSH_SOCKET
        st = os.lstat(sock)
        assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)
        assert _connect_as(sock, 0) == b"SSH-"
        # The relay checks the peer: a user who may open the socket file still gets nothing while unclaimed.
        os.chmod(sock, 0o666)
        assert _connect_as(sock, 1001) == b""
        # Claimed by uid 1001: its socket made 1001's; 1001 gets in, anyone else still not.
        os.chown(sock, 1001, 1001)
        assert _connect_as(sock, 1001) == b"SSH-"
        assert _connect_as(sock, 1002) == b""
    finally:
        stop.set()
        link.join(2)
        import shutil

        shutil.rmtree(gdir, ignore_errors=True)
        top.rmdir()
