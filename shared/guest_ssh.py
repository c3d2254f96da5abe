"""The client side of a guest's ssh link (services/node_worker/guest_link.py): root's readiness check and the
owner's ssh (cli/launcher_ssh.py) both get their connection to the guest's sshd this way."""

from __future__ import annotations

import socket
from pathlib import Path

CONNECT_TIMEOUT = 10.0


def connect(path: str | Path, timeout: float = CONNECT_TIMEOUT) -> socket.socket:
    """A TCP connection to the guest's sshd, handed over by its link process (SCM_RIGHTS). Raises OSError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        _, fds, _, _ = socket.recv_fds(sock, 1, 1)
    if not fds:
        raise ConnectionRefusedError(f"the guest's sshd did not answer through {path}")
    return socket.socket(fileno=fds[0])
