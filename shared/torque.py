"""What vtorque knows of Torque, in one place: its job states, `qstat -f` and its folded lines, `exec_host` (which
hosts and cores a job has), PBS_NODEFILE and the prologue's Resource_List, the .o/.e paths, the server's accounting
records, pbs_mom's $prologalarm, and the one class that asks it (`Torque`: the shared/scheduler.py interface, plus
`attrs`, the raw `qstat -f` a prologue needs for exec_host and the .o/.e paths). vsub, the hooks, the bridge's
prefetch, reconciliation and `vtorque status` all read Torque through here. Parsers are pure (text in, values out)
and unit-tested on recorded output; only `Torque.run` (and `submit`) run a command. Light to import: the Torque
prologue starts it.
"""

from __future__ import annotations

import re
import subprocess
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from vtorque.shared import messages as m
from vtorque.shared.cpu_list import parse_cpu_list
from vtorque.shared.scheduler import (
    BadNode,
    JobInfo,
    SchedulerError,
    State,
    hms_seconds,
    mem_mib,
    run_client,
    submit_client,
)

# qstat job_state letters (TORQUE 6.1): C is kept only while keep_completed lasts.
_TORQUE_STATES: dict[str, State] = {"Q": "queued", "H": "queued", "W": "queued", "T": "queued", "R": "running",
                                    "S": "suspended", "E": "exiting", "C": "completed"}


def parse_qstat_f(text: str) -> dict[str, str]:
    """`qstat -f JOBID` → {attribute: value}. Long values are folded onto lines that start with a tab
    (TORQUE 6.1 qstat.c prt_attr: "\n\t" after a comma, or inside a token longer than the line): only the tab
    is dropped, the rest is the value's own text."""
    attrs: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if line.startswith("\t") and key:
            attrs[key] += line[1:]
            continue
        name, sep, value = line.strip().partition(" = ")
        if sep:
            key = name
            attrs[key] = value.strip()
    return attrs


def torque_job_info(job_id: str, text: str) -> JobInfo:
    """`qstat -f` text → JobInfo."""
    return job_info_from_attrs(job_id, parse_qstat_f(text))


def job_info_from_attrs(job_id: str, a: dict[str, str]) -> JobInfo:
    raw = a.get("job_state", "")
    state: State = _TORQUE_STATES.get(raw, "unknown")
    exit_code = None
    if "exit_status" in a and re.fullmatch(r"-?\d+", a["exit_status"]):
        exit_code = int(a["exit_status"])
        if state == "completed" and exit_code != 0:
            # Torque's own codes below 0 (-2 aborted by the prologue, -11 walltime, 271 = 256+SIGTERM qdel)
            state = "cancelled" if exit_code == 271 else "failed"
    # Short names, as the hooks and node workers name nodes (PBS_NODEFILE cut at the first dot): a site's
    # server_priv/nodes often says n1.cluster.
    nodes = tuple(dict.fromkeys(part.split("/")[0].split(".")[0] for part in a.get("exec_host", "").split("+")
                                if part))
    owner = a.get("Job_Owner", "").split("@")[0] or None
    wall = hms_seconds(a["Resource_List.walltime"]) if "Resource_List.walltime" in a else None
    mem = mem_mib(a["Resource_List.mem"], bare="b") if "Resource_List.mem" in a else None
    return JobInfo(job_id=job_id, state=state, raw_state=raw, exit_code=exit_code, owner=owner, nodes=nodes,
                   walltime_s=wall, reason=a.get("comment") or None, mem_mib=mem,
                   cores=_cores_of(a.get("exec_host", ""), nodes), queue=a.get("queue") or None,
                   stdout=_path_of(a.get("Output_Path", "")), stderr=_path_of(a.get("Error_Path", "")),
                   # start_count grows on every start, requeues included (../shared/reference/torque-hooks.md §8)
                   restarts=max(0, int(a["start_count"]) - 1) if a.get("start_count", "").isdigit() else None,
                   batch_host=nodes[0] if nodes else None)  # exec_host's first: the mother superior


def _cores_of(exec_host: str, nodes: tuple[str, ...]) -> tuple[int, ...]:
    """How many cores exec_host gives the job on each of `nodes`; () when it says nothing readable."""
    try:
        hosts = parse_exec_host(exec_host)
    except ExecHostError:
        return ()
    return tuple(len(hosts[n]) for n in nodes) if set(hosts) == set(nodes) else ()


class Torque:
    kind = "torque"

    def __init__(self, config):
        self.config = config  # the [scheduler] section

    def binary(self, name: str) -> str:
        return self.config.binary(name)

    def run(self, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """One of its client binaries (argv[0], by the configured path) with the configured time limit."""
        return run_client([self.binary(argv[0]), *argv[1:]], self.config.timeout, env)

    def cluster(self, job_id: str) -> str | None:
        """`torque:<server>`, the server in the job id (`12.head` → `torque:head`); None without one."""
        server = job_id.partition(".")[2]
        return f"torque:{server}" if server else None

    def submit(self, args: list[str]) -> subprocess.CompletedProcess:
        return submit_client([self.binary("qsub"), *args])

    def cancel(self, job_id: str) -> None:
        try:
            self.run("qdel", job_id)
        except SchedulerError:
            pass

    def requeue(self, job_id: str) -> None:
        """`qrerun JOBID`: pbs_server requeues a rerunnable job (qsub -r y, the default) for its managers."""
        proc = self.run("qrerun", job_id)
        if proc.returncode != 0:
            raise SchedulerError(f"qrerun {job_id}: {_last_line(proc, 'qrerun')}")

    def bad_nodes(self) -> list[BadNode]:
        proc = self.run("pbsnodes", "-l", "-n")
        if proc.returncode != 0:
            raise SchedulerError(f"pbsnodes -l: {_last_line(proc, 'pbsnodes')}")
        return bad_nodes(proc.stdout)

    def release(self, job: JobInfo, node: str) -> str | None:
        return "Torque takes no node from a running job"

    def note(self, job_id: str, text: str) -> str | None:
        # Torque's job comment is the server's own (qalter cannot set it): the owner reads it in the job's
        # output only through the hooks (hooks/torque/owner_notes.py); here the log and the operator's output.
        return "Torque keeps no job comment vtorque may set"

    def suspend(self, job_id: str) -> None:
        self._signal("suspend", job_id)

    def resume(self, job_id: str) -> None:
        self._signal("resume", job_id)

    def _signal(self, verb: str, job_id: str) -> None:
        """`qsig -s suspend|resume JOBID`: pbs_server takes them from its managers and operators alone (others get
        `qsig: Unauthorized Request`); the mom stops (SIGSTOP) or continues the job's processes, job_state S."""
        proc = self.run("qsig", "-s", verb, job_id)
        if proc.returncode != 0:
            raise SchedulerError(f"qsig -s {verb} {job_id}: {_last_line(proc, 'qsig')}")

    def _qstat_f(self, job_id: str) -> str | None:
        # Plain -f: TORQUE shows a completed job (C) while keep_completed lasts. Its -x is not PBS Pro's
        # "finished jobs too" but XML output (qstat.c: case 'x': DisplayXML), which this parser cannot read.
        proc = self.run("qstat", "-f", job_id)
        if proc.returncode != 0:
            if "Unknown Job" in proc.stderr:
                return None
            raise SchedulerError(f"qstat exit {proc.returncode}: {proc.stderr.strip()[:200]}")
        return proc.stdout

    def attrs(self, job_id: str) -> dict[str, str] | None:
        """`qstat -f JOBID` as {attribute: value} (exec_host, Error_Path, ...: what a prologue's environment
        does not carry); None when Torque no longer knows the job. Raises SchedulerError."""
        text = self._qstat_f(job_id)
        return None if text is None else parse_qstat_f(text)

    def job(self, job_id: str) -> JobInfo | None:
        text = self._qstat_f(job_id)
        if text is None:
            return None
        attrs = parse_qstat_f(text)
        if "job_state" not in attrs:
            # Never "gone" on output we cannot read: reconciliation would remove a running job's guests.
            raise SchedulerError(f"qstat -f {job_id} shows no job_state: {text.strip()[:120]!r}")
        return job_info_from_attrs(job_id, attrs)


# -- exec_host: which hosts and cores ----------------------------------------------------------------------------
# The prologue gets the job's hosts from PBS_NODEFILE (one line per core) but not which cores: those are in the
# job's `exec_host` attribute (`vm/0-1`, `n1/0-1+n2/2-3`, or the older one-slot-per-entry `n1/0+n1/1+n2/0`),
# which Torque shows in `qstat -f` and writes into the server's accounting `S`/`E` records
# (../shared/reference/torque-hooks.md §8).

_CORES = re.compile(r"^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$")


def _last_line(proc: subprocess.CompletedProcess, client: str) -> str:
    """A Torque client's refusal in one line, without its `client: ` prefix."""
    lines = [line.strip() for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
    return lines[-1][:200].removeprefix(f"{client}: ") if lines else f"exit {proc.returncode}"


# `pbsnodes -l` states that take a node out (a node listed there is not up).
BAD_STATES = frozenset({"offline", "down", "unknown"})


def bad_nodes(pbsnodes_ln: str) -> list[BadNode]:
    """`pbsnodes -l -n` (`node  state[,state]  note` per line, the nodes not up) → BadNode list."""
    found = []
    for line in pbsnodes_ln.splitlines():
        words = line.split(None, 2)
        if len(words) >= 2 and set(words[1].split(",")) & BAD_STATES:
            found.append(BadNode(words[0], words[2].strip() if len(words) > 2 else ""))
    return found


class ExecHostError(ValueError):
    pass


def short_host(host: str) -> str:
    """Node workers name themselves by short host name, as PBS_NODEFILE entries are cut in the hook."""
    return host.split(".")[0]


def parse_core_list(text: str) -> list[int]:
    """'0-1,4' -> [0, 1, 4] (in the order given, without repeats; shared/cpu_list.py), nothing but digits,
    dashes and commas."""
    if not _CORES.match(text):
        raise ExecHostError(f"bad core list {text!r}")
    try:
        return parse_cpu_list(text)
    except ValueError as exc:
        raise ExecHostError(str(exc).replace("CPU", "core")) from None


def parse_exec_host(text: str) -> OrderedDict[str, list[int]]:
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


def exec_host_of(attrs: dict[str, str] | None, why: str = "") -> tuple[OrderedDict[str, list[int]] | None, str]:
    """The exec_host of `qstat -f`'s attributes (Torque.attrs), or (None, why not)."""
    if attrs is None:
        return None, why
    value = attrs.get("exec_host")
    if not value:
        return None, "qstat -f shows no exec_host"
    try:
        return parse_exec_host(value), ""
    except ExecHostError as exc:
        return None, str(exc)


# -- what a root prologue is handed: PBS_NODEFILE and Resource_List ($5) -----------------------------------------

def nodes_from_nodefile(path: str | None, exec_host: OrderedDict[str, list[int]] | None = None
                        ) -> list[m.NodeAllocation]:
    """PBS_NODEFILE lists a host once per core, in allocation order; the first host is the mother superior.
    exec_host (when known) says which cores: kept only where it agrees with the node file's count."""
    counts: OrderedDict[str, int] = OrderedDict()
    if path:
        for line in Path(path).read_text().split():
            host = short_host(line)
            counts[host] = counts.get(host, 0) + 1
    return nodes_with_cores(counts, exec_host)


def nodes_with_cores(counts: OrderedDict[str, int], exec_host: OrderedDict[str, list[int]] | None
                     ) -> list[m.NodeAllocation]:
    nodes = []
    for host, n in counts.items():
        cores = exec_host.get(host) if exec_host else None
        nodes.append(m.NodeAllocation(host=host, ncpus=n, cores=list(cores) if cores and len(cores) == n else None))
    return nodes


def walltime_seconds(resource_list: str) -> int | None:
    """walltime from Resource_List ($5 of the prologue): `walltime=01:00:00`, `walltime=90`, `1:02:00:00`."""
    match = re.search(r"(?:^|,)walltime=([0-9:]+)(?:,|$)", resource_list)
    if not match:
        return None
    parts = match.group(1).split(":")
    if "" in parts or len(parts) > 4:
        return None
    values = [int(p) for p in parts]
    days = values.pop(0) if len(values) == 4 else 0
    total = 0
    for v in values:
        total = total * 60 + v
    return days * 86400 + total


def output_paths(attrs: dict[str, str] | None) -> list[Path]:
    """The job's .o/.e as `qstat -f` names them (Output_Path/Error_Path = `host:/path`): each absolute path once,
    output first."""
    paths: list[Path] = []
    for key in ("Output_Path", "Error_Path"):
        path = _path_of((attrs or {}).get(key, ""))
        if path and path not in [str(p) for p in paths]:
            paths.append(Path(path))
    return paths


def _path_of(value: str) -> str | None:
    """`host:/path` (qstat -f's Output_Path, Error_Path) → the absolute path; None when it names none."""
    path = value.split(":", 1)[1] if ":" in value else value
    return path if path.startswith("/") else None


# -- pbs_mom's prologue alarm: when it kills a root prologue -----------------------------------------------------

TORQUE_ALARM_SLACK = 10  # pbs_mom kills the prologue at $prologalarm - 10 s (when $prologalarm > 10)
DEFAULT_PROLOGALARM = 300  # PBS_PROLOG_TIME


def prologalarm_from_config(text: str) -> int | None:
    """`$prologalarm N` from mom_priv/config (the last one wins, as pbs_mom reads the file top to bottom)."""
    value = None
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) >= 2 and words[0] == "$prologalarm" and words[1].isdigit():
            value = int(words[1])
    return value


def torque_kill_after(prologalarm: int) -> int:
    """When pbs_mom SIGKILLs a prologue (recorded: $prologalarm 30 killed after 20 s)."""
    return prologalarm - TORQUE_ALARM_SLACK if prologalarm > TORQUE_ALARM_SLACK else prologalarm


def read_prologalarm(home: Path) -> int:
    """This mom's $prologalarm (<TORQUE_HOME>/mom_priv/config), else Torque's default."""
    try:
        value = prologalarm_from_config((Path(home) / "mom_priv" / "config").read_text(errors="replace"))
    except OSError:
        value = None
    return DEFAULT_PROLOGALARM if value is None else value


# -- the server's files: accounting records and job scripts ------------------------------------------------------

def accounting_dir(torque_home: str | Path) -> Path:
    """Where pbs_server writes its accounting records: server_priv/accounting/YYYYMMDD, a file a day."""
    return Path(torque_home) / "server_priv" / "accounting"


def server_job_script(torque_home: str | Path, job_id: str) -> Path | None:
    """The server's copy of a job's script: server_priv/jobs/<id>.SC, or jobs/<last digit>/<id>.SC when the
    server has use_jobs_subdirs; None when there is none (or the id could name another path)."""
    jobs = Path(torque_home) / "server_priv" / "jobs"
    if "/" in job_id or job_id.startswith("."):
        return None
    candidates = [jobs / f"{job_id}.SC"]
    digits = re.match(r"\d+", job_id)
    if digits:
        candidates.append(jobs / digits.group()[-1] / f"{job_id}.SC")
    return next((p for p in candidates if p.is_file()), None)


# -- the server's accounting records ---------------------------------------------------------------------------
# server_priv/accounting/YYYYMMDD, one record a line: `MM/DD/YYYY HH:MM:SS;TYPE;JOBID;key=value ...`

_RECORD_TIME = re.compile(r"^\d{2}/\d{2}/\d{4} \d{2}:\d{2}:\d{2}$")


@dataclass(frozen=True)
class AccountingRecord:
    when: datetime
    type: str  # Q S E D A R (others are kept and ignored)
    job_id: str
    attrs: dict[str, str]


def parse_attrs(text: str) -> dict[str, str]:
    """`user=a group=b Resource_List.nodes=1:ppn=2` → dict; words without '=' are ignored."""
    attrs = {}
    for word in text.split():
        key, sep, value = word.partition("=")
        if sep and key:
            attrs[key] = value
    return attrs


def parse_record(line: str) -> AccountingRecord | None:
    """One line of the accounting log, or None for a line that is not a record (blank, torn, foreign)."""
    parts = line.rstrip("\r\n").split(";", 3)
    if len(parts) < 3 or not _RECORD_TIME.match(parts[0]):
        return None
    rtype, job_id = parts[1], parts[2]
    if not re.fullmatch(r"[A-Z]", rtype) or not job_id or any(c.isspace() for c in job_id):
        return None
    try:
        when = datetime.strptime(parts[0], "%m/%d/%Y %H:%M:%S")
    except ValueError:
        return None
    return AccountingRecord(when, rtype, job_id, parse_attrs(parts[3] if len(parts) > 3 else ""))


def parse_accounting(text: str) -> list[AccountingRecord]:
    """Every record of an accounting file's text (lines that are not records are passed over)."""
    return [rec for rec in map(parse_record, text.splitlines()) if rec is not None]


# -- what pbs_mom gives its hooks ----------------------------------------------------------------------

def pbs_environment_lines(text: str) -> dict[str, str]:
    """`NAME=value` lines (Torque's pbs_environment: no shell, no quotes removed but a surrounding pair)."""
    env = {}
    for line in text.splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and name.isidentifier() and not line.lstrip().startswith("#"):
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            env[name] = value
    return env


def hook_base_env(torque_home: str | Path) -> dict[str, str]:
    """What pbs_mom adds to its hooks' environment from <TORQUE_HOME>/pbs_environment ({} when absent)."""
    try:
        return pbs_environment_lines((Path(torque_home) / "pbs_environment").read_text(errors="replace"))
    except OSError:
        return {}
