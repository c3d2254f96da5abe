#!/opt/vtorque/venv/bin/python
"""The hooks' cost on a job without -vm, side by side with the references DESIGN.md names.

Runs each command N times (default 200) with the recorded Torque prologue arguments and environment and a plain
job script, and prints the median and p95 wall time of: a no-op shell hook, vtorque's Torque prologue and
epilogue and Slurm PrologSlurmctld entry points (they must exit 0 without starting Python), and
`python -c pass` from the venv.
Usage: bench/hook_fast_path.py [--runs 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(argv: list[str], env: dict, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[0]} exited {proc.returncode}")
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "1.vm.SC"
        script.write_text("#!/bin/sh\n#PBS -N plain\n" + "echo line\n" * 100)
        noop = Path(tmp) / "noop"
        noop.write_text("#!/bin/sh\nexit 0\n")
        noop.chmod(0o755)
        nodefile = Path(tmp) / "aux"
        nodefile.write_text("vm\nvm\n")
        torque_env = {"LANG": "C.UTF-8", "PATH": "/bin:/usr/bin", "PBS_NODEFILE": str(nodefile), "PBS_NP": "2",
                      "PBS_MSHOST": "vm", "PBS_O_WORKDIR": tmp}
        slurm_state = Path(tmp) / "state"
        (slurm_state / "hash.7" / "job.7").mkdir(parents=True)
        (slurm_state / "hash.7" / "job.7" / "script").write_text(script.read_text())
        slurm_env = {"SLURM_JOB_ID": "7", "SLURM_JOB_USER": "root", "SLURM_JOB_UID": "0", "SLURM_JOB_GID": "0",
                     "VTORQUE_SLURM_STATE": str(slurm_state)}
        pro = ["1.vm", "root", "root", "plain", "nodes=1:ppn=2", "batch", "", str(script)]
        epi = ["1.vm", "root", "root", "plain", "123", "nodes=1:ppn=2", "", "batch", "", "0", str(script)]
        rows = [
            ("no-op shell hook (reference)", [str(noop), *pro], torque_env),
            ("Torque prologue, job without -vm", [str(REPO / "hooks/torque/prologue"), *pro], torque_env),
            ("Torque epilogue, job without -vm", [str(REPO / "hooks/torque/epilogue"), *epi], torque_env),
            ("Slurm PrologSlurmctld, job without -vm", [str(REPO / "hooks/slurm/prolog_slurmctld")], slurm_env),
            ("venv python -c pass (reference)", [sys.executable, "-c", "pass"], dict(os.environ)),
        ]
        print(f"{'command':<42} {'median':>9} {'p95':>9}   ({args.runs} runs each)")
        for name, cmd, env in rows:
            t = sorted(timed(cmd, env, args.runs))
            print(f"{name:<42} {statistics.median(t) * 1e3:>7.2f}ms {t[int(len(t) * 0.95)] * 1e3:>7.2f}ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
