#!/opt/vtorque/venv/bin/python
"""The Slurm prologue's own cost on a VM job: the Python process from its start to its exit, with guests that
are ready at once, side by side with `python -c pass` (and, with --also, the same hook of another source tree).

What a VM job's prologue pays besides the boot is its start-up (imports, config, tracing's set-up), the
scheduler's answers (`scontrol show job -d`, `show config`) and its exit (tracing's flush). Each run here is a
fresh `python -P` that calls `vtorque.hooks.slurm.main(["prolog"])` as the shell entry point's exec does,
with a stand-in `scontrol` (a sh script with canned answers) and a channel that answers JobStarted at once
with the plan and the guest's GuestReady (no broker: its round trips are the bus's, not the start-up's). The
channel imports the hook's real one (pika) so the same modules load. Rounds interleave the commands.
  wall          process start → exit (what the job's start waits for, less the boot and the broker)
Usage: bench/hook_vm_path.py [--runs 20] [--also /path/to/other/tree]
(--also TREE: a checkout whose shared/ hooks/ cli/ services/ are imported instead of this one's, e.g.
 `git archive 6b0591a | tar -x -C /tmp/base`.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from hook_fast_path import timed  # bench/ is on sys.path: run as a script

DIGEST = "ab" * 32
DRIVER = '''
import sys

DIGEST = "%DIGEST%"
from vtorque.hooks import slurm
from vtorque.shared import messages as m
from vtorque.shared import tracing


class Instant:
    """The hook's channel, answered at once: the plan, then every guest ready."""

    def __init__(self, url, patterns, attempts=3, timeout=5.0):
        import vtorque.shared.hook_channel  # noqa: F401 - what the real channel loads (pika)
        self.answers = []

    def publish(self, event):
        with tracing.publish_span(event, "vtorque.events", event.routing_key()):
            pass
        owner, node = event.owner, event.nodes[0].host
        plan = m.GuestPlan(name=f"vt-{event.job_id}-0", node=node, index=0, image="tiny", image_digest=DIGEST,
                           vcpus=1, ram_mib=128, cores=None, owner=owner, ssh_authorized_keys=[])
        self.answers = [m.JobPlanned.new(job_id=event.job_id, deadline=60, guests=[plan]),
                        m.GuestReady.new(job_id=event.job_id, deadline=60, guest=plan.name, node=node, index=0,
                                         address="", ssh_port=0, timings=m.PhaseTimings(0, 0, 0, 0, None, 0))]

    def events(self, deadline):
        for answer in self.answers:
            yield answer, {}

    def close(self):
        pass


sys.exit(slurm.main(["prolog"], channel_factory=Instant))
'''.replace("%DIGEST%", DIGEST)

SCONTROL = """#!/bin/sh
# stands in for scontrol: canned answers for the hook's questions
case "$1 $2" in
  "show job") printf 'JobId=7 JobName=bench\\n   Comment=(null)\\n     Nodes=vm CPU_IDs=0 Mem=100 GRES=\\n' ;;
  "show config") printf 'PrologEpilogTimeout     = 300\\n' ;;
esac
exit 0
"""


def site(tmp: Path) -> dict:
    (tmp / "bin").mkdir()
    (tmp / "bin" / "scontrol").write_text(SCONTROL)
    (tmp / "bin" / "scontrol").chmod(0o755)
    image = tmp / "tiny.qcow2"
    image.write_bytes(b"")
    (tmp / "vtorque.toml").write_text(f"""state_dir = "{tmp}/state"
[broker]
url = "amqp://bench:bench@127.0.0.1:1/vtorque"
[tracing]
dir = "{tmp}/traces"
[images]
store = "{tmp}/images"
[images.catalog.tiny]
source = "{image}"
sha256 = "{DIGEST}"
format = "qcow2"
[scheduler]
kind = "slurm"
bin_dir = "{tmp}/bin"
[node]
allow_system_owners = true
""")
    script = tmp / "slurm" / "hash.7" / "job.7" / "script"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n# vtorque-spec: img=tiny,ram=128M,vcpus=1\necho hi\n")
    (tmp / "driver.py").write_text(DRIVER)
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "VTORQUE_CONFIG": str(tmp / "vtorque.toml"),
            "VTORQUE_SLURM_STATE": str(tmp / "slurm"), "SLURM_JOB_ID": "7", "SLURM_JOB_USER": "root",
            "SLURM_JOB_UID": "0", "SLURM_JOB_GID": "0", "SLURM_JOB_NODELIST": "vm",
            "SLURM_JOB_CPUS_PER_NODE": "1"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--also", help="another source tree to time beside this one")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        env = site(tmp)
        rows = [("venv python -c pass (reference)", [sys.executable, "-c", "pass"], env),
                ("Slurm prologue, VM job, instant guests", [sys.executable, "-P", str(tmp / "driver.py")], env)]
        if args.also:
            # A package `vtorque` whose parts are the other tree's, found before the editable install's.
            pkg = tmp / "also" / "vtorque"
            pkg.mkdir(parents=True)
            (pkg / "__init__.py").write_text("")
            for part in ("shared", "hooks", "cli", "services"):
                (pkg / part).symlink_to(Path(args.also).resolve() / part)
            rows.append((f"the same, {args.also}", rows[1][1], {**env, "PYTHONPATH": str(tmp / "also")}))
        times: dict[str, list[float]] = {name: [] for name, _, _ in rows}
        for _ in range(args.runs):
            for name, cmd, cmd_env in rows:
                times[name] += timed(cmd, cmd_env, 1)
        print(f"| command ({args.runs} runs each, interleaved) | median | min | max |")
        print("|---|---|---|---|")
        for name, t in times.items():
            print(f"| {name} | {statistics.median(t) * 1e3:.1f} ms | {min(t) * 1e3:.1f} ms | {max(t) * 1e3:.1f} ms |")
        if args.also:
            this, other = times[rows[1][0]], times[rows[2][0]]
            ratios = [a / b for a, b in zip(this, other, strict=True)]
            saved = [(b - a) * 1e3 for a, b in zip(this, other, strict=True)]
            print(f"\nper round, this tree / {args.also}: " + " ".join(f"{r:.2f}" for r in ratios))
            print(f"median of per-round ratios: {statistics.median(ratios):.2f}; "
                  f"median saved per round: {statistics.median(saved):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
