#!/opt/vtorque/venv/bin/python
"""What the user feels: a one-line VM job against the same script as a plain Slurm job (and, optionally, a bare
libvirt boot of the same guest), side by side in one run.

For each round (interleaved, so all see the same machine): one plain job (the script submitted with the
stack's qsub, no -vm), one VM job submitted with vsub through Slurm's qsub on the single-host stack, and, unless
--no-bare, one bare boot (bench/bare_boot.py: createXML → sshd banner, same kernel, disk, seed, 1 vCPU,
128 MiB, virtio-rng as the node worker uses). The script prints `uname -r`. Figures:
  plain          submit → done of the plain job (qsub called → the job has left the queue)
  vsub           the vsub call itself (returns the job id)
  submit→start   vsub called → Slurm shows the job RUNNING (the prologue saw every guest ready)
  prologue       the hook's `prologue` span: hook start → all guests ready (what DESIGN.md's target is about)
  boot           the node worker's `boot guest` span: BootGuests received → GuestReady
  launch         the prologue's end → the end of the launcher's `run job in guest` span (Slurm starts the batch
                 step, vtorque-launch starts, ssh to the guest, the script's one line, ssh's exit)
  ssh            the `run job in guest` span alone (ssh to the guest, run, exit)
  epilogue       the EpilogSlurmctld's `epilogue` span: JobEnded → every node's GuestsTornDown
  job→done       RUNNING → the job has left the queue (the run in the guest + the epilogue's teardown)
  submit→done    the whole VM job as the user sees it; `vm/plain` = its ratio to the plain job's, per round
Usage (root, stack and services up, as after `make demo`; other tests' jobs must not run meanwhile):
  . /var/lib/vtorque-stack/env; flock /tmp/vtorque-e2e.lock bench/job_vs_bare.py [--rounds 3] [--no-bare] [--json]
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
SCRIPT = "#!/bin/sh\nuname -r\n"


def _env() -> dict:
    env = dict(os.environ)
    for line in (STACK / "env").read_text().splitlines():
        if line.startswith("export "):
            key, value = line[len("export "):].split("=", 1)
            env[key] = value
    env["PATH"] = f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin"
    return env


def _until_gone(job: str, env: dict) -> tuple[float | None, float]:
    """(when Slurm first showed the job RUNNING, when it left the queue), monotonic."""
    running = None
    while True:
        state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=env, capture_output=True,
                               text=True).stdout.strip()
        now = time.monotonic()
        if state == "RUNNING" and running is None:
            running = now
        if not state:
            return running, now
        time.sleep(0.02)


def run_plain(workdir: Path, env: dict) -> dict:
    script = workdir / "plain.sh"
    script.write_text(SCRIPT)
    t0 = time.monotonic()
    job = subprocess.run(["qsub", str(script)], cwd=workdir, env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    _, done = _until_gone(job, env)
    out = (workdir / f"plain.sh.o{job}").read_text().strip()
    if out != os.uname().release:
        raise RuntimeError(f"plain job {job} printed {out!r}")
    return {"plain_job": job, "plain": done - t0}


def run_job(workdir: Path, env: dict) -> dict:
    script = workdir / "bench.sh"
    script.write_text(SCRIPT)
    t0 = time.monotonic()
    job = subprocess.run(["vsub", "-vm", "img=tiny,vcpus=1,ram=128M", str(script)], cwd=workdir, env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    submitted = time.monotonic()
    running, done = _until_gone(job, env)
    out = (workdir / f"bench.sh.o{job}").read_text().strip()
    if not out or out == os.uname().release:
        raise RuntimeError(f"job {job} did not run in the guest: {out!r}")
    config = load_config()
    want = {"prologue", "boot guest", "run job in guest", "epilogue"}
    spans: list = []
    for _ in range(40):
        spans = job_spans(load(config.tracing.dir), job)
        if want <= {s.name for s in spans}:
            break
        time.sleep(0.25)
    by = {s.name: s for s in spans}

    def dur(name: str) -> float | None:
        return (by[name].end_ns - by[name].start_ns) / 1e9 if name in by else None

    launch = ((by["run job in guest"].end_ns - by["prologue"].end_ns) / 1e9
              if {"prologue", "run job in guest"} <= set(by) else None)
    return {"job": job, "vsub": submitted - t0, "submit_to_start": (running or done) - t0,
            "prologue": dur("prologue"), "boot": dur("boot guest"), "launch": launch,
            "ssh": dur("run job in guest"), "epilogue": dur("epilogue"),
            "job_to_done": done - (running or done), "submit_to_done": done - t0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-bare", action="store_true", help="skip the bare libvirt boot of each round")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    env = _env()
    rows = []
    with tempfile.TemporaryDirectory(dir=STACK / "jobs") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)
        for i in range(args.rounds):
            row: dict = {"round": i + 1}
            if not args.no_bare:
                row["bare_banner"] = bare_boot.boot_bare(GUEST_DIR, str(workdir), virtio_rng=True)["ssh_banner_s"]
            # Alternate which goes first, so neither always follows the other's teardown.
            first, second = (run_plain, run_job) if i % 2 == 0 else (run_job, run_plain)
            row.update(first(workdir, env))
            row.update(second(workdir, env))
            row["vm_over_plain"] = row["submit_to_done"] / row["plain"]
            rows.append(row)
            if not args.json:
                print(f"round {i + 1}: plain {row['plain']:.2f}s, VM job {row['job']} submit→done "
                      f"{row['submit_to_done']:.2f}s", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    cols = ([] if args.no_bare else ["bare_banner"]) + [
        "plain", "vsub", "prologue", "boot", "submit_to_start", "launch", "ssh", "epilogue", "job_to_done",
        "submit_to_done"]
    print("| round | " + " | ".join(cols) + " | vm/plain |")
    print("|---" * (len(cols) + 2) + "|")

    def cell(v) -> str:
        return "–" if v is None else f"{v:.2f} s"

    for r in rows:
        print(f"| {r['round']} | " + " | ".join(cell(r[c]) for c in cols) + f" | {r['vm_over_plain']:.2f} |")
    med = {c: statistics.median(r[c] for r in rows if r[c] is not None)
           if any(r[c] is not None for r in rows) else None for c in cols}
    print("| median | " + " | ".join(cell(med[c]) for c in cols) +
          f" | **{statistics.median(r['vm_over_plain'] for r in rows):.2f}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
