#!/usr/bin/env python3
"""Image staging, measured side by side with its reference in one run (as root: it drops the page cache).

Cold: a 1 GiB image that is not in the store, copied in by ImageStore.stage (sha256 verified, renamed in:
usable; its fsync runs in the background) vs `cp` of the same file, with the page cache dropped before each;
also, for the record, stage until the background fsync is done and `cp` + `sync FILE` (the same durability),
and sha256 of the file alone. Rounds interleave the cases, rotating their order.

Warm: an image already in the store → a guest's disk: the stager's cache hit (ImageStore.stage), the lease
and the qcow2 overlay (`qemu-img create -b`, what services/node_worker/disks.py runs), for sparse raw images of
100 MiB to 4 GiB; and disks.prepare whole (overlay + seed ISO), for the record.

    python3 bench/staging.py [--size 1G] [--rounds 5] [--dir /var/lib/vtorque/bench-staging] [--warm 20]

Prints a Markdown table (the one in docs/benchmarks.md). Everything it writes is removed at the end.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from vtorque.services.node_worker import disks
from vtorque.shared import image_leases as leases
from vtorque.shared.image_store import ImageStore, parse_size

MiB = 2**20


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as fh:
        fh.write("3\n")


def make_random(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "wb") as fh:
        left = size
        while left:
            chunk = os.urandom(min(left, 16 * MiB))
            fh.write(chunk)
            h.update(chunk)
            left -= len(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    return h.hexdigest()


def make_sparse(path: Path, size: int) -> str:
    """A raw image of `size` bytes: 4 MiB of data at the start, the rest a hole (as cloud raw images are)."""
    with open(path, "wb") as fh:
        fh.write(os.urandom(4 * MiB))
        fh.truncate(size)
    return _sha256(path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(16 * MiB):
            h.update(chunk)
    return h.hexdigest()


def _overlay(store: ImageStore, src: Path, digest: str, gdir: Path) -> None:
    staged = store.stage(src, digest)  # what the stager answers: a cache hit
    leases.take(staged.path, gdir, "bench")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(staged.path),
                    str(gdir / "root.qcow2")], check=True, capture_output=True)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cold(work: Path, size: int, rounds: int) -> list[dict]:
    src = work / "cold-src.raw"
    print(f"# writing a {size / MiB:.0f} MiB random image ...", file=sys.stderr)
    digest = make_random(src, size)
    dst = work / "cold-dst.raw"
    store_dir = work / "store-cold"

    def run_cp():
        subprocess.run(["cp", str(src), str(dst)], check=True)

    def run_cp_sync():
        subprocess.run(["cp", str(src), str(dst)], check=True)
        subprocess.run(["sync", str(dst)], check=True)

    def run_stage():
        ImageStore(store_dir).stage(src, digest)

    def run_stage_durable():
        store = ImageStore(store_dir)
        store.stage(src, digest)
        store.wait_durable()

    def run_hash():
        _sha256(src)

    cases = [("cp", run_cp), ("stage", run_stage), ("cp+sync", run_cp_sync), ("stage+durable", run_stage_durable),
             ("sha256 only", run_hash)]
    results = []
    for r in range(rounds):
        row = {}
        for name, fn in cases[r % 4:4] + cases[:r % 4] + cases[4:]:
            dst.unlink(missing_ok=True)
            shutil.rmtree(store_dir, ignore_errors=True)
            drop_caches()
            row[name] = timed(fn)
        results.append(row)
        print(f"# round {r + 1}: " + ", ".join(f"{k} {v:.3f}s" for k, v in row.items()), file=sys.stderr)
    dst.unlink(missing_ok=True)
    shutil.rmtree(store_dir, ignore_errors=True)
    src.unlink()
    return results


def warm(work: Path, sizes: list[int], reps: int) -> dict[int, dict[str, list[float]]]:
    store = ImageStore(work / "store-warm")
    guests = work / "guests"
    seed = {"meta-data": b"instance-id: bench\n", "user-data": b"#cloud-config\n"}
    images = {}
    for size in sizes:  # the cold copies, once: afterwards each image is in the store
        src = work / f"warm-{size}.raw"
        digest = make_sparse(src, size)
        store.stage(src, digest)
        images[size] = (src, digest)
    store.wait_durable()
    os.sync()
    out = {size: {"overlay": [], "prepare": []} for size in sizes}
    for i in range(reps):  # sizes interleaved, so drift in the machine's load hits them alike
        for size, (src, digest) in images.items():
            gdir = guests / f"g-{size}-{i}"
            gdir.mkdir(parents=True)

            out[size]["overlay"].append(timed(functools.partial(_overlay, store, src, digest, gdir)))
            disks.remove(guests, gdir.name)
            base = store.path(digest)
            out[size]["prepare"].append(
                timed(functools.partial(disks.prepare, guests, f"p-{size}-{i}", "bench", base, "raw", seed)))
            disks.remove(guests, f"p-{size}-{i}")
    for size, (src, _) in images.items():
        src.unlink()
        print(f"# warm {size / MiB:.0f} MiB: overlay median {statistics.median(out[size]['overlay']) * 1000:.1f} ms",
              file=sys.stderr)
    shutil.rmtree(work / "store-warm", ignore_errors=True)
    shutil.rmtree(guests, ignore_errors=True)
    return out


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 "?")
    mem = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal"))) / 2**20
    fs = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", "/var/lib"], capture_output=True,
                        text=True).stdout.strip()
    return (f"{os.cpu_count()} vCPU {model}, {mem:.0f} GiB, {platform.system()} {platform.release()}, "
            f"/var/lib on {fs}, load {os.getloadavg()[0]:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warm", type=int, default=20, help="overlays per image size")
    ap.add_argument("--warm-sizes", default="100M,1G,4G")
    ap.add_argument("--dir", default="/var/lib/vtorque/bench-staging")
    ap.add_argument("--skip-cold", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/staging.py: run as root (it drops the page cache before each cold copy)", file=sys.stderr)
        return 2
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.chmod(work, 0o711)
    size = parse_size(args.size)
    try:
        print(f"Machine: {machine()}\n")
        if not args.skip_cold:
            rows = cold(work, size, args.rounds)
            print(f"Cold staging of a {size / MiB:.0f} MiB image (page cache dropped before each):\n")
            print("| round | cp | stage (sha256, usable) | **stage/cp** | cp + sync | stage + durable | "
                  "(stage+durable)/(cp+sync) | sha256 alone |")
            print("|---|---|---|---|---|---|---|---|")
            for i, row in enumerate(rows, 1):
                print(f"| {i} | {row['cp']:.2f} s | {row['stage']:.2f} s | {row['cp'] / row['stage']:.2f} | "
                      f"{row['cp+sync']:.2f} s | {row['stage+durable']:.2f} s | "
                      f"{row['cp+sync'] / row['stage+durable']:.2f} | {row['sha256 only']:.2f} s |")
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            mbps = {k: size / MiB / v for k, v in med.items()}
            print(f"| median | {med['cp']:.2f} s ({mbps['cp']:.0f} MiB/s) | {med['stage']:.2f} s "
                  f"({mbps['stage']:.0f} MiB/s) | **{med['cp'] / med['stage']:.2f}** | {med['cp+sync']:.2f} s | "
                  f"{med['stage+durable']:.2f} s | {med['cp+sync'] / med['stage+durable']:.2f} | "
                  f"{med['sha256 only']:.2f} s ({mbps['sha256 only']:.0f} MiB/s) |\n")
        sizes = [parse_size(s) for s in args.warm_sizes.split(",")]
        out = warm(work, sizes, args.warm)
        print(f"Warm path, image in the store → guest disk ({args.warm} each; sparse raw images):\n")
        print(
            "| image | stage hit + lease + overlay: median | p95 | max | disks.prepare (overlay + seed ISO): median |"
        )
        print("|---|---|---|---|---|")
        for size, t in out.items():
            o = sorted(t["overlay"])
            p95 = o[min(len(o) - 1, int(round(0.95 * (len(o) - 1))))]
            print(f"| {size / MiB:.0f} MiB | {statistics.median(o) * 1000:.1f} ms | {p95 * 1000:.1f} ms | "
                  f"{o[-1] * 1000:.1f} ms | {statistics.median(t['prepare']) * 1000:.1f} ms |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
