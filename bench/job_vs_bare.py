#!/opt/vtorque/venv/bin/python
"""A vtorque VM job against a bare libvirt boot of the same guest, side by side in one run.

For each round (interleaved, so both see the same machine): one bare boot (bench/bare_boot.py: createXML →
sshd banner, same kernel, disk, seed, 1 vCPU, 128 MiB, virtio-rng as the node worker uses) and one VM job
submitted with vsub through Slurm's qsub on the single-host stack, whose script prints `uname -r`. For the job:
  submit→start   vsub called → Slurm shows the job RUNNING (the prologue saw every guest ready)
  prologue       the hook's `prologue` span: hook start → all guests ready (what DESIGN.md's target is about)
  boot           the node worker's `boot guest` span: BootGuests received → GuestReady
  job→done       RUNNING → the job has left the queue (the run in the guest + the epilogue's teardown)
  submit→done    the whole job as the user sees it
Usage (root, stack and services up, as after `make demo`): bench/job_vs_bare.py [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bare_boot  # bench/bare_boot.py: run as a script, bench/ is on sys.path

from vtorque.cli.trace_view import job_spans, load
from vtorque.shared.config import load_config

HERE = Path(__file__).resolve().parent
STACK = Path(os.environ.get("VTORQUE_STACK_DIR", "/var/lib/vtorque-stack"))
GUEST_DIR = "/var/cache/vtorque/testguest"


def _env() -> dict:
    env = dict(os.environ)
    for line in (STACK / "env").read_text().splitlines():
        if line.startswith("export "):
            key, value = line[len("export "):].split("=", 1)
            env[key] = value
    env["PATH"] = f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin"
    return env


def run_job(workdir: Path, env: dict) -> dict:
    script = workdir / "bench.sh"
    script.write_text("#!/bin/sh\nuname -r\n")
    t0 = time.monotonic()
    job = subprocess.run(["vsub", "-vm", "img=tiny,vcpus=1,ram=128M", str(script)], cwd=workdir, env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    running = None
    while True:
        state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=env, capture_output=True,
                               text=True).stdout.strip()
        now = time.monotonic()
        if state == "RUNNING" and running is None:
            running = now
        if not state:
            break
        time.sleep(0.02)
    done = time.monotonic()
    out = (workdir / f"bench.sh.o{job}").read_text().strip()
    if not out or out == os.uname().release:
        raise RuntimeError(f"job {job} did not run in the guest: {out!r}")
    config = load_config()
    spans: list = []
    for _ in range(40):
        spans = job_spans(load(config.tracing.dir), job)
        if {"prologue", "boot guest"} <= {s.name for s in spans}:
            break
        time.sleep(0.25)
    dur = {s.name: (s.end_ns - s.start_ns) / 1e9 for s in spans}
    return {"job": job, "submit_to_start": (running or done) - t0, "prologue": dur.get("prologue"),
            "boot": dur.get("boot guest"), "job_to_done": done - (running or done), "submit_to_done": done - t0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    env = _env()
    rows = []
    with tempfile.TemporaryDirectory(dir=STACK / "jobs") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)
        for i in range(args.rounds):
            bare = bare_boot.boot_bare(GUEST_DIR, str(workdir), virtio_rng=True)
            job = run_job(workdir, env)
            rows.append({"round": i + 1, "bare_banner": bare["ssh_banner_s"], **job})
            if not args.json:
                print(f"round {i + 1}: bare {bare['ssh_banner_s']:.2f}s, job {job['job']} prologue "
                      f"{job['prologue']:.2f}s, submit→done {job['submit_to_done']:.2f}s", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    cols = ["bare_banner", "prologue", "boot", "submit_to_start", "job_to_done", "submit_to_done"]
    print(f"{'round':>5} " + " ".join(f"{c:>15}" for c in cols) + f" {'prologue/bare':>14}")
    for r in rows:
        print(f"{r['round']:>5} " + " ".join(f"{r[c]:>14.2f}s" for c in cols) +
              f" {r['prologue'] / r['bare_banner']:>14.2f}")
    med = {c: statistics.median(r[c] for r in rows) for c in cols}
    print(f"{'med':>5} " + " ".join(f"{med[c]:>14.2f}s" for c in cols) +
          f" {med['prologue'] / med['bare_banner']:>14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
