"""An instant host for the node worker: the real NodeWorker (its checks, the boot's steps, domain XML,
define/start through Hypervisor, the readiness wait, the job files, teardown) on a host where only the machine
is instant. Used by the scale benches (bench/many_nodes.py, bench/scale_nodes.py) and the in-memory flow tests
(tests/unit/test_flow_in_memory.py). What is instant, and only that:
- the hypervisor: libvirt's test driver, one private instance per node (`InstantHypervisor`; a node has a
  libvirtd of its own; a test:///<file> URI opens a fresh in-memory driver per connection, so the Hypervisor's
  threads share one);
- the guest: when the test driver "starts" a domain, `InstantGuests` writes the guest's ready line to its
  console log, and its link (guest_link.start's stand-in) hands over a connection that answers sshd's banner
  at once, so the node worker's own wait_ready sees a booted guest;
- the guest's disks: disks.prepare is replaced by `instant_prepare` (the guest directory and its console log,
  no qemu-img and no seed ISO);
- the job network: `instant_segments`, whose `ip` commands are taken as done.
`instant_host(guests)` patches the two module attributes the node worker calls (disks.prepare,
guest_link.start) while it is active; nothing of the node worker's own code is replaced.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import tempfile
import threading
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import cast
from unittest import mock

import libvirt

from . import disks, guest_link, trust
from .domain import GuestDisks
from .hypervisor import Hypervisor
from .job_segment import JobSegments
from .readiness import GUEST_READY


class InstantGuests:
    """Every started guest's link, at once (in place of guest_link.py's process per guest): its ssh socket
    hands over a connection whose far end answers `SSH-2.0-…` at once, as the node worker's readiness wait
    (shared/guest_ssh.py connect) expects; one selector thread serves every guest's socket."""

    def __init__(self):
        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._links: dict[str, socket.socket] = {}  # guest directory → its ssh socket
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        threading.Thread(target=self._serve, name="instant-guests", daemon=True).start()

    def link(self, guest_dir: Path, owner_uid: int, mac: str, timeout: float = 10.0) -> None:
        """guest_link.start's stand-in: the guest's ssh socket, served from this process."""
        path = Path(guest_dir) / guest_link.SSH_SOCKET
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        sock.listen(16)
        sock.setblocking(False)
        with self._lock:
            self._close(str(guest_dir))
            self._links[str(guest_dir)] = sock
            self._sel.register(sock, selectors.EVENT_READ)
        self._wake_w.send(b"x")

    @staticmethod
    def boot(console: str) -> None:
        with open(console, "ab") as fh:
            fh.write(GUEST_READY + b" instant\n")

    def halt(self, guest_dir: str) -> None:
        with self._lock:
            self._close(guest_dir)

    def _close(self, guest_dir: str) -> None:
        sock = self._links.pop(guest_dir, None)
        if sock is not None:
            self._sel.unregister(sock)
            sock.close()

    def _serve(self) -> None:
        while True:
            for key, _ in self._sel.select():
                if key.fileobj is self._wake_r:
                    self._wake_r.recv(4096)
                    continue
                try:
                    conn, _ = cast(socket.socket, key.fileobj).accept()
                except OSError:
                    continue
                ours, theirs = socket.socketpair()
                with conn, ours, theirs:
                    try:
                        ours.sendall(b"SSH-2.0-instant\r\n")
                        socket.send_fds(conn, [b"x"], [theirs.fileno()])
                    except OSError:
                        pass


def instant_segments(workdir: Path) -> JobSegments:
    """Job networks that cost nothing: the simulated nodes share this machine's kernel, where a bridge per job
    would be one real bridge for all of them; the commands are taken as done and nothing is made."""
    import subprocess

    def taken_as_done(argv: list[str]) -> subprocess.CompletedProcess:
        # No interface is ever there (`ip link show dev X` fails, listings are empty); every change succeeds.
        missing = argv[:3] == ["ip", "link", "show"] and "dev" in argv
        return subprocess.CompletedProcess(argv, 1 if missing else 0, "[]" if "-j" in argv else "", "")

    return JobSegments(789, run=taken_as_done, lock_path=str(Path(workdir) / "job-network.lock"))


class InstantHypervisor(Hypervisor):
    """The real Hypervisor (its thread pool and deadlines) on a test-driver instance of this node's own."""

    def __init__(self, guests: InstantGuests, workdir: str):
        fd, path = tempfile.mkstemp(prefix="node-", suffix=".xml", dir=workdir)
        os.write(fd, b"<node/>")
        os.close(fd)
        super().__init__(f"test://{path}")
        self._guests = guests
        self._shared = libvirt.open(self.uri)  # libvirt connections are thread-safe; the instance is this one's

    @property
    def conn(self) -> libvirt.virConnect:  # one instance for all of the pool's threads
        return self._shared

    def _start(self, dom: libvirt.virDomain, paused: bool = False) -> None:
        super()._start(dom, paused)
        if not paused:  # a guest started paused (job_cgroup.py) runs, and so boots, at its resume
            self._guests.boot(_console(dom.XMLDesc(0)))

    def resume(self, dom: libvirt.virDomain) -> None:
        super().resume(dom)
        self._guests.boot(_console(dom.XMLDesc(0)))

    def _remove(self, name: str) -> bool:
        dom = self._lookup(name)
        if dom is not None:
            self._guests.halt(str(Path(_console(dom.XMLDesc(0))).parent))
        return super()._remove(name)


def _console(xml: str) -> str:
    source = ET.fromstring(xml).find("devices/serial/source")
    if source is None:
        raise ValueError("the domain has no serial console")
    return source.attrib["path"]


def instant_prepare(root, guest_name, job_id, base, base_format, seed, data_size_mib=None, user_image=None,
                    store=None, node=None, memory_cap_mib=None) -> GuestDisks:
    """disks.prepare's directory (root's, checked as there), its job and node marks and the console log; no
    overlay and no seed ISO (nothing reads them on the test driver)."""
    gdir = disks.guest_dir(root, guest_name)
    trust.secure_dir(root, disks.DIR_MODE)
    if gdir.exists():
        disks._remove_tree(gdir, store)
    os.mkdir(gdir, disks.DIR_MODE)
    (gdir / "job").write_bytes(job_id.encode())
    if node:
        (gdir / "node").write_bytes(node.encode())
    (gdir / "console.log").write_bytes(b"")
    return GuestDisks(overlay=str(gdir / "root.qcow2"), seed=str(gdir / "seed.iso"),
                      console_log=str(gdir / "console.log"))


@contextlib.contextmanager
def instant_host(guests: InstantGuests):
    """While active, the node workers of this process prepare guests with instant_prepare and link them with
    `guests` (the module attributes the node worker calls; nothing of its own code is replaced)."""
    with mock.patch.object(disks, "prepare", instant_prepare), \
            mock.patch.object(guest_link, "start", guests.link):
        yield
