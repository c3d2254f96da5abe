#!/opt/vtorque/venv/bin/python
"""Live migration's total time and downtime (issue 14 item 6): the tiny test guest moved between two rig hosts
(deploy/rig/rig.sh: two libvirtds in their own namespaces, TLS, peer to peer, the overlay by NBD), idle and under
a memory-writing load in the guest, side by side in one run.

A 2-host VM job (one guest on c1 and one on c2) is submitted through the rig's Slurm with vsub; its guest on c2
is moved to c1 and back (`vtorque migrate JOB --from c2 --to c1 --guest G`, then `--from c1 --to c2`), each move
one sample of the whole `vtorque migrate` (CLI to answer), libvirt's own time (from the copy's start to the guest
running on the target) and the downtime libvirt's completed job statistics give, with the pre-copy rounds. Then
the same with a load in the guest: `dd` writing 64 MiB of its tmpfs over and over (the pages it dirties are sent
again in the next round). The idle and loaded rounds alternate, so both see the same machine.

Usage (root; it starts the rig and boots guests: take the e2e lock on a shared machine, with no rig up):
    flock /tmp/vtorque-e2e.lock bench/migrate.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from e2e.rig_support import cancel_unfinished  # noqa: E402
from e2e.test_rig import RIG_DIR, on, rig, rig_netns  # noqa: E402
from e2e.test_rig_migrate import MigrateJob, in_guest, job_key  # noqa: E402

LOAD_S = 20  # the load's own end (a guest whose one vCPU writes memory flat out answers ssh only slowly)
LOAD = (f"trap '' HUP; (end=$(($(date +%s)+{LOAD_S})); while [ $(date +%s) -lt $end ]; do "
        "dd if=/dev/zero of=/dev/shm/vt-load bs=1M count=64 2>/dev/null; done; rm -f /dev/shm/vt-load) "
        "</dev/null >/dev/null 2>&1 &")
LINE = re.compile(r": (c\d) -> (c\d) in ([0-9.]+)s, downtime (\d+) ms, (\d+) pre-copy rounds")


def move(job_id: str, guest: str, source: str, target: str) -> dict:
    t0 = time.monotonic()
    out = on("head", "vtorque", "migrate", job_id, "--from", source, "--to", target, "--guest", guest, timeout=400)
    whole = time.monotonic() - t0
    found = LINE.search(out.stdout)
    if not found:
        raise SystemExit(f"no migration line in: {out.stdout}\n{out.stderr}")
    return {"whole": whole, "libvirt": float(found.group(3)), "downtime": float(found.group(4)),
            "rounds": int(found.group(5))}


def show(label: str, samples: list[dict]) -> None:
    def col(key: str) -> str:
        values = [s[key] for s in samples]
        return f"{statistics.median(values):8.2f} ({min(values):.2f}-{max(values):.2f})"

    print(f"| {label:<22} | {len(samples):2d} | {col('whole')} | {col('libvirt')} | {col('downtime')} | "
          f"{col('rounds')} |")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3, help="moves there and back per load")
    args = ap.parse_args()
    if rig_netns():
        raise SystemExit("a rig is up: deploy/rig/rig.sh down first (the bench starts its own)")
    t0 = time.monotonic()
    rig("up", timeout=400)
    print(f"rig up in {time.monotonic() - t0:.1f}s")
    try:
        job = MigrateJob(pings=100000)
        job.wait_ready("c1")
        job.wait_ready("c2")
        guest, key = job.guest("c2"), job_key(job.id)
        samples: dict[str, list[dict]] = {"idle": [], "memory-writing load": []}
        where = "c2"
        for _ in range(args.rounds):
            for load in samples:
                if load != "idle":
                    in_guest(where, guest, key, LOAD)
                    started = time.monotonic()
                    time.sleep(3)
                for _ in range(2):  # there and back
                    other = "c1" if where == "c2" else "c2"
                    sample = move(job.id, guest, where, other)
                    print(f"{load}: {where} -> {other}: {sample}", flush=True)
                    samples[load].append(sample)
                    where = other
                    console = RIG_DIR / "hosts" / where / "vtorque" / "lib" / "guests" / guest / "console.log"
                    time.sleep(1)
                    if "Kernel panic" in console.read_text(errors="replace"):
                        # seen 2 times in ~20 moves under a fresh load (docs/design.md): said, not hidden
                        print(f"{load}: THE GUEST'S KERNEL PANICKED after the move to {where}: {console}")
                        raise SystemExit(2)
                if load != "idle":
                    time.sleep(max(0.0, LOAD_S + 2 - (time.monotonic() - started)))  # the load is over
        print("\n| tiny guest (256 MiB, TCG) | n | vtorque migrate s | libvirt s | downtime ms | pre-copy rounds |")
        print("|---|---|---|---|---|---|")
        for load, got in samples.items():
            show(load, got)
        print("(median (min-max) of every move, there and back)")
    finally:
        cancel_unfinished()
        t1 = time.monotonic()
        rig("down", timeout=300)
        print(f"rig down in {time.monotonic() - t1:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
