"""The image stager: StageImage commands in, a verified image in the store and an ImageStaged event out.

One process works on `images.concurrent_stagings` commands at once (one consumer each on the stager queue,
see `extra_consumers`), so a long download does not hold up a cached image; any number of processes may
share a store: the store's lock, not memory, makes concurrent requests for one image a single copy. While
it copies, the stager publishes ImageStagingProgress; a JobDeleted event (from `vtorque run prefetch`)
withdraws that job's requests, and a copy nobody else wants stops (ImageStageCancelled).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from kombu import Queue
from opentelemetry import trace

from vtorque.shared import messages as m
from vtorque.shared import topology
from vtorque.shared.bus import Publisher, stager_queue, table_queue
from vtorque.shared.clock import SYSTEM_CLOCK, Clock
from vtorque.shared.config import Config, ImageEntry, refresh_catalog
from vtorque.shared.image_store import ImageStore, StageCancelled, StageError, parse_size
from vtorque.shared.logs import log
from vtorque.shared.service import Handler, Service

LOG = logging.getLogger("vtorque.stager")


def cancel_queue() -> Queue:
    """Job deletions for the stagers: a durable queue, so a deletion while every stager is down still counts."""
    return table_queue(topology.STAGER_CANCEL_Q)


class ProgressMeter:
    """Turns a stream of (bytes done, total) into at most one report per `interval` seconds, with the rate
    over the time since the previous report. Pure: the clock is passed in."""

    def __init__(self, interval: float, clock=time.monotonic):
        self.interval, self.clock = interval, clock
        self._last_time: float | None = None
        self._last_bytes = 0

    def update(self, done: int, total: int | None, final: bool = False) -> tuple[int, int | None, float] | None:
        now = self.clock()
        if self._last_time is None:
            self._last_time, self._last_bytes = now, 0
        elapsed = now - self._last_time
        if not final and elapsed < self.interval:
            return None
        rate = (done - self._last_bytes) / elapsed if elapsed > 0 else 0.0
        self._last_time, self._last_bytes = now, done
        return done, total, rate


class ImageStager(Service):
    name = "stager"

    def __init__(self, config: Config, publisher: Publisher, store: ImageStore | None = None,
                 clock: Clock = SYSTEM_CLOCK):
        # Shared by every consumer's handler thread: the Publisher gives each thread its own connection.
        self.config, self.publisher = config, publisher
        self.clock = clock  # how often progress is said, and when a command is past its deadline
        images = config.images
        self.store = store or ImageStore(images.store, budget=parse_size(images.store_budget),
                                         http_timeout=images.http_timeout, http_retries=images.http_retries)
        try:  # what a stager that died left in tmp/: conversions at once, partial downloads when a day old
            self.store.clean_tmp()
        except OSError as exc:
            log(LOG, logging.WARNING, "could not clean the store's tmp/", error=str(exc))

    def queues(self):
        return [stager_queue()]

    def handlers(self):
        return {m.StageImage: self.on_stage_image}

    def extra_consumers(self) -> list[tuple[list[Queue], Mapping[type, Handler]]]:
        """Concurrent stagings (one consumer each) and job deletions, beside the main consumer."""
        more = [(self.queues(), self.handlers()) for _ in range(max(0, self.config.images.concurrent_stagings - 1))]
        return more + [([cancel_queue()], {m.JobDeleted: self.on_job_deleted})]

    # -- StageImage ---------------------------------------------------------------------------------------

    def on_stage_image(self, cmd: m.StageImage) -> None:
        span = trace.get_current_span()
        span.set_attribute("vtorque.image.digest", cmd.digest)
        span.set_attribute("vtorque.image.name", cmd.image)
        entry = self._entry(cmd.image, cmd.digest)
        if entry is None:
            self._failed(cmd, f"image {cmd.image} with digest {cmd.digest[:12]}… is not in this stager's catalog")
            return
        if self.store.job_cancelled(cmd.job_id, cmd.created_at.timestamp()):
            self._cancelled(cmd, f"job {cmd.job_id} was deleted before its image was staged")
            return
        meter = ProgressMeter(self.config.images.progress_interval, self.clock.monotonic)

        def progress(done: int, total: int | None) -> None:
            report = meter.update(done, total, final=total is not None and done >= total)
            if report is not None:
                self.publisher.publish(m.ImageStagingProgress.new(
                    job_id=cmd.job_id, deadline=cmd.deadline, image=cmd.image, digest=cmd.digest,
                    bytes=report[0], total=report[1], rate=round(report[2], 1)))

        still_wanted = _Throttled(lambda: self.store.wanted(cmd.digest), 0.25)
        with self.store.want(cmd.digest, cmd.job_id):
            try:
                staged = self.store.stage(
                    entry.source, cmd.digest, source_format=entry.source_format or entry.format,
                    target_format=entry.format, compress=entry.compress, size_hint=entry.size,
                    progress=progress, cancelled=lambda: not still_wanted(), job_id=cmd.job_id)
            except StageCancelled as exc:
                self._cancelled(cmd, str(exc))
                return
            except StageError as exc:
                self._failed(cmd, str(exc))
                return
        span.set_attribute("vtorque.image.bytes", staged.bytes)
        span.set_attribute("vtorque.image.cached", staged.cached)
        log(LOG, logging.INFO, "image staged", image=cmd.image, digest=cmd.digest, bytes=staged.bytes,
            seconds=round(staged.seconds, 3), cached=staged.cached, converted=staged.converted)
        self.publisher.publish(m.ImageStaged.new(
            job_id=cmd.job_id, deadline=cmd.deadline, image=cmd.image, digest=cmd.digest, path=str(staged.path),
            bytes=staged.bytes, seconds=staged.seconds, cached=staged.cached))

    def _entry(self, image: str, digest: str) -> ImageEntry | None:
        entry = self.config.images.catalog.get(image)
        if (entry is None or entry.sha256 != digest) and refresh_catalog(self.config):
            entry = self.config.images.catalog.get(image)  # added or updated by `vtorque images` just now
        return entry if entry is not None and entry.sha256 == digest else None

    def _failed(self, cmd: m.StageImage, reason: str) -> None:
        log(LOG, logging.ERROR, "staging failed", image=cmd.image, reason=reason)
        trace.get_current_span().set_status(trace.Status(trace.StatusCode.ERROR, reason))
        failed = m.ImageStageFailed.new(job_id=cmd.job_id, deadline=cmd.deadline, image=cmd.image,
                                        digest=cmd.digest, reason=reason)
        self.publisher.publish(failed)

    def _cancelled(self, cmd: m.StageImage, reason: str) -> None:
        log(LOG, logging.INFO, "staging cancelled", image=cmd.image, reason=reason)
        self.publisher.publish(m.ImageStageCancelled.new(job_id=cmd.job_id, deadline=cmd.deadline, image=cmd.image,
                                                         digest=cmd.digest, reason=reason))

    # -- JobDeleted ---------------------------------------------------------------------------------------

    def on_job_deleted(self, event: m.JobDeleted) -> None:
        digests = self.store.cancel_job(event.job_id)
        log(LOG, logging.INFO, "job deleted: its staging requests withdrawn", reason=event.reason,
            images=[d[:12] for d in digests])


class _Throttled:
    """Ask `probe` at most every `interval` seconds; in between, the last answer stands."""

    def __init__(self, probe, interval: float):
        self.probe, self.interval = probe, interval
        self._at, self._value = 0.0, True

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self._at >= self.interval:
            self._at, self._value = now, self.probe()
        return self._value
