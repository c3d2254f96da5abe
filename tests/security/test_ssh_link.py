"""Finding 10: "holding the 1,000 loopback ports of the guests' ssh range stops every VM job on the node".

A guest's sshd is no longer forwarded to a host port: it is reached through its link process
(services/node_worker/guest_link.py) over a unix socket only root and the job's owner may use. Here a real
unprivileged account holds every port of the old range (and listens on them, as a fake sshd would) while
another user's job boots a real guest; the owner's own ssh (as the launcher makes it) runs in the guest, and
the attacker can neither open the owner's socket nor, with its mode widened by root, get a connection through
it. Boots a guest: run under `flock /tmp/vtorque-e2e.lock`."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vtorque.cli.launcher_ssh import ssh_argv
from vtorque.services.node_worker import guest_link
from vtorque.shared import messages as m

from .conftest import make_site

pytestmark = [pytest.mark.slow, pytest.mark.guest]

OLD_RANGE = range(22000, 23000)  # [node] ssh_port_min/max of the port design

HOLD = textwrap.dedent(f"""
    import resource, socket, sys, time
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    held = []
    for port in range({OLD_RANGE.start}, {OLD_RANGE.stop}):
        s = socket.socket()
        try:
            s.bind(("0.0.0.0", port))  # the wildcard: 127.0.0.1:port cannot be bound by anyone else either
            s.listen()
        except OSError:
            s.close()
            continue
        held.append(s)
    print(len(held), flush=True)
    time.sleep(600)
""")


@pytest.fixture
def guest_site(base_image, test_guest):
    s = make_site(base_image, entry=test_guest, boot_timeout=150.0)
    yield s
    for name in s.domains():
        s.worker.hv.remove(name)
    shutil.rmtree(s.root, ignore_errors=True)


@pytest.fixture
def ports_held(users):
    attacker, _ = users
    proc = subprocess.Popen([sys.executable, "-c", HOLD], user=attacker.uid, group=attacker.gid, extra_groups=[],
                            stdout=subprocess.PIPE, text=True)
    try:
        held = int(proc.stdout.readline())
        # Every port of the range that no one else had already (the single-host stack's own guests may hold some).
        free = []
        for port in OLD_RANGE:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                    free.append(port)
                except OSError:
                    pass
        assert held >= 900 and free == [], (held, free[:5])
        yield held
    finally:
        proc.kill()
        proc.wait()


def test_a_guest_boots_and_only_its_owner_gets_in_while_a_user_holds_every_old_port(guest_site, users, ports_held,
                                                                                    tmp_path):
    site = guest_site
    attacker, victim = users
    key = victim.home / "job_key"
    assert victim.run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)).returncode == 0
    j = "4343.sec"
    plan = site.plan(victim, j, vcpus=1, ram_mib=192, ssh_authorized_keys=[key.with_suffix(".pub").read_text().strip()])
    try:
        answers = site.boot(j, plan)
        assert len(answers) == 1 and isinstance(answers[0], m.GuestReady), answers
        sock = Path(answers[0].address)
        gdir = Path(site.config.node.guest_dir) / plan.name
        assert sock == gdir / guest_link.SSH_SOCKET and answers[0].ssh_port == 0
        assert (sock.stat().st_uid, sock.stat().st_mode & 0o777) == (victim.uid, 0o600)
        assert not (gdir / guest_link.LINK_SOCKET).exists()  # QEMU's end: taken by QEMU, gone from the tree

        # The owner's job, as the launcher runs it: her own uid in the guest.
        run = victim.run(*ssh_argv(key, sock, victim.name, "id -u"))
        assert (run.returncode, run.stdout.strip()) == (0, str(victim.uid)), run.stderr

        # The attacker cannot open the owner's socket...
        probe = f"from vtorque.shared.guest_ssh import connect; connect({str(sock)!r})"
        denied = attacker.run(sys.executable, "-c", probe)
        assert denied.returncode != 0 and "PermissionError" in denied.stderr, denied.stderr
        # ...and with its mode widened, the link itself refuses anyone but root and the owner.
        sock.chmod(0o666)
        refused = attacker.run(sys.executable, "-c", probe)
        assert refused.returncode != 0 and "ConnectionRefusedError" in refused.stderr, refused.stderr
        sock.chmod(0o600)
        again = victim.run(*ssh_argv(key, sock, victim.name, "echo still-in"))
        assert again.stdout.strip() == "still-in", again.stderr
    finally:
        site.worker.on_teardown_guests(m.TeardownGuests.new(job_id=j, deadline=60.0, node=site.node))
        for thread in site.worker.teardown_threads:  # the files follow the answer, in their own thread
            thread.join(60)
    assert not (Path(site.config.node.guest_dir) / plan.name).exists()
    # The link process went with its guest (it sees QEMU's end close).
    deadline = time.monotonic() + 10
    while (ps := subprocess.run(["pgrep", "-f", f"guest_link {site.config.node.guest_dir}/{plan.name} "],
                                capture_output=True, text=True)).stdout.strip() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ps.stdout.strip() == ""
