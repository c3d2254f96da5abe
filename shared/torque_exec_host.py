"""What Torque says about a job's hosts and cores, parsed. Pure: text in, values out.

The prologue gets the job's hosts from PBS_NODEFILE (one line per core) but not which cores: those are in the
job's `exec_host` attribute (`vm/0-1`, `n1/0-1+n2/2-3`, or the older one-slot-per-entry `n1/0+n1/1+n2/0`),
which Torque shows in `qstat -f` (parsed by shared/scheduler.parse_qstat_f) and writes into the server's
accounting `S`/`E` records (../shared/reference/torque-hooks.md §8). In shared/ because both the Torque hook and
the bridge read it, and hooks import nothing from services/.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime

_CORES = re.compile(r"^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$")


class ExecHostError(ValueError):
    pass


def short_host(host: str) -> str:
    """Node workers name themselves by short host name, as PBS_NODEFILE entries are cut in the hook."""
    return host.split(".")[0]


def parse_core_list(text: str) -> list[int]:
    """'0-1,4' -> [0, 1, 4] (in the order given, without repeats)."""
    if not _CORES.match(text):
        raise ExecHostError(f"bad core list {text!r}")
    cores: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        first, last = int(low), int(high or low)
        if last < first:
            raise ExecHostError(f"bad core range {part!r}")
        cores += [c for c in range(first, last + 1) if c not in cores]
    return cores


def parse_exec_host(text: str) -> "OrderedDict[str, list[int]]":
    """exec_host -> {short host: cores}, hosts in the order given (the first is the mother superior)."""
    text = text.strip()
    if not text:
        raise ExecHostError("empty exec_host")
    hosts: OrderedDict[str, list[int]] = OrderedDict()
    for entry in text.split("+"):
        host, sep, cores = entry.partition("/")
        if not sep or not host or not cores:
            raise ExecHostError(f"bad exec_host entry {entry!r} (want host/cores)")
        got = hosts.setdefault(short_host(host), [])
        got += [c for c in parse_core_list(cores) if c not in got]
    return hosts


@dataclass(frozen=True)
class AccountingRecord:
    """One line of server_priv/accounting/YYYYMMDD: `MM/DD/YYYY HH:MM:SS;TYPE;JOBID;key=value ...`."""

    time: datetime
    type: str  # Q queued, S started, E ended, D deleted, A aborted, R rerun
    job_id: str
    attrs: dict[str, str]


def parse_accounting_line(line: str) -> AccountingRecord:
    parts = line.rstrip("\n").split(";", 3)
    if len(parts) != 4:
        raise ValueError(f"not an accounting record: {line!r}")
    stamp, kind, job_id, rest = parts
    attrs = {}
    for item in rest.split():
        key, sep, value = item.partition("=")
        if sep:
            attrs[key] = value
    return AccountingRecord(datetime.strptime(stamp, "%m/%d/%Y %H:%M:%S"), kind, job_id, attrs)


def parse_accounting(text: str) -> list[AccountingRecord]:
    return [parse_accounting_line(line) for line in text.splitlines() if line.strip()]
