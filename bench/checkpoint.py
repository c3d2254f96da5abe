#!/opt/vtorque/venv/bin/python
"""Checkpoint size and time vs guest RAM (issue 14 item 6): a requeued job's guest checkpointed at its teardown
(all its guests paused, each saved with virDomainSave, its overlay copied, its record written and synced:
services/node_worker/checkpoint.py) and the requeued job's boot restored from it (the saved memory copied with
this boot's XML in its header, the overlay copied and rebased, restored, its clock set, until its sshd answers),
side by side with the same guest's cold boot, for guests of 256, 512 and 1024 MiB; and how long a periodic
checkpoint (`checkpoint=<interval>`) stops the guest (pause, save, disk copy, record, restore in place, resume;
the clock set after it runs again is not counted).

The node worker is the real one (its teardown's checkpoint step `Checkpoints.at_teardown` and its BootGuests
handler, real libvirt, the tiny test guest booted cold first), with the scheduler a stand-in that says the job
was requeued (Restarts 0 -> 1), so the figures are the node's own. Before the checkpoint the guest's owner writes
RAM/4 MiB of random bytes to a file in the guest's /tmp (a tmpfs: memory) and RAM/8 MiB to one in its home (its
disk, and its page cache; as much as the test guest's small root file system takes, ~100 MB): what an
application's data costs (an idle guest's memory is mostly zero pages, which the save stream skips); after the
restore both files are checked whole. Each round runs every RAM size, the order turned every round; every job is
torn down before the next.

Usage (root; it boots real guests, so take the e2e lock on a shared machine):
    flock /tmp/vtorque-e2e.lock bench/checkpoint.py [--rounds 3] [--ram 256,512,1024]
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
sys.path.insert(0, str(ROOT / "bench"))

from e2e.test_checkpoint_requeue import _in_guest, _key  # noqa: E402
from security.conftest import _useradd, make_site  # noqa: E402
from suspend_resume import test_guest  # noqa: E402

from vtorque.services.node_worker import suspend  # noqa: E402
from vtorque.shared import messages as m  # noqa: E402
from vtorque.shared.scheduler import JobInfo  # noqa: E402


class StandInScheduler:
    kind = "slurm"

    def __init__(self, job_id: str):
        self.info = JobInfo(job_id=job_id, state="running", raw_state="RUNNING", restarts=0)

    def job(self, job_id: str) -> JobInfo:
        return self.info


def one_job(entry, owner, ram: int) -> dict[str, float]:
    site = make_site(None, entry=entry, boot_timeout=300.0)
    site.config.spec.max_ram = "4G"
    job = str(uuid.uuid4().int % 100000)
    scheduler = StandInScheduler(job)
    site.worker.scheduler = scheduler
    try:
        key = _key(owner)
        guest = site.plan(owner, job, vcpus=1, ram_mib=ram, checkpoint=0,
                          ssh_authorized_keys=[key.with_suffix(".pub").read_text().strip()])
        (cold,) = site.boot(job, guest)
        assert isinstance(cold, m.GuestReady), cold
        _in_guest(owner, key, cold.address, f"dd if=/dev/urandom of=/tmp/data bs=1M count={ram // 4} 2>/dev/null; "
                  f"dd if=/dev/urandom of=$HOME/data bs=1M count={ram // 8} 2>/dev/null; sync")
        # As much as the disk took (the test guest's root file system is small); checked whole after the restore.
        written = _in_guest(owner, key, cold.address, "wc -c < /tmp/data; wc -c < $HOME/data; df -k /").split()
        # A periodic checkpoint (checkpoint=<interval>): the guest stops for the save and the restore in place; its
        # clock is set after it runs again (on the host's next whole second), so that wait is not downtime.
        clocked = []
        real_clock = suspend.set_clock

        def timed_clock(worker, name):
            t = time.monotonic()
            try:
                return real_clock(worker, name)
            finally:
                clocked.append(time.monotonic() - t)

        suspend.set_clock = timed_clock
        try:
            t0 = time.monotonic()
            assert not site.worker.checkpoints.take(job, "p1", site.worker.checkpoints._guests_of(job), resume=True)
            periodic = time.monotonic() - t0 - sum(clocked)
        finally:
            suspend.set_clock = real_clock
        assert site.worker.hv.is_active(guest.name)
        assert _in_guest(owner, key, cold.address, "wc -c < /tmp/data").split() == written[:1]  # running on
        scheduler.info = JobInfo(job_id=job, state="exiting", raw_state="COMPLETING", restarts=1)  # requeued
        t0 = time.monotonic()
        failed = site.worker.checkpoints.at_teardown(job)
        took = time.monotonic() - t0
        assert not failed, failed
        site.worker.teardown_job(job)
        (part,) = site.worker.checkpoints.epochs(job)["r1"]
        scheduler.info = JobInfo(job_id=job, state="running", raw_state="RUNNING", restarts=1)
        (again,) = site.boot(job, guest)
        assert isinstance(again, m.GuestReady), again
        assert again.timings.kernel_up is None, "booted cold, not restored"  # a restore has no kernel boot
        back = _in_guest(owner, key, again.address, "wc -c < /tmp/data; wc -c < $HOME/data; df -k /").split()
        assert back[:2] == written[:2], (written, back)
        scheduler.info = JobInfo(job_id=job, state="completed", raw_state="COMPLETED", restarts=1)
        site.worker.teardown_job(job)
        site.worker.checkpoints.at_teardown(job)  # no guest left: the job ended, its checkpoint goes
        return {"data_mem_mb": int(written[0]) / 1e6, "data_disk_mb": int(written[1]) / 1e6,
                "memory_mb": part.save_size / 1e6, "disk_mb": part.disk_size / 1e6, "checkpoint": took,
                "periodic_down": periodic,
                "restore": again.timings.ready, "cold": cold.timings.ready}
    finally:
        site.worker.teardown_job(job)
        for thread in site.worker.teardown_threads:
            thread.join(60)
        shutil.rmtree(site.root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ram", default="256,512,1024", help="guest RAM sizes (MiB), comma-separated")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/checkpoint.py must run as root (it boots guests, as the node worker does)")
    sizes = [int(r) for r in args.ram.split(",")]
    entry = test_guest()
    owner = _useradd(f"vtbench{uuid.uuid4().hex[:6]}")
    load = [os.getloadavg()[0]]
    results: dict[int, list[dict[str, float]]] = {r: [] for r in sizes}
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    try:
        for n in range(args.rounds):
            for ram in (sizes if n % 2 == 0 else list(reversed(sizes))):
                got = one_job(entry, owner, ram)
                results[ram].append(got)
                load.append(os.getloadavg()[0])
                print(f"round {n + 1} {ram} MiB: " + ", ".join(f"{k} {v:.2f}" for k, v in got.items()), flush=True)
    finally:
        subprocess.run(["userdel", "-r", owner.name], capture_output=True)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"\nRun of {started}–{time.strftime('%H:%M:%S', time.gmtime())} UTC, commit {commit}; 1 vCPU, the tiny "
          f"test guest (TCG), RAM/4 of data in the guest's memory and RAM/8 on its disk (at most what it takes) "
          f"first; {args.rounds} rounds; load average {min(load):.1f}-{max(load):.1f}")
    print("| guest RAM | data in memory / on disk | memory saved (median; rounds) | overlay copied | "
          "checkpoint at teardown | restore → sshd answers | cold boot → ready | periodic checkpoint: guest stopped |")
    print("|---|---|---|---|---|---|---|---|")
    for ram, rows in results.items():
        cells = [f"{statistics.median(r['data_mem_mb'] for r in rows):.0f} / "
                 f"{statistics.median(r['data_disk_mb'] for r in rows):.0f} MB"]
        for key, unit in (("memory_mb", " MB"), ("disk_mb", " MB"), ("checkpoint", " s"), ("restore", " s"),
                          ("cold", " s"), ("periodic_down", " s")):
            values = [row[key] for row in rows]
            fmt = ".0f" if unit == " MB" else ".2f"
            cells.append(f"{statistics.median(values):{fmt}}{unit} ({', '.join(f'{v:{fmt}}' for v in values)})")
        print(f"| {ram} MiB | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
