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
  path           how the node worker got the guest: cold, warm (restored) or pool (a pooled guest resumed)
With --pool, the VM jobs take a guest from the warm pool (services/node_worker/warm_pool.py): the bench makes
the warm image of the jobs' shape (`vtorque images warm tiny`), restarts the stack's node worker alone with
`[node] warm_pool = 1` (VTORQUE_NODE__WARM_POOL=1), waits before each round until the pool holds a guest again
(the refill, off the clock, as on an idle node), and restarts the node worker as it was at the end.
Usage (root, stack and services up, as after `make demo`; other tests' jobs must not run meanwhile):
  . /var/lib/vtorque-stack/env; flock /tmp/vtorque-e2e.lock bench/job_vs_bare.py [--rounds 3] [--no-bare] [--pool]
  [--json]
"""

from __future__ import annotations

import argparse
import contextlib
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
SHAPE = {"vcpus": 1, "ram": "128M"}  # the VM jobs' guest
SERVICES_SH = HERE.parent / "deploy/single-host/services.sh"


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
    job = subprocess.run(["vsub", "-vm", f"img=tiny,vcpus={SHAPE['vcpus']},ram={SHAPE['ram']}", str(script)],
                         cwd=workdir, env=env,
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
    path = by["boot guest"].attributes.get("vtorque.boot.path", "cold") if "boot guest" in by else None
    return {"job": job, "path": path, "vsub": submitted - t0, "submit_to_start": (running or done) - t0,
            "prologue": dur("prologue"), "boot": dur("boot guest"), "launch": launch,
            "ssh": dur("run job in guest"), "epilogue": dur("epilogue"),
            "job_to_done": done - (running or done), "submit_to_done": done - t0}


def pooled_guests(guest_dir: Path) -> list[str]:
    """The pooled guests no job has claimed yet (warm_pool.py: a record written last, no claim file)."""
    from vtorque.services.node_worker import warm_pool

    return sorted(p.name for p in guest_dir.glob(f"{warm_pool.POOL_PREFIX}*")
                  if (p / warm_pool.RECORD).exists() and not (p / warm_pool.CLAIM).exists())


def wait_pooled(guest_dir: Path, timeout: float = 180.0) -> None:
    until = time.monotonic() + timeout
    while not pooled_guests(guest_dir):
        if time.monotonic() > until:
            raise RuntimeError(f"no pooled guest in {guest_dir} after {timeout:.0f}s: see the node worker's log")
        time.sleep(0.2)


def _node_worker(env: dict, **overrides: str) -> None:
    subprocess.run([str(SERVICES_SH), "stop", "node-worker"], env=env, check=True, capture_output=True)
    subprocess.run([str(SERVICES_SH), "start", "node-worker"], env=dict(env, **overrides), check=True,
                   capture_output=True)


@contextlib.contextmanager
def warm_pool_on(env: dict):
    """The stack's node worker with a pool of one guest of the jobs' shape, then as it was."""
    subprocess.run(["vtorque", "images", "warm", "tiny", "--vcpus", str(SHAPE["vcpus"]), "--ram", SHAPE["ram"]],
                   env=env, check=True, capture_output=True, text=True)
    _node_worker(env, VTORQUE_NODE__WARM_POOL="1")
    try:
        yield Path(load_config().node.guest_dir)
    finally:
        _node_worker(env)  # its reconciliation removes the pooled guests a pool of 0 has no room for


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-bare", action="store_true", help="skip the bare libvirt boot of each round")
    parser.add_argument("--pool", action="store_true", help="VM jobs take a pooled guest (see above)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    env = _env()
    rows = []
    with tempfile.TemporaryDirectory(dir=STACK / "jobs") as tmp, \
            (warm_pool_on(env) if args.pool else contextlib.nullcontext()) as guest_dir:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)
        for i in range(args.rounds):
            if guest_dir is not None:
                wait_pooled(guest_dir)
                time.sleep(1.0)  # the refill's own QEMU work settled, as on a node idle between jobs
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
    print("| round | path | " + " | ".join(cols) + " | vm/plain |")
    print("|---" * (len(cols) + 3) + "|")

    def cell(v) -> str:
        return "–" if v is None else f"{v:.2f} s"

    for r in rows:
        print(f"| {r['round']} | {r['path']} | " + " | ".join(cell(r[c]) for c in cols) +
              f" | {r['vm_over_plain']:.2f} |")
    med = {c: statistics.median(r[c] for r in rows if r[c] is not None)
           if any(r[c] is not None for r in rows) else None for c in cols}
    print("| median | | " + " | ".join(cell(med[c]) for c in cols) +
          f" | **{statistics.median(r['vm_over_plain'] for r in rows):.2f}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
