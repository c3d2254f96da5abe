"""The traces directory is 1777 and its file names are predictable: a name planted by another user (a symlink to
a root file, a file of her own) never makes root append there (finding 4 of issue 11)."""

import hashlib
import os

import pytest

from vtorque.shared.own_file import NotOwnFile, append_own


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def traces():
    """A 1777 traces directory the test's accounts can reach (pytest's own tmp is 0700)."""
    import shutil
    import tempfile
    from pathlib import Path

    root = Path(tempfile.mkdtemp(prefix="vtorque-test-traces-", dir="/tmp"))
    root.chmod(0o755)
    d = root / "traces"
    d.mkdir()
    d.chmod(0o1777)
    yield d
    shutil.rmtree(root, ignore_errors=True)


def test_a_planted_symlink_is_not_followed(traces, users):
    attacker, _ = users
    canary = traces.parent / "root-only"
    canary.write_text("root's\n")
    canary.chmod(0o600)
    before = _digest(canary)
    link = traces / "vtorque-bridge.0.jsonl"
    assert attacker.run("ln", "-s", str(canary), str(link)).returncode == 0
    with pytest.raises(OSError):
        append_own(link, "span\n")
    assert _digest(canary) == before and os.stat(canary).st_uid == 0


def test_a_file_another_user_made_first_is_not_written(traces, users):
    attacker, _ = users
    planted = traces / "vtorque-node-worker.0.jsonl"
    assert attacker.run("touch", str(planted)).returncode == 0
    with pytest.raises(NotOwnFile):
        append_own(planted, "span\n")
    assert planted.read_bytes() == b""


def test_a_new_trace_file_is_its_writers_alone(traces):
    path = traces / "vtorque-stager.0.jsonl"
    append_own(path, "a\n")
    append_own(path, "b\n")
    assert path.read_text() == "a\nb\n" and path.stat().st_mode & 0o777 == 0o600
