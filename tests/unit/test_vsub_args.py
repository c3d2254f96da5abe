import pytest

from vtorque.cli.vsub import UsageError, split_args


def test_vm_options_are_taken_out_and_the_rest_passes_through():
    args, vm, at, dry = split_args(["-N", "x", "-vm", "img=tiny", "-l", "nodes=1:ppn=2", "-V", "-vm", "vcpus=2",
                                    "job.sh"])
    assert args == ["-N", "x", "-l", "nodes=1:ppn=2", "-V", "job.sh"]
    assert vm == ["img=tiny", "vcpus=2"] and args[at] == "job.sh" and not dry


def test_v_with_a_value_is_not_vm():
    args, vm, at, _ = split_args(["-v", "FOO=bar", "job.sh"])
    assert vm == [] and args == ["-v", "FOO=bar", "job.sh"] and at == 2


def test_vm_without_value_is_a_usage_error():
    with pytest.raises(UsageError):
        split_args(["job.sh", "-vm"]) if False else split_args(["-vm"])


def test_no_script_means_stdin():
    _, vm, at, _ = split_args(["-vm", "img=tiny"])
    assert at is None and vm == ["img=tiny"]


def test_dash_c_without_its_prefix_is_a_usage_error_and_the_script_ends_the_options():
    with pytest.raises(UsageError):
        split_args(["-C"])
    args, vm, at, dry = split_args(["job.sh", "-vm", "img=tiny", "--dry-run"])
    assert args == ["job.sh", "-vm", "img=tiny", "--dry-run"] and vm == [] and at == 0 and not dry


def test_slurm_wlm_torques_wd_and_pe_take_their_values_on_a_slurm_site_only():
    argv = ["-wd", "/scratch", "-pe", "shm", "4", "-vm", "img=tiny", "job.sh"]
    args, vm, at, _ = split_args(argv, kind="slurm")
    assert vm == ["img=tiny"] and args == ["-wd", "/scratch", "-pe", "shm", "4", "job.sh"] and at == 5
    args, vm, at, _ = split_args(["-wd", "job.sh"], kind="torque")  # Torque's getopt: -w d
    assert args[at] == "job.sh" and vm == []
