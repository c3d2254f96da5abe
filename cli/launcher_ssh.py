"""ssh to a job's guest through its link's unix socket (services/node_worker/guest_link.py), never a TCP port.

`python -m vtorque.cli.launcher_ssh SOCKET` is ssh's ProxyCommand with `ProxyUseFdpass`: it asks the guest's
link for a connection to the guest's sshd and passes that socket to ssh on its stdout, then exits; ssh talks to
the guest directly on it. Only root and the job's owner may open SOCKET.
"""

from __future__ import annotations

import shlex
import socket
import sys
from pathlib import Path

# The guests' host keys are new on every boot; the guest is reached by a path only its owner may open, so there
# is no one in between to check a key against.
SSH_OPTIONS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
               "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=20", "-o", "ServerAliveInterval=30"]


def ssh_argv(key: str | Path, ssh_socket: str | Path, user: str, command: str | None = None,
             python: str = sys.executable) -> list[str]:
    """The ssh command line that runs `command` as `user` in the guest behind `ssh_socket`."""
    proxy = " ".join(shlex.quote(a) for a in (python, "-m", "vtorque.cli.launcher_ssh", str(ssh_socket)))
    argv = ["ssh", "-i", str(key), *SSH_OPTIONS, "-o", "ProxyUseFdpass=yes",
            # ssh execs the ProxyCommand with the user's shell and expands %-tokens in it: a path's own % is doubled.
            "-o", "ProxyCommand=" + proxy.replace("%", "%%"), f"{user}@vtorque-guest"]
    return argv + ([command] if command is not None else [])


def main(argv: list[str]) -> int:
    from vtorque.shared.guest_ssh import connect

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
