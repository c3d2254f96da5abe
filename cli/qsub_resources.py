"""Making a VM job's qsub resource request big enough for its VMs. Pure: qsub arguments in, arguments out.

A node must give the job `VMSpec.cores_per_node` cores and `ram_mib_per_node` MiB. vsub raises `ppn` (or
`ncpus`, or the `select` chunk's `ncpus`) and `mem` where the user asked for less or nothing, and says so.
Torque's `mem` is for the whole job, so it is the per-node need times the number of nodes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_MEM = re.compile(r"^([0-9]+)([kmgt]?)(b|w)?$", re.IGNORECASE)
_MIB = {"": 1 / 2**20, "k": 1 / 1024, "m": 1, "g": 1024, "t": 1024**2}


@dataclass(frozen=True)
class Fitted:
    args: list[str]
    notes: list[str]


def mem_to_mib(text: str) -> float | None:
    m = _MEM.match(text.strip())
    if not m:
        return None
    factor = _MIB[m.group(2).lower()] * (8 if (m.group(3) or "").lower() == "w" else 1)
    return int(m.group(1)) * factor


def _node_groups(nodes: str) -> list[str]:
    return nodes.split("+")


def _raise_ppn(group: str, need: int, notes: list[str]) -> tuple[str, int]:
    """'2:ppn=1:gpus=1' → '2:ppn=need:gpus=1'; returns the group and its node count."""
    parts = group.split(":")
    count = int(parts[0]) if parts[0].isdigit() else 1
    for i, part in enumerate(parts[1:], start=1):
        if part.startswith("ppn="):
            have = int(part[4:]) if part[4:].isdigit() else 0
            if have < need:
                parts[i] = f"ppn={need}"
                notes.append(f"raising ppn from {have} to {need}")
            return ":".join(parts), count
    notes.append(f"adding ppn={need} to nodes={group}")
    return ":".join(parts + [f"ppn={need}"]), count


def fit(args: list[str], cores: int, ram_mib: int) -> Fitted:
    """`args` are qsub's (without -vm); `cores`/`ram_mib` what each node must give the job."""
    out: list[str] = []
    notes: list[str] = []
    node_count = 0
    saw_cpus = False
    mem_at: tuple[int, int] | None = None  # (index in out of the -l value, index of mem= in its items)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-l" and i + 1 < len(args):
            items = args[i + 1].split(",")
            for j, item in enumerate(items):
                key, _, value = item.partition("=")
                if key == "nodes":
                    groups = []
                    for group in _node_groups(value):
                        fitted, count = _raise_ppn(group, cores, notes)
                        groups.append(fitted)
                        node_count += count
                    items[j] = "nodes=" + "+".join(groups)
                    saw_cpus = True
                elif key == "ncpus":
                    have = int(value) if value.isdigit() else 0
                    if have < cores:
                        items[j] = f"ncpus={cores}"
                        notes.append(f"raising ncpus from {have} to {cores}")
                    saw_cpus = True
                    node_count = max(node_count, 1)
                elif key == "select":
                    chunks = value.split(":")
                    count = int(chunks[0]) if chunks[0].isdigit() else 1
                    node_count += count
                    for k, chunk in enumerate(chunks):
                        ckey, _, cval = chunk.partition("=")
                        if ckey == "ncpus" and (not cval.isdigit() or int(cval) < cores):
                            chunks[k] = f"ncpus={cores}"
                            notes.append(f"raising select ncpus from {cval} to {cores}")
                        elif ckey == "mem":
                            have_mib = mem_to_mib(cval) or 0
                            if have_mib < ram_mib:
                                chunks[k] = f"mem={ram_mib}mb"
                                notes.append(f"raising select mem from {cval} to {ram_mib}mb")
                    if not any(c.startswith("ncpus=") for c in chunks):
                        chunks.append(f"ncpus={cores}")
                        notes.append(f"adding ncpus={cores} to select")
                    items[j] = "select=" + ":".join(chunks)
                    saw_cpus = True
                elif key == "mem":
                    mem_at = (len(out) + 1, j)
            out += ["-l", ",".join(items)]
            i += 2
            continue
        out.append(arg)
        i += 1
    extra: list[str] = []
    if not saw_cpus:
        extra.append(f"nodes=1:ppn={cores}")
        notes.append(f"adding nodes=1:ppn={cores}")
        node_count = 1
    need_mem = ram_mib * max(node_count, 1)
    if mem_at is not None:
        items = out[mem_at[0]].split(",")
        value = items[mem_at[1]].partition("=")[2]
        given_mib = mem_to_mib(value)
        if given_mib is None or given_mib < need_mem:
            items[mem_at[1]] = f"mem={need_mem}mb"
            out[mem_at[0]] = ",".join(items)
            notes.append(f"raising mem from {value} to {need_mem}mb")
    elif not any("select=" in a for a in out):
        extra.append(f"mem={need_mem}mb")
        notes.append(f"adding mem={need_mem}mb")
    return Fitted(_one_resource_list(out, extra), notes)


def _one_resource_list(args: list[str], extra: list[str]) -> list[str]:
    """All -l lists as one, where the first was: Torque takes several, but slurm-wlm-torque's qsub keeps only
    the last -l it sees, which would silently drop the VMs' cores or memory."""
    lists = [args[i + 1] for i in range(len(args) - 1) if args[i] == "-l" and (i == 0 or args[i - 1] != "-l")]
    merged = ",".join([*lists, *extra])
    out, placed, i = [], False, 0
    while i < len(args):
        if args[i] == "-l" and i + 1 < len(args):
            if not placed:
                out += ["-l", merged]
                placed = True
            i += 2
            continue
        out.append(args[i])
        i += 1
    if not placed and merged:
        out += ["-l", merged]
    return out
