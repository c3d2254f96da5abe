"""`vtorque migrate JOBID --from NODE [--to NODE]`: move a running job's guests between nodes of the job, live.

Root's (the operator's) alone: an ordinary user is refused with one line. The scheduler says where a job may
run: the target must be a node the scheduler gave the job (a spare it holds, or a node of the site's spare pool
the job was given), checked here and again by the source's node worker before anything moves. This publishes
one MigrateGuests to the source node's worker and waits for each guest's GuestMigrated or MigrationFailed
(services/node_worker/migrate.py); the trace of the job shows the move, its pre-copy rounds and its downtime.
"""

from __future__ import annotations

import os

import click


def pick_target(source: str, allocation: tuple[str, ...], wanted: str | None) -> str:
    """The target: the one asked for, if the job holds it; else the job's first node other than the source.
    Raises click.ClickException with the reason."""
    if source not in allocation:
        raise click.ClickException(f"node {source} is not one of the job's nodes ({', '.join(allocation) or 'none'})")
    if wanted is not None:
        if wanted == source:
            raise click.ClickException(f"--to {wanted} is the node the guests are on")
        if wanted not in allocation:
            raise click.ClickException(f"node {wanted} is not one of the job's nodes ({', '.join(allocation)}): "
                                       "the scheduler gives a job its nodes (a spare the job holds)")
        return wanted
    others = [n for n in allocation if n != source]
    if not others:
        raise click.ClickException(f"the job holds no node but {source}: nowhere to move its guests "
                                   "(submit it with a spare node, e.g. one more than its guests use)")
    return others[0]


def checked_command(job_id: str, source: str, target: str, guests: tuple[str, ...], timeout: float):
    """The MigrateGuests to publish, checked as its consumer will check it (a guest name that is not a guest's,
    a node name that is not a node's): refused here in one line, rather than dead-lettered by the node worker
    while this waits for an answer. Raises click.ClickException."""
    import msgspec

    from vtorque.shared import messages as m

    cmd = m.MigrateGuests.new(job_id=job_id, deadline=timeout, node=source, target=target, guests=list(guests))
    try:
        m.decode(m.encode(cmd))
    except msgspec.ValidationError as exc:
        raise click.ClickException(f"vtorque migrate: {exc}") from None
    return cmd


@click.command()
@click.argument("job_id")
@click.option("--from", "source", required=True, help="The node whose guests of the job move.")
@click.option("--to", "target", help="The node they move to (one of the job's; default: its first other node).")
@click.option("--guest", "guests", multiple=True, help="Only this guest (repeatable; default: all on --from).")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait for the moves.")
def migrate(job_id: str, source: str, target: str | None, guests: tuple[str, ...], timeout: float) -> None:
    """Move job JOBID's running guests on node --from to node --to, live: the program in them keeps running."""
    if os.geteuid() != 0:
        raise click.ClickException("vtorque migrate: only root (the operator) may move a job's guests")
    from vtorque.cli.main import _config
    from vtorque.shared.scheduler import SchedulerError, scheduler_for

    checked_command(job_id, source, target or source, guests, timeout)  # before anything is asked or sent
    config = _config()
    try:
        info = scheduler_for(config).job(job_id)
    except SchedulerError as exc:
        raise click.ClickException(str(exc)) from None
    if info is None or info.state != "running":
        raise click.ClickException(f"job {job_id} is not running ({info.raw_state if info else 'unknown'})")
    to = pick_target(source, tuple(info.nodes), target)
    click.echo(f"job {job_id}: moving its guests on {source} to {to}")
    if move(config, checked_command(job_id, source, to, guests, timeout), click.echo):
        raise click.exceptions.Exit(1)


def move(config, cmd, echo) -> int:
    """Publish the checked MigrateGuests `cmd` to its source node and wait for each guest's answer, each said in
    one line through `echo(text, err=False)`; the number of guests not moved. Raises click.ClickException when
    the broker cannot be reached or the source does not answer within the command's deadline."""
    import time

    from vtorque.shared import messages as m
    from vtorque.shared import topology
    from vtorque.shared.bus import EventWaiter, Publisher

    job_id, source = cmd.job_id, cmd.node
    url = config.broker.connection_url()
    try:
        waiter = EventWaiter(url, topology.bindings(topology.MIGRATE_WAIT_Q, job=m.routing_word(job_id)),
                             timeout=config.broker.connect_timeout, prefix=topology.prefix(topology.MIGRATE_WAIT_Q))
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        raise click.ClickException(f"cannot reach the broker: {exc}") from exc
    publisher = Publisher(url)
    failed = 0
    try:
        publisher.publish(cmd)
        timeout = (cmd.deadline - cmd.created_at).total_seconds()  # the command's own deadline, absolute
        end = time.monotonic() + timeout
        while True:
            event = waiter.next(end)
            if event is None:
                # Not "not moved": libvirtd finishes a peer-to-peer move whose worker died (seen on the rig).
                raise click.ClickException(
                    f"job {job_id}: no answer from {source}'s node worker in {timeout:.0f}s; the move may have "
                    f"finished without it: `virsh list` on {source} and {cmd.target} says where the guests run")
            if event.job_id != job_id or getattr(event, "node", None) != source:
                continue
            if isinstance(event, m.GuestMigrated):
                down = f"{event.downtime_ms:.0f} ms" if event.downtime_ms is not None else "unknown"
                echo(f"{event.guest}: {source} -> {event.target} in {event.seconds:.2f}s, downtime {down}, "
                     f"{event.memory_iterations or 0} pre-copy rounds")
            elif isinstance(event, m.MigrationFailed):
                failed += 1
                where = f" (it runs on {event.running_on})" if event.running_on else ""
                echo(f"{event.guest or job_id}: not moved: {event.reason}{where}", err=True)
            else:
                continue
            if event.remaining == 0:
                break
    finally:
        waiter.close()
        publisher.close()
    return failed
