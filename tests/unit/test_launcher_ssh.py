"""The launcher's ssh to the guest: through the guest's ssh socket (cli/launcher_ssh.py), or, for a job file of a
node worker from before that (an upgrade whose node worker has not restarted), the guest's old port."""

import base64
import json
import subprocess
import sys
from pathlib import Path

from vtorque.cli import launcher_ssh
from vtorque.cli.launcher import alone_in_its_job
from vtorque.cli.launcher_ssh import ssh_argv

PROXY = str(Path(launcher_ssh.__file__).resolve())


def test_ssh_goes_through_the_socket_with_fd_passing_and_a_quoted_path():
    argv = ssh_argv("/k/id", "/g/vt-1 x%/ssh.sock", "bob", "true", python="/venv/bin/python")
    assert argv[:3] == ["ssh", "-i", "/k/id"] and argv[-2:] == ["bob@vtorque-guest", "true"]
    assert "ProxyUseFdpass=yes" in argv
    proxy = next(a for a in argv if a.startswith("ProxyCommand="))
    # The user's shell runs it (spaces quoted) after ssh expanded %-tokens (a path's % doubled).
    # As a file without site-packages (-I -S): it starts in a few ms, not the package's tens to hundreds.
    assert proxy == f"ProxyCommand=/venv/bin/python -I -S {PROXY} '/g/vt-1 x%%/ssh.sock'"
    assert "-p" not in argv


def launch(tmp_path, doc):
    """vtorque-launch with a recording `ssh` first on PATH; returns the argv ssh got."""
    job_dir = tmp_path / "state" / "jobs" / "7"
    job_dir.mkdir(parents=True)
    (job_dir / "vt-7-n1-0.json").write_text(json.dumps({"guest": "vt-7-n1-0", "index": 0, "node": "n1",
                                                         "user": "bob", **doc}))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "ssh").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/argv\ncat >/dev/null\nexit 0\n')
    (bindir / "ssh").chmod(0o755)
    (tmp_path / "vtorque.toml").write_text(f'state_dir = "{tmp_path}/state"\n[tracing]\ndir = "{tmp_path}"\n')
    key = tmp_path / "keys" / "k" / "id_ed25519"
    key.parent.mkdir(parents=True)
    key.write_text("k")
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "VTORQUE_CONFIG": str(tmp_path / "vtorque.toml"), "PBS_JOBID": "7",
           "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "vtorque.cli.launcher", "--ssh-key", str(key), "--wait", "1"],
                          input=base64.b64encode(b"#!/bin/sh\necho hi\n"), env=env, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return (tmp_path / "argv").read_text().splitlines()


def test_the_launcher_uses_the_guests_socket(tmp_path):
    argv = launch(tmp_path, {"ssh_socket": "/g/vt-7-n1-0/ssh.sock"})
    assert "ProxyUseFdpass=yes" in argv and "-p" not in argv
    assert any(a.endswith(f"-I -S {PROXY} /g/vt-7-n1-0/ssh.sock") for a in argv)


def test_a_job_file_of_an_older_node_worker_still_names_its_port(tmp_path):
    argv = launch(tmp_path, {"address": "127.0.0.1", "ssh_port": 22007})
    assert argv[argv.index("-p") + 1] == "22007" and "bob@127.0.0.1" in argv


def test_the_proxy_runs_without_site_packages_and_says_why_it_cannot_connect(tmp_path):
    proc = subprocess.run([sys.executable, "-I", "-S", PROXY, str(tmp_path / "no.sock")], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 1 and "cannot reach the guest through" in proc.stderr, proc.stderr


def test_a_guest_alone_in_its_job_needs_no_agent(tmp_path):
    (tmp_path / "vt-7-n1-0.json").write_text("{}")
    assert alone_in_its_job(tmp_path, {"SLURM_JOB_NUM_NODES": "1"})
    assert alone_in_its_job(tmp_path, {"PBS_NUM_NODES": "1"})
    assert not alone_in_its_job(tmp_path, {"SLURM_JOB_NUM_NODES": "2"})  # its other guests are elsewhere
    assert not alone_in_its_job(tmp_path, {})  # unknown: the agent is started
    (tmp_path / "vt-7-n1-1.json").write_text("{}")
    assert not alone_in_its_job(tmp_path, {"SLURM_JOB_NUM_NODES": "1"})  # two guests here
