"""A job's private ssh key does not outlive the job, however it ends (issue 11, "a job's private key stays in
~/.vtorque/keys when the job never runs").

vsub runs as a real unprivileged account against a scheduler of the test's own: a `qsub` that hands out job ids
(or fails), and a `scontrol` that answers what the test says each job is. The launcher removes a key at the end
of the job's run (tests/unit/test_launcher*); these are the paths where the launcher never runs."""

from __future__ import annotations

import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import pytest

DIGEST = "ab" * 32


@pytest.fixture
def submit_site(users):
    """A Slurm site under /tmp that the victim account can read: `qsub` and `scontrol` fakes in its bin_dir."""
    _, victim = users
    root = Path(f"/tmp/vts-keys-{uuid.uuid4().hex[:8]}")
    bindir = root / "bin"
    jobs = root / "jobs"  # jobs/<id> holds the job's Slurm state; no file: Slurm never had it
    bindir.mkdir(parents=True)
    jobs.mkdir()
    (root / "trace").mkdir(mode=0o1777)
    os.chmod(root / "trace", 0o1777)
    (bindir / "qsub").write_text(f"""#!/bin/sh
[ -e {root}/qsub-fails ] && {{ echo "qsub: submission refused" >&2; exit 1; }}
id=$(cat {root}/next 2>/dev/null || echo 100)
echo $((id + 1)) > {root}/next
echo $id
""")
    (bindir / "scontrol").write_text(f"""#!/bin/sh
if [ "$1 $2" = "show config" ]; then
    echo "ClusterName = $(cat {root}/cluster 2>/dev/null || echo vts)"
    exit 0
fi
for id; do :; done
[ -e {root}/down ] && {{ echo "slurm_load_jobs error: Unable to contact slurm controller" >&2; exit 1; }}
if [ -e {jobs}/"$id" ]; then
    echo "JobId=$id JobName=job.sh UserId={victim.name}({victim.uid}) JobState=$(cat {jobs}/"$id")" \
         "Reason=None ExitCode=0:0 NodeList=(null)"
    exit 0
fi
echo "slurm_load_jobs error: Invalid job id specified" >&2
exit 1
""")
    for tool in ("qsub", "scontrol"):
        (bindir / tool).chmod(0o755)
    (root / "vtorque.toml").write_text(
        f'state_dir = "{root}/state"\n[tracing]\ndir = "{root}/trace"\n'
        f'[images.catalog.tiny]\nsource = "/x/tiny.qcow2"\nsha256 = "{DIGEST}"\n'
        f'[scheduler]\nkind = "slurm"\nbin_dir = "{bindir}"\n')
    os.chmod(root, 0o777)  # the fakes' state files are written by the victim's vsub
    (root / "job.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "job.sh", 0o644)
    keys = victim.home / ".vtorque" / "keys"
    shutil.rmtree(victim.home / ".vtorque", ignore_errors=True)
    yield root, jobs, keys
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(victim.home / ".vtorque", ignore_errors=True)


def vsub(victim, root: Path):
    env = {"PATH": "/usr/bin:/bin", "VTORQUE_CONFIG": str(root / "vtorque.toml"), "HOME": str(victim.home)}
    return victim.run(sys.executable, "-m", "vtorque.cli.vsub", "-vm", "img=tiny", str(root / "job.sh"), env=env)


def key_of(keys: Path, job_id: str) -> Path:
    found = [d for d in keys.iterdir() if (d / "job").is_file() and (d / "job").read_text().strip() == job_id]
    assert len(found) == 1, list(keys.iterdir())
    return found[0]


def test_a_failed_submission_leaves_no_key(users, submit_site):
    _, victim = users
    root, _, keys = submit_site
    (root / "qsub-fails").touch()
    proc = vsub(victim, root)
    assert proc.returncode == 1 and "submission refused" in proc.stderr
    assert not keys.exists() or list(keys.iterdir()) == []


def test_keys_of_jobs_that_ended_without_running_are_removed_by_the_next_vsub(users, submit_site):
    _, victim = users
    root, jobs, keys = submit_site
    ids = []
    for _ in range(5):
        proc = vsub(victim, root)
        assert proc.returncode == 0, proc.stderr
        ids.append(proc.stdout.strip())
        (jobs / ids[-1]).write_text("PENDING")
        # The key is the owner's own, private.
        key = key_of(keys, ids[-1])
        assert key.stat().st_uid == victim.uid and key.stat().st_mode & 0o077 == 0
    queued, cancelled, node_fail, forgotten, running = ids
    (jobs / cancelled).write_text("CANCELLED")  # qdel/scancel while it was queued: no prologue, no launcher
    (jobs / node_fail).write_text("NODE_FAIL")  # its node died before the launcher ran
    (jobs / forgotten).unlink()  # Slurm forgot it (MinJobAge) or never ran it
    (jobs / running).write_text("RUNNING")  # the launcher uses this one now
    kept = {j: key_of(keys, j) for j in (queued, running)}

    proc = vsub(victim, root)
    assert proc.returncode == 0, proc.stderr
    left = {(d / "job").read_text().strip() for d in keys.iterdir()}
    assert left == {queued, running, proc.stdout.strip()}
    assert all(d.is_dir() and (d / "id_ed25519").is_file() for d in kept.values())


def test_a_scheduler_that_cannot_be_asked_keeps_every_key(users, submit_site):
    _, victim = users
    root, jobs, keys = submit_site
    first = vsub(victim, root).stdout.strip()
    (jobs / first).write_text("CANCELLED")
    (root / "down").touch()
    proc = vsub(victim, root)
    assert proc.returncode == 0, proc.stderr
    assert {(d / "job").read_text().strip() for d in keys.iterdir()} == {first, proc.stdout.strip()}
    (root / "down").unlink()
    assert vsub(victim, root).returncode == 0
    assert first not in {(d / "job").read_text().strip() for d in keys.iterdir()}


def test_a_key_whose_vsub_died_before_qsub_answered_goes_after_an_hour(users, submit_site):
    _, victim = users
    root, jobs, keys = submit_site
    first = vsub(victim, root).stdout.strip()
    (jobs / first).write_text("PENDING")
    stale, fresh = keys / "stale", keys / "fresh"  # made as the owner, as vsub makes them
    for d in (stale, fresh):
        assert victim.run("mkdir", "-m", "700", str(d)).returncode == 0
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    assert vsub(victim, root).returncode == 0
    assert not stale.exists() and fresh.is_dir() and key_of(keys, first).is_dir()


def test_a_key_of_another_clusters_job_stays(users, submit_site):
    """One home, two clusters: a job this cluster's scheduler never had is no ended job of this cluster."""
    _, victim = users
    root, jobs, keys = submit_site
    (root / "cluster").write_text("other")
    theirs = vsub(victim, root).stdout.strip()  # queued on cluster "other", unknown here
    (root / "cluster").unlink()
    (root / "next").write_text("500")
    ours = vsub(victim, root)
    assert ours.returncode == 0, ours.stderr
    left = {(d / "job").read_text().strip(): (d / "cluster").read_text().strip() for d in keys.iterdir()}
    assert left == {theirs: "slurm:other", ours.stdout.strip(): "slurm:vts"}


def test_a_torque_job_belongs_to_the_server_in_its_id():
    from vtorque.shared.config import Config, SchedulerConfig
    from vtorque.shared.scheduler import scheduler_for

    torque = scheduler_for(Config(scheduler=SchedulerConfig(kind="torque")))
    assert torque.cluster("12.head.cluster") == "torque:head.cluster"
    assert torque.cluster("12[3].head") == "torque:head"
    assert torque.cluster("12") is None  # a key that can never be told apart is never swept
