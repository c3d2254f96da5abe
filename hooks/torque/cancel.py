"""The cancel path (qdel), see the package's docstring: epilogue.precancel runs as the owner and may only make
a directory in the job's cancel directory; the root watcher the prologue left behind sees it and publishes
JobEnded, so the teardown starts at once; the epilogue removes the directory, which ends the watcher."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from vtorque.shared import messages as m

from .log import hook_log

if TYPE_CHECKING:  # `vtorque install-hooks` imports CANCEL_DIR from here: not the hooks' pika and tracing
    from vtorque.hooks.job_hook import JobContext

CANCEL_DIR = "vtorque-cancel"  # in mom_priv: <jobid>/ per VM job, owned by the job's owner
CANCEL_REQUEST = "requested"  # what epilogue.precancel makes inside it
WATCH_POLL = 0.25


def safe_job_id(job_id: str) -> bool:
    """A job id usable as one file name (the cancel directory); Torque's are `<seq>[<idx>].<server>`."""
    return bool(re.fullmatch(r"[A-Za-z0-9_\-\[\]][A-Za-z0-9_.\-\[\]]*", job_id)) and job_id not in (".", "..")


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


def watch_main(args: list[str]) -> int:
    """`python -m vtorque.hooks.torque watch-cancel JOB UID DIR UNTIL NODES TRACEPARENT`, as spawned above."""
    from vtorque.shared.config import ConfigError, load_config

    from .log import setup_hook_log

    job_id, uid, cancel_dir, until, nodes, traceparent = args
    try:
        config = load_config(role="hook")
    except ConfigError:
        return 1
    setup_hook_log(config)
    return watch_cancel(config, job_id, int(uid), Path(cancel_dir), float(until), [n for n in nodes.split(",") if n],
                        None if traceparent == "-" else traceparent)
