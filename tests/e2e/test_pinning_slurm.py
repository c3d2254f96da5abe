"""Exact pinning through Slurm: the guest's vCPU and I/O threads run on exactly the CPU ids Slurm gave the
job (scontrol show job -d), as the libvirt API reports them on the running guest."""


import pytest

from vtorque.hooks.slurm import parse_cpu_ids
from vtorque.shared.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.guest]


def cores(cpumap):
    return [i for i, on in enumerate(cpumap) if on]


def test_guest_runs_on_the_cores_slurm_gave(slurm):
    slurm.write("pin.sh", "#!/bin/sh\nsleep 3\necho cpus: $(nproc)\n")
    proc = slurm.run("vsub", "-vm", "img=tiny,vcpus=1,ram=160M,iocm=true,iocm_min_cores=1,iocm_max_cores=1",
                     "pin.sh")
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    config = load_config()
    _, dom = slurm.running_domain(job_id)
    seen = ([cores(c) for c in dom.vcpuPinInfo(0)], {t: cores(c) for t, c in dom.ioThreadInfo(0)})
    shown = slurm.run("scontrol", "show", "job", "-d", job_id, check=True).stdout
    given = next(iter(parse_cpu_ids(shown).values()))
    reserve = config.spec.host_reserve_cores
    vcpu_cores, io = seen
    # The planner's order: host reserve, then the vCPUs, then the I/O cores.
    assert vcpu_cores == [[given[reserve]]]
    assert io == {1: [given[reserve + 1]]}
    slurm.wait(job_id)
    assert slurm.exit_code(job_id) == 0
