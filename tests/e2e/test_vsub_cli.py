"""vsub against the real Slurm qsub: every bad input is refused before anything is submitted; the resource
request really grows; --dry-run and --help."""

import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm]

KEYS_DIR = Path.home() / ".vtorque" / "keys"


def keys():
    return set(KEYS_DIR.iterdir()) if KEYS_DIR.exists() else set()


BAD = [
    ("img=tiny,vcpus=abc", "vcpus"), ("img=tiny,vcpus=3", "vcpus"), ("img=nosuch", "img"),
    ("img=../../etc/passwd", "img"), ("img=tiny,colour=red", "colour"), ("img=tiny,img=tiny", "img"),
    ("img=tiny,ram=3G", "ram"), ("img=tiny,distro=dos", "distro"), ("img=tiny,arch=sparc", "arch"),
    ("img=tiny,vcpu_pinning=sometimes", "vcpu_pinning"), ("img=tiny,vms_per_node=99", "vms_per_node"),
    ("img=tiny,vm_prologue=/etc/passwd", "vm_prologue"), ("img=tiny,vm_epilogue=missing.sh", "vm_epilogue"),
    ("img=tiny,vrdma=perhaps", "vrdma"), ("img=tiny,iocm=true,iocm_max_cores=9", "iocm_max_cores"),
    ("img=tiny,iocm_min_cores=1", "iocm_min_cores"), ("img=tiny,fs_type=tape", "fs_type"),
    ("img=tiny,disk=1000G", "disk"), ("img=tiny,disk=/etc/shadow.img", "disk"), ("img=tiny,metadata=/etc/x.yaml", "metadata"),
    ("", "-vm"),
]


def assert_refused(slurm, proc, key):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vsub: ") and key in lines[0], proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("value,key", BAD)
def test_bad_values_on_the_command_line_and_in_the_script(slurm, value, key):
    slurm.write("plain.sh", "#!/bin/sh\necho never\n")
    slurm.write("inline.sh", f"#!/bin/sh\n#PBS -N inline\n#PBS -vm {value}\necho never\n")
    before, keys_before = slurm.queued(), keys()
    assert_refused(slurm, slurm.run("vsub", "-vm", value, "plain.sh"), key)
    assert_refused(slurm, slurm.run("vsub", "inline.sh"), key)
    assert slurm.queued() == before and keys() == keys_before
    assert sorted(p.name for p in slurm.workdir.iterdir()) == ["inline.sh", "plain.sh"]


def test_metadata_that_would_give_root_is_refused(slurm):
    slurm.write("m.yaml", "runcmd: [id]\n")
    slurm.write("job.sh", "#!/bin/sh\n")
    assert_refused(slurm, slurm.run("vsub", "-vm", "img=tiny,metadata=m.yaml", "job.sh"), "metadata")


def test_no_script_and_unreadable_script(slurm):
    proc = slurm.run("vsub", "-vm", "img=tiny", stdin=open(os.devnull))
    assert proc.returncode == 2 and proc.stdout == ""
    assert_refused(slurm, slurm.run("vsub", "-vm", "img=tiny", "missing.sh"), "missing.sh")
    assert_refused(slurm, slurm.run("vsub", "-vm"), "-vm")


def test_the_command_line_wins_over_the_script(slurm):
    slurm.write("inline.sh", "#!/bin/sh\n#PBS -vm img=tiny,vcpus=1\necho hi\n")
    proc = slurm.run("vsub", "--dry-run", "-vm", "vcpus=2", "inline.sh")
    assert proc.returncode == 0, proc.stderr
    assert "# vtorque-spec: " in proc.stdout and "vcpus=2" in proc.stdout
    assert "-l nodes=1:ppn=2" in proc.stdout.splitlines()[0]


def test_dry_run_prints_the_exact_qsub_command_and_submits_nothing(slurm):
    slurm.write("job.sh", "#!/bin/sh\necho hi\n")
    before, keys_before = slurm.queued(), keys()
    proc = slurm.run("vsub", "--dry-run", "-N", "dry", "-l", "nodes=1:ppn=1,mem=10mb", "-vm", "img=tiny,vcpus=2",
                     "job.sh")
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.startswith("qsub -N dry -l nodes=1:ppn=2,mem=256mb ") and first.endswith("/job.sh")
    assert "raising ppn from 1 to 2" in proc.stderr and "raising mem from 10mb to 256mb" in proc.stderr
    assert proc.stdout.splitlines()[1] == "#!/bin/sh"
    assert slurm.queued() == before and keys() == keys_before


def test_the_raised_request_really_reaches_the_scheduler(slurm):
    slurm.write("job.sh", "#!/bin/sh\necho hi\n")
    proc = slurm.run("vsub", "-h", "-l", "nodes=1:ppn=1", "-vm", "img=tiny,vcpus=2", "job.sh")  # -h: held
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    try:
        info = slurm.run("scontrol", "show", "job", job_id, check=True).stdout
        assert "NumCPUs=2" in info and "JobState=PENDING" in info
    finally:
        slurm.run("scancel", job_id)
        slurm.wait(job_id)


def test_help_shows_qsub_usage_and_the_vm_keys(slurm):
    proc = slurm.run("vsub", "--help")
    assert proc.returncode == 0
    assert "vms_per_node" in proc.stdout and "1..2" in proc.stdout and "-vm key=value" in proc.stdout
