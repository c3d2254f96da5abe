"""End to end on the real single-host Slurm with a real guest: vsub → qsub → PrologSlurmctld → bridge →
stager → node worker → guest → the job's output, exit code and trace; nothing left afterwards."""

import os
import time
from pathlib import Path

import pytest

from vtorque.cli.trace_view import job_spans, load
from vtorque.services.node_worker.hypervisor import Hypervisor
from vtorque.shared.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.guest]

SERVICES = {"vtorque-vsub", "vtorque-hook", "vtorque-bridge", "vtorque-stager", "vtorque-node-worker"}
MARKER_JOB = """#!/bin/sh
#PBS -N marker
echo "MARKER-LINE-e2e"
echo "release=$(uname -r)"
echo "cpus=$(nproc)"
echo "to-stderr" >&2
"""


def vtorque_leftovers(job_id: str) -> tuple[list[str], list[str]]:
    config = load_config()
    domains = [name for name, meta in Hypervisor(config.node.libvirt_uri).vtorque_domains().items()
               if meta.get("job") == job_id]
    disks = [p.name for p in Path(config.node.guest_dir).glob("*/job") if p.read_text() == job_id]
    return domains, disks


def running_qemus(job_id: str) -> list[str]:
    """The job's guests whose QEMU runs on this host (an exited one, reaped or not, has no argv left)."""
    from vtorque.shared.messages import domain_name

    prefix = "guest=" + domain_name(job_id, "", 0).removesuffix("-0")  # -name guest=vt-<job>-<node>-<i>,...
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        found += [a.split(",")[0][len("guest="):] for a in argv if a.startswith(prefix)]
    return found


def gone_soon(job_id: str, within: float = 15.0) -> tuple[list[str], list[str]]:
    """What is left of the job once its domains and files had `within` s after the job left the queue: the
    epilogue's answer comes once the guests are stopped, the undefine and the files follow it."""
    deadline = time.monotonic() + within
    while (left := vtorque_leftovers(job_id)) != ([], []) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def submit(slurm, *args) -> str:
    proc = slurm.run("vsub", *args)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    assert job_id.isdigit(), proc.stdout
    return job_id


def test_a_vm_job_runs_in_its_guest_and_leaves_nothing(slurm):
    slurm.write("marker.sh", MARKER_JOB)
    job_id = submit(slurm, "-N", "marker", "-vm", "img=tiny,vcpus=2,ram=256M", "marker.sh")
    slurm.wait(job_id)
    out = (slurm.workdir / f"marker.o{job_id}").read_text()
    err = (slurm.workdir / f"marker.e{job_id}").read_text()
    assert "MARKER-LINE-e2e" in out
    release = next(x.split("=", 1)[1] for x in out.splitlines() if x.startswith("release="))
    assert release and release != os.uname().release  # the guest's kernel, not the host's
    assert "cpus=2" in out  # vcpus=2 reached the guest
    assert "to-stderr" in err
    assert slurm.exit_code(job_id) == 0

    # (c) the epilogue's teardown is confirmed before Slurm lets the job go: no guest of the job runs then; its
    # domain and disks go right after
    assert running_qemus(job_id) == []
    assert gone_soon(job_id) == ([], [])

    # (d) one trace, from every part, every span with the job id
    config = load_config()
    deadline = time.monotonic() + 10
    while True:
        spans = job_spans(load(config.tracing.dir), job_id)
        if SERVICES <= {s.service for s in spans} or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert SERVICES <= {s.service for s in spans}, {s.service for s in spans}
    assert len({s.trace_id for s in spans}) == 1
    assert all(s.attributes.get("pbs.job_id") == job_id for s in spans), [
        (s.service, s.name) for s in spans if s.attributes.get("pbs.job_id") != job_id]
    roots = [s for s in spans if not s.parent_id]
    assert [(r.service, r.name) for r in roots] == [("vtorque-vsub", "vsub submit")]
    ids = {s.span_id for s in spans}
    assert all(s.parent_id in ids for s in spans if s.parent_id), "orphan spans"


def test_the_guest_exit_code_becomes_the_job_exit_code(slurm):
    slurm.write("three.sh", "#!/bin/sh\necho before\nexit 3\n")
    job_id = submit(slurm, "-vm", "img=tiny", "three.sh")
    slurm.wait(job_id)
    assert "before" in (slurm.workdir / f"three.sh.o{job_id}").read_text()  # named as qsub names it
    assert slurm.exit_code(job_id) == 3
    assert running_qemus(job_id) == []
    assert gone_soon(job_id) == ([], [])


def test_a_job_without_vm_runs_on_the_host_as_with_qsub(slurm):
    slurm.write("plain.sh", "#!/bin/sh\necho \"release=$(uname -r)\"\nexit 4\n")
    via_vsub = submit(slurm, "-N", "plain", "plain.sh")
    direct = slurm.run("qsub", "-N", "direct", "plain.sh", check=True).stdout.strip()
    slurm.wait(via_vsub)
    slurm.wait(direct)
    out = (slurm.workdir / f"plain.o{via_vsub}").read_text()
    assert out == (slurm.workdir / f"direct.o{direct}").read_text()
    assert out.strip() == f"release={os.uname().release}"
    assert slurm.exit_code(via_vsub) == slurm.exit_code(direct) == 4


@pytest.mark.parametrize("value,key", [("img=tiny,vcpus=abc", "vcpus"), ("img=nosuch", "img"),
                                       ("img=../../etc/passwd", "img"), ("img=tiny,colour=red", "colour")])
def test_bad_vm_values_submit_nothing(slurm, value, key):
    slurm.write("bad.sh", "#!/bin/sh\necho never\n")
    keys = Path.home() / ".vtorque" / "keys"
    keys_before = set(keys.iterdir()) if keys.exists() else set()
    before = slurm.queued()
    proc = slurm.run("vsub", "-vm", value, "bad.sh")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"-vm {key}" in lines[0], proc.stderr
    assert proc.stdout == ""
    assert slurm.queued() == before
    assert (set(keys.iterdir()) if keys.exists() else set()) == keys_before
    assert [p.name for p in slurm.workdir.iterdir()] == ["bad.sh"]
