#!/opt/vtorque/venv/bin/python
"""What vtorque's Torque prologue adds to a job without -vm, over the site's own prologue, side by side.

A TORQUE_HOME-like directory is laid out as `vtorque install-hooks` leaves it: vtorque's hooks/torque/prologue
as `mom_priv/prologue` and the site's prologue kept (hard link, root, 0500) in `mom_priv/vtorque-site/`. Each
round runs, interleaved so that both see the same machine, the site prologue alone and vtorque's chain (which
runs the site prologue, then looks for a vtorque header with shell builtins only and exits 0), with the recorded
prologue arguments (8, the job script last) and environment (PATH=/bin:/usr/bin) and a plain job script.
Printed: per round the median of each and the difference; at the end the median over rounds of the per-round
differences and ratios. Two site prologues: a typical one (logs a line, makes the job's scratch directory:
two forks) and an empty one (`exit 0`), where only vtorque's own part remains.

Usage: bench/torque_prologue_fast_path.py [--rounds 10] [--runs 50] [--also OTHER_PROLOGUE]   (root: the chain
checks the site hook is root-owned, as pbs_mom does). `--also` measures another version of the prologue in the
same rounds, e.g. the one before a change: `git show REV:hooks/torque/prologue > /tmp/old-prologue`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SITES = {
    "typical site prologue": "#!/bin/sh\n# site: note the start, make the job's scratch directory\n"
                             "echo \"$(date +%s) start $1 $2\" >> \"$SCRATCH/site.log\"\n"
                             "mkdir -p \"$SCRATCH/$1\"\nexit 0\n",
    "empty site prologue": "#!/bin/sh\nexit 0\n",
}
# A job script as users write them: a comment block of directives, then the work (no vtorque header).
PLAIN_JOB = ("#!/bin/bash\n#PBS -N plain\n#PBS -l nodes=1:ppn=2,walltime=01:00:00\n#PBS -j oe\n"
             "# analysis of run 42\n" + "module load gcc openmpi\n" + "mpirun ./a.out input.dat > out.txt\n" * 40)


def run_once(argv: list[str], env: dict, cwd: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {proc.returncode}")
    return elapsed


def layout(root: Path, site_text: str, also: Path | None = None) -> tuple[Path, Path, Path | None, list[str], dict]:
    mom_priv = root / "mom_priv"
    (mom_priv / "vtorque-site").mkdir(parents=True)
    (mom_priv / "jobs").mkdir()
    (root / "aux").mkdir()
    (root / "scratch").mkdir()
    site = mom_priv / "vtorque-site" / "prologue"
    site.write_text(site_text)
    site.chmod(0o500)
    hook = mom_priv / "prologue"
    shutil.copyfile(REPO / "hooks" / "torque" / "prologue", hook)
    hook.chmod(0o500)
    other = None
    if also is not None:  # beside ours, in the same mom_priv: it finds the same kept site hook
        other = mom_priv / "prologue.other"
        shutil.copyfile(also, other)
        other.chmod(0o500)
    script = mom_priv / "jobs" / "1.vm.SC"
    script.write_text(PLAIN_JOB)
    nodefile = root / "aux" / "1.vm"
    nodefile.write_text("vm\nvm\n")
    argv = ["1.vm", "trqtest", "trqtest", "plain", "nodes=1:ppn=2,walltime=01:00:00,neednodes=1:ppn=2", "batch", "",
            str(script)]
    env = {"LANG": "C.UTF-8", "PATH": "/bin:/usr/bin", "PBS_MSHOST": "vm", "PBS_NODEFILE": str(nodefile),
           "PBS_NODENUM": "0", "PBS_NP": "2", "PBS_NUM_NODES": "1", "PBS_NUM_PPN": "2", "PBS_O_WORKDIR": str(root),
           "PBS_RESOURCE_NODES": "1:ppn=2", "SCRATCH": str(root / "scratch")}
    return site, hook, other, argv, env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=50, help="runs of each command per round")
    parser.add_argument("--also", type=Path, help="another prologue to measure in the same rounds")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("run as root (the chain runs the site prologue only when it is root-owned)", file=sys.stderr)
        return 2
    for label, text in SITES.items():
        with tempfile.TemporaryDirectory(prefix="vtorque-bench-") as tmp:
            site, hook, other, hook_argv, env = layout(Path(tmp), text, args.also)
            cwd = str(hook.parent)
            print(f"\n{label}: {args.rounds} rounds x {args.runs} runs of each, interleaved")
            print(f"{'round':>5} {'site alone':>11} {'vtorque chain':>14} {'added':>9} {'ratio':>7}"
                  + (f" {'--also':>10} {'added':>9}" if other else ""))
            added, ratios, other_added = [], [], []
            for r in range(1, args.rounds + 1):
                alone, chain, also = [], [], []
                for _ in range(args.runs):
                    alone.append(run_once([str(site), *hook_argv], env, cwd))
                    chain.append(run_once([str(hook), *hook_argv], env, cwd))
                    if other:
                        also.append(run_once([str(other), *hook_argv], env, cwd))
                a, c = statistics.median(alone), statistics.median(chain)
                added.append(c - a)
                ratios.append(c / a)
                line = f"{r:>5} {a * 1e3:>9.2f}ms {c * 1e3:>12.2f}ms {(c - a) * 1e3:>7.2f}ms {c / a:>7.2f}"
                if other:
                    o = statistics.median(also)
                    other_added.append(o - a)
                    line += f" {o * 1e3:>8.2f}ms {(o - a) * 1e3:>7.2f}ms"
                print(line)
            print(f"median over rounds: added {statistics.median(added) * 1e3:.2f} ms, "
                  f"ratio {statistics.median(ratios):.2f} (target: added <= 1 ms)"
                  + (f"; --also added {statistics.median(other_added) * 1e3:.2f} ms" if other else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
