"""The warm guest's identity, end to end between its two real ends: the node worker's `send_identity` writes it,
the test guest's own `wait_identity` (tests/guest/vtorque-init, run here by the busybox shell the guest has)
reads it; and the early banner a warm guest's readiness waits on."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from vtorque.services.node_worker import warm_boot
from vtorque.services.node_worker.identity_channel import IdentityChannel
from vtorque.services.node_worker.readiness import GUEST_READY, EarlyBanner, wait_ready
from vtorque.services.node_worker.seed import seed_files
from vtorque.shared import messages as m

INIT = Path(__file__).resolve().parents[2] / "tests/guest/vtorque-init"
BUSYBOX = "/bin/busybox"  # busybox-static, what the test guest is built from (deploy/install-deps.sh)
PRINTED = ("VT_HOSTNAME", "VT_USER", "VT_UID", "VT_SSH_AUTHORIZED_KEYS", "VT_HOSTS", "VT_NODEFILE", "VT_CLOCK",
           "VT_RANDOM", "VT_WARM")


def guest_function(name: str) -> str:
    """One shell function of the guest's init, as the guest has it."""
    text = INIT.read_text()
    found = re.search(rf"^{name}\(\) {{\n.*?^}}\n", text, re.S | re.M)
    assert found, f"{name} not in {INIT}"
    return found.group(0)


def run_guest_side(tmp_path: Path, wire: bytes) -> dict[str, str]:
    """The guest's wait_identity reading `wire` from its port (a FIFO here, opened read-write as the guest opens
    its virtio port), then what it holds: each variable on a NUL-terminated line."""
    port = tmp_path / "port"
    os.mkfifo(port)
    script = "\n".join([
        'say() { :; }', 'fail() { echo "FAILED $1"; exit 3; }', 'pause_s() { :; }',
        'dated=$2; date() { echo "$*" > "$dated"; }',  # the clock is the guest's to set; here it is only written down
        "VT_WARM=1 VT_CLOCK= VT_RANDOM=",
        guest_function("wait_identity"),
        'wait_identity "$1"',
        *[f'printf "%s=%s\\0" {v} "${v}"' for v in PRINTED]])
    dated = tmp_path / "date"
    proc = subprocess.Popen([BUSYBOX, "sh", "-c", script, "guest", str(port), str(dated)], stdout=subprocess.PIPE)
    # The guest writes its WARM-READY line into the same FIFO first and reads it back: it must skip it.
    with open(port, "wb") as fifo:
        fifo.write(wire)
        fifo.flush()
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    values = dict(item.decode().split("=", 1) for item in out.split(b"\0") if item)
    values["date"] = dated.read_text().strip() if dated.exists() else ""
    return values


class _Sent:
    """IdentityChannel's socket, kept: what send_identity puts on the wire."""

    def __init__(self):
        self.data = b""

    def settimeout(self, _t):
        pass

    def sendall(self, data: bytes):
        self.data += data


def wire_of(env: bytes) -> bytes:
    sent = _Sent()
    IdentityChannel(sent).send_identity(env)  # type: ignore[arg-type]
    return sent.data


def guest_plan(keys: list[str]) -> m.GuestPlan:
    return m.GuestPlan(name="vt-7-n1-0", node="n1", index=0, image="tiny", image_digest="a" * 64, vcpus=1,
                       ram_mib=192, cores=None, owner=m.Owner(user="alice", uid=1001, gid=1001),
                       ssh_authorized_keys=keys)


def test_the_guest_reads_every_value_of_its_identity_as_the_host_wrote_it(tmp_path):
    keys = ["ssh-ed25519 AAAAC3Nza alice@login", "ssh-rsa AAAAB3Nza with 'quotes' and $(not run) `nor this`"]
    peers = [m.GuestPeer(name=f"vt-7-n{i}-0", index=i - 1, node=f"n{i}", vcpus=2, address=f"10.77.0.{i}")
             for i in (1, 2)]
    network = m.JobNetwork(vni=4242, prefix=24, endpoints={"n1": "192.0.2.1", "n2": "192.0.2.2"})
    seed = seed_files(guest_plan(keys), "7.head", peers, network, "52:54:00:00:00:01")
    env = warm_boot.identity_env(seed, clock=1_700_000_000)
    got = run_guest_side(tmp_path, wire_of(env) + b"IDENTITY 1\nVT_USER=mallory\n")  # what follows is not read
    assert got["VT_USER"] == "alice" and got["VT_UID"] == "1001" and got["VT_HOSTNAME"] == "vt-7-n1-0"
    assert got["VT_SSH_AUTHORIZED_KEYS"] == "\n".join(keys)  # several lines, quotes, nothing expanded
    assert "vt-7-n2-0" in got["VT_HOSTS"] and got["VT_HOSTS"].count("\n") >= 2
    assert got["VT_NODEFILE"].splitlines() == ["vt-7-n1-0", "vt-7-n1-0", "vt-7-n2-0", "vt-7-n2-0"]
    assert got["date"] == "-u -s @1700000000"  # the host's clock
    assert got["VT_RANDOM"] == "" and got["VT_WARM"] == ""  # mixed into /dev/urandom, then forgotten


@pytest.mark.parametrize("wire", [b"IDENTITY\nVT_USER=x\n", b"IDENTITY 3x\n", b"IDENTITY 2\nVT_USER=x\n"])
def test_a_malformed_identity_fails_the_guest(tmp_path, wire):
    port = tmp_path / "port"
    os.mkfifo(port)
    script = "\n".join(['say() { :; }', 'fail() { echo "FAILED $1"; exit 3; }', 'pause_s() { :; }',
                        guest_function("wait_identity"), 'wait_identity "$1"', 'echo "TAKEN $VT_USER"'])
    proc = subprocess.Popen([BUSYBOX, "sh", "-c", script, "guest", str(port)], stdout=subprocess.PIPE)
    with open(port, "wb") as fifo:
        fifo.write(wire)
        fifo.flush()
        time.sleep(0.3)
    try:  # the short one: the guest waits for its last line, and fails when its port gives no more
        out, _ = proc.communicate(timeout=2)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        assert b"TAKEN" not in out  # still waiting for the lines it was told of: nothing taken
        return
    assert proc.returncode == 3 and out.startswith(b"FAILED bad-identity"), out


def test_the_wire_counts_the_lines_it_carries():
    assert wire_of(b"A=1\nB='two\nlines'\n") == b"IDENTITY 3\nA=1\nB='two\nlines'\n"
    assert wire_of(b"A=1") == b"IDENTITY 1\nA=1\n"  # the last line ended, so the guest's read takes it


def _banner_server(path: Path, delay: float, accepted: list[float]) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)

    def serve():
        start = time.monotonic()
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(time.monotonic())
            # As the guest's link does: a connection to sshd handed over (SCM_RIGHTS), sshd's banner on it.
            ours, theirs = socket.socketpair()
            socket.send_fds(conn, [b"x"], [theirs.fileno()])
            theirs.close()
            if time.monotonic() - start >= delay:
                ours.sendall(b"SSH-2.0-dropbear\r\n")
            ours.close()
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return server


def test_the_early_banner_is_seen_once_sshd_answers_and_then_asked_no_more(tmp_path):
    accepted: list[float] = []
    server = _banner_server(tmp_path / "ssh.sock", 0.3, accepted)
    try:
        banner = EarlyBanner(tmp_path / "ssh.sock", time.monotonic() + 10, poll=0.02)
        until = time.monotonic() + 5
        while not banner.seen() and time.monotonic() < until:
            time.sleep(0.01)
        assert banner.seen()
        asked = len(accepted)
        time.sleep(0.2)
        assert len(accepted) == asked  # seen once: no more connections
    finally:
        server.close()


def test_a_closed_early_banner_stops_asking(tmp_path):
    accepted: list[float] = []
    server = _banner_server(tmp_path / "ssh.sock", 3600, accepted)  # never answers with a banner
    try:
        banner = EarlyBanner(tmp_path / "ssh.sock", time.monotonic() + 60, poll=0.02)
        time.sleep(0.2)
        banner.close()
        banner._thread.join(timeout=3)
        assert not banner._thread.is_alive() and not banner.seen()
    finally:
        server.close()


def test_ready_with_the_banner_seen_needs_only_the_console_marker(tmp_path):
    accepted: list[float] = []
    server = _banner_server(tmp_path / "ssh.sock", 0, accepted)
    console = tmp_path / "console.log"
    console.write_bytes(b"booting\n" + GUEST_READY + b" uptime=1.0 restored=1\n")
    try:
        banner = EarlyBanner(tmp_path / "ssh.sock", time.monotonic() + 10, poll=0.02)
        until = time.monotonic() + 5
        while not banner.seen() and time.monotonic() < until:
            time.sleep(0.01)
        asked = len(accepted)
        wait_ready(console, tmp_path / "ssh.sock", lambda: True, time.monotonic() + 5, banner=banner)
        assert banner.seen() and len(accepted) == asked  # no second connection to sshd
    finally:
        server.close()
