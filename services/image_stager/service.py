"""The image stager: StageImage commands in, a verified image in the store and an ImageStaged event out."""

from __future__ import annotations

import logging

from opentelemetry import trace

from vtorque.shared import messages as m
from vtorque.shared.bus import Publisher, stager_queue
from vtorque.shared.config import Config
from vtorque.shared.logs import log

from .store import ImageStore, StageError

LOG = logging.getLogger("vtorque.stager")


class ImageStager:
    name = "stager"

    def __init__(self, config: Config, publisher: Publisher, store: ImageStore | None = None):
        self.config, self.publisher = config, publisher
        self.store = store or ImageStore(config.images.store)

    def queues(self):
        return [stager_queue()]

    def handlers(self):
        return {m.StageImage: self.on_stage_image}

    def on_stage_image(self, cmd: m.StageImage) -> None:
        span = trace.get_current_span()
        span.set_attribute("vtorque.image.digest", cmd.digest)
        span.set_attribute("vtorque.image.name", cmd.image)
        entry = self.config.images.catalog.get(cmd.image)
        if entry is None or entry.sha256 != cmd.digest:
            self._failed(cmd, f"image {cmd.image} with digest {cmd.digest[:12]}… is not in this stager's catalog")
            return
        try:
            staged = self.store.stage(entry.source, cmd.digest)
        except StageError as exc:
            self._failed(cmd, str(exc))
            return
        span.set_attribute("vtorque.image.bytes", staged.bytes)
        span.set_attribute("vtorque.image.cached", staged.cached)
        log(LOG, logging.INFO, "image staged", image=cmd.image, digest=cmd.digest, bytes=staged.bytes,
            seconds=round(staged.seconds, 3), cached=staged.cached)
        self.publisher.publish(m.ImageStaged.new(
            job_id=cmd.job_id, deadline=cmd.deadline, image=cmd.image, digest=cmd.digest, path=str(staged.path),
            bytes=staged.bytes, seconds=staged.seconds, cached=staged.cached))

    def _failed(self, cmd: m.StageImage, reason: str) -> None:
        log(LOG, logging.ERROR, "staging failed", image=cmd.image, reason=reason)
        trace.get_current_span().set_status(trace.Status(trace.StatusCode.ERROR, reason))
        failed = m.ImageStageFailed.new(job_id=cmd.job_id, deadline=cmd.deadline, image=cmd.image,
                                        digest=cmd.digest, reason=reason)
        self.publisher.publish(failed)
