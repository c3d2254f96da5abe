"""Replays hook invocations recorded from a real TORQUE 6.1 (../shared/reference/torque-recorded/*.log)
against our own hook entry points.

A recording holds one or more runs of a hook (a requeued job's prologue runs many times), each like:

    === prologue start 00:22:31.846 pid=25783 ppid=25782 sid=25783 cwd=/var/spool/torque/mom_priv
    argc=8
    argv[0]=</var/spool/torque/mom_priv/prologue>
    argv[1]=<1.vm>
    ...
    umask=0077
    --- env (sorted):
    LANG=C.UTF-8
    ...
    === prologue exiting with 0 at 00:22:31.889

`parse_log` turns that into `Invocation`s; `TorqueHome` lays out a TORQUE_HOME-like tmp tree (mom_priv/jobs/
<jobid>.SC, aux/<jobid>) and rewrites every recorded /var/spool/torque path into it; `run_hook` runs one of
our entry points with exactly the recorded argv[1..], `env -i` plus the recorded environment (plus only
VTORQUE_CONFIG / VTORQUE_PYTHON), cwd = the tmp mom_priv, stdin /dev/null, the recorded umask and a new
session, as pbs_mom does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HOOKS = REPO / "hooks" / "torque"
RECORDED = Path(os.environ.get("VTORQUE_TORQUE_RECORDED", Path(__file__).parents[1] / "data" / "torque-recorded"))
RECORDED_HOME = "/var/spool/torque"  # the recordings were rewritten to the default TORQUE_HOME
ARGC = {"prologue": 8, "epilogue": 11, "epilogue.precancel": 11}  # recorded (torque-hooks.md 5.1, 5.4b)
ACCOUNTING = RECORDED / "accounting" / "20261126"
# What a site may add to its hooks' environment (pbs_environment) and the tests need: the config, the
# interpreter, and the broker user (this machine's /etc/vtorque/hooks.env names the running stack's otherwise).
ALLOWED_ADDITIONS = frozenset({"VTORQUE_CONFIG", "VTORQUE_PYTHON", "VTORQUE_BROKER__CREDENTIALS_FILE"})

_START = re.compile(r"^=== (?P<hook>\S+) start .*\bcwd=(?P<cwd>\S+)\s*$")
_ARGV = re.compile(r"^argv\[(?P<i>[0-9]+)\]=<(?P<value>.*)>$")


class RecordingError(ValueError):
    pass


@dataclass(frozen=True)
class Invocation:
    hook: str  # the recorded file name in mom_priv: prologue, epilogue, prologue.user, ...
    source: str  # "<log file>#<run number>"
    argc: int  # as the logger printed it ($#)
    argv: tuple[str, ...]  # argv[1..]
    argv0: str
    cwd: str
    umask: int
    env: tuple[tuple[str, str], ...]  # sorted, as recorded

    @property
    def job_id(self) -> str:
        return self.argv[0]

    @property
    def script_index(self) -> int:
        """0-based index into argv[1..] of the job script path: $8 (prologue) or $11 (epilogue)."""
        return self.argc - 1

    @property
    def script_path(self) -> str:
        return self.argv[self.script_index]

    def environ(self) -> dict[str, str]:
        return dict(self.env)

    def key(self) -> tuple:
        """What a replay depends on (identical requeue runs collapse to one)."""
        return (self.hook, self.argv, self.cwd, self.umask, self.env)

    def with_args(self, **by_position: str) -> Invocation:
        """A copy with some arguments replaced, by 1-based position: with_args(a2="nobody")."""
        argv = list(self.argv)
        for name, value in by_position.items():
            argv[int(name.lstrip("a")) - 1] = value
        return dataclasses.replace(self, argv=tuple(argv), source=self.source + "*")

    def with_job_id(self, job_id: str) -> Invocation:
        """A copy for another job: $1, the script path and PBS_NODEFILE all name the job id."""
        old = self.job_id

        def swap(value: str) -> str:
            head, sep, tail = value.rpartition("/")
            if sep and tail in (old, f"{old}.SC"):
                return head + sep + tail.replace(old, job_id, 1)
            return value

        argv = (job_id, *(swap(a) for a in self.argv[1:]))
        env = tuple((k, swap(v) if k == "PBS_NODEFILE" else v) for k, v in self.env)
        return dataclasses.replace(self, argv=argv, env=env, source=f"{self.source}[{job_id}]")


def parse_log(path: Path) -> list[Invocation]:
    """Every hook run recorded in one log file, in order."""
    runs: list[Invocation] = []
    current: dict | None = None
    in_env = False

    def finish() -> None:
        if current is None:
            return
        argv = current["argv"]
        if sorted(argv) != list(range(len(argv))):
            raise RecordingError(f"{current['source']}: argv indices {sorted(argv)} are not contiguous")
        if current["argc"] is None or current["umask"] is None:
            raise RecordingError(f"{current['source']}: no argc or umask line")
        if len(argv) != current["argc"] + 1:
            raise RecordingError(f"{current['source']}: argc={current['argc']} but {len(argv) - 1} argv lines")
        runs.append(Invocation(
            hook=current["hook"], source=current["source"], argc=current["argc"],
            argv=tuple(argv[i] for i in range(1, len(argv))), argv0=argv[0], cwd=current["cwd"],
            umask=current["umask"], env=tuple(sorted(current["env"].items()))))

    for line in path.read_text().splitlines():
        start = _START.match(line)
        if start:
            finish()
            current = {"hook": start["hook"], "cwd": start["cwd"], "argc": None, "argv": {}, "umask": None,
                       "env": {}, "source": f"{path.name}#{len(runs) + 1}"}
            in_env = False
            continue
        if current is None:
            continue
        if line.startswith("=== "):  # "=== prologue exiting with 0 at ..."
            in_env = False
            continue
        if in_env:
            name, sep, value = line.partition("=")
            if sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                if name in current["env"]:
                    raise RecordingError(f"{current['source']}: {name} twice in the env block")
                current["env"][name] = value
                continue
            in_env = False  # the logger's own later lines, e.g. "sleeping 120 at ..." (psleep)
        elif line.startswith("argc="):
            current["argc"] = int(line[len("argc="):])
        elif (arg := _ARGV.match(line)) is not None:
            current["argv"][int(arg["i"])] = arg["value"]
        elif line.startswith("umask="):
            current["umask"] = int(line[len("umask="):], 8)
        elif line.startswith("--- env"):
            in_env = True
    finish()
    return runs


def root_hook_logs(hook: str) -> list[Path]:
    """The root prologue.N.vm.log / epilogue.N.vm.log recordings, both runs (not .user, precancel, per-job)."""
    pattern = re.compile(rf"^{re.escape(hook)}\.[0-9]+\.vm\.log$")
    found = [p for d in (RECORDED, RECORDED / "run2") if d.is_dir() for p in sorted(d.iterdir())
             if pattern.match(p.name)]
    return found


def recorded_invocations(hook: str) -> list[Invocation]:
    """Distinct recorded runs of the root `hook` (the 111 identical requeue runs of one job count once)."""
    seen: dict[tuple, Invocation] = {}
    for path in root_hook_logs(hook):
        for inv in parse_log(path):
            if inv.hook != hook:
                raise RecordingError(f"{inv.source}: a {inv.hook} run in a {hook} log")
            seen.setdefault(inv.key(), dataclasses.replace(
                inv, source=f"{path.parent.name}/{inv.source}" if path.parent != RECORDED else inv.source))
    return list(seen.values())


# -- the tmp TORQUE_HOME ----------------------------------------------------------------------------------

PLAIN_SCRIPT = "#!/bin/sh\n#PBS -N hooktest\nhostname\nexit 3\n"


@dataclass(frozen=True)
class Prepared:
    argv: list[str]  # argv[1..], paths rewritten
    env: dict[str, str]
    cwd: Path
    umask: int
    script: Path
    nodefile: Path | None


class TorqueHome:
    """A TORQUE_HOME-like tree under `root`: mom_priv/jobs, aux, spool."""

    def __init__(self, root: Path, workdir: Path | None = None):
        self.root = root
        self.workdir = workdir  # the default stand-in for the recorded PBS_O_WORKDIR (see prepare)
        self.mom_priv = root / "mom_priv"
        for sub in (self.mom_priv / "jobs", root / "aux", root / "spool"):
            sub.mkdir(parents=True, exist_ok=True)

    def rewrite(self, value: str) -> str:
        if value == RECORDED_HOME or value.startswith(RECORDED_HOME + "/"):
            return str(self.root) + value[len(RECORDED_HOME):]
        return value

    def prepare(self, inv: Invocation, script_text: str | None = PLAIN_SCRIPT, workdir: Path | None = None,
                nodefile_hosts: list[str] | None = None) -> Prepared:
        """Rewrite the invocation into this tree and write its job script (None: leave it missing) and node file.

        `workdir` stands in for the recorded submit directory (PBS_O_WORKDIR=/home/trqtest, also the cwd of the
        hooks that run as the user), which does not exist here. `nodefile_hosts` replaces the recorded one-host
        node file (PBS_MSHOST repeated PBS_NP times) for multi-node replays."""
        recorded_workdir = inv.environ().get("PBS_O_WORKDIR")
        workdir = workdir if workdir is not None else self.workdir

        def rewrite(value: str) -> str:
            if workdir is not None and recorded_workdir and (
                    value == recorded_workdir or value.startswith(recorded_workdir + "/")):
                return str(workdir) + value[len(recorded_workdir):]
            return self.rewrite(value)

        argv = [self.rewrite(a) for a in inv.argv]
        env = {k: rewrite(v) for k, v in inv.env}
        script = Path(argv[inv.script_index])
        if not script.is_relative_to(self.mom_priv / "jobs"):
            raise RecordingError(f"{inv.source}: script {inv.script_path} is not under mom_priv/jobs")
        if script_text is not None:
            script.write_text(script_text)
        nodefile = None
        if "PBS_NODEFILE" in env:
            nodefile = Path(env["PBS_NODEFILE"])
            if not nodefile.is_relative_to(self.root / "aux"):
                raise RecordingError(f"{inv.source}: PBS_NODEFILE {env['PBS_NODEFILE']} is not under aux/")
            host = env.get("PBS_MSHOST", "localhost")
            hosts = nodefile_hosts or [host] * int(env.get("PBS_NP", "1"))
            nodefile.write_text("".join(f"{h}\n" for h in hosts))
        cwd = Path(rewrite(inv.cwd))
        cwd.mkdir(parents=True, exist_ok=True)
        if "PWD" in env:
            env["PWD"] = str(cwd)
        return Prepared(argv=argv, env=env, cwd=cwd, umask=inv.umask, script=script, nodefile=nodefile)


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def __str__(self) -> str:
        return (f"exit {self.returncode} after {self.seconds:.1f}s\n--- stdout\n{self.stdout}"
                f"--- stderr\n{self.stderr}")


def run_hook(hook: str, prepared: Prepared, add_env: dict[str, str] | None = None,
             timeout: float = 60.0, entry: Path | None = None, as_user: tuple[int, int] | None = None,
             devnull_stdio: bool = False) -> Result:
    """Run our hooks/torque/<hook> as pbs_mom runs its hooks: `as_user` (uid, gid) for the ones that run as
    the job's owner (epilogue.precancel), `devnull_stdio` for the precancel's stdout/stderr on /dev/null."""
    add_env = dict(add_env or {})
    extra = set(add_env) - ALLOWED_ADDITIONS
    if extra:
        raise ValueError(f"only {sorted(ALLOWED_ADDITIONS)} may be added to the recorded environment, not {extra}")
    env = {**prepared.env, **add_env}
    t0 = time.monotonic()
    user = {} if as_user is None else {"user": as_user[0], "group": as_user[1], "extra_groups": []}
    out = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL} if devnull_stdio else {"capture_output": True}
    proc = subprocess.run([str(entry or HOOKS / hook), *prepared.argv], env=env, cwd=prepared.cwd,
                          stdin=subprocess.DEVNULL, text=True, timeout=timeout,
                          umask=prepared.umask, start_new_session=True, **user, **out)
    return Result(proc.returncode, proc.stdout or "", proc.stderr or "", time.monotonic() - t0)


# -- the server's side: accounting records and a qstat that answers from them ------------------------------

def accounting_records() -> list:
    """The recorded server accounting log (torque-hooks.md 8), parsed."""
    from vtorque.shared.torque import parse_accounting

    return parse_accounting(ACCOUNTING.read_text())


def first_start_record(job_id: str):
    """The job's first S record in the first run (run2 re-used job ids 0-3 after the db was re-created)."""
    return next(r for r in accounting_records() if r.type == "S" and r.job_id == job_id)


QSTAT_F_ATTRS = [("Job_Name", "jobname"), ("Job_Owner", "owner"), ("queue", "queue"), ("Account_Name", "account"),
                 ("exec_host", "exec_host"), ("start_count", "start_count"), ("Output_Path", "Output_Path"),
                 ("Error_Path", "Error_Path")]


def qstat_f_text(job_id: str, attrs: dict[str, str]) -> str:
    """`qstat -f` of a running job, from an accounting record's fields. qstat's output was not recorded: this
    follows Torque 6.1's layout (`Job Id:`, then `    name = value`, long values folded at 78 columns onto
    lines that start with a tab), which is what the hook's parser must cope with."""
    lines = [f"Job Id: {job_id}"]
    for name, key in QSTAT_F_ATTRS + [(k, k) for k in attrs if k.startswith("Resource_List.")]:
        if key not in attrs:
            continue
        line = f"    {name} = {attrs[key]}"
        first, rest = line[:78], line[78:]
        lines.append(first)
        while rest:
            lines.append("\t" + rest[:70])
            rest = rest[70:]
    lines.append("    job_state = R")
    return "\n".join(lines) + "\n"


def qstat_stand_in(directory: Path, jobs: dict[str, dict[str, str]]) -> Path:
    """An executable `qstat` answering `qstat -f JOBID` for `jobs` (id -> accounting attrs), exit 153 and
    Torque's message for any other job."""
    answers = directory / "qstat-answers"
    answers.mkdir(parents=True, exist_ok=True)
    for job_id, attrs in jobs.items():
        (answers / job_id).write_text(qstat_f_text(job_id, attrs))
    script = directory / "qstat"
    script.write_text(f"""#!/bin/sh
[ "$1" = -f ] || {{ echo "usage: qstat -f [-x] JOBID" >&2; exit 2; }}
shift
[ "$1" = -x ] && shift  # completed jobs too (shared/scheduler.py asks so)
[ -n "$1" ] || {{ echo "usage: qstat -f [-x] JOBID" >&2; exit 2; }}
[ -f '{answers}/'"$1" ] || {{ echo "qstat: Unknown Job Id $1" >&2; exit 153; }}
cat '{answers}/'"$1"
""")
    script.chmod(0o755)
    return script


def suspendable_stand_ins(directory: Path, job_id: str, attrs: dict[str, str]) -> tuple[Path, Path]:
    """(qstat, qsig) for one running job that its operator can suspend and resume: `qsig -s suspend|resume JOBID`
    as root (a Torque manager) turns the job's `job_state` in `qstat -f` to S and back to R, as pbs_server does;
    anyone else gets pbs_server's refusal (exit 159), another job Torque's Unknown Job (153)."""
    answers = directory / "qstat-answers"
    answers.mkdir(parents=True, exist_ok=True)
    (answers / job_id).write_text(qstat_f_text(job_id, attrs))
    qstat = qstat_stand_in(directory, {job_id: attrs})
    qsig = directory / "qsig"
    qsig.write_text(f"""#!/bin/sh
[ "$1" = -s ] && [ -n "$3" ] || {{ echo "usage: qsig [-s signal] job_identifier..." >&2; exit 2; }}
[ -f '{answers}/'"$3" ] || {{ echo "qsig: Unknown Job Id $3" >&2; exit 153; }}
[ "$(id -u)" = 0 ] || {{ echo "qsig: Unauthorized Request  MSG=operation not permitted $3" >&2; exit 159; }}
case "$2" in
    suspend) from=R to=S ;;
    resume) from=S to=R ;;
    *) echo "qsig: Invalid request $2" >&2; exit 2 ;;
esac
grep -q "job_state = $from" '{answers}/'"$3" || {{ echo "qsig: Request invalid for state of job $3" >&2; exit 170; }}
sed -i "s/job_state = $from/job_state = $to/" '{answers}/'"$3"
""")
    qsig.chmod(0o755)
    return qstat, qsig


# -- a broker vhost of one's own ---------------------------------------------------------------------------

class PrivateVhost:
    """A RabbitMQ vhost for one test session, so its events and commands meet no other test's services (the
    single-host stack's own bridge and node worker consume the default vhost)."""

    def __init__(self, name: str):
        self.name = name
        self.url = f"amqp://guest:guest@127.0.0.1:5672/{name}"

    def __enter__(self) -> PrivateVhost:
        subprocess.run(["rabbitmqctl", "-q", "add_vhost", self.name], check=True, capture_output=True, timeout=60)
        subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", self.name, "guest", ".*", ".*", ".*"],
                       check=True, capture_output=True, timeout=60)
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", self.name], capture_output=True, timeout=60)


# -- helpers for the VM-job side ------------------------------------------------------------------------

def sentinel_python(directory: Path) -> tuple[Path, Path]:
    """A stand-in for VTORQUE_PYTHON that records its arguments (one per line) and exits 97."""
    marker = directory / "python-was-called"
    script = directory / "sentinel-python"
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" >> '{marker}'\nexit 97\n")
    script.chmod(0o755)
    return script, marker


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_config(path: Path, sections: dict) -> Path:
    """A TOML file from {"state_dir": ..., "broker": {...}, "images.catalog.tiny": {...}}."""
    lines = [f"{k} = {toml_value(v)}" for k, v in sections.items() if not isinstance(v, dict)]
    for name, table in sections.items():
        if isinstance(table, dict):
            lines += ["", f"[{name}]"] + [f"{k} = {toml_value(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path
