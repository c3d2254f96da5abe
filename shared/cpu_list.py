"""CPU lists (`0-2,5`), as the kernel's sysfs, libvirt's cpusets, Torque's exec_host and Slurm's CPU_IDs all
write them: one reading of them, pure. Each caller keeps its own policy around it (what an empty list means,
which error it raises)."""

from __future__ import annotations


def parse_cpu_list(text: str) -> list[int]:
    """'0-2,5' → [0, 1, 2, 5]: in the order given, without repeats; blanks around the list and its parts (a sysfs
    file's newline) and empty parts are ignored, so a blank list is []. ValueError for anything else: a word, an
    open or backwards range."""
    cpus: list[int] = []
    seen: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, sep, high = part.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"bad CPU list {text.strip()!r}")
        first, last = int(low), int(high if sep else low)
        if last < first:
            raise ValueError(f"bad CPU range {part!r}")
        for cpu in range(first, last + 1):
            if cpu not in seen:
                seen.add(cpu)
                cpus.append(cpu)
    return cpus
