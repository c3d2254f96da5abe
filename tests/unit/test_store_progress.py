"""What the waiting prologue prints of a staging's progress (hooks/job_hook.py), fed the events it would get."""

from vtorque.hooks.job_hook import Verdict, _wait_for_guests
from vtorque.shared import messages as m

DIGEST = "d" * 64
MiB = 2**20


class Channel:
    """The hook channel's `events()` interface over a fixed list: what the broker would deliver."""

    def __init__(self, events):
        self._events = events

    def events(self, deadline):
        for event in self._events:
            yield event, {}


def progress_event(job_id, done, total, rate=100 * MiB):
    return m.ImageStagingProgress.new(job_id=job_id, deadline=60.0, image="big", digest=DIGEST, bytes=done,
                                      total=total, rate=rate)


def test_the_prologue_shows_staging_progress_sparingly_whoever_started_the_copy():
    events = [progress_event("7.vm", 100 * MiB, 1000 * MiB), progress_event("7.vm", 200 * MiB, 1000 * MiB),
              progress_event("other-job", 600 * MiB, 1000 * MiB, 50 * MiB),
              progress_event("other-job", 1000 * MiB, 1000 * MiB),
              m.JobRejected.new(job_id="7.vm", deadline=60.0, reason="stop here")]
    lines = []
    outcome = _wait_for_guests(Channel(events), "7.vm", deadline=1e12, deadline_s=60, progress=lines.append)
    assert outcome.verdict is Verdict.REJECTED
    assert lines == ["image big: 100/1000 MiB staged, 100 MiB/s",  # the first at once, then one per 5 s ...
                     "image big: 1000/1000 MiB staged, 100 MiB/s"]  # ... and the last one always


def test_progress_without_a_known_total():
    events = [progress_event("7.vm", 64 * MiB, None),
              m.JobRejected.new(job_id="7.vm", deadline=60.0, reason="stop here")]
    lines = []
    _wait_for_guests(Channel(events), "7.vm", deadline=1e12, deadline_s=60, progress=lines.append)
    assert lines == ["image big: 64 MiB staged, 100 MiB/s"]
