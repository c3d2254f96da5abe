"""NUMA memory placement: a guest's memory on the NUMA nodes of the cores its vCPUs are pinned to.

Only where the host has more than one NUMA node: on a single-node host a <numatune> says nothing and would
only make a guest fail to start where libvirt cannot apply it (no cpuset cgroup controller).
"""

from __future__ import annotations

import os
from pathlib import Path

from vtorque.shared.cpu_list import parse_cpu_list

Topology = dict[int, frozenset[int]]  # NUMA node → its CPUs

# Where host_topology reads the machine's facts; tests point it at a fake host's sysfs tree.
SYSFS = "/sys"


def nodeset(cores: list[int] | None, topology: Topology) -> str | None:
    """The NUMA nodes holding `cores`, as a libvirt nodeset ('0' or '0,1'); None when there is nothing to
    place: no pinned cores, or a host with one NUMA node."""
    if not cores or len(topology) <= 1:
        return None
    nodes = sorted(n for n, cpus in topology.items() if cpus & set(cores))
    return ",".join(map(str, nodes)) or None


def parse_cpulist(text: str) -> frozenset[int]:
    """A NUMA node's sysfs cpulist (`0-3,8-11\n`; a memory-only node's is blank) as a set (shared/cpu_list.py)."""
    return frozenset(parse_cpu_list(text))


def host_topology(sysfs: str | None = None) -> Topology:
    """This host's NUMA nodes and their CPUs (from /sys/devices/system/node/nodeN/cpulist)."""
    root = Path(sysfs or SYSFS) / "devices" / "system" / "node"
    topo: Topology = {}
    try:
        names = os.listdir(root)
    except OSError:
        return topo
    for name in names:
        if name.startswith("node") and name[4:].isdigit():
            try:
                topo[int(name[4:])] = parse_cpulist((root / name / "cpulist").read_text())
            except OSError:
                continue
    return topo
