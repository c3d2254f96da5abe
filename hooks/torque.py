"""Torque's root prologue and epilogue for VM jobs, to the contract recorded from TORQUE 6.1
(../shared/reference/torque-hooks.md): prologue argv = jobid user group jobname resource_list queue account
script (8), epilogue argv = jobid user group jobname sid resource_list resources_used queue account
exit_status script (11); PBS_NODEFILE in the environment; cwd mom_priv; stdout/stderr are the job's.

Exit codes, as Torque reads them: 0 runs the job; 1 aborts it (Torque then keeps its .o/.e, so the reason also
goes to a file of the owner's, see write_reason); anything else requeues it with no limit, so an infrastructure
failure requeues at most hooks.max_requeues times, counted on disk, then aborts. The Python side answers
PY_REQUEUE for a requeue and the shell entry point (hooks/torque/prologue) turns it into 2; any other code
(a crash, an interpreter that cannot start) becomes 1 there: nothing but a deliberate decision ever requeues.

Cancel (qdel): Torque runs `epilogue.precancel` as the job's owner, with pbs_mom waiting for it, and users
hold no broker credentials. So the precancel only makes a directory (mkdir never blocks) inside the job's
cancel directory `<mom_priv>/vtorque-cancel/<jobid>/`, which the root prologue made for the owner; a small
root watcher that the prologue left behind (Torque does not kill a prologue's background children) sees it
and publishes JobEnded, so the teardown starts at once; the epilogue then confirms it. See docs/design.md.
"""

from __future__ import annotations

import dataclasses
import grp
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import OrderedDict
from datetime import UTC, datetime
from pathlib import Path

from vtorque.shared import messages as m
from vtorque.shared.job_script import HEADER_LINES, JobHeader, ScriptError, parse_header

from .job_hook import JobContext, Outcome, Verdict

RUN, ABORT, REQUEUE = 0, 1, 2  # what Torque sees
PY_REQUEUE = 75  # EX_TEMPFAIL: the Python side asks the shell entry point for a requeue (2)
TORQUE_ALARM_SLACK = 10  # pbs_mom kills the prologue at $prologalarm - 10 s (when $prologalarm > 10)
DEFAULT_PROLOGALARM = 300  # PBS_PROLOG_TIME
CANCEL_DIR = "vtorque-cancel"  # in mom_priv: <jobid>/ per VM job, owned by the job's owner
CANCEL_REQUEST = "requested"  # what epilogue.precancel makes inside it
WATCH_POLL = 0.25
LOG = logging.getLogger("vtorque.hooks.torque")


class HookUsage(Exception):
    pass


# -- pure: what Torque hands us ---------------------------------------------------------------------------

def read_header(script: str) -> JobHeader | None:
    try:
        with open(script, encoding="utf-8", errors="replace") as fh:
            head = "".join(fh.readline() for _ in range(HEADER_LINES))
    except OSError:
        return None
    return parse_header(head)


def nodes_from_nodefile(path: str | None, exec_host: OrderedDict[str, list[int]] | None = None
                        ) -> list[m.NodeAllocation]:
    """PBS_NODEFILE lists a host once per core, in allocation order; the first host is the mother superior.
    exec_host (when known) says which cores: kept only where it agrees with the node file's count."""
    counts: OrderedDict[str, int] = OrderedDict()
    if path:
        for line in Path(path).read_text().split():
            host = line.split(".")[0]
            counts[host] = counts.get(host, 0) + 1
    return nodes_with_cores(counts, exec_host)


def nodes_with_cores(counts: OrderedDict[str, int], exec_host: OrderedDict[str, list[int]] | None
                     ) -> list[m.NodeAllocation]:
    nodes = []
    for host, n in counts.items():
        cores = exec_host.get(host) if exec_host else None
        nodes.append(m.NodeAllocation(host=host, ncpus=n, cores=list(cores) if cores and len(cores) == n else None))
    return nodes


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


def prologue_room(prologalarm: int, margin: float, elapsed: float = 0.0) -> float:
    """Seconds left before Torque's kill, less `margin`, less what the hook already spent (a chained site
    prologue, start-up)."""
    return torque_kill_after(prologalarm) - margin - elapsed


def prologue_deadline(prologalarm: int, margin: float, cap: float, elapsed: float = 0.0) -> float:
    """Seconds the prologue may wait for guests: the room Torque leaves, never above `cap`
    (hooks.prologue_timeout)."""
    return min(cap, prologue_room(prologalarm, margin, elapsed))


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


def job_sequence(job_id: str) -> str:
    """What Torque puts after `.o` in an output name: `12.vm` -> `12`, array `12[3].vm` -> `12-3`."""
    seq = job_id.split(".", 1)[0]
    return re.sub(r"\[([0-9]*)\]", lambda g: f"-{g.group(1)}" if g.group(1) else "", seq)


def reason_file_name(job_name: str, job_id: str) -> str:
    """`<job name>.v<seq>`, beside where Torque would have put `<job name>.o<seq>` and `.e<seq>`."""
    name = job_name if job_name and "/" not in job_name and job_name not in (".", "..") else "job"
    return f"{name}.v{job_sequence(job_id)}"


def safe_job_id(job_id: str) -> bool:
    """A job id usable as one file name (the cancel directory); Torque's are `<seq>[<idx>].<server>`."""
    return bool(re.fullmatch(r"[A-Za-z0-9_\-\[\]][A-Za-z0-9_.\-\[\]]*", job_id)) and job_id not in (".", "..")


def torque_home(hook_path: str | None, configured: str) -> Path:
    """TORQUE_HOME: the parent of the mom_priv the hook was run from, else `[torque] home`."""
    if hook_path:
        here = Path(hook_path).parent
        if here.name == "mom_priv":
            return here.parent
    return Path(configured)


def prologue_exit_code(outcome: Outcome, requeues_so_far: int, max_requeues: int) -> int:
    if outcome.verdict is Verdict.READY:
        return RUN
    if outcome.verdict is Verdict.FAILED and requeues_so_far < max_requeues:
        return REQUEUE
    return ABORT


def reason_text(job_id: str, job_name: str, code: int, reason: str, attempt: int, max_requeues: int,
                node: str, when: datetime) -> str:
    if code == REQUEUE:
        then = (f"Torque will start the job again (requeue {attempt} of {max_requeues}); "
                f"after {max_requeues} it is aborted. This is not the job's end: this file is rewritten with "
                f"what finally happens.")
    elif attempt > 1:
        then = (f"Torque aborted the job (attempt {attempt}, after {attempt - 1} requeue(s)): this is its end. "
                f"The .o/.e files Torque delivered for the requeued attempts are not the last word; the last "
                f"attempt's are not delivered, so this file says why.")
    else:
        then = "Torque aborted the job: its .o and .e files are not delivered, so this file says why."
    return (f"vtorque: job {job_id} ({job_name}) did not start: {reason}\n"
            f"{then}\n"
            f"node {node}, {when.strftime('%Y-%m-%d %H:%M:%S UTC')}; "
            f"your administrator can show every step with `vtorque trace {job_id}`.\n")


def started_text(job_id: str, job_name: str, attempt: int, node: str, when: datetime) -> str:
    """The reason file of a job that started after requeues: the earlier "did not start" is no longer true."""
    return (f"vtorque: job {job_id} ({job_name}) started on attempt {attempt}, after {attempt - 1} requeue(s); "
            f"its guests were ready on node {node} at {when.strftime('%Y-%m-%d %H:%M:%S UTC')}.\n"
            f"The requeue notes of the earlier attempts are superseded: the job's own .o/.e tell the rest.\n")


def final_note(job_id: str, code: int, reason: str, attempt: int, reason_file: str | None) -> str:
    """Appended to the .o/.e Torque delivered for the previous (requeued) attempt, which otherwise would be the
    last thing the owner sees and still promise another start."""
    where = f" (see {reason_file})" if reason_file else ""
    return (f"vtorque: FINAL: job {job_id} was aborted on attempt {attempt}, not requeued again: {reason}{where}\n"
            if code == ABORT else "")


def delivered_paths(attrs: dict[str, str] | None) -> list[Path]:
    """The job's .o/.e as `qstat -f` names them (Output_Path/Error_Path = `host:/path`), where they exist here."""
    paths: list[Path] = []
    for key in ("Output_Path", "Error_Path"):
        value = (attrs or {}).get(key, "")
        path = value.split(":", 1)[1] if ":" in value else value
        if path.startswith("/") and path not in [str(p) for p in paths]:
            paths.append(Path(path))
    return paths


# -- I/O helpers ------------------------------------------------------------------------------------------

def owner(user: str, group: str) -> m.Owner:
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise HookUsage(f"job owner {user} is unknown on this host") from None
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        gid = pw.pw_gid
    return m.Owner(user=user, uid=pw.pw_uid, gid=gid, group=group)


def job_context(argv: list[str], env, script_index: int, exec_host=None) -> JobContext | None:
    header = read_header(argv[script_index])
    if header is None:
        return None
    return JobContext(scheduler="torque", job_id=argv[0], owner=owner(argv[1], argv[2]),
                      nodes=nodes_from_nodefile(env.get("PBS_NODEFILE"), exec_host), header=header,
                      walltime=walltime_seconds(argv[4]))


def hook_age(env) -> float:
    """Seconds since pbs_mom started our shell entry point (our parent), so time spent in a chained site
    prologue counts against Torque's alarm; 0 when we were not started by it."""
    if not env.get("VTORQUE_HOOK_PATH"):
        return 0.0
    try:
        fields = Path(f"/proc/{os.getppid()}/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - started)
    except (OSError, ValueError, IndexError):
        return 0.0


def read_prologalarm(home: Path) -> int:
    try:
        value = prologalarm_from_config((home / "mom_priv" / "config").read_text(errors="replace"))
    except OSError:
        value = None
    return DEFAULT_PROLOGALARM if value is None else value


def qstat_attrs(job_id: str, config) -> tuple[dict[str, str] | None, str]:
    """`qstat -f JOBID` as {attribute: value} (exec_host, Error_Path, ...: the prologue's environment carries
    none of them); (None, why) if qstat cannot answer. Asked through shared/torque.py, by the [scheduler] path:
    the site's Torque, never the first qstat on PATH."""
    from vtorque.shared.scheduler import SchedulerError
    from vtorque.shared.torque import Torque

    try:
        attrs = Torque(config.scheduler).attrs(job_id)
    except SchedulerError as exc:
        return None, str(exc)
    return (None, f"qstat -f {job_id}: Torque does not know the job") if attrs is None else (attrs, "")


def exec_host_of(attrs: dict[str, str] | None, why: str = "") -> tuple[OrderedDict[str, list[int]] | None, str]:
    from vtorque.shared.torque import ExecHostError, parse_exec_host

    if attrs is None:
        return None, why
    value = attrs.get("exec_host")
    if not value:
        return None, "qstat -f shows no exec_host"
    try:
        return parse_exec_host(value), ""
    except ExecHostError as exc:
        return None, str(exc)


def qstat_exec_host(job_id: str, config) -> tuple[OrderedDict[str, list[int]] | None, str]:
    """exec_host from `qstat -f JOBID`; (None, why) if not."""
    return exec_host_of(*qstat_attrs(job_id, config))


def setup_hook_log(config) -> None:
    from vtorque.shared.logs import JsonFormatter

    try:
        Path(config.torque.log_file).parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(config.torque.log_file)
        os.chmod(config.torque.log_file, 0o640)
    except OSError:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter("vtorque-hook"))
    LOG.handlers[:] = [handler]
    LOG.setLevel(logging.INFO)
    LOG.propagate = False


def hook_log(level: int, msg: str, **fields) -> None:
    from vtorque.shared.logs import log

    log(LOG, level, msg, **fields)


def write_as_user(uid: int, gid: int, user: str, path: Path, text: str, timeout: float = 5.0,
                  append: bool = False) -> str | None:
    """Create `path` as the user (their own rights, so root squashing on NFS homes does not matter and the
    file is theirs), or with `append` add to it if it exists (never create); refuses to follow a symlink.
    None when written, else why not."""
    flags = (os.O_WRONLY | os.O_APPEND if append else os.O_WRONLY | os.O_CREAT | os.O_TRUNC) | os.O_NOFOLLOW
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: only raw syscalls until _exit
        os.close(rd)
        try:
            os.initgroups(user, gid)
            os.setgid(gid)
            os.setuid(uid)
            fd = os.open(path, flags, 0o600)
            os.write(fd, text.encode())
            os.close(fd)
            os._exit(0)
        except BaseException as exc:  # noqa: BLE001 - report to the parent, never return into its code
            os.write(wr, str(getattr(exc, "strerror", None) or exc).encode()[:200])
            os._exit(1)
    os.close(wr)
    end = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > end:  # a hung network file system must not hold the prologue past its deadline
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(rd)
            return f"{path}: no answer in {timeout:.0f}s"
        time.sleep(0.02)
    err = os.read(rd, 400).decode(errors="replace")
    os.close(rd)
    return None if os.waitstatus_to_exitcode(status) == 0 else f"{path}: {err}"


def write_reason(job: JobContext, job_name: str, env, text: str) -> str | None:
    """The reason file in PBS_O_WORKDIR, else in the owner's home. The path written, or None."""
    name = reason_file_name(job_name, job.job_id)
    dirs = [d for d in (env.get("PBS_O_WORKDIR"), _home_of(job.owner.user)) if d]
    for d in dict.fromkeys(dirs):
        problem = write_as_user(job.owner.uid, job.owner.gid, job.owner.user, Path(d) / name, text)
        if problem is None:
            return str(Path(d) / name)
        hook_log(logging.WARNING, "reason file not written", path=str(Path(d) / name), error=problem)
    return None


def _home_of(user: str) -> str | None:
    try:
        return pwd.getpwnam(user).pw_dir
    except KeyError:
        return None


def _requeue_counter(state_dir: str, job_id: str) -> Path:
    return Path(state_dir) / "hooks" / "torque" / f"{m.routing_word(job_id)}.requeues"


def _guests_marker(state_dir: str, job_id: str) -> Path:
    """Made by the prologue before it publishes JobStarted (hooks/job_hook.py): guests of the job may exist."""
    return Path(state_dir) / "hooks" / "torque" / f"{m.routing_word(job_id)}.guests"


def _quiet_marker(state_dir: str, job_id: str) -> Path:
    """Made by a prologue that ran to its end without a guests marker: it asked no node for anything. With this
    and no guests marker the epilogue ends at once. Neither (a prologue of an older vtorque, one killed early):
    the epilogue asks and waits, as it always did."""
    return Path(state_dir) / "hooks" / "torque" / f"{m.routing_word(job_id)}.quiet"


def nothing_asked(state_dir: str, job_id: str) -> bool:
    return _quiet_marker(state_dir, job_id).exists() and not os.path.lexists(_guests_marker(state_dir, job_id))


def read_requeues(counter: Path, max_requeues: int) -> int:
    """A counter that is unreadable or not a number counts as exhausted: abort rather than loop."""
    try:
        return int(counter.read_text().strip()) if counter.exists() else 0
    except (OSError, ValueError):
        return max_requeues


# -- the cancel path --------------------------------------------------------------------------------------

def cancel_root(home: Path) -> Path:
    return home / "mom_priv" / CANCEL_DIR


def make_cancel_dir(home: Path, job: JobContext) -> Path | None:
    """<mom_priv>/vtorque-cancel/<jobid>/, the owner's (0700): only they (and root) can ask for a cancel."""
    if not safe_job_id(job.job_id):
        return None
    root = cancel_root(home)
    root.mkdir(mode=0o711, exist_ok=True)
    os.chmod(root, 0o711)  # the prologue's umask is 0077
    path = root / job.job_id
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)  # an earlier attempt's: its request (if any) was for that attempt
    path.mkdir(mode=0o700)
    os.chown(path, job.owner.uid, job.owner.gid)
    return path


def remove_cancel_dir(home: Path, job_id: str) -> None:
    if not safe_job_id(job_id):
        return
    path = cancel_root(home) / job_id
    try:
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)  # fd-based on Linux: a user's symlink inside cannot redirect it
    except OSError as exc:
        hook_log(logging.WARNING, "cancel directory not removed", path=str(path), error=str(exc))


def spawn_cancel_watcher(job: JobContext, cancel_dir: Path, until: float, traceparent: str | None,
                         env) -> int:
    """Start the root watcher in a session of its own, with no fd of the job's (.OU/.ER) kept open."""
    argv = [sys.executable, "-P", "-m", "vtorque.hooks.torque", "watch-cancel", job.job_id,
            str(job.owner.uid), str(cancel_dir), f"{until:.0f}", ",".join(n.host for n in job.nodes),
            traceparent or "-"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            close_fds=True, start_new_session=True, cwd="/", env=dict(env))
    return proc.pid


def watch_cancel(config, job_id: str, uid: int, cancel_dir: Path, until: float, nodes: list[str],
                 traceparent: str | None) -> int:
    """Until the epilogue removes cancel_dir (or `until`): on the owner's request, publish JobEnded."""
    request = cancel_dir / CANCEL_REQUEST
    while time.time() < until:
        try:
            st = os.lstat(request)
        except FileNotFoundError:
            if not cancel_dir.is_dir():
                return 0  # the job ended: the epilogue took over
            time.sleep(WATCH_POLL)
            continue
        if st.st_uid != uid:  # only the owner (or root) can write there; anything else is not a request
            hook_log(logging.WARNING, "cancel request ignored: not the owner's", job_id=job_id, uid=st.st_uid)
            return 0
        return _publish_cancel(config, job_id, nodes, traceparent, cancel_dir)
    hook_log(logging.WARNING, "cancel watcher gave up: the job outlived its walltime", job_id=job_id)
    return 0


def _publish_cancel(config, job_id: str, nodes: list[str], traceparent: str | None, cancel_dir: Path) -> int:
    from vtorque.shared import tracing
    from vtorque.shared.hook_channel import BrokerUnreachable, HookChannel

    tracing.setup_tracing("vtorque-hook", config.tracing, metrics=False)
    try:
        with tracing.job_trace(job_id, traceparent), tracing.tracer().start_as_current_span(
                "precancel", attributes={"vtorque.scheduler": "torque"}) as span:
            for attempt in range(1, 6):
                try:
                    channel = HookChannel(config.broker.connection_url(), [], attempts=config.hooks.broker_attempts,
                                          timeout=config.broker.connect_timeout, label=m.routing_word(job_id))
                except BrokerUnreachable as exc:
                    hook_log(logging.WARNING, "cancel: broker unreachable", job_id=job_id, attempt=attempt,
                             error=str(exc))
                    if not cancel_dir.is_dir():
                        break
                    time.sleep(min(2 ** attempt, 10))
                    continue
                try:
                    channel.publish(m.JobEnded.new(job_id=job_id, deadline=config.hooks.epilogue_timeout,
                                                   scheduler="torque", nodes=nodes, exit_status=None))
                except BrokerUnreachable as exc:
                    hook_log(logging.WARNING, "cancel: publish failed", job_id=job_id, attempt=attempt,
                             error=str(exc))
                    time.sleep(min(2 ** attempt, 10))
                    continue
                finally:
                    channel.close()
                hook_log(logging.INFO, "cancel requested by the owner: teardown started", job_id=job_id,
                         nodes=nodes)
                return 0
            tracing.mark_error(span, "cancel not published; the epilogue tears down")
            return 0
    finally:
        tracing.shutdown_tracing()


def torque_channel_factory(config, hosts: list[str]):
    """HookChannel plus two Torque needs: fail early when a node of the job has no node worker (instead of
    waiting out the whole deadline), and stop waiting when the job is cancelled (JobEnded) mid-boot."""
    import pika
    import pika.exceptions

    from vtorque.hooks.job_hook import CANCELLED_HEADER
    from vtorque.shared.hook_channel import (
        BrokerUnreachable,
        HookChannel,
        describe,
        missing_node_workers,
        no_node_worker_reason,
    )

    class NodeWorkersMissing(BrokerUnreachable):
        pass

    class TorqueChannel(HookChannel):
        def __init__(self, url, patterns, attempts=3, timeout=5.0):
            super().__init__(url, patterns, attempts=attempts, timeout=timeout)
            if config.torque.require_node_workers:
                try:
                    missing = missing_node_workers(self.conn, hosts, config.torque.node_worker_grace)
                except (pika.exceptions.AMQPError, OSError) as exc:
                    self.close()
                    raise BrokerUnreachable(f"broker unusable: {describe(exc)}") from None
                if missing:
                    self.close()
                    raise NodeWorkersMissing(no_node_worker_reason(missing))

        def events(self, deadline):
            for event, headers in super().events(deadline):
                if isinstance(event, m.JobEnded):
                    yield m.JobRejected.new(job_id=event.job_id, deadline=event.deadline,
                                            reason="the job was cancelled (qdel) while its guests were booting"), {
                        CANCELLED_HEADER: True}
                    return
                yield event, headers

    return TorqueChannel


# -- entry points -----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None, env=os.environ) -> int:
    t0 = time.monotonic()
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "watch-cancel" and len(argv) == 7:
        return _watch_main(argv[1:])
    if not argv or argv[0] not in ("prologue", "epilogue"):
        print("usage: python -m vtorque.hooks.torque prologue|epilogue ARGS...", file=sys.stderr)
        return ABORT
    which, args = argv[0], argv[1:]
    want = 8 if which == "prologue" else 11
    if len(args) != want:
        print(f"vtorque: the Torque {which} expects {want} arguments, got {len(args)}", file=sys.stderr)
        return ABORT if which == "prologue" else 0

    from vtorque.hooks.job_hook import Progress
    from vtorque.shared import tracing
    from vtorque.shared.config import ConfigError, load_config

    progress = Progress(sys.stdout)
    try:
        config = load_config(role="hook")
        setup_hook_log(config)
        home = torque_home(env.get("VTORQUE_HOOK_PATH"), config.torque.home)
        job = job_context(args, env, want - 1)
    except (ConfigError, HookUsage, ScriptError) as exc:
        print(f"vtorque: {exc}", file=sys.stderr)
        return ABORT if which == "prologue" else 0
    if job is None:
        return 0
    tracing.setup_tracing("vtorque-hook", config.tracing, metrics=False)
    try:
        if which == "epilogue":
            return _epilogue(job, args, config, home, progress)
        return _prologue(job, args, config, home, env, progress, t0)
    finally:
        tracing.shutdown_tracing()


def _epilogue(job: JobContext, args: list[str], config, home: Path, progress) -> int:
    from vtorque.hooks.job_hook import run_epilogue

    exit_status = int(args[9]) if args[9].lstrip("-").isdigit() else None
    remove_cancel_dir(home, job.job_id)  # ends the cancel watcher: from here the epilogue tears down
    if exit_status != -14:  # -14: the prologue asked for a requeue; any other end is the job's last
        _requeue_counter(config.state_dir, job.job_id).unlink(missing_ok=True)
    marker = _guests_marker(config.state_dir, job.job_id)
    confirmed = run_epilogue(job, config, exit_status, progress,
                             nothing_asked=nothing_asked(config.state_dir, job.job_id))
    if confirmed:
        marker.unlink(missing_ok=True)  # every node confirmed: nothing of the job is left anywhere
    if exit_status != -14:  # the job's last end: what is left is reconciliation's
        marker.unlink(missing_ok=True)
        _quiet_marker(config.state_dir, job.job_id).unlink(missing_ok=True)
    hook_log(logging.INFO if confirmed else logging.WARNING, "epilogue done", job_id=job.job_id,
             exit_status=exit_status, teardown_confirmed=confirmed)
    return 0  # Torque ignores the epilogue's exit code; reconciliation covers what it missed


def _prologue(job: JobContext, args: list[str], config, home: Path, env, progress, t0: float) -> int:
    from vtorque.hooks.job_hook import run_prologue

    alarm = read_prologalarm(home)
    elapsed = hook_age(env) + (time.monotonic() - t0)
    deadline_s = prologue_deadline(alarm, config.torque.prologue_margin, config.hooks.prologue_timeout, elapsed)
    counter = _requeue_counter(config.state_dir, job.job_id)
    requeues = read_requeues(counter, config.hooks.max_requeues)
    attrs = None
    if prologue_room(alarm, config.torque.prologue_margin, elapsed) < 1:
        outcome = Outcome(Verdict.REJECTED,
                          f"$prologalarm {alarm} in {home}/mom_priv/config leaves no time to boot guests "
                          f"(Torque kills the prologue after {torque_kill_after(alarm)} s; vtorque keeps "
                          f"{config.torque.prologue_margin:.0f} s): raise it")
    else:
        attrs, why = qstat_attrs(job.job_id, config)
        exec_host, why = exec_host_of(attrs, why)
        if exec_host is None:
            hook_log(logging.INFO, "cores unknown: nothing will be pinned", job_id=job.job_id, why=why)
        else:
            # Only the nodes change: everything else (walltime: the guests' end time) stays as Torque gave it.
            job = dataclasses.replace(job, nodes=nodes_from_nodefile(env.get("PBS_NODEFILE"), exec_host))
        def start_cancel_watcher(_spec) -> None:  # only for a valid spec: run_prologue validated it
            try:
                cancel_dir = make_cancel_dir(home, job)
                if cancel_dir is not None:
                    walltime = walltime_seconds(args[4]) or 7 * 86400
                    spawn_cancel_watcher(job, cancel_dir, time.time() + deadline_s + walltime + 3600,
                                         job.header.traceparent, env)
            except OSError as exc:  # qdel then waits for the epilogue: slower, not wrong
                hook_log(logging.WARNING, "no cancel watcher", job_id=job.job_id, error=str(exc))

        remaining = deadline_s - (time.monotonic() - t0)
        outcome = run_prologue(job, config, remaining, progress,
                               channel_factory=torque_channel_factory(config, [n.host for n in job.nodes]),
                               guests_marker=_guests_marker(config.state_dir, job.job_id),
                               on_valid=start_cancel_watcher)
    if not os.path.lexists(_guests_marker(config.state_dir, job.job_id)):
        quiet = _quiet_marker(config.state_dir, job.job_id)
        quiet.parent.mkdir(parents=True, exist_ok=True)
        quiet.touch()
    code = prologue_exit_code(outcome, requeues, config.hooks.max_requeues)
    node, now = socket.gethostname().split(".")[0], datetime.now(UTC)
    if code == REQUEUE:
        counter.parent.mkdir(parents=True, exist_ok=True)
        counter.write_text(str(requeues + 1))
    else:
        counter.unlink(missing_ok=True)
    if code != RUN:
        text = reason_text(job.job_id, args[3], code, outcome.reason, requeues + 1, config.hooks.max_requeues,
                           node, now)
        where = write_reason(job, args[3], env, text)
        if code == REQUEUE:  # Torque delivers this attempt's .e: say it is not the end, and where the end goes
            then = f"; what finally happens goes to {where}" if where else ""
            print(f"vtorque: requeued ({requeues + 1} of {config.hooks.max_requeues}): {outcome.reason} "
                  f"(Torque starts the job again{then})", file=sys.stderr)
        else:
            print(f"vtorque: job aborted: {outcome.reason}", file=sys.stderr)
            if requeues:  # the previous attempt's delivered .o/.e still say "requeued": they get the end
                note = final_note(job.job_id, code, outcome.reason, requeues + 1, where)
                for path in delivered_paths(attrs):
                    problem = write_as_user(job.owner.uid, job.owner.gid, job.owner.user, path, note, append=True)
                    if problem:
                        hook_log(logging.INFO, "final note not added", path=str(path), error=problem)
        hook_log(logging.WARNING, "prologue failed", job_id=job.job_id, exit_code=code, reason=outcome.reason,
                 verdict=outcome.verdict.value, requeues=requeues, reason_file=where)
    else:
        if requeues:  # the reason file of an earlier attempt said "did not start": no longer true
            write_reason(job, args[3], env, started_text(job.job_id, args[3], requeues + 1, node, now))
        hook_log(logging.INFO, "prologue done: guests ready", job_id=job.job_id,
                 guests=[g.guest for g in outcome.ready])
    return PY_REQUEUE if code == REQUEUE else code


def _watch_main(args: list[str]) -> int:
    from vtorque.shared.config import ConfigError, load_config

    job_id, uid, cancel_dir, until, nodes, traceparent = args
    try:
        config = load_config(role="hook")
    except ConfigError:
        return 1
    setup_hook_log(config)
    return watch_cancel(config, job_id, int(uid), Path(cancel_dir), float(until), [n for n in nodes.split(",") if n],
                        None if traceparent == "-" else traceparent)


if __name__ == "__main__":
    sys.exit(main())
