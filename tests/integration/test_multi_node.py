"""A job on two nodes with two VMs per node, on this one machine: a bridge and two node workers of the test's
own (`vtorque run`, on the test site: the session's vhost, node names of their own, directories under a
temporary root) boot their shares; the hook waits for all four; the guests reach each other over the job
network by name; the node file lists them as PBS_NODEFILE would; the epilogue leaves nothing."""

import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from vtorque.cli.launcher import remote_command
from vtorque.cli.launcher_ssh import ssh_argv
from vtorque.hooks.job_hook import JobContext, Verdict, run_epilogue, run_prologue
from vtorque.services.node_worker.hypervisor import Hypervisor
from vtorque.shared import messages as m
from vtorque.shared.job_script import JobHeader

pytestmark = [pytest.mark.slow, pytest.mark.guest]


@pytest.fixture
def site(test_site, test_guest):
    test_site.catalog = {"tiny": test_guest}
    test_site.stage()  # as the stager would have (the bridge's StageImage has no consumer here)
    return test_site


@pytest.fixture
def two_node_workers(site, tmp_path):
    names = [f"nw{uuid.uuid4().hex[:5]}a", f"nw{uuid.uuid4().hex[:5]}b"]
    procs = []
    for name, service in [("bridge", "bridge"), *((n, "node-worker") for n in names)]:
        env = site.env(VTORQUE_NODE__NAME=name) if service == "node-worker" else site.env()
        log = open(tmp_path / f"{name}.log", "w")
        procs.append(subprocess.Popen([str(Path(sys.executable).parent / "vtorque"), "run", service],
                                      env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 30
    while not all("consuming" in (tmp_path / f"{n}.log").read_text() for n in ["bridge", *names]):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            [(tmp_path / f"{n}.log").read_text()[-2000:] for n in ["bridge", *names]]
        time.sleep(0.2)
    yield names
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        proc.wait(30)


def test_four_guests_on_two_nodes_reach_each_other(site, two_node_workers, tmp_path):
    _four_guests_on_two_nodes(site, two_node_workers, tmp_path, warm=False)


def test_four_guests_on_two_nodes_restored_from_warm_images_reach_each_other(site, two_node_workers, tmp_path):
    """Issue 13 item 4: the multi-node case with warm guests. A warm image of the job's shape made first (`vtorque
    images warm`, as an operator does; the two node workers share this host's warm directory), then the
    same job: every guest restored (its console says so), each with its own job network address, names and node
    file, hot-plugged after the restore."""
    made = subprocess.run([str(Path(sys.executable).parent / "vtorque"), "images", "warm", "tiny",
                           "--vcpus", "1", "--ram", "128M"], env=site.env(), capture_output=True, text=True,
                          timeout=300)
    assert made.returncode == 0, made.stderr
    _four_guests_on_two_nodes(site, two_node_workers, tmp_path, warm=True)


def _four_guests_on_two_nodes(site, two_node_workers, tmp_path, warm: bool) -> None:
    config = site.config()
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    job_id = f"mn{uuid.uuid4().hex[:6]}"
    header = JobHeader(spec={"img": "tiny", "vcpus": "1", "ram": "128M", "vms_per_node": "2"},
                       ssh_pubkeys=[key.with_suffix(".pub").read_text().strip()])
    job = JobContext(scheduler="torque", job_id=job_id, owner=m.Owner(user="root", uid=0, gid=0),
                     nodes=[m.NodeAllocation(host=n, ncpus=2) for n in two_node_workers], header=header)
    lines = []
    try:
        outcome = run_prologue(job, config, 240, lines.append)
        assert outcome.verdict is Verdict.READY, (outcome.reason, lines)
        assert sorted(((r.node, r.index) for r in outcome.ready), key=lambda x: x[1]) == [
            (two_node_workers[0], 0), (two_node_workers[0], 1), (two_node_workers[1], 2), (two_node_workers[1], 3)]
        rank0 = next(r for r in outcome.ready if r.index == 0)
        names = [r.guest for r in sorted(outcome.ready, key=lambda r: r.index)]
        # From rank 0: the node file, and every other guest by name over the job network.
        script = ("cat $PBS_NODEFILE; for h in $(sort -u $PBS_NODEFILE); do "
                  "ping -c1 -W3 $h >/dev/null && echo reach-$h; done\n")
        run = subprocess.run(
            ssh_argv(key, rank0.address, "root", remote_command(job_id)),
            input=script.encode(),
            capture_output=True,
            timeout=120,
        )
        out = run.stdout.decode().split()
        assert run.returncode == 0, run.stderr
        assert out[:4] == names  # one line per vCPU, rank order
        assert sorted(o for o in out if o.startswith("reach-")) == sorted(f"reach-{n}" for n in names)
        restored = ["restored=1" in (Path(r.address).parent / "console.log").read_text(errors="replace")
                    for r in outcome.ready]
        assert restored == [warm] * 4, restored
    finally:
        assert run_epilogue(job, config, 0, lines.append), lines
    # The epilogue's answer means the guests' QEMUs have exited; domains and files go right after (bounded).
    hv = Hypervisor(config.node.libvirt_uri)
    gone_by = time.monotonic() + 60
    while (_job_domains(hv, job_id) or list(Path(config.node.guest_dir).glob(f"vt-{job_id}-*"))) \
            and time.monotonic() < gone_by:
        time.sleep(0.2)
    assert _job_domains(hv, job_id) == []
    assert not list(Path(config.node.guest_dir).glob(f"vt-{job_id}-*"))


def _job_domains(hv: Hypervisor, job_id: str) -> list[str]:
    return [n for n, meta in hv.vtorque_domains().items() if meta.get("job") == job_id]
