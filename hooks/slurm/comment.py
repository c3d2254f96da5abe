"""The Slurm hook's word to the owner, the job's Comment (the package's docstring says why the Comment): what
it says for a requeue and for a job that will not start, the owner's own --comment kept after ours, and the one
line vtorque-launch prints from it. Pure: the hook sets it and vtorque-launch reads it through shared/slurm.py."""

from __future__ import annotations

PREFIX = "vtorque: "
NOT_STARTED = PREFIX + "not started: "  # the launcher refuses to run a job whose Comment starts so
REQUEUED = PREFIX + "requeued "
USER_PART = " | your comment: "  # the owner's own --comment, kept after ours
COMMENT_MAX = 400  # characters of reason in the Comment (and the owner's one line)


def users_comment(comment: str) -> str:
    """What the owner put in --comment, with any comment of ours taken off."""
    if comment.startswith(PREFIX):
        return comment.partition(USER_PART)[2]
    return comment


def one_line(text: str, limit: int = COMMENT_MAX) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def comment_with(old: str, ours: str) -> str:
    """Our comment first, the owner's own after it (kept across requeues)."""
    theirs = users_comment(old)
    return ours + (USER_PART + theirs if theirs else "")


def requeue_comment(reason: str, attempt: int, max_requeues: int) -> str:
    return f"{REQUEUED}({attempt} of {max_requeues}): {one_line(reason)}"


def not_started_comment(reason: str, restarts: int) -> str:
    after = f" (after {restarts} requeue{'s' if restarts != 1 else ''})" if restarts else ""
    return f"{NOT_STARTED}{one_line(reason)}{after}"


def refusal_line(job_id: str, comment: str) -> str | None:
    """The owner's one line for a job the hook did not start, from its Comment; None when it may run."""
    if not comment.startswith(NOT_STARTED):
        return None
    why = comment[len(NOT_STARTED):].partition(USER_PART)[0]
    return f"vtorque: job {job_id} did not start: {why}"
