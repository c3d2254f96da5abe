#!/opt/vtorque/venv/bin/python
"""A 4-guest job against 4 bare libvirt boots of the same guest, side by side in one run.

bare:  4 × bench/bare_boot.py boot_bare() started together (threads), createXML → every sshd banner.
job:   the prologue of a job of 2 nodes × 2 VMs (hooks/job_hook.py run_prologue, through the running bridge
       and stager, and two node workers this script starts under node names of their own, each booting its
       2 guests side by side; 2 nodes because the site allows 2 cores per node here), hook start → all 4
       GuestReady; then the epilogue (teardown confirmed) is timed too.
Usage (root, stack and services up, as after `make demo`): bench/four_guests.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import bare_boot  # bench/bare_boot.py: run as a script, bench/ is on sys.path

from vtorque.hooks.job_hook import JobContext, Verdict, run_epilogue, run_prologue
from vtorque.shared import messages as m
from vtorque.shared.config import load_config
from vtorque.shared.job_script import JobHeader

HERE = Path(__file__).resolve().parent
GUEST_DIR = "/var/cache/vtorque/testguest"


def four_bare(bare_boot, workdir: str) -> float:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        runs = [
            pool.submit(
                bare_boot.boot_bare, GUEST_DIR, workdir, virtio_rng=True, name=f"vtbench4-{i}-{uuid.uuid4().hex[:6]}"
            )
            for i in range(4)
        ]
        results = [r.result() for r in runs]
    # Each run's banner time is from its own createXML, started together: the batch ends at the slowest one.
    return max(r["ssh_banner_s"] for r in results)


def start_node_workers(names: list[str], logdir: Path) -> list[subprocess.Popen]:
    procs = []
    for name in names:
        log = logdir / f"{name}.log"
        procs.append(subprocess.Popen([str(Path(sys.executable).parent / "vtorque"), "run", "node-worker"],
                                      env=dict(os.environ, VTORQUE_NODE__NAME=name, VTORQUE_NODE__SCHEDULER="none"),
                                      stdout=open(log, "w"), stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 30
    while not all("consuming" in (logdir / f"{n}.log").read_text() for n in names):
        if time.monotonic() > deadline:
            raise RuntimeError("node workers did not start")
        time.sleep(0.2)
    return procs


def four_job(config, pubkey: str, nodes: list[str]) -> tuple[float, float]:
    job = JobContext(scheduler="torque", job_id=f"bench4-{uuid.uuid4().hex[:6]}",
                     owner=m.Owner(user="root", uid=0, gid=0), nodes=[m.NodeAllocation(host=n, ncpus=2) for n in nodes],
                     header=JobHeader(spec={"img": "tiny", "vcpus": "1", "ram": "128M", "vms_per_node": "2"},
                                      ssh_pubkeys=[pubkey]))
    t0 = time.monotonic()
    outcome = run_prologue(job, config, 300, lambda _line: None)
    ready = time.monotonic() - t0
    t1 = time.monotonic()
    run_epilogue(job, config, 0, lambda _line: None)
    teardown = time.monotonic() - t1
    if outcome.verdict is not Verdict.READY:
        raise RuntimeError(outcome.reason)
    return ready, teardown


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    config = load_config()
    rows = []
    with tempfile.TemporaryDirectory(dir="/var/lib/vtorque") as tmp:
        Path(tmp).chmod(0o755)
        key = Path(tmp) / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        nodes = [f"bench-{uuid.uuid4().hex[:4]}-{i}" for i in range(2)]
        workers = start_node_workers(nodes, Path(tmp))
        try:
            for i in range(args.rounds):
                bare = four_bare(bare_boot, tmp)
                ready, teardown = four_job(config, key.with_suffix(".pub").read_text().strip(), nodes)
                rows.append((bare, ready, teardown))
                print(f"round {i + 1}: 4 bare {bare:.2f}s, 4-guest prologue {ready:.2f}s, teardown {teardown:.2f}s",
                      file=sys.stderr)
        finally:
            for proc in workers:
                proc.terminate()
                proc.wait(30)
    print(f"{'round':>5} {'4 bare boots':>13} {'4-guest job':>12} {'job/bare':>9} {'teardown':>9}")
    for i, (bare, ready, teardown) in enumerate(rows, 1):
        print(f"{i:>5} {bare:>12.2f}s {ready:>11.2f}s {ready / bare:>9.2f} {teardown:>8.2f}s")
    mb, mr, mt = (statistics.median(r[k] for r in rows) for k in range(3))
    print(f"{'med':>5} {mb:>12.2f}s {mr:>11.2f}s {mr / mb:>9.2f} {mt:>8.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
