"""The guest's private ssh path: no port on the host's network, a unix socket only root and the job's owner open.

Why not a loopback port (QEMU's `hostfwd`): any local user can bind a TCP port first (holding the guests' range
stopped every VM job on a node, issue 11 finding 10) and connect to one. Measured on this host: QEMU 7.2 refuses a
unix `hostfwd` ("Bad protocol name"), there is no /dev/vhost-vsock, QEMU runs as libvirt-qemu with no capability
and NoNewPrivs (so no port below 1024), and the guests (the test guest, cloud images, users' own images) must
stay unchanged.

So the guest's one NIC sits on a QEMU hub with slirp (its outbound network, as before, with `ipv6=off`) and a
`stream` netdev to this process, a root process per guest. It writes the guest's frames into a tap in a network
namespace of its own, which only root can enter, and reaches the guest's sshd there on its IPv6 link-local
address (slirp, IPv4 only, ignores those frames, so it never answers them). The owner asks over
`<guest dir>/ssh.sock` (the owner's, 0600; the peer's uid checked again: root or the socket file's owner): this process
connects to the guest's sshd inside its namespace and hands the connected socket over (SCM_RIGHTS), and ssh uses
it as its own (`ProxyUseFdpass`, cli/launcher_ssh.py). No byte of a session passes through here but the frames.

It exits when QEMU's side of the link closes (the guest is gone), when QEMU never came, or when its guest
directory is removed; a node worker restart leaves it running. A guest saved to disk while its job is suspended
(suspend.py: root's `saved` file in its directory) is not gone: the link waits for the restored QEMU, keeping its
namespace and the job's ssh connections in it, which carry on after the restore.

Who may connect is the socket file's owner, looked at on each connection (the file is root's to change: the guest
directory is root's). A guest restored from a warm image, or waiting in the warm pool, has its link started for
root alone (owner uid 0), and `hand_over` makes the socket its job owner's once the guest holds its identity: no
login of the owner's can reach the guest's sshd (started before the save) before the identity and the host's
random bytes are in, and a node worker restart changes nothing.
"""

from __future__ import annotations

import ctypes
import fcntl
import ipaddress
import os
import pwd
import selectors
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

from vtorque.shared.guest_ssh import CONNECT_TIMEOUT

LINK_SOCKET = "link.sock"  # QEMU's end of the guest's link (libvirt-qemu's, 0600)
SSH_SOCKET = "ssh.sock"  # the owner's way to the guest's sshd
LOG_FILE = "link.log"
SAVED_MARK = "saved"  # suspend.py's mark of a guest saved to disk: the link waits for its restored QEMU
# The user that runs QEMU (libvirt's qemu.conf `user`): Debian's name, then Red Hat's.
QEMU_USERS = ("libvirt-qemu", "qemu")
SSH_PORT = 22
START_TIMEOUT = 300.0  # QEMU connects when the domain starts; a link it never joined goes away on its own

_CLONE_NEWNET = 0x40000000
_TUNSETIFF = 0x400454CA
_IFF_TAP, _IFF_NO_PI, _IFF_UP = 0x0002, 0x1000, 0x1
_SIOCGIFFLAGS, _SIOCSIFFLAGS = 0x8913, 0x8914
_TAP = "vtlink"


class LinkError(Exception):
    pass


def qemu_uid() -> int:
    for name in QEMU_USERS:
        try:
            return pwd.getpwnam(name).pw_uid
        except KeyError:
            continue
    raise LinkError(f"no QEMU user ({' or '.join(QEMU_USERS)}) on this node")


def netdev_args(guest_dir: Path, mac: str) -> list[str]:
    """The QEMU arguments of the guest's NIC: slirp and this link on one hub."""
    path = str(guest_dir / LINK_SOCKET).replace(",", ",,")  # QEMU's option syntax doubles a comma
    return ["-netdev", "user,id=vtuser0,ipv6=off",
            "-netdev", f"stream,id=vtlink0,server=off,addr.type=unix,addr.path={path}",
            "-netdev", "hubport,id=vthub0,hubid=0,netdev=vtuser0",
            "-netdev", "hubport,id=vthub1,hubid=0,netdev=vtlink0",
            "-netdev", "hubport,id=vtnet0,hubid=0",
            "-device", f"virtio-net-pci,netdev=vtnet0,mac={mac},addr=0x10"]


def start(guest_dir: Path, owner_uid: int, mac: str, timeout: float = 10.0) -> None:
    """Start the guest's link process (before the domain: QEMU connects to it at start). Raises LinkError."""
    quid = qemu_uid()
    log_fd = os.open(guest_dir / LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vtorque.services.node_worker.guest_link", str(guest_dir), str(owner_uid),
             str(quid), mac], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_fd,
            start_new_session=True, close_fds=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    finally:
        os.close(log_fd)
    stdout = proc.stdout
    assert stdout is not None  # stdout=PIPE
    try:
        sel = selectors.DefaultSelector()
        sel.register(stdout, selectors.EVENT_READ)
        line = stdout.readline() if sel.select(timeout) else b""
        sel.close()
        # The process forks once it is set up; its first half exits at once (reaped here), so the link, a
        # grandchild, is no zombie of the node worker when it ends.
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        line = b""
    finally:
        stdout.close()
    if line.strip() != b"ready":
        proc.kill()
        proc.wait()
        tail = (guest_dir / LOG_FILE).read_text(errors="replace")[-300:].strip()
        raise LinkError(f"the guest's ssh link did not start: {tail or 'no reason given'}")


def allowed(peer_uid: int, socket_owner: int) -> bool:
    """Who the link lets in: root, and the owner of its ssh socket file (root's alone until the guest is a job's)."""
    return peer_uid in (0, socket_owner)


def hand_over(guest_dir: Path, uid: int, gid: int) -> None:
    """The guest's ssh socket made its job owner's: from now on the link lets them in. The socket must be the
    link's own, root's: anything else in its place is not given away. Raises LinkError."""
    path = guest_dir / SSH_SOCKET
    st = os.lstat(path)
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != 0:
        raise LinkError(f"{path} is not the guest link's own socket")
    os.chown(path, uid, gid, follow_symlinks=False)


def eui64_link_local(mac: str) -> str:
    """The kernel's default link-local address for `mac` (until the guest's own frames say otherwise)."""
    b = bytes.fromhex(mac.replace(":", ""))
    iid = bytes([b[0] ^ 0x02]) + b[1:3] + b"\xff\xfe" + b[3:]
    return str(ipaddress.IPv6Address(b"\xfe\x80" + b"\0" * 6 + iid))


# -- the link process ---------------------------------------------------------------------------------------

def _bound(path: Path, uid: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # 0600 from the start: no instant where another user could connect
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chown(path, uid, -1)
    sock.listen(16)
    sock.setblocking(False)
    return sock


def _peer_uid(sock: socket.socket) -> int:
    _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid


def _private_tap() -> tuple[int, int]:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
    # The namespace's own settings: the tap's link-local address usable at once (no duplicate detection: it is
    # alone on its segment but for the guest), no router solicitations into the guest's network.
    for key, value in (("accept_dad", "0"), ("router_solicitations", "0")):
        Path(f"/proc/sys/net/ipv6/conf/default/{key}").write_text(value)
    tap = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    fcntl.ioctl(tap, _TUNSETIFF, struct.pack("16sH22x", _TAP.encode(), _IFF_TAP | _IFF_NO_PI))
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as ctl:
        ifr = fcntl.ioctl(ctl, _SIOCGIFFLAGS, struct.pack("16sH22x", _TAP.encode(), 0))
        flags = struct.unpack_from("16sH", ifr)[1] | _IFF_UP
        fcntl.ioctl(ctl, _SIOCSIFFLAGS, struct.pack("16sH22x", _TAP.encode(), flags))
    os.set_blocking(tap, False)
    return tap, socket.if_nametoindex(_TAP)


def _guest_source(frame: bytes, mac: bytes) -> str | None:
    """The guest's IPv6 link-local source address, from a frame the guest sent."""
    if len(frame) >= 38 and frame[6:12] == mac and frame[12:14] == b"\x86\xdd" and frame[22:24] == b"\xfe\x80":
        return str(ipaddress.IPv6Address(frame[22:38]))
    return None


def serve(guest_dir: Path, owner_uid: int, quid: int, mac: str) -> None:
    link_listener = _bound(guest_dir / LINK_SOCKET, quid)
    ssh_listener = _bound(guest_dir / SSH_SOCKET, owner_uid)
    tap, ifindex = _private_tap()
    if os.fork():
        os._exit(0)
    print("ready", flush=True)
    os.close(1)
    os.open(os.devnull, os.O_WRONLY)
    guest_mac = bytes.fromhex(mac.replace(":", ""))
    guest_addr = eui64_link_local(mac)
    sel = selectors.DefaultSelector()
    sel.register(link_listener, selectors.EVENT_READ, "link-listen")
    sel.register(ssh_listener, selectors.EVENT_READ, "ssh-listen")
    sel.register(tap, selectors.EVENT_READ, "tap")
    qemu: socket.socket | None = None
    buf = b""
    pending: dict[int, tuple[socket.socket, socket.socket, float]] = {}  # tcp fd → (client, tcp, deadline)
    started = time.monotonic()
    try:
        while True:
            for key, _ in sel.select(1.0):
                what = key.data
                if what == "link-listen":
                    conn, _ = link_listener.accept()
                    if qemu is not None or _peer_uid(conn) != quid:
                        conn.close()  # one link, QEMU's alone
                        continue
                    qemu = conn
                    sel.unregister(link_listener)
                    link_listener.close()
                    (guest_dir / LINK_SOCKET).unlink(missing_ok=True)
                    sel.register(qemu, selectors.EVENT_READ, "qemu")
                elif what == "qemu":
                    assert qemu is not None  # registered once it connected
                    data = qemu.recv(1 << 20)
                    if not data and _saved(guest_dir):
                        # Saved, not gone: the restore's QEMU joins again (no frame is lost that TCP misses).
                        sel.unregister(qemu)
                        qemu.close()
                        qemu, buf = None, b""
                        link_listener = _bound(guest_dir / LINK_SOCKET, quid)
                        sel.register(link_listener, selectors.EVENT_READ, "link-listen")
                        continue
                    if not data:
                        return  # the guest is gone
                    buf += data
                    while len(buf) >= 4 and len(buf) >= 4 + (n := struct.unpack_from(">I", buf)[0]):
                        frame, buf = buf[4:4 + n], buf[4 + n:]
                        guest_addr = _guest_source(frame, guest_mac) or guest_addr
                        try:
                            os.write(tap, frame)
                        except BlockingIOError:
                            pass  # a full tap queue drops a frame, as a wire would; TCP sends it again
                elif what == "tap":
                    try:
                        frame = os.read(tap, 65536)
                    except BlockingIOError:
                        continue
                    if qemu is not None:
                        qemu.setblocking(True)
                        qemu.sendall(struct.pack(">I", len(frame)) + frame)
                        qemu.setblocking(False)
                elif what == "ssh-listen":
                    client, _ = ssh_listener.accept()
                    peer = _peer_uid(client)
                    if not allowed(peer, _socket_owner(guest_dir / SSH_SOCKET)):
                        # Recorded: the file's mode keeps others out, so a refused peer means a widened mode.
                        print(f"guest link: refused uid {peer}", file=sys.stderr, flush=True)
                        client.close()
                        continue
                    tcp = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
                    tcp.setblocking(False)
                    try:
                        tcp.connect((guest_addr, SSH_PORT, 0, ifindex))
                    except BlockingIOError:
                        pass
                    except OSError:
                        tcp.close()
                        client.close()
                        continue
                    pending[tcp.fileno()] = (client, tcp, time.monotonic() + CONNECT_TIMEOUT)
                    sel.register(tcp, selectors.EVENT_WRITE, "connect")
                elif what == "connect":
                    client, tcp, _ = pending.pop(key.fd)
                    sel.unregister(tcp)
                    if tcp.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                        try:
                            client.setblocking(True)
                            client.settimeout(5)
                            socket.send_fds(client, [b"\0"], [tcp.fileno()])
                        except OSError:
                            pass
                    client.close()
                    tcp.close()
            now = time.monotonic()
            for fd, (client, tcp, deadline) in list(pending.items()):
                if now > deadline:
                    sel.unregister(tcp)
                    client.close()
                    tcp.close()
                    del pending[fd]
            if (qemu is None and now - started > START_TIMEOUT and not _saved(guest_dir)) or not guest_dir.is_dir():
                return
    finally:
        (guest_dir / SSH_SOCKET).unlink(missing_ok=True)
        (guest_dir / LINK_SOCKET).unlink(missing_ok=True)


def _socket_owner(path: Path) -> int:
    """The uid of the ssh socket file; root's when it is anything but a socket (then only root gets in)."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    return st.st_uid if stat.S_ISSOCK(st.st_mode) else 0


def _saved(guest_dir: Path) -> bool:
    """suspend.py's mark of a guest saved to disk (SAVED_MARK): a regular file of root's, in root's directory."""
    try:
        st = os.lstat(guest_dir / SAVED_MARK)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == 0


if __name__ == "__main__":
    try:
        serve(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    except Exception as exc:  # noqa: BLE001 - any failure: one line into link.log, which the node worker quotes
        print(f"guest link: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
