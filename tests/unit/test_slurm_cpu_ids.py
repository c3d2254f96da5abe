"""Slurm: the job's cores per node from `scontrol show job -d` (pure parsing)."""

from vtorque.hooks import slurm

SHOW = """JobId=53 JobName=wrap
   UserId=root(0) GroupId=root(0) MCS_label=N/A
   NumNodes=1 NumCPUs=1 NumTasks=1 CPUs/Task=1 ReqB:S:C:T=0:0:*:*
     Nodes=vm CPU_IDs=0 Mem=100 GRES=
   MinCPUsNode=1 MinMemoryCPU=100M MinTmpDiskNode=0
"""

MULTI = """JobId=7 JobName=x
     Nodes=n[1-2] CPU_IDs=0-1,4 Mem=100 GRES=
     Nodes=n3 CPU_IDs=2-3 Mem=100 GRES=
"""


def test_one_node_one_core():
    assert slurm.parse_cpu_ids(SHOW) == {"vm": [0]}


def test_node_ranges_and_core_lists():
    expand = {"n[1-2]": ["n1", "n2"]}.__getitem__
    assert slurm.parse_cpu_ids(MULTI, expand) == {"n1": [0, 1, 4], "n2": [0, 1, 4], "n3": [2, 3]}


def test_nothing_when_scontrol_says_nothing():
    assert slurm.parse_cpu_ids("JobId=7 JobName=x\n   NumCPUs=2\n") == {}
    assert slurm.parse_cpu_ids("") == {}
