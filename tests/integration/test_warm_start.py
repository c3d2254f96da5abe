"""Warm start with real libvirt + QEMU (TCG) and the real RabbitMQ, on a site of the test's own: a warm image of the
test guest is made, two jobs of two owners get their guests by restore from that one image, and they share
nothing (ssh host keys, random state, owner, files); a job of two guests gets its job network hot-plugged; the
restored guests go at teardown and by reconciliation as cold ones do."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from vtorque.cli.launcher_ssh import ssh_argv
from vtorque.services.node_worker import warm
from vtorque.services.node_worker.reconcile import Reconciler
from vtorque.shared import messages as m
from vtorque.shared.bus import EventWaiter, Publisher
from vtorque.shared.job_boot import hoist
from vtorque.shared.job_network import guest_address, job_network

from .guests import expect, node_worker

pytestmark = [pytest.mark.slow, pytest.mark.guest]
VCPUS, RAM_MIB = 1, 192


@pytest.fixture
def worker(test_site, test_guest):
    test_site.catalog = {"tiny": test_guest}
    with node_worker(test_site, "ws-") as started:
        yield started


@pytest.fixture
def owners():
    """Two job owners on the host, as a scheduler's users would be; removed afterwards."""
    names = [f"vtw{uuid.uuid4().hex[:6]}{s}" for s in "ab"]
    made = []
    try:
        for name in names:
            subprocess.run(["useradd", "-M", "-U", "-s", "/bin/sh", name], check=True, capture_output=True, timeout=30)
            made.append(name)
        yield [owner_of(name) for name in names]
    finally:
        for name in made:
            subprocess.run(["userdel", name], capture_output=True, timeout=30)
            subprocess.run(["groupdel", name], capture_output=True, timeout=30)


def owner_of(name: str) -> m.Owner:
    import pwd

    entry = pwd.getpwnam(name)
    return m.Owner(user=name, uid=entry.pw_uid, gid=entry.pw_gid)


def keypair(directory: Path, name: str) -> Path:
    key = directory / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


def plans(config, job: str, owner: m.Owner, key: Path, count: int = 1) -> list[m.GuestPlan]:
    entry = config.images.catalog["tiny"]
    node = config.node.name
    return [m.GuestPlan(name=m.domain_name(job, node, i), node=node, index=i, image="tiny",
                        image_digest=entry.sha256, vcpus=VCPUS, ram_mib=RAM_MIB, cores=None, owner=owner,
                        ssh_authorized_keys=[key.with_suffix(".pub").read_text().strip()]) for i in range(count)]


def ssh(key: Path, ready: m.GuestReady, user: str, command: str, known_hosts: Path | None = None):
    argv = ssh_argv(key, ready.address, user, command)
    if known_hosts is not None:  # the first value of an option wins: these before ssh_argv's own
        argv[1:1] = ["-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=accept-new"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def console(config, guest: str) -> str:
    return (Path(config.node.guest_dir) / guest / "console.log").read_text(errors="replace")


def test_two_jobs_restored_from_one_warm_image_share_nothing(broker_url, worker, owners, tmp_path):
    config, svc = worker
    made = warm.build(config, svc.hv, svc.store, "tiny", VCPUS, RAM_MIB, svc.domain_type)
    # Root's alone: the directory 0700, its files 0600, and nothing of a user's in it.
    for path in (made.dir, warm.root_of(config)):
        st = os.lstat(path)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)
    for path in made.dir.iterdir():
        st = os.lstat(path)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600), path
    assert made.digest == config.images.catalog["tiny"].sha256
    # Its build guest is gone: only the saved file remains of it.
    assert not any(n.startswith(warm.WARM_GUEST_PREFIX) for n in svc.hv.vtorque_domains())
    assert svc.hv.lookup(warm.WARM_GUEST_PREFIX + made.key[:16]) is None

    alice, bob = owners
    key_a, key_b = keypair(tmp_path, "a"), keypair(tmp_path, "b")
    job_a, job_b = f"ws-{uuid.uuid4().hex[:6]}", f"ws-{uuid.uuid4().hex[:6]}"
    guests_a = plans(config, job_a, alice, key_a)
    guests_b = plans(config, job_b, bob, key_b, count=2)
    network_b = job_network(job_b, {config.node.name: config.node.job_network_localaddr})
    waiter = EventWaiter(broker_url, [f"job.{job_a}.#", f"job.{job_b}.#"])
    publisher = Publisher(broker_url)
    try:
        publisher.publish(hoist(job_a, 300.0, guests_a))
        publisher.publish(hoist(job_b, 300.0, guests_b, network=network_b))
        ready = {}
        while len(ready) < 3:
            event = expect(waiter, m.GuestReady)
            ready[event.guest] = event
        ra, rb0, rb1 = ready[guests_a[0].name], ready[guests_b[0].name], ready[guests_b[1].name]
        for event in ready.values():
            # Restored, not booted: the guest said so, and no kernel came up.
            assert "VTORQUE-GUEST-READY" in console(config, event.guest)
            assert "restored=1" in console(config, event.guest), console(config, event.guest)
            assert event.timings.kernel_up is None
        # Each guest's files are its own directory's (the save file's paths moved), the copy of the save gone.
        for event in ready.values():
            gdir = Path(config.node.guest_dir) / event.guest
            assert event.address == str(gdir / "ssh.sock")
            # Handed to its owner once it held its identity (root's until then: guest_link.hand_over).
            assert os.lstat(event.address).st_uid == (alice if event.job_id == job_a else bob).uid
            assert not (gdir / "restore.save").exists()
            sock = os.lstat(gdir / "identity.sock")
            assert (sock.st_uid, stat.S_IMODE(sock.st_mode)) == (0, 0o600)  # the channel: root's alone

        check_two_jobs_share_nothing(tmp_path, (key_a, ra, alice, guests_a[0].name),
                                     (key_b, rb0, bob, guests_b[0].name))
        # The two-guest job: its job network NIC was hot-plugged into each restored guest; they reach each other.
        # (ping needs root in the guest: the other guest's sshd, by name and by address, answers instead.)
        names = ssh(key_b, rb1, bob.user, f"cat /etc/vtorque/nodefile; for h in {guests_b[0].name} "
                                         f"{guest_address(0)}; do nc -w 5 $h 22 </dev/null | head -c 4; echo; done")
        assert names.returncode == 0, names.stdout + names.stderr
        assert names.stdout.split() == [guests_b[0].name, guests_b[1].name, "SSH-", "SSH-"], names.stdout

        # Teardown removes a restored guest as a cold one: domain, directory, job file.
        publisher.publish(m.TeardownGuests.new(job_id=job_a, deadline=60.0, node=config.node.name))
        gone = expect(waiter, m.GuestsTornDown, timeout=60)
        assert gone.guests == [guests_a[0].name]
        # The answer comes once the domains are stopped; the undefine and the files follow right after it.
        gdir_a = Path(config.node.guest_dir) / guests_a[0].name

        def left() -> bool:
            return gdir_a.exists() or config.job_dir(job_a).exists() or svc.hv.lookup(guests_a[0].name) is not None

        until = time.monotonic() + 30
        while left() and time.monotonic() < until:
            time.sleep(0.1)
        assert not left()
        assert not svc.hv.active_names() & {guests_a[0].name}
        # And reconciliation: job B no longer running, its restored guests removed.
        reconciler = Reconciler(svc, None, 0, lambda job: job != job_b)
        removed = reconciler.run_once()
        assert sorted(r.name for r in removed) == sorted(g.name for g in guests_b)
        for guest in guests_b:
            assert svc.hv.lookup(guest.name) is None
            assert not (Path(config.node.guest_dir) / guest.name).exists()
        reconciler.run_once()  # a second round: the job's network, unused twice in a row, goes too
        # The warm image is still there, for the next job.
        assert warm.find(config, svc.store, made.digest, made.key) is not None
    finally:
        waiter.close()
        publisher.close()


def test_a_warm_image_that_does_not_restore_falls_back_to_a_cold_boot(broker_url, worker, owners, tmp_path):
    config, svc = worker
    made = warm.build(config, svc.hv, svc.store, "tiny", VCPUS, RAM_MIB, svc.domain_type)
    made.save.write_bytes(made.save.read_bytes()[:100_000])  # cut short: libvirt cannot restore it
    with one_guest_job(broker_url, config, owners[0], tmp_path, "ws") as (plan, ready):
        assert ready.timings.kernel_up is not None  # booted: its kernel came up
        assert "restored=1" not in console(config, plan.name)


@contextlib.contextmanager
def one_guest_job(broker_url, config, owner, tmp_path, prefix: str):
    """A one-guest job of `owner` booted through the broker: (its plan, its GuestReady) for the test to look at;
    then its owner's ssh runs in it as the owner, and its teardown removes exactly its guest."""
    key = keypair(tmp_path, "a")
    job = f"{prefix}-{uuid.uuid4().hex[:6]}"
    [plan] = plans(config, job, owner, key)
    waiter = EventWaiter(broker_url, [f"job.{job}.#"])
    publisher = Publisher(broker_url)
    try:
        publisher.publish(hoist(job, 300.0, [plan]))
        ready = expect(waiter, m.GuestReady)
        yield plan, ready
        run = ssh(key, ready, owner.user, "id -un")
        assert run.returncode == 0 and run.stdout.strip() == owner.user, run.stderr
        publisher.publish(m.TeardownGuests.new(job_id=job, deadline=60.0, node=config.node.name))
        assert expect(waiter, m.GuestsTornDown, timeout=60).guests == [plan.name]
    finally:
        waiter.close()
        publisher.close()


def check_two_jobs_share_nothing(tmp_path, job_a: tuple, job_b: tuple) -> None:
    """Two jobs' guests made from one saved image (a warm restore, a pooled guest), each (job key, GuestReady,
    owner, guest name): each its own owner, uid, gid and hostname, its clock set, its random state and ssh host
    key its own, and nothing of the first job (a file, a user, a key that logs in) in the second."""
    (key_a, ra, alice, name_a), (key_b, rb, bob, name_b) = job_a, job_b
    probe = ("id -un; id -u; id -g; hostname; date +%s; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; "
             "echo; cat /proc/sys/kernel/random/boot_id")
    out_a = ssh(key_a, ra, alice.user, probe + "; echo secret-a > $HOME/secret; echo secret-a > /tmp/secret-a",
                tmp_path / "known_a")
    out_b = ssh(key_b, rb, bob.user, probe, tmp_path / "known_b")
    assert out_a.returncode == 0, out_a.stderr
    assert out_b.returncode == 0, out_b.stderr
    a, b = out_a.stdout.split(), out_b.stdout.split()
    assert a[:4] == [alice.user, str(alice.uid), str(alice.gid), name_a]
    assert b[:4] == [bob.user, str(bob.uid), str(bob.gid), name_b]
    now = time.time()  # the clock set at the restore or the claim (the save was earlier)
    assert abs(int(a[4]) - now) < 60 and abs(int(b[4]) - now) < 60
    assert a[5] != b[5] and len(a[5]) == 64  # reseeded: the saved CRNG state is the same in every copy
    host_a = (tmp_path / "known_a").read_text().split()[1:]  # host keys made after the identity
    host_b = (tmp_path / "known_b").read_text().split()[1:]
    assert host_a and host_b and host_a != host_b
    # The first job's files by their names (a pattern would find the guest's own, Python's secrets.py).
    seen = ssh(key_b, rb, bob.user, f"ls -A /home; echo --; ls -A /tmp; echo --; grep -c {alice.user} "
                                    "/etc/passwd; echo --; find / -xdev \\( -name secret -o -name secret-a \\) "
                                    "2>/dev/null")
    home, tmp, users, found = [part.split() for part in seen.stdout.split("--")]
    assert home == [bob.user] and "secret-a" not in tmp and users == ["0"] and found == [], seen.stdout
    assert ssh(key_a, rb, alice.user, "true").returncode != 0
    assert ssh(key_a, rb, bob.user, "true").returncode != 0
    assert ssh(key_b, ra, alice.user, "true").returncode != 0
