"""Is the guest up? Console markers from the guest, then sshd's banner through the guest's link (guest_link.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vtorque.shared.guest_ssh import connect

KERNEL_UP = b"VTORQUE-KERNEL-UP"
GUEST_READY = b"VTORQUE-GUEST-READY"
GUEST_FAILED = b"VTORQUE-GUEST-FAILED"


class BootFailed(Exception):
    def __init__(self, reason: str, retryable: bool, console_tail: str = ""):
        super().__init__(reason)
        self.reason, self.retryable, self.console_tail = reason, retryable, console_tail


@dataclass(frozen=True)
class Readiness:
    kernel_up: float | None  # monotonic times
    ready: float


def console_tail(path: str | Path, lines: int = 20) -> str:
    try:
        data = Path(path).read_bytes()[-8192:]
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def ssh_banner(ssh_socket: str | Path, timeout: float = 2.0) -> bool:
    try:
        with connect(ssh_socket, timeout) as sock:
            sock.settimeout(timeout)
            return sock.recv(4) == b"SSH-"
    except OSError:
        return False


class EarlyBanner:
    """sshd's banner, asked for in a thread of its own from now on: a warm guest's sshd listens from before its
    save, so its banner can be had while the guest takes its identity, and not after it (the first connection
    runs sshd's accept path cold under TCG: 0.1-0.2 s here)."""

    def __init__(self, ssh_socket: str | Path, deadline: float, poll: float = 0.05):
        self._seen, self._closed = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._ask, args=(ssh_socket, deadline, poll), daemon=True,
                                        name="early-banner")
        self._thread.start()

    def _ask(self, ssh_socket: str | Path, deadline: float, poll: float) -> None:
        while time.monotonic() < deadline and not self._closed.is_set():
            if ssh_banner(ssh_socket, timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                self._seen.set()
                return
            self._closed.wait(poll)

    def seen(self) -> bool:
        return self._seen.is_set()

    def close(self) -> None:
        """No more asking (the guest is ready, or it failed and goes)."""
        self._closed.set()


def wait_ready(console: str | Path, ssh_socket: str | Path, is_active: Callable[[], bool], deadline: float,
               poll: float = 0.05, banner: EarlyBanner | None = None) -> Readiness:
    """Block until the guest is reachable over ssh, or raise BootFailed. `deadline` is monotonic. `banner`: sshd's
    banner already asked for (a warm guest); once it came, the console's ready marker is all that is waited for."""
    kernel_up = None
    seen_ready = False
    offset, buf = 0, b""
    last_alive_check = 0.0
    while True:
        now = time.monotonic()
        try:
            with open(console, "rb") as fh:
                fh.seek(offset)
                chunk = fh.read()
        except OSError:
            chunk = b""
        if chunk:
            offset += len(chunk)
            buf = (buf + chunk)[-4096:]
            if kernel_up is None and KERNEL_UP in buf:
                kernel_up = now
            if GUEST_FAILED in buf:
                raise BootFailed("the guest reported a failure", False, console_tail(console))
            seen_ready = seen_ready or GUEST_READY in buf
        if seen_ready and ((banner is not None and banner.seen()) or ssh_banner(ssh_socket)):
            return Readiness(kernel_up, time.monotonic())
        if now - last_alive_check > 1.0:
            last_alive_check = now
            if not is_active():
                raise BootFailed("the guest stopped during boot", True, console_tail(console))
        if now >= deadline:
            what = "sshd did not answer" if seen_ready else "no readiness signal"
            raise BootFailed(f"boot timed out: {what}", True, console_tail(console))
        time.sleep(poll)
