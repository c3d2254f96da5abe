#!/opt/vtorque/venv/bin/python
"""What vsub adds to a job without -vm, side by side with the site's qsub in one run.

Interleaved rounds: each round submits the same plain job (a script with #PBS lines, no -vm) once with qsub
alone and once with vsub (the sh front, cli/vsub.sh), in alternating order, and prints both wall times, the
difference and the ratio; then the medians. The Python vsub (vtorque-vsub) on the same job is the reference
row: what every job paid before the front.

  --qsub stand-in  (default) a stand-in qsub (a sh script that prints a job id), so it runs anywhere
  --qsub real      the site's qsub from [scheduler] (single-host stack: slurm-wlm-torque's), real held
                   submissions (-h), each job cancelled right after its round (run under the e2e lock)

Usage: bench/vsub_fast_path.py [--qsub stand-in|real] [--rounds 30] [--vsub PATH]
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
SCRIPT = "#!/bin/sh\n#PBS -N plain\n#PBS -l walltime=00:05:00\n#PBS -j oe\n" + "echo line\n" * 100
STAND_IN = "#!/bin/sh\n# stands in for qsub: reads its arguments, prints a job id\nfor a do :; done\necho 1.stand-in\n"


def timed(argv: list[str], env: dict, cwd: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return elapsed, proc.stdout.strip()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qsub", choices=("stand-in", "real"), default="stand-in")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--vsub", default=str(REPO / "cli" / "vsub.sh"), help="the front to measure")
    parser.add_argument("--python-vsub", default=str(Path(sys.executable).parent / "vtorque-vsub"),
                        help="the Python vsub, for the reference row (skipped if absent)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="vsub-bench-") as tmp:
        os.chmod(tmp, 0o755)
        (Path(tmp) / "job.sh").write_text(SCRIPT)
        env = dict(os.environ)
        if args.qsub == "stand-in":
            qsub = Path(tmp) / "qsub"
            qsub.write_text(STAND_IN)
            qsub.chmod(0o755)
            config = Path(tmp) / "vtorque.toml"
            site = Path(os.environ.get("VTORQUE_CONFIG", "/etc/vtorque/vtorque.toml"))
            # The site's config (same size for the front to read) with the stand-in as [scheduler] qsub.
            text = site.read_text() if site.exists() else f'state_dir = "{tmp}"\n'
            config.write_text(_with_qsub(text, str(qsub)) if "[scheduler]" in text
                              else f'{text}\n[scheduler]\nqsub = "{qsub}"\n')
            env["VTORQUE_CONFIG"] = str(config)
            cancel = None
        else:
            from vtorque.shared.config import load_config

            qsub = Path(load_config().scheduler.binary("qsub"))
            cancel = str(Path(load_config().scheduler.binary("scancel")))
        qsub_argv = [str(qsub), *(["-h"] if cancel else []), "job.sh"]
        vsub_argv = [args.vsub, *(["-h"] if cancel else []), "job.sh"]

        def run(argv):
            elapsed, out = timed(argv, env, tmp)
            if cancel and out:
                subprocess.run([cancel, out.split()[-1]], env=env, capture_output=True)
            return elapsed

        for argv in (qsub_argv, vsub_argv):  # warm the page cache and the scheduler's connection
            run(argv)
        print(f"vsub fast path: a job without -vm, qsub = {qsub} ({args.qsub}), {args.rounds} interleaved rounds")
        print(f"{'round':>5} {'qsub ms':>9} {'vsub ms':>9} {'added ms':>9} {'ratio':>7}")
        q_times, v_times, added, ratios = [], [], [], []
        for i in range(args.rounds):
            if i % 2 == 0:
                q, v = run(qsub_argv), run(vsub_argv)
            else:
                v, q = run(vsub_argv), run(qsub_argv)
            q_times.append(q)
            v_times.append(v)
            added.append(v - q)
            ratios.append(v / q)
            print(f"{i + 1:>5} {q * 1e3:>9.2f} {v * 1e3:>9.2f} {(v - q) * 1e3:>9.2f} {v / q:>7.2f}")
        med = statistics.median
        print(f"{'median':>5} {med(q_times) * 1e3:>9.2f} {med(v_times) * 1e3:>9.2f} {med(added) * 1e3:>9.2f} "
              f"{med(ratios):>7.2f}")
        if Path(args.python_vsub).exists():
            py_argv = [args.python_vsub, *(["-h"] if cancel else []), "job.sh"]
            py = [run(py_argv) for _ in range(min(args.rounds, 10))]
            print(f"reference: the Python vsub ({args.python_vsub}) on the same job, median of {len(py)}: "
                  f"{med(py) * 1e3:.2f} ms")
    return 0


def _with_qsub(text: str, qsub: str) -> str:
    """The [scheduler] section of `text` with qsub = the stand-in (other keys of the section kept)."""
    out, in_section = [], False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            in_section = stripped.replace(" ", "") == "[scheduler]"
            out.append(line)
            if in_section:
                out.append(f'qsub = "{qsub}"')
            continue
        if in_section and stripped.split("=")[0].strip() == "qsub":
            continue
        out.append(line)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
