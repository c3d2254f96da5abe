"""Every -vm key of one job, through Slurm, seen where it must land: the guest, its definition, its disks."""

import time
from pathlib import Path

import pytest

from vtorque.services.node_worker.domain import parse_metadata
from vtorque.shared.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.guest]

JOB = """#!/bin/sh
#PBS -N keys
echo "prologue-mark: $(cat /tmp/vm-prologue-ran 2>/dev/null)"
echo "vdc-sectors: $(cat /sys/block/vdc/size 2>/dev/null)"
echo "user-data-packages: $(grep -c htop /run/seed/user-data)"
echo "cpus: $(nproc)"
sleep 4
"""


def test_every_key_reaches_guest_definition_and_disks(slurm):
    slurm.write("keys.sh", JOB)
    slurm.write("pre.sh", "#!/bin/sh\necho from-vm-prologue > /tmp/vm-prologue-ran\n")
    slurm.write("post.sh", "#!/bin/sh\necho vm-epilogue-saw: $(cat /tmp/vm-prologue-ran)\n")
    slurm.write("meta.yaml", "packages: [htop]\ntimezone: Europe/Berlin\n")
    spec = ("img=tiny,vcpus=1,ram=192M,distro=debian,arch=x86_64,vcpu_pinning=true,vms_per_node=1,"
            "vm_prologue=pre.sh,vm_epilogue=post.sh,vrdma=true,iocm=true,iocm_min_cores=1,iocm_max_cores=1,"
            "fs_type=ramdisk,disk=64M,metadata=meta.yaml")
    proc = slurm.run("vsub", "-vm", spec, "keys.sh")
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    assert "ppn=2" in proc.stderr  # 1 vCPU + 1 I/O core

    config = load_config()
    name, dom = slurm.running_domain(job_id)
    xml = dom.XMLDesc(0)
    assert parse_metadata(xml)["job"] == job_id
    assert "<iothreads>1</iothreads>" in xml and "ivshmem-plain" in xml
    assert "<target dev=\"vdc\"" in xml or "<target dev='vdc'" in xml
    assert Path(config.node.ramdisk_dir, name, "root.qcow2").exists()  # fs_type=ramdisk
    assert not Path(config.node.guest_dir, name).exists()

    slurm.wait(job_id)
    out = (slurm.workdir / f"keys.sh.o{job_id}").read_text()
    assert "prologue-mark: from-vm-prologue" in out
    assert "vdc-sectors: 131072" in out  # 64 MiB
    assert "user-data-packages: 1" in out
    assert "vm-epilogue-saw: from-vm-prologue" in out
    assert slurm.exit_code(job_id) == 0
    # The teardown answers once the guest's QEMU has exited; its files go right after it (bounded wait).
    gone_by = time.monotonic() + 60
    while Path(config.node.ramdisk_dir, name).exists() and time.monotonic() < gone_by:
        time.sleep(0.2)
    assert not Path(config.node.ramdisk_dir, name).exists()


def test_a_failing_vm_prologue_stops_the_job(slurm):
    slurm.write("never.sh", "#!/bin/sh\necho JOB-RAN\n")
    slurm.write("bad-pre.sh", "#!/bin/sh\necho refusing >&2\nexit 5\n")
    proc = slurm.run("vsub", "-vm", "img=tiny,vm_prologue=bad-pre.sh", "never.sh")
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    slurm.wait(job_id)
    assert "JOB-RAN" not in (slurm.workdir / f"never.sh.o{job_id}").read_text()
    err = (slurm.workdir / f"never.sh.e{job_id}").read_text()
    assert "refusing" in err and "vm_prologue" in err
    assert slurm.exit_code(job_id) == 5
