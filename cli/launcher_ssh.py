"""ssh to a job's guest through its link's unix socket (services/node_worker/guest_link.py), never a TCP port.

`python -I -S …/cli/launcher_ssh.py SOCKET` is ssh's ProxyCommand with `ProxyUseFdpass`: it asks the guest's
link for a connection to the guest's sshd and passes that socket to ssh on its stdout, then exits; ssh talks to
the guest directly on it. Only root and the job's owner may open SOCKET. It runs as a file, without site-packages
(`-S`; the standard library is all it needs, shared/guest_ssh.py loaded by its path), because every job's ssh
waits for it: `python -m vtorque.cli.launcher_ssh` took 60-300 ms to start here, most of it site and the
editable install's finder.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The guests' host keys are new on every boot; the guest is reached by a path only its owner may open, so there
# is no one in between to check a key against.
SSH_OPTIONS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
               "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=20", "-o", "ServerAliveInterval=30"]


def ssh_argv(key: str | Path, ssh_socket: str | Path, user: str, command: str | None = None,
             python: str = sys.executable, forward_agent: bool = False) -> list[str]:
    """The ssh command line that runs `command` as `user` in the guest behind `ssh_socket`. `forward_agent`
    forwards the agent in the environment's SSH_AUTH_SOCK: give it only the job's own agent (job_agent)."""
    proxy = " ".join(shlex.quote(a) for a in (python, "-I", "-S", str(Path(__file__).resolve()), str(ssh_socket)))
    forward = ["-o", "ForwardAgent=yes"] if forward_agent else []
    argv = ["ssh", "-i", str(key), *SSH_OPTIONS, *forward, "-o", "ProxyUseFdpass=yes",
            # ssh execs the ProxyCommand with the user's shell and expands %-tokens in it: a path's own % is doubled.
            "-o", "ProxyCommand=" + proxy.replace("%", "%%"), f"{user}@vtorque-guest"]
    return argv + ([command] if command is not None else [])


@contextlib.contextmanager
def job_agent(key: str | Path):
    """An ssh-agent of this job's own that holds only the job's key; yields the environment for ssh (its
    SSH_AUTH_SOCK), or None when no agent could be started (the job then runs without forwarding).

    Forwarded into guest 0, it lets an MPI launcher there (mpirun over dbclient) log into the job's other
    guests, which all accept the job's public key, without the private key ever leaving the owner's host:
    nothing secret goes on the bus, into a seed or into a guest. The user's own agent (an SSH_AUTH_SOCK the
    job inherited) is never the one forwarded. The agent and its directory are gone when the block ends."""
    tmp = Path(tempfile.mkdtemp(prefix="vtorque-agent-"))  # mode 0700: only the owner reaches the socket
    sock = tmp / "agent.sock"
    env = {k: v for k, v in os.environ.items() if k not in ("SSH_AUTH_SOCK", "SSH_AGENT_PID")}
    env["SSH_AUTH_SOCK"] = str(sock)
    agent = None
    try:
        try:
            # -D: in the foreground, a child of ours, so it ends with us; -a: the socket in our private dir
            agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 10
            while not sock.exists() and agent.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            added = sock.exists() and subprocess.run(
                ["ssh-add", "-q", str(key)], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                timeout=20).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            added = False
        if not added:
            print("vtorque: warning: no ssh agent for the job (ssh-agent/ssh-add failed): guests cannot ssh to "
                  "each other", file=sys.stderr)
        yield env if added else None
    finally:
        if agent is not None:
            agent.terminate()
            try:
                agent.wait(timeout=5)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def _guest_ssh():
    """shared/guest_ssh.py, also when this runs as a file without site-packages (the ProxyCommand)."""
    try:
        from vtorque.shared import guest_ssh
    except ImportError:
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "vtorque_guest_ssh", Path(__file__).resolve().parents[1] / "shared" / "guest_ssh.py")
        assert spec is not None and spec.loader is not None
        guest_ssh = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(guest_ssh)
    return guest_ssh


def main(argv: list[str]) -> int:
    connect = _guest_ssh().connect

    if len(argv) != 1:
        print("usage: python -m vtorque.cli.launcher_ssh SOCKET (ssh's ProxyCommand, with ProxyUseFdpass)",
              file=sys.stderr)
        return 2
    try:
        guest = connect(argv[0])
    except OSError as exc:
        print(f"vtorque: cannot reach the guest through {argv[0]}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    with socket.socket(fileno=sys.stdout.fileno()) as out:
        socket.send_fds(out, [b"\0"], [guest.fileno()])
        out.detach()
    guest.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
