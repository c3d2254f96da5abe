"""vTorque's own command lines work unchanged (examples from its user guide, doc/user.md, and its vsub:
see /work/shared/reference/vtorque-original.md §1): `-gf`, upper-case keys, several -vm options, a key given
again (vTorque's VM_PARAMETER map: the later value replaces the earlier one)."""

import subprocess
import sys
from pathlib import Path

import pytest

from vtorque.cli.qsub_resources import fit
from vtorque.cli.vsub import directive_prefix, split_args
from vtorque.shared.config import Config, ImageEntry, ImagesConfig, SpecConfig
from vtorque.shared.job_script import inline_vm_options
from vtorque.shared.spec import KEYS, SpecError, parse_options, validate

DIGEST = "a" * 64


def site(**spec) -> Config:
    return Config(images=ImagesConfig(catalog={"tiny": ImageEntry(source="/x/tiny.qcow2", sha256=DIGEST)}),
                  spec=SpecConfig(**{"max_vcpus": 16, "host_reserve_cores": 1, **spec}))


def test_the_user_guide_example_with_the_sites_default_image():
    # doc/user.md: vsub -l nodes=2,walltime=00:15:00 -vm vcpus=14 jobScript.sh
    args, vm, at, dry = split_args(["-l", "nodes=2,walltime=00:15:00", "-vm", "vcpus=14", "jobScript.sh"])
    assert (args, vm, args[at], dry) == (["-l", "nodes=2,walltime=00:15:00", "jobScript.sh"], ["vcpus=14"],
                                         "jobScript.sh", False)
    config = site(default_img="tiny")
    spec = validate(parse_options(vm), config)
    assert (spec.img, spec.vcpus, spec.vms_per_node) == ("tiny", 14, 1)
    fitted = fit(args[:at], spec.cores_per_node(config.spec), spec.ram_mib_per_node(config.spec))
    assert fitted.args == ["-l", "nodes=2:ppn=15,walltime=00:15:00,mem=5120mb"]  # 14 vCPUs + 1 host core


def test_without_a_default_image_the_error_says_what_to_do():
    with pytest.raises(SpecError) as err:
        validate(parse_options(["vcpus=14"]), site())
    assert str(err.value) == ("-vm img: required: this site sets no default image ([spec] default_img); "
                              "give -vm img=NAME, one of: tiny")


def test_gf_generates_files_only_that_is_dry_run():
    args, vm, at, dry = split_args(["-gf", "-vm", "img=tiny", "job.sh"])
    assert dry and vm == ["img=tiny"] and args == ["job.sh"] and at == 0


@pytest.mark.parametrize("key", KEYS)
def test_every_key_may_be_upper_case(key):
    assert list(parse_options([f"{key.upper()}=v"])) == [key]


def test_upper_case_keys_and_vtorques_values():
    spec = validate(parse_options(["IMG=tiny,VCPUS=2,VMS_PER_NODE=2,DISTRO=Debian,VCPU_PINNING=TRUE",
                                   "VRDMA=enabled,IOCM=disabled,FS_TYPE=ramdisk,ARCH=x86_64,RAM=1G"]),
                    site())
    assert (spec.img, spec.vcpus, spec.vms_per_node, spec.distro, spec.vcpu_pinning) == ("tiny", 2, 2, "debian",
                                                                                        True)
    assert (spec.vrdma, spec.iocm, spec.fs_type, spec.ram_mib) == (True, False, "ramdisk", 1024)
    assert validate({"img": "tiny", "vcpu_pinning": "auto"}, site()).vcpu_pinning is True


def test_several_vm_options_are_merged():
    args, vm, _, _ = split_args(["-vm", "img=tiny", "-N", "x", "-vm", "vcpus=2", "-vm=vms_per_node=2", "job.sh"])
    assert args == ["-N", "x", "job.sh"]
    spec = validate(parse_options(vm), site())
    assert (spec.img, spec.vcpus, spec.vms_per_node) == ("tiny", 2, 2)


def test_a_key_given_again_replaces_the_earlier_value_as_in_vtorque():
    assert parse_options(["vcpus=1", "vcpus=2"]) == {"vcpus": "2"}
    assert parse_options(["vcpus=1,VCPUS=3"]) == {"vcpus": "3"}
    # the script's '#PBS -vm' lines are read first, the command line after them: the command line wins
    script = "#!/bin/sh\n#PBS -vm img=tiny,vcpus=1\n#PBS -vm vcpus=4\necho hi\n"
    assert parse_options([*inline_vm_options(script), "vcpus=2"]) == {"img": "tiny", "vcpus": "2"}
    assert parse_options(inline_vm_options(script)) == {"img": "tiny", "vcpus": "4"}


def test_the_directive_prefix_follows_qsub():
    assert directive_prefix([], env={}) == "#PBS"
    assert directive_prefix(["-C", "#X"], env={}) == "#X"
    assert directive_prefix(["-C#Y", "-N", "-C"], env={"PBS_DPREFIX": "#Z"}) == "#Y"  # -N's value is not -C
    assert directive_prefix([], env={"PBS_DPREFIX": "#Z"}) == "#Z"
    assert inline_vm_options("#!/bin/sh\n#X -vm img=tiny\n#PBS -vm vcpus=2\n", "#X") == ["img=tiny"]
    assert inline_vm_options("#!/bin/sh\n#PBS -vm img=tiny\n", "") == []


def run_vsub(tmp_path, *argv, stdin=None, qsub_there=True):
    qsub = tmp_path / "qsub"
    (tmp_path / "job.sh").write_text("#!/bin/sh\necho hi\n")
    qsub.write_text("#!/bin/sh\ncase $1 in --help) echo 'Usage:'; echo '    qsub [-a start_time] [script]'; "
                    "exit 0;; esac\necho \"QSUB $*\"; /bin/cat\n")
    qsub.chmod(0o755)
    if not qsub_there:
        qsub.unlink()
    config = tmp_path / "vtorque.toml"
    config.write_text(f'state_dir = "{tmp_path}"\n[tracing]\ndir = "{tmp_path}"\n[spec]\nmax_vcpus = 3\n'
                      f'[images.catalog.tiny]\nsource = "/x/tiny.qcow2"\nsha256 = "{DIGEST}"\n'
                      f'[scheduler]\nqsub = "{qsub}"\n')
    env = {"PATH": "/usr/bin:/bin", "VTORQUE_CONFIG": str(config), "HOME": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "vtorque.cli.vsub", *argv], cwd=tmp_path, env=env, text=True,
                          capture_output=True, input=stdin, timeout=60)


def test_the_python_vsub_runs_the_configured_qsub_with_a_piped_script_unchanged(tmp_path):
    proc = run_vsub(tmp_path, "-N", "piped", stdin="#!/bin/sh\n#PBS -l walltime=1:00\necho hi\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "QSUB -N piped\n#!/bin/sh\n#PBS -l walltime=1:00\necho hi\n"


def test_a_piped_script_with_pbs_vm_lines_is_a_vm_job(tmp_path):
    proc = run_vsub(tmp_path, "-gf", stdin="#!/bin/sh\n#PBS -vm IMG=tiny,VCPUS=2\necho hi\n")
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.startswith(f"{tmp_path}/qsub -l nodes=1:ppn=3,mem=2560mb ") and first.endswith("/STDIN")
    assert "# vtorque-spec: " in proc.stdout and "vcpus=2" in proc.stdout
    assert not (tmp_path / ".vtorque" / "keys").exists() or not any((tmp_path / ".vtorque" / "keys").iterdir())


def test_a_bad_value_is_one_line_exit_2_and_names_the_key(tmp_path):
    proc = run_vsub(tmp_path, "-vm", "img=tiny", "-vm", "VCPUS=4", "job.sh")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "vsub: -vm vcpus=4: a whole number from 1 to 3\n"


def test_man_is_vsubs_own_manual(tmp_path):
    proc = run_vsub(tmp_path, "--man")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("VSUB(1)") and "perl" not in out.lower()
    for text in ("-vm key=value", "-gf", "vms_per_node", "1..3", "EXIT STATUS", "vsub -l nodes=2,walltime=00:15:00",
                 f"QSUB'S OWN OPTIONS ({tmp_path}/qsub --help)", "vsub [-a start_time] [script]"):
        assert text in out, text


def test_help_advertises_man_and_shows_qsubs_usage(tmp_path):
    proc = run_vsub(tmp_path, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage:\n    vsub [-a start_time] [script]\n")
    assert "--man" in proc.stdout and "--dry-run, -gf" in proc.stdout and "1..3" in proc.stdout


def test_a_qsub_that_is_not_there_is_named(tmp_path):
    proc = run_vsub(tmp_path, "job.sh", qsub_there=False)
    assert proc.returncode == 2 and proc.stderr.startswith(f"vsub: the site's qsub {tmp_path}/qsub is not")
    assert Path(tmp_path / "job.sh").exists()
