"""What the owner of a job that did not start is told: Torque does not deliver an aborted job's .o/.e, so the
reason goes to a file of the owner's beside where they would have been (`<job name>.v<seq>`), and a final
note goes onto the .o/.e Torque delivered for an earlier, requeued attempt. The texts are pure; the writing is
done as the owner (write_as_user)."""

from __future__ import annotations

import logging
import os
import pwd
import re
import signal
import time
from datetime import datetime
from pathlib import Path

from vtorque.hooks.job_hook import JobContext

from .exit_codes import ABORT, REQUEUE
from .log import hook_log

# -- pure ---------------------------------------------------------------------------------------------------

def job_sequence(job_id: str) -> str:
    """What Torque puts after `.o` in an output name: `12.vm` -> `12`, array `12[3].vm` -> `12-3`."""
    seq = job_id.split(".", 1)[0]
    return re.sub(r"\[([0-9]*)\]", lambda g: f"-{g.group(1)}" if g.group(1) else "", seq)


def reason_file_name(job_name: str, job_id: str) -> str:
    """`<job name>.v<seq>`, beside where Torque would have put `<job name>.o<seq>` and `.e<seq>`."""
    name = job_name if job_name and "/" not in job_name and job_name not in (".", "..") else "job"
    return f"{name}.v{job_sequence(job_id)}"


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


# -- I/O ----------------------------------------------------------------------------------------------------

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
