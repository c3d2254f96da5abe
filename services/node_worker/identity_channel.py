"""The host's end of a warm guest's identity channel: lines over the unix socket of its virtio-serial port.

The socket is libvirtd's (root's, in the guest's root-owned directory; domain.py IDENTITY_SOCKET): no user can
connect to it, so what the guest reads there comes from this node worker only. The guest side is the test
guest's init (tests/guest/vtorque-init, warm mode) or a cloud image's agent (tests/guest/cloud/vtorque-agent): it
says VTORQUE-WARM-READY once booted with no identity, takes `IDENTITY <n>` and the n lines of a vtorque.env after
a restore and answers IDENTITY-OK.
"""

from __future__ import annotations

import os
import socket
import stat
import time
from pathlib import Path

WARM_READY = "VTORQUE-WARM-READY"
IDENTITY_OK = "IDENTITY-OK"
# After a resume or a restore from a suspension (suspend.py) any guest, cold or warm, takes `CLOCK <seconds since
# the epoch>` and answers CLOCK-OK: its clock stood still while it was paused or saved.
CLOCK_OK = "CLOCK-OK"
MAX_LINE = 1 << 16


class ChannelError(Exception):
    pass


class IdentityChannel:
    def __init__(self, sock: socket.socket):
        self.sock, self._buf = sock, b""

    @classmethod
    def open(cls, path: str | Path, deadline: float, poll: float = 0.02, root_only: bool = False) -> IdentityChannel:
        """Connected to the guest's channel socket, waited for until `deadline` (monotonic): QEMU listens on
        it only once it runs. `root_only`: the socket (libvirt makes it QEMU's, group-writable) is made root's,
        0600, first: no process but root's may say anything on it, QEMU's user included."""
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                if root_only:
                    # In the guest's directory, which root alone writes: this is libvirt's socket, no link.
                    if not stat.S_ISSOCK(os.lstat(path).st_mode):
                        raise ChannelError(f"{path} is not the guest's channel socket")
                    os.chown(path, 0, 0, follow_symlinks=False)
                    os.chmod(path, 0o600)
                sock.connect(str(path))
                return cls(sock)
            except OSError as exc:
                sock.close()
                if time.monotonic() + poll > deadline:
                    raise ChannelError(f"the guest's identity channel did not open: {exc}") from None
            time.sleep(poll)

    def readline(self, deadline: float) -> str:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChannelError("the guest did not answer on its identity channel in time")
            self.sock.settimeout(min(left, 1.0))
            try:
                chunk = self.sock.recv(4096)
            except TimeoutError:
                continue
            if not chunk:
                raise ChannelError("the guest's identity channel closed")
            self._buf += chunk
            if len(self._buf) > MAX_LINE:
                raise ChannelError("the guest sent an overlong line on its identity channel")
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode(errors="replace").strip()

    def expect(self, word: str, deadline: float) -> None:
        """Read lines until one is `word` (the guest's console may hold why not)."""
        while self.readline(deadline) != word:
            pass

    def send_identity(self, env: bytes) -> None:
        """`IDENTITY <n>` and the n lines of the env: the guest reads lines with its shell's builtins, where
        decoding base64 would start a program (each one slow on a just-restored guest under TCG)."""
        if not env.endswith(b"\n"):
            env += b"\n"
        self.sock.settimeout(10.0)
        self.sock.sendall(b"IDENTITY %d\n" % env.count(b"\n") + env)

    def send_clock(self, lead: float = 0.3, clock=time.time, sleep=time.sleep) -> int:
        """`CLOCK <s>` sent on the host's whole second s (the guest's `date -s @s` takes whole seconds), at least
        `lead` s after the connection: the guest, which looks at its port every 0.25 s while no host holds it,
        is by then waiting in its read, so its clock is set within milliseconds of the host's. Returns s."""
        now = clock()
        second = int(now) + 1
        if second - now < lead:
            second += 1
        sleep(second - now)
        self.sock.settimeout(10.0)
        self.sock.sendall(f"CLOCK {second}\n".encode())
        return second

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> IdentityChannel:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()
