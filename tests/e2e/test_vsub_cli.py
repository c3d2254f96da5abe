"""vsub against the real Slurm qsub: every bad input is refused before anything is submitted; the resource
request really grows; --dry-run/-gf, --help and --man; vTorque's documented command lines; a job without -vm
goes from the sh front to qsub. The limits the refusals rely on are the test's own (VTORQUE_SPEC__*), not the
machine's core count."""

import os
import shutil
from pathlib import Path

import pytest

from vtorque.shared.config import load_config

pytestmark = [pytest.mark.slurm]

# This test's own limits, whatever the machine and the site config say.
LIMITS = {"VTORQUE_SPEC__MAX_VCPUS": "2", "VTORQUE_SPEC__MAX_RAM": "2G", "VTORQUE_SPEC__MAX_VMS_PER_NODE": "8",
          "VTORQUE_SPEC__MAX_IOCM_CORES": "4", "VTORQUE_SPEC__MAX_DISK": "100G"}


@pytest.fixture
def slurm(slurm):
    slurm.env.update(LIMITS)
    return slurm


def site_qsub() -> str:
    return load_config().scheduler.binary("qsub")

KEYS_DIR = Path.home() / ".vtorque" / "keys"


def keys():
    return set(KEYS_DIR.iterdir()) if KEYS_DIR.exists() else set()


BAD = [
    ("img=tiny,vcpus=abc", "vcpus"),
    ("img=tiny,vcpus=3", "vcpus"),
    ("img=nosuch", "img"),
    ("img=../../etc/passwd", "img"),
    ("img=tiny,colour=red", "colour"),
    ("img=tiny,ram=3G", "ram"),
    ("img=tiny,distro=dos", "distro"),
    ("img=tiny,arch=sparc", "arch"),
    ("img=tiny,vcpu_pinning=sometimes", "vcpu_pinning"),
    ("img=tiny,vms_per_node=99", "vms_per_node"),
    ("img=tiny,vm_prologue=/etc/passwd", "vm_prologue"),
    ("img=tiny,vm_epilogue=missing.sh", "vm_epilogue"),
    ("img=tiny,vrdma=perhaps", "vrdma"),
    ("img=tiny,iocm=true,iocm_max_cores=9", "iocm_max_cores"),
    ("img=tiny,iocm_min_cores=1", "iocm_min_cores"),
    ("img=tiny,fs_type=tape", "fs_type"),
    ("img=tiny,disk=1000G", "disk"),
    ("img=tiny,disk=/etc/shadow.img", "disk"),
    ("img=tiny,metadata=/etc/x.yaml", "metadata"),
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
    assert first.startswith(f"{site_qsub()} -N dry -l nodes=1:ppn=2,mem=256mb ") and first.endswith("/job.sh")
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


def test_help_advertises_man_and_man_is_vsubs_own_manual(slurm):
    assert "--man" in slurm.run("vsub", "--help").stdout
    proc = slurm.run("vsub", "--man")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("VSUB(1)") and "perl" not in (proc.stdout + proc.stderr).lower()
    assert "vms_per_node" in proc.stdout and "1..2" in proc.stdout and "-gf" in proc.stdout
    assert f"QSUB'S OWN OPTIONS ({site_qsub()} --help)" in proc.stdout and "-a start_time" in proc.stdout


def test_vtorques_user_guide_example_works_unchanged(slurm):
    # doc/user.md: vsub -l nodes=2,walltime=00:15:00 -vm vcpus=14 jobScript.sh (vcpus within this test's limit);
    # the site's default image (single-host stack: [spec] default_img = "tiny") stands in for img=.
    slurm.write("jobScript.sh", "#!/bin/sh\nhostname\n")
    before, keys_before = slurm.queued(), keys()
    proc = slurm.run("vsub", "-gf", "-l", "nodes=2,walltime=00:15:00", "-vm", "vcpus=2", "jobScript.sh")
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.startswith(f"{site_qsub()} -l nodes=2:ppn=2,walltime=00:15:00,mem=") and first.endswith(
        "/jobScript.sh")
    assert "img=tiny" in proc.stdout and "vcpus=2" in proc.stdout
    assert slurm.queued() == before and keys() == keys_before


def test_no_image_and_no_site_default_is_one_clear_line(slurm):
    slurm.write("jobScript.sh", "#!/bin/sh\nhostname\n")
    slurm.env["VTORQUE_SPEC__DEFAULT_IMG"] = ""
    proc = slurm.run("vsub", "-l", "nodes=1,walltime=00:15:00", "-vm", "vcpus=1", "jobScript.sh")
    assert_refused(slurm, proc, "default_img")
    assert "give -vm img=NAME, one of: tiny" in proc.stderr


def test_upper_case_keys_several_vm_options_and_a_key_given_again_reach_the_scheduler(slurm):
    slurm.write("job.sh", "#!/bin/sh\n#PBS -vm VCPUS=1\necho hi\n")
    proc = slurm.run("vsub", "-h", "-l", "walltime=00:15:00", "-vm", "IMG=tiny,VCPUS=1", "-vm", "vcpus=2,RAM=256M",
                     "job.sh")  # -h: held
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    try:
        info = slurm.run("scontrol", "show", "job", job_id, check=True).stdout
        assert "NumCPUs=2" in info and "TimeLimit=00:15:00" in info and "JobState=PENDING" in info
    finally:
        slurm.run("scancel", job_id)
        slurm.wait(job_id)


def test_a_job_without_vm_goes_from_the_sh_front_to_the_sites_qsub(slurm):
    vsub = Path(shutil.which("vsub", path=slurm.env["PATH"]))
    assert vsub.read_text().startswith("#!/bin/sh\n"), f"{vsub} is not the sh front (cli/vsub.sh)"
    slurm.write("plain.sh", "#!/bin/sh\n#PBS -N plain\necho hi\n")
    proc = slurm.run("vsub", "-h", "plain.sh")
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    try:
        assert "JobState=PENDING" in slurm.run("scontrol", "show", "job", job_id, check=True).stdout
        stored = slurm.run("scontrol", "write", "batch_script", job_id, "-", check=True).stdout
        assert stored == "#!/bin/sh\n#PBS -N plain\necho hi\n"  # the user's own script, untouched
    finally:
        slurm.run("scancel", job_id)
        slurm.wait(job_id)
    # A script on stdin without -vm: whatever the site's qsub does with it (slurm-wlm-torque's refuses it).
    before = slurm.queued()
    by_vsub = slurm.run("vsub", "-h", input="#!/bin/sh\necho piped\n")
    by_qsub = slurm.run(site_qsub(), "-h", input="#!/bin/sh\necho piped\n")
    assert (by_vsub.returncode, by_vsub.stdout, by_vsub.stderr) == (by_qsub.returncode, by_qsub.stdout,
                                                                     by_qsub.stderr)
    assert slurm.queued() == before


def test_a_vm_job_script_on_stdin_is_submitted_as_a_file(slurm):
    proc = slurm.run("vsub", "-gf", "-vm", "img=tiny", input="#!/bin/sh\n#PBS -vm vcpus=2\nhostname\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].endswith("/STDIN") and "vcpus=2" in proc.stdout
