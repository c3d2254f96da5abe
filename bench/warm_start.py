#!/opt/vtorque/venv/bin/python
"""Warm start and the warm pool against a cold boot of the same guest, side by side in one run (issue 13 items 3, 6).

What is timed is the node worker's part of a prologue: its handler gets the job's BootGuests and the time runs
until every guest's GuestReady is published (prepare disks, define/start or restore, identity, sshd's banner
through the guest's link). Three node workers of the same site run in this process, on an in-memory publisher
(no broker): `cold` with no warm image, `warm` with one of the same shape (made first by services/node_worker/
warm.py, as `vtorque images warm` does) and `pool` with the same warm image and `[node] warm_pool` = the job's
guest count (services/node_worker/warm_pool.py): its pooled guests are restored and paused before the job, off
the clock, as the refill thread does while the node is idle. Each round runs cold, warm and pool for a job of 1
guest and a job of 4 (one job network, as the bridge plans a job of several guests), interleaved (the order turned
every round), each job torn down before the next; the table gives per-kind medians and the medians of the per-round
ratios warm/cold and pool/cold.

`--image debian12-cloud` runs the same for the Debian cloud-init guest (tests/guest/cloud/build.sh; its agent
takes the identity after a restore, tests/guest/cloud/vtorque-agent) in place of the tiny test guest.

Usage (root; it boots real guests, so take the e2e lock on a shared machine):
    flock /tmp/vtorque-e2e.lock bench/warm_start.py [--rounds 3] [--vcpus 1] [--ram MiB] [--image tiny|debian12-cloud]
        [--counts 1,4]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from vtorque.services.node_worker import warm, warm_pool
from vtorque.services.node_worker.service import NodeWorker
from vtorque.shared import messages as m
from vtorque.shared.config import load_config
from vtorque.shared.image_store import ImageStore
from vtorque.shared.job_boot import hoist
from vtorque.shared.job_network import job_network

ROOT = Path(__file__).resolve().parent.parent
# Each image: where it is built, its build script, its catalog's extra lines, its default RAM (MiB).
IMAGES = {
    "tiny": (Path("/var/cache/vtorque/testguest"), ROOT / "tests/guest/build.sh", "", 192),
    "debian12-cloud": (Path("/var/cache/vtorque/cloudguest"), ROOT / "tests/guest/cloud/build.sh",
                       'distro = "debian"\n', 768),
}


class Collected:
    """The node worker's publisher: what it publishes, kept."""

    def __init__(self):
        self.events: list = []

    def publish(self, event) -> None:
        self.events.append(event)

    def close(self) -> None:
        pass


def site(root: Path, node: str, warm_dir: Path, image: str, pool: int = 0) -> Path:
    guest_dir, _, extra, _ = IMAGES[image]
    sums = dict(reversed(line.split()) for line in (guest_dir / "SHA256SUMS").read_text().splitlines())
    cmdline = (guest_dir / "cmdline").read_text().strip() if (guest_dir / "cmdline").exists() else ""
    path = root / f"{warm_dir.name}-{pool}.toml"
    path.write_text(f"""state_dir = "{root}/state"
[tracing]
dir = "{root}/traces"
[images]
store = "{root}/images"
[spec]
host_reserve_cores = 0
host_reserve_ram = "0M"
[node]
name = "{node}"
guest_dir = "{root}/guests"
ramdisk_dir = "{root}/shm/guests"
warm_dir = "{warm_dir}"
warm_pool = {pool}
allow_system_owners = true
boot_timeout = 600
[images.catalog.{image}]
source = "{guest_dir}/rootfs.qcow2"
sha256 = "{sums['rootfs.qcow2']}"
format = "qcow2"
kernel = "{guest_dir}/vmlinux"
initrd = "{guest_dir}/initrd.img"
{f'cmdline = "{cmdline}"' if cmdline else ""}
{extra}""")
    return path


def job_of(config, image: str, job: str, count: int, vcpus: int, ram_mib: int, key: str) -> m.BootGuests:
    entry, node = config.images.catalog[image], config.node.name
    guests = [m.GuestPlan(name=m.domain_name(job, node, i), node=node, index=i, image=image,
                          image_digest=entry.sha256, vcpus=vcpus, ram_mib=ram_mib, cores=None,
                          owner=m.Owner(user="root", uid=0, gid=0), ssh_authorized_keys=[key],
                          distro=entry.distro)
              for i in range(count)]
    network = job_network(job, {node: config.node.job_network_localaddr}) if count > 1 else None
    return hoist(job, 600.0, guests, network=network)


def run_job(worker: NodeWorker, publisher: Collected, cmd: m.BootGuests, count: int) -> tuple[float, str]:
    publisher.events.clear()
    started = time.monotonic()
    worker.on_boot_guests(cmd)
    elapsed = time.monotonic() - started
    ready = [e for e in publisher.events if isinstance(e, m.GuestReady)]
    failed = [e for e in publisher.events if isinstance(e, m.GuestFailed)]
    # Restored: the guest said so on its console (a cloud guest prints no kernel marker even when booted cold).
    restored = sum(1 for e in ready if "restored=1" in (Path(e.address).parent / "console.log").read_text(
        errors="replace"))
    pooled = sum(1 for e in ready if warm_pool.POOL_PREFIX in e.address)
    slowest = max(ready, key=lambda e: e.timings.ready).timings if ready else None
    worker.on_teardown_guests(m.TeardownGuests.new(job_id=cmd.job_id, deadline=60.0, node=worker.node))
    # The teardown answers once the domains are stopped and removes the rest after: the next job starts on a
    # node with nothing of this one left (QEMU exiting and files going would be charged to whichever is next).
    until = time.monotonic() + 60
    prefix = m.domain_name(cmd.job_id, "", 0).removesuffix("-0")
    while time.monotonic() < until and (
            any(meta.get("job") == cmd.job_id for meta in worker.hv.vtorque_domains().values())
            or any(p.name.startswith(prefix) for p in Path(worker.config.node.guest_dir).iterdir())):
        time.sleep(0.1)
    time.sleep(1.0)
    if failed or len(ready) != count:
        raise SystemExit(f"job {cmd.job_id}: {[e.reason for e in failed]}")
    phases = (f"; slowest guest: disks {slowest.disks:.2f}, define {slowest.define:.2f}, start {slowest.start:.2f}, "
              f"ready {slowest.ready:.2f}s") if slowest else ""
    return elapsed, f"{restored}/{count} restored, {pooled} of them pooled{phases}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vcpus", type=int, default=1)
    parser.add_argument("--ram", type=int, help="MiB (default: 192 for tiny, 768 for debian12-cloud)")
    parser.add_argument("--image", choices=sorted(IMAGES), default="tiny")
    parser.add_argument("--counts", default="1,4", help="guests per job, comma-separated")
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    guest_dir, build, _, default_ram = IMAGES[args.image]
    args.ram = args.ram or default_ram
    subprocess.run([str(build), str(guest_dir)], check=True, capture_output=True)
    root = Path(tempfile.mkdtemp(prefix="vtorque-bench-warm-", dir="/tmp"))
    root.chmod(0o711)
    for sub in ("state", "guests", "images", "traces"):
        (root / sub).mkdir(mode=0o711)
    node = f"bw{uuid.uuid4().hex[:8]}"
    key_dir = Path(tempfile.mkdtemp(prefix="vtorque-bench-key-"))
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key_dir / "k")], check=True)
    key = (key_dir / "k.pub").read_text().strip()
    pooling: NodeWorker | None = None
    try:
        cold_cfg = load_config(site(root, node, root / "state/no-warm", args.image), env={})
        warm_cfg = load_config(site(root, node, root / "state/warm", args.image), env={})
        pool_cfg = load_config(site(root, node, root / "state/warm", args.image, pool=max(counts)), env={})
        entry = cold_cfg.images.catalog[args.image]
        store = ImageStore(cold_cfg.images.store)
        store.stage(entry.source, entry.sha256)
        cold_pub, warm_pub, pool_pub = Collected(), Collected(), Collected()
        cold, hot = NodeWorker(cold_cfg, cold_pub), NodeWorker(warm_cfg, warm_pub)  # type: ignore[arg-type]
        pooling = NodeWorker(pool_cfg, pool_pub)  # type: ignore[arg-type]
        pool = warm_pool.pool_of(pooling)
        t = time.monotonic()
        made = warm.build(warm_cfg, hot.hv, hot.store, args.image, args.vcpus, args.ram, hot.domain_type,
                          timeout=600.0)
        print(f"warm image {made.dir.name}: made in {time.monotonic() - t:.1f}s "
              f"(boot {made.meta['boot_s']}s, save {made.meta['save_s']}s, {made.meta['save_bytes'] / 2**20:.0f} MiB)")
        kinds = ("cold", "warm", "pool")
        results: dict[str, list[float]] = {f"{k} {n}": [] for k in kinds for n in counts}
        fills: list[float] = []
        for r in range(args.rounds):
            for count in counts:
                # Alternate which goes first, so neither always finds the other's leftovers in the page cache.
                order = [("cold", cold, cold_pub, cold_cfg), ("warm", hot, warm_pub, warm_cfg),
                         ("pool", pooling, pool_pub, pool_cfg)]
                for kind, worker, pub, cfg in order[r % 3:] + order[:r % 3]:
                    job = f"bw{uuid.uuid4().hex[:6]}"
                    if kind == "pool":  # off the clock: what the refill thread does while the node is idle
                        pool.size = count
                        t = time.monotonic()
                        made_now = pool.fill_to_target()
                        if made_now:
                            fills.append((time.monotonic() - t) / made_now)
                        time.sleep(1.0)
                    elapsed, how = run_job(worker, pub, job_of(cfg, args.image, job, count, args.vcpus, args.ram, key),
                                           count)
                    results[f"{kind} {count}"].append(elapsed)
                    print(f"round {r + 1}: {kind} {count} guest(s): {elapsed:.2f}s ({how})", flush=True)
        print()
        if fills:
            print(f"pool refill (off the clock): {statistics.median(fills):.2f}s per pooled guest (median)")
        print(f"{'guests':>6}  {'cold median':>11}  {'warm median':>11}  {'pool median':>11}  "
              f"{'warm/cold':>9}  {'pool/cold':>9}  (ratios: median of rounds)")
        summary: dict = {"refill_s": fills}
        for count in counts:
            c, w, p = results[f"cold {count}"], results[f"warm {count}"], results[f"pool {count}"]
            ratio = statistics.median(wv / cv for wv, cv in zip(w, c, strict=True))
            pratio = statistics.median(pv / cv for pv, cv in zip(p, c, strict=True))
            summary[count] = {"cold": c, "warm": w, "pool": p, "ratio": ratio, "pool_ratio": pratio}
            print(f"{count:>6}  {statistics.median(c):>10.2f}s  {statistics.median(w):>10.2f}s  "
                  f"{statistics.median(p):>10.2f}s  {ratio:>8.3f}x  {pratio:>8.3f}x")
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=1))
    finally:
        guests = root / "guests"
        for name in [p.name for p in guests.iterdir()] if guests.is_dir() else []:
            if warm_pool.is_pool_name(name) and pooling is not None:  # pooled guests no job took (a failed run)
                pooling.remove_guest(name, None)
        shutil.rmtree(key_dir, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
