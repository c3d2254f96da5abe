#!/opt/vtorque/venv/bin/python
"""Suspend and resume latency (issue 14 item 6): `vtorque suspend JOBID` → the job's guest paused (pause mode) or
saved to disk and its QEMU gone (save mode); `vtorque resume JOBID` → the guest running again and its program
advancing (the next line of a counter it prints over the owner's ssh), side by side in one run.

The node worker is the real one (services/node_worker/suspend.py through its reconciler, real libvirt, the tiny
test guest booted cold), with its reconciler on a `--period` s timer, so a request waits up to one period for the
next round: the table gives the whole latency and, apart, the node worker's own part (the libvirt call, the save
or restore, the clock over the host channel). The scheduler is Torque's contract stand-ins (qstat -f showing
job_state S once `qsig -s suspend`: tests/integration/torque_replay.py), so `vtorque suspend` is the real CLI
and the scheduler's own latency is a shell script's (a real scheduler adds its round trip, not measured here:
tests/e2e/test_suspend_resume.py checks the same path on a real Slurm, within one reconcile period). Each round
runs a pause-mode job and a save-mode job, their order turned every round; every job is torn down before the
next.

Usage (root; it boots real guests, so take the e2e lock on a shared machine):
    flock /tmp/vtorque-e2e.lock bench/suspend_resume.py [--rounds 3] [--period 1] [--ram 192]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import libvirt  # noqa: E402
from e2e.test_suspend_resume import Counter, _key, torque_node_of  # noqa: E402
from security.conftest import _useradd, make_site  # noqa: E402

from vtorque.services.node_worker import suspend  # noqa: E402
from vtorque.shared import messages as m  # noqa: E402
from vtorque.shared.config import ImageEntry  # noqa: E402

GUEST_DIR = Path("/var/cache/vtorque/testguest")


def test_guest() -> ImageEntry:
    run = subprocess.run([str(ROOT / "tests/guest/build.sh"), str(GUEST_DIR)], capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"tests/guest/build.sh failed: {run.stderr[-2000:]}")
    sums = dict(reversed(line.split()) for line in (GUEST_DIR / "SHA256SUMS").read_text().splitlines())
    return ImageEntry(source=str(GUEST_DIR / "rootfs.qcow2"), sha256=sums["rootfs.qcow2"], format="qcow2",
                      kernel=str(GUEST_DIR / "vmlinux"), initrd=str(GUEST_DIR / "initrd.img"))


def one_job(entry: ImageEntry, owner, mode: str, period: float, ram: int) -> dict[str, float]:
    site = make_site(None, entry=entry, boot_timeout=150.0)
    node = torque_node_of(site, owner, mode)
    job = node.torque_job  # type: ignore[attr-defined]
    node.reconciler.interval = period
    acted: dict[str, float] = {}  # the node worker's whole action, and the clock's part of it
    suspender = site.worker.suspender
    real_apply, real_clock = suspender._apply, suspender.set_clock

    def timed_apply(what, *args):
        t0 = time.monotonic()
        real_apply(what, *args)
        acted[what] = time.monotonic() - t0

    def timed_clock(name):
        t0 = time.monotonic()
        said = real_clock(name)
        acted["clock"] = time.monotonic() - t0
        assert said == "set", said
        return said

    suspender._apply = timed_apply  # type: ignore[method-assign]
    suspender.set_clock = timed_clock  # type: ignore[method-assign]
    counter = None
    try:
        key = _key(owner)
        guest = site.plan(owner, job, vcpus=1, ram_mib=ram,
                          ssh_authorized_keys=[key.with_suffix(".pub").read_text().strip()])
        (ready,) = site.boot(job, guest)
        assert isinstance(ready, m.GuestReady), ready
        node.reconciler.start()
        counter = Counter(owner, key, Path(ready.address))
        counter.wait_count(3)
        asked = time.monotonic()
        assert node.vtorque("suspend", job).returncode == 0
        gone = libvirt.VIR_DOMAIN_PAUSED if mode == "pause" else libvirt.VIR_DOMAIN_SHUTOFF
        node.wait_state(guest.name, gone, 10 * period + 60)
        suspended = time.monotonic() - asked
        time.sleep(2.0)
        count = counter.lines[-1][1]
        asked = time.monotonic()
        assert node.vtorque("resume", job).returncode == 0
        node.wait_state(guest.name, libvirt.VIR_DOMAIN_RUNNING, 10 * period + 60)
        running = time.monotonic() - asked
        counter.wait_count(count)
        advancing = time.monotonic() - asked
        back = "resume" if mode == "pause" else "restore"
        deadline = time.monotonic() + 30
        while back not in acted:  # its clock is set after the guest runs again: the action ends after that
            assert time.monotonic() < deadline, acted
            time.sleep(0.05)
        return {"suspend": suspended, "suspend_node": acted[mode], "resume": running, "advancing": advancing,
                "resume_node": acted[back] - acted["clock"], "clock": acted["clock"]}
    finally:
        if counter is not None:
            counter.stop()
        node.stop.set()
        if node.reconciler.thread.is_alive():
            node.reconciler.thread.join(30)
        site.worker.teardown_job(job)
        shutil.rmtree(site.root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--period", type=float, default=1.0, help="the reconcile period (s)")
    parser.add_argument("--ram", type=int, default=192, help="the guest's RAM (MiB)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/suspend_resume.py must run as root (it boots guests, as the node worker does)")
    entry = test_guest()
    owner = _useradd(f"vtbench{uuid.uuid4().hex[:6]}")
    load = [os.getloadavg()[0]]
    results: dict[str, list[dict[str, float]]] = {"pause": [], "save": []}
    try:
        for r in range(args.rounds):
            for mode in (("pause", "save") if r % 2 == 0 else ("save", "pause")):
                got = one_job(entry, owner, mode, args.period, args.ram)
                results[mode].append(got)
                load.append(os.getloadavg()[0])
                print(f"round {r + 1} {mode}: " + ", ".join(f"{k} {v:.3f}s" for k, v in got.items()), flush=True)
    finally:
        subprocess.run(["userdel", "-r", owner.name], capture_output=True)
    print(f"\n1 vCPU, {args.ram} MiB, the tiny test guest, reconcile period {args.period:g} s, "
          f"{args.rounds} rounds interleaved; load average {min(load):.1f}-{max(load):.1f}; "
          f"suspend module {Path(suspend.__file__).name}")
    print("| mode | request → suspended (median; rounds) | node worker's libvirt call | request → running | "
          "→ program advancing | node worker's libvirt call | clock set (on the whole second) |")
    print("|---|---|---|---|---|---|---|")
    for mode, rows in results.items():
        cells = []
        for key in ("suspend", "suspend_node", "resume", "advancing", "resume_node", "clock"):
            values = [row[key] for row in rows]
            cells.append(f"{statistics.median(values):.2f} s ({', '.join(f'{v:.2f}' for v in values)})")
        print(f"| {mode} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
