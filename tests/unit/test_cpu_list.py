"""One reading of a CPU list (shared/cpu_list.py), for sysfs, libvirt's cpusets, exec_host and CPU_IDs."""

import pytest

from vtorque.services.node_worker import iocm, numa, warm_pool
from vtorque.shared import slurm, torque
from vtorque.shared.cpu_list import parse_cpu_list


@pytest.mark.parametrize("text, want", [
    ("0-2,5", [0, 1, 2, 5]), ("3", [3]), ("3,0-1,1", [3, 0, 1]), ("0-3,8-11\n", [0, 1, 2, 3, 8, 9, 10, 11]),
    (" 4 , 6-7 ", [4, 6, 7]), ("", []), ("\n", []), ("1,,2,", [1, 2]),
])
def test_cpu_lists_in_order_without_repeats(text, want):
    assert parse_cpu_list(text) == want


@pytest.mark.parametrize("text", ["a", "1-", "-1", "1;2", "1-b", "3-1", "0x1"])
def test_anything_else_is_a_value_error(text):
    with pytest.raises(ValueError):
        parse_cpu_list(text)


def test_every_reader_of_a_cpu_list_reads_it_so():
    assert iocm.parse_cpuset("0-2,5") == slurm.cpu_ids("0-2,5") == torque.parse_core_list("0-2,5") == [0, 1, 2, 5]
    assert numa.parse_cpulist("0-2,5\n") == frozenset(warm_pool.parse_cpuset("0-2,5")) == {0, 1, 2, 5}
    # Each keeps its own policy: a pin needs a cpuset, exec_host's cores are digits, dashes and commas only.
    with pytest.raises(ValueError):
        warm_pool.parse_cpuset("")
    for bad in (" 0", "0,", "3-1"):
        with pytest.raises(torque.ExecHostError):
            torque.parse_core_list(bad)
