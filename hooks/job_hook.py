"""What every scheduler's prologue and epilogue do for a VM job, once the scheduler adapter (torque.py,
slurm.py) has turned its arguments and environment into a JobContext.

The prologue publishes JobStarted and waits until every planned guest is ready, or something fails, or the
deadline passes; the answer is an Outcome that the adapter maps to the scheduler's exit codes. The
epilogue publishes JobEnded and waits, bounded, for each node's teardown confirmation.

Every broker failure (pika's exceptions come out of HookChannel as BrokerUnreachable) is an infrastructure
failure: the prologue answers FAILED (a bounded requeue with the reason), the epilogue gives up its wait and
leaves the guests to reconciliation. Neither ever dies with a traceback.

`guests_marker` (a file of the adapter's choosing, on the hook's host): the prologue creates it just before it
publishes JobStarted (from then on guests may exist) and removes it when the bridge rejected the job before any
plan. An adapter that knows from it (and from a record that its prologue ran to the end without publishing) that
no guest was ever asked for passes `nothing_asked` to the epilogue, which then ends at once, without the broker,
instead of waiting its whole epilogue_timeout for nodes that have nothing to confirm.
"""

from __future__ import annotations

import enum
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from opentelemetry.trace import Link, get_current_span

from vtorque.shared import messages as m
from vtorque.shared import topology, tracing
from vtorque.shared.config import Config
from vtorque.shared.hook_channel import BrokerUnreachable, HookChannel
from vtorque.shared.job_script import JobHeader
from vtorque.shared.spec import SpecError, VMSpec, validate_job


class Verdict(enum.Enum):
    READY = "ready"
    REJECTED = "rejected"  # a retry cannot cure it: bad spec, unknown image
    FAILED = "failed"  # infrastructure: a retry may cure it


@dataclass
class Outcome:
    verdict: Verdict
    reason: str = ""
    ready: list[m.GuestReady] = field(default_factory=list)
    planned: bool = True  # guests may exist; False only when the bridge rejected the job before any plan


@dataclass(frozen=True)
class JobContext:
    scheduler: str
    job_id: str
    owner: m.Owner
    nodes: list[m.NodeAllocation]
    header: JobHeader
    walltime: float | None = None  # seconds: node workers remove the job's guests once it has passed


class Progress:
    """One line per step, prefixed, into the job's output where the scheduler gives us one."""

    def __init__(self, stream: TextIO = sys.stdout):
        self.stream = stream
        self.t0 = time.monotonic()

    def __call__(self, text: str) -> None:
        print(f"vtorque [{time.monotonic() - self.t0:6.1f}s] {text}", file=self.stream, flush=True)


CANCELLED_HEADER = "x-vtorque-cancelled"  # set by an adapter's channel on the JobRejected it makes of a cancel


def _mark(marker: Path | None) -> bool:
    """Create the marker; True when this call made it (an earlier attempt's marker is left to its epilogue)."""
    if marker is None:
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        return True
    except FileExistsError:
        return False


def run_prologue(job: JobContext, config: Config, deadline_s: float, progress: Callable[[str], None],
                 channel_factory=HookChannel, guests_marker: Path | None = None,
                 on_valid: Callable[[VMSpec], None] | None = None) -> Outcome:
    """`on_valid`: what the adapter does only for a job whose spec is valid (Torque: start the cancel
    watcher), called once the spec is validated and before anything is published. The spec is validated here
    and nowhere else in the hook's process."""
    with tracing.job_trace(job.job_id, job.header.traceparent):
        if job.header.submitted_ns and job.header.submitted_ns < time.time_ns():
            # The wait in the scheduler's queue, recorded now that it is over: nobody was alive during it.
            tracing.tracer().start_span("queue wait", start_time=job.header.submitted_ns, attributes={
                "vtorque.scheduler": job.scheduler}).end()
        with tracing.tracer().start_as_current_span("prologue", attributes={
                "vtorque.scheduler": job.scheduler, "vtorque.nodes": len(job.nodes)}) as span:
            outcome = _prologue(job, config, deadline_s, progress, channel_factory, guests_marker, on_valid)
            span.set_attribute("vtorque.verdict", outcome.verdict.value)
            if outcome.verdict is not Verdict.READY:
                tracing.mark_error(span, outcome.reason)
            return outcome


def _prologue(job: JobContext, config: Config, deadline_s: float, progress, channel_factory,
              guests_marker: Path | None, on_valid: Callable[[VMSpec], None] | None) -> Outcome:
    try:
        spec, _ = validate_job(job.header.spec, job.header.user_metadata, config)
    except SpecError as exc:
        return Outcome(Verdict.REJECTED, f"bad VM spec: {exc}")
    if on_valid is not None:
        on_valid(spec)
    digest = config.images.catalog[spec.img].sha256
    deadline = time.monotonic() + deadline_s
    progress(f"job {job.job_id}: {len(job.nodes)} node(s), image {spec.img}, {spec.vcpus} vCPU, "
             f"{spec.ram_mib} MiB; waiting up to {deadline_s:.0f}s for the guests")
    patterns = topology.bindings(topology.HOOK_Q, job=m.routing_word(job.job_id), digest=digest)
    try:
        channel = _Asking(channel_factory, config, patterns, progress)
    except BrokerUnreachable as exc:
        return Outcome(Verdict.FAILED, str(exc))
    try:
        try:
            made = _mark(guests_marker)  # before the publish: a hook killed right after it still leaves the mark
        except OSError as exc:
            return Outcome(Verdict.FAILED, f"cannot record the job on this host: {exc}")
        channel.ask(m.JobStarted.new(
            job_id=job.job_id, deadline=deadline_s, scheduler=job.scheduler, owner=job.owner, nodes=job.nodes,
            spec=dict(job.header.spec), ssh_authorized_keys=list(job.header.ssh_pubkeys),
            user_metadata=dict(job.header.user_metadata), walltime=job.walltime))
        outcome = _wait_for_guests(channel, job.job_id, deadline, deadline_s, progress)
        if not outcome.planned and made and guests_marker is not None:
            guests_marker.unlink(missing_ok=True)  # the bridge rejected it before any plan: no guest anywhere
        return outcome
    except BrokerUnreachable as exc:
        return Outcome(Verdict.FAILED, str(exc))
    except Exception as exc:  # noqa: BLE001 - a broker error mid-wait is an infrastructure failure, not a crash
        return Outcome(Verdict.FAILED, f"lost the broker while waiting: {exc!r}")
    finally:
        channel.close()


def _may_retry(lost: int, config: Config, deadline: float) -> bool:
    """After the `lost`-th loss of the broker in one wait: whether to reconnect again (3 tries per
    hooks.broker_attempts, as long as a try still fits in the deadline)."""
    return lost <= 3 * config.hooks.broker_attempts and time.monotonic() + _retry_delay(lost) < deadline


def _retry_delay(lost: int) -> float:
    return min(0.5 * lost, 2.0)


class _Asking:
    """A hook's channel that outlives the broker node it is connected to. The hook asks once (JobStarted,
    JobEnded) and then reads its job's events; when its node is lost (a cluster lost one node), what was
    published to its queue meanwhile is lost with it, so it reconnects through [broker] hosts and asks again.
    Asking twice is safe: the bridge plans the same guests, a node worker re-announces a guest that runs and
    never boots a second one, a teardown of what is gone removes nothing. Right after a loss the other nodes
    may still be electing the quorum queues' new leaders (a publish is nacked meanwhile): hence a few tries,
    spaced out, within the deadline. What the caller heard before the loss stays heard: one events() spans
    every reconnection."""

    def __init__(self, channel_factory, config: Config, patterns: list[str], progress):
        self._open = lambda: channel_factory(config.broker.connection_url(), patterns,
                                             attempts=config.hooks.broker_attempts,
                                             timeout=config.broker.connect_timeout)
        self.config, self.progress = config, progress
        self.question: m.Event | None = None
        self.channel = self._open()  # BrokerUnreachable here: the caller's "cannot reach the broker"

    def ask(self, question: m.Event) -> None:
        self.question = question
        self.channel.publish(question)

    def events(self, deadline: float):
        lost = 0
        while True:
            try:
                yield from self.channel.events(deadline)
                return
            except BrokerUnreachable as exc:
                lost += 1
                if not _may_retry(lost, self.config, deadline):
                    raise
                self.channel.close()
                self.progress(f"{exc}; reconnecting to the broker and asking again")
                time.sleep(_retry_delay(lost))
                try:
                    self.channel = self._open()
                    self.channel.publish(self.question)
                except BrokerUnreachable as again:
                    self.channel = _Lost(again)  # counted as the next loss

    def close(self) -> None:
        self.channel.close()


class _Lost:
    """A channel whose connection could not be made: its events() raises the loss again."""

    def __init__(self, exc: BrokerUnreachable):
        self.exc = exc

    def events(self, deadline):
        raise self.exc
        yield  # pragma: no cover - a generator

    def close(self) -> None:
        pass


def _wait_for_guests(channel, job_id: str, deadline: float, deadline_s: float, progress) -> Outcome:
    expected: set[str] | None = None
    ready: dict[str, m.GuestReady] = {}
    links: list[Link] = []
    shown_progress = 0.0
    for event, headers in channel.events(deadline):
        if isinstance(event, m.JobPlanned):
            expected = {g.name for g in event.guests}
            progress(f"planned {len(expected)} guest(s) on {', '.join(sorted({g.node for g in event.guests}))}")
        elif isinstance(event, m.JobRejected):
            planned = expected is not None or bool(headers.get(CANCELLED_HEADER))
            return Outcome(Verdict.FAILED if event.retryable else Verdict.REJECTED, event.reason, planned=planned)
        elif isinstance(event, m.ImageStaged):
            if event.job_id != job_id:
                continue  # another job's staging of the same image
            how = "already cached" if event.cached else f"{event.bytes / 2**20:.0f} MiB in {event.seconds:.1f}s"
            progress(f"image {event.image} staged ({how})")
        elif isinstance(event, m.ImageStageFailed):
            if event.job_id != job_id:
                continue
            return Outcome(Verdict.REJECTED, f"image {event.image}: {event.reason}")
        elif isinstance(event, m.ImageStagingProgress):
            # Whichever job's request started the copy, it is this job's image: one copy serves all. At most
            # one line every 5 s (the stager reports every second), and the last one.
            if time.monotonic() - shown_progress >= 5 or (event.total and event.bytes >= event.total):
                shown_progress = time.monotonic()
                of = f"/{event.total / 2**20:.0f}" if event.total else ""
                progress(f"image {event.image}: {event.bytes / 2**20:.0f}{of} MiB staged, "
                         f"{event.rate / 2**20:.0f} MiB/s")
        elif isinstance(event, m.GuestFailed):
            tail = f"\n--- console of {event.guest} ---\n{event.console_tail}" if event.console_tail else ""
            progress(f"guest {event.guest} on {event.node} failed: {event.reason}{tail}")
            verdict = Verdict.FAILED if event.retryable else Verdict.REJECTED
            return Outcome(verdict, f"guest {event.guest} on {event.node}: {event.reason}")
        elif isinstance(event, m.GuestReady):
            ready[event.guest] = event
            ctx = get_current_span(tracing.extract(headers)).get_span_context()
            if ctx.is_valid:
                links.append(Link(ctx))
            progress(f"guest {event.guest} ready on {event.node} after {event.timings.ready:.1f}s")
        if expected is not None and expected <= set(ready):
            # Fan-in: one span linking every guest's readiness.
            with tracing.tracer().start_as_current_span("all guests ready", links=links, attributes={
                    "messaging.batch.message_count": len(links)}):
                pass
            progress("all guests ready; starting the job")
            return Outcome(Verdict.READY, ready=[ready[name] for name in sorted(expected)])
    waiting = "the plan" if expected is None else f"{len(expected - set(ready))} guest(s)"
    return Outcome(Verdict.FAILED, f"timed out after {deadline_s:.0f}s waiting for {waiting}")


def run_epilogue(job: JobContext, config: Config, exit_status: int | None, progress,
                 channel_factory=HookChannel, nothing_asked: bool = False) -> bool:
    """True when every node confirmed its teardown in time, or when `nothing_asked` (no guest of the job was
    ever asked for: nothing to remove or wait for)."""
    with tracing.job_trace(job.job_id, job.header.traceparent):
        with tracing.tracer().start_as_current_span("epilogue", attributes={
                "vtorque.scheduler": job.scheduler, "vtorque.exit_status": exit_status or 0}) as span:
            if nothing_asked:
                # The prologue never published this job (bad spec, broker down, a node without a worker, ...):
                # no node has anything of it to remove or confirm.
                progress("no guest was ever asked for: nothing to remove")
                span.set_attribute("vtorque.guests_asked", False)
                return True
            nodes = [n.host for n in job.nodes]
            deadline = time.monotonic() + config.hooks.epilogue_timeout
            try:
                channel = _Asking(channel_factory, config,
                                  [topology.route(m.GuestsTornDown, job=m.routing_word(job.job_id))], progress)
            except BrokerUnreachable as exc:
                progress(f"cannot ask for teardown: {exc}; the node workers' reconciliation will remove the guests")
                tracing.mark_error(span, str(exc))
                return False
            try:
                channel.ask(m.JobEnded.new(job_id=job.job_id, deadline=config.hooks.epilogue_timeout,
                                           scheduler=job.scheduler, nodes=nodes, exit_status=exit_status))
                pending = set(nodes)
                for event, _ in channel.events(deadline):
                    if isinstance(event, m.GuestsTornDown):
                        pending.discard(event.node)
                        progress(f"{event.node}: removed {len(event.guests)} guest(s)")
                        if event.reason:
                            # Answered, so no point waiting on; the node's reconciliation removes the rest.
                            progress(f"{event.node}: not all removed ({event.reason}); the node retries on its own")
                            tracing.mark_error(span, f"{event.node}: {event.reason}")
                        if not pending:
                            return True
                progress(f"teardown not confirmed by {', '.join(sorted(pending))} in time")
                tracing.mark_error(span, "teardown not confirmed")
                return False
            except Exception as exc:  # noqa: BLE001 - BrokerUnreachable or worse: reconciliation takes over
                progress(f"lost the broker during the teardown: {exc}; the node workers' reconciliation will "
                         "remove the guests")
                tracing.mark_error(span, str(exc))
                return False
            finally:
                channel.close()
