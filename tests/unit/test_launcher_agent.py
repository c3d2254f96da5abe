"""The launcher's job agent (cli/launcher_ssh.py job_agent): guest 0's mpirun reaches the job's other guests
through the agent forwarded from the launcher, so the agent must hold the job's key and nothing else, must not
be the user's own agent, and must be gone when the job's run ends."""

import stat
import subprocess
import tempfile
from pathlib import Path

from vtorque.cli.launcher_ssh import job_agent, ssh_argv


def test_the_job_agent_holds_only_the_job_key_and_is_gone_afterwards(tmp_path, monkeypatch):
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "job-key", "-f", str(key)], check=True)
    # A personal agent of the user's in the job's environment: never the one handed to ssh.
    monkeypatch.setenv("SSH_AUTH_SOCK", str(tmp_path / "users-own-agent.sock"))
    with job_agent(key) as env:
        assert env is not None
        sock = Path(env["SSH_AUTH_SOCK"])
        assert sock != tmp_path / "users-own-agent.sock" and sock.exists()
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700  # only the job's owner reaches it
        listed = subprocess.run(["ssh-add", "-L"], env=env, capture_output=True, text=True, check=True).stdout
        assert listed.split()[:2] == (key.with_suffix(".pub")).read_text().split()[:2]
        assert len(listed.splitlines()) == 1
    assert not sock.exists() and not sock.parent.exists()
    assert subprocess.run(["ssh-add", "-L"], env=env, capture_output=True).returncode == 2  # no agent there


def test_without_a_usable_key_the_job_runs_without_forwarding(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the agent's private directory goes here: see it removed
    tempfile.tempdir = None
    bad = tmp_path / "not-a-key"
    bad.write_text("k")
    try:
        with job_agent(bad) as env:
            assert env is None
            assert len(list(tmp_path.glob("vtorque-agent-*"))) == 1
    finally:
        tempfile.tempdir = None
    assert "no ssh agent for the job" in capfd.readouterr().err
    assert not list(tmp_path.glob("vtorque-agent-*"))


def test_forwarding_is_asked_for_only_when_wanted():
    assert "ForwardAgent=yes" not in ssh_argv("/k/id", "/g/s", "bob", "true")
    argv = ssh_argv("/k/id", "/g/s", "bob", "true", forward_agent=True)
    assert argv[argv.index("ForwardAgent=yes") - 1] == "-o" and argv[-2:] == ["bob@vtorque-guest", "true"]
