"""vtorque: the operator's command — run a service, look at a job's trace, print the message contract."""

from __future__ import annotations

import faulthandler
import importlib
import json
import signal
import sys
import threading

import click

from vtorque.shared.config import ConfigError, load_config

# What `vtorque run NAME` runs: each a shared.service.Service (prefetch follows the scheduler, not a queue).
SERVICE_CLASSES = {"bridge": "vtorque.services.scheduler_bridge.service:SchedulerBridge",
                   "stager": "vtorque.services.image_stager.service:ImageStager",
                   "node-worker": "vtorque.services.node_worker.service:NodeWorker"}
PREFETCHER = "vtorque.services.scheduler_bridge.accounting:make_prefetcher"
# A service's module another command runs as a program (`python -m`): `vtorque images warm` (cli/images.py).
SERVICE_PROGRAMS = {"warm-images": "vtorque.services.node_worker.warm"}
SERVICES = (*SERVICE_CLASSES, "prefetch")


def _service_object(path: str):
    """What SERVICE_CLASSES or PREFETCHER names: the cli imports a service only here, to run it."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _config():
    try:
        return load_config()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def _close_inherited_fds() -> None:
    """A daemon keeps nothing its starter had open: a lock held by the shell that ran `make demo` (or a
    pipe a caller waits on to close) would otherwise stay held for as long as the service runs."""
    import os

    os.closerange(3, os.sysconf("SC_OPEN_MAX"))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """vtorque: batch jobs in virtual machines."""


@main.command()
@click.argument("service", type=click.Choice(SERVICES))
def run(service: str) -> None:
    """Run one service in the foreground until SIGTERM/SIGINT."""
    _close_inherited_fds()
    from vtorque.shared import tracing
    from vtorque.shared.bus import Publisher
    from vtorque.shared.logs import setup_logging
    from vtorque.shared.service import run_service

    try:  # this service's own broker user (shared/topology.py), when the site has one per part
        config = load_config(role={"node-worker": "node"}.get(service, service))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    setup_logging(f"vtorque-{service}", config.log_level)
    # `kill -USR1 PID` writes every thread's stack to stderr (the service's log, the journal): where a service
    # that seems stuck waits, without stopping it.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    tracing.setup_tracing(f"vtorque-{service}", config.tracing)
    url = config.broker.connection_url()
    publisher = Publisher(url)  # every thread of the service publishes through it (one connection per thread)
    if service == "prefetch":  # not a consumer: follows the scheduler's queue (services/scheduler_bridge/accounting.py)
        _run_prefetch(config, publisher)
        return
    try:
        run_service(_service_object(SERVICE_CLASSES[service])(config, publisher), config)
    except ValueError as exc:  # a configuration its background tasks cannot run with
        raise click.ClickException(str(exc)) from exc
    finally:
        publisher.close_all()
        tracing.shutdown_tracing()


def _run_prefetch(config, publisher) -> None:
    import logging

    from vtorque.shared import tracing

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    prefetcher = _service_object(PREFETCHER)(config, publisher)
    logging.getLogger("vtorque").info("prefetch consuming the %s queue (no broker queue)", prefetcher.scheduler)
    try:
        prefetcher.run(stop)
    finally:
        publisher.close()
        tracing.shutdown_tracing()


def _job_spans(config, job_id: str):
    """The job's spans from Jaeger when [tracing] query_endpoint is set, else from the local span files."""
    from vtorque.cli.trace_view import QueryError, jaeger_job_spans, job_spans, load

    if config.tracing.query_endpoint:
        try:
            spans = jaeger_job_spans(config.tracing.query_endpoint, job_id)
        except QueryError as exc:
            raise click.ClickException(str(exc)) from exc
        where = config.tracing.query_endpoint
    else:
        spans, where = job_spans(load(config.tracing.dir), job_id), config.tracing.dir
    if not spans:
        raise click.ClickException(f"no spans for job {job_id} in {where}")
    return spans


@main.command()
@click.argument("job_id")
@click.option("--all", "show_all", is_flag=True,
              help="Every span, with the publish/process plumbing between the services.")
@click.option("--json", "as_json", is_flag=True, help="The spans as JSON lines, for scripts.")
def trace(job_id: str, show_all: bool, as_json: bool) -> None:
    """A job's phases (queue wait, prologue and each guest's boot, run, epilogue: durations and status), then
    its trace as a waterfall (Jaeger's query API if configured, else the local span files)."""
    from vtorque.cli.trace_view import is_plumbing, render_phases, waterfall

    config = _config()
    spans = _job_spans(config, job_id)
    if as_json:
        for s in spans:
            click.echo(json.dumps(s.to_json()))
        return
    traces = {s.trace_id for s in spans}
    click.echo(f"job {job_id}: {len(spans)} spans in trace{'s' if len(traces) > 1 else ''} {', '.join(sorted(traces))}")
    click.echo(render_phases(spans))
    click.echo("")
    click.echo(waterfall(spans, plumbing=show_all))
    hidden = sum(1 for s in spans if is_plumbing(s))
    if hidden and not show_all:
        click.echo(f"({hidden} publish/process spans between the services not shown: vtorque trace --all {job_id})")


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="The status as one JSON object.")
def status(job_id: str, as_json: bool) -> None:
    """A job's state and exit code (asked of the scheduler) with its phase, nodes, guests and timings (from
    its trace). When the scheduler no longer knows the job, the state comes from the trace, and it says so."""
    from vtorque.cli.status import ask_scheduler, job_status, render_status

    config = _config()
    answer = ask_scheduler(config, job_id)
    try:
        spans, no_trace = _job_spans(config, job_id), ""
    except click.ClickException as exc:  # no spans (a job without -vm, or none written yet), or Jaeger down
        spans, no_trace = [], exc.message
    if not spans and answer.info is None:
        asked = answer.error or f"{answer.kind} does not know it"
        raise click.ClickException(f"job {job_id}: {asked}; {no_trace}")
    st = job_status(job_id, spans, answer)
    if no_trace:
        st.notes.append(no_trace)
    click.echo(json.dumps(st.to_json()) if as_json else render_status(st))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per node.")
def nodes(as_json: bool) -> None:
    """The node workers' latest heartbeats: cores, free memory, guests running, KVM or TCG."""
    from vtorque.cli.status import render_nodes
    from vtorque.shared import messages as m
    from vtorque.shared.node_registry import latest_per_node, read_heartbeats

    config = _config()
    try:
        beats = latest_per_node(read_heartbeats(config.broker.connection_url(), config.broker.connect_timeout))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - the broker's own errors vary by transport
        raise click.ClickException(f"broker {config.broker.url}: {exc}") from exc
    if as_json:
        for b in beats:
            click.echo(m.encode(b).decode())
        return
    if not beats:
        raise click.ClickException("no node worker has sent a heartbeat in the last minute")
    click.echo(render_nodes(beats))


@main.command()
@click.option("--check", "only", multiple=True, metavar="NAME",
              help="Run only this check (repeatable), e.g. --check broker: the containers' health checks.")
def doctor(only: tuple[str, ...]) -> None:
    """Check this host: broker, libvirt, KVM or TCG, image store, clock skew (and the checks others add)."""
    from vtorque.cli.doctor import CHECKS, FAIL, check_name, render, run_checks

    names = {check_name(c): c for c in CHECKS}
    unknown = [n for n in only if n not in names]
    if unknown:
        raise click.BadParameter(f"no check {unknown[0]!r}; checks: {', '.join(names)}", param_hint="--check")
    results = run_checks(_config(), [names[n] for n in only] or None)
    click.echo(render(results))
    if any(r.status == FAIL for r in results):
        sys.exit(1)


@main.command("install-hooks")
@click.option("--torque-home", type=click.Path(file_okay=False), default=None,
              help="TORQUE_HOME of this node's pbs_mom (default: [torque] home, /var/spool/torque).")
@click.option("--uninstall", is_flag=True, help="Remove vtorque's hooks and put back what was there.")
def install_hooks(torque_home: str | None, uninstall: bool) -> None:
    """Install vtorque's Torque prologue, epilogue and epilogue.precancel on this node (keeps and chains
    a site prologue/epilogue); idempotent. Run it on every node of the cluster."""
    import os
    from pathlib import Path

    from vtorque.cli.install_hooks import InstallError, install
    from vtorque.cli.install_hooks import uninstall as remove

    if os.geteuid() != 0:
        raise click.ClickException("install-hooks must run as root (the hooks must be root-owned)")
    home = Path(torque_home or _config().torque.home)
    try:
        actions = remove(home) if uninstall else install(home)
    except (InstallError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    for action in actions:
        click.echo(f"{home / 'mom_priv' / action.hook}: {action.what}")
    if not actions:
        click.echo(f"{home / 'mom_priv'}: nothing of vtorque's here")


@main.command()
def contract() -> None:
    """Print the message contract: the messages' JSON Schema and their channels (shared/topology.py)."""
    from vtorque.shared.topology import contract_document

    click.echo(json.dumps(contract_document(), indent=2, sort_keys=True))


def _register_images() -> None:
    from vtorque.cli.images import images

    main.add_command(images)  # vtorque images list|show|add|update|remove|pull (cli/images.py)


def _register_broker() -> None:
    from vtorque.cli.broker import broker

    main.add_command(broker)  # vtorque broker setup|permissions (cli/broker.py)


def _register_suspend() -> None:
    from vtorque.cli.suspend import resume, suspend

    main.add_command(suspend)  # vtorque suspend|resume JOBID: asks the scheduler (cli/suspend.py)
    main.add_command(resume)


def _register_migrate() -> None:
    from vtorque.cli.migrate import migrate

    main.add_command(migrate)  # vtorque migrate JOBID --from NODE [--to NODE]: live, root's (cli/migrate.py)


def _register_evacuate() -> None:
    from vtorque.cli.evacuate import evacuate

    main.add_command(evacuate)  # vtorque evacuate [NODE...] [--watch]: guests off bad nodes (cli/evacuate.py)


_register_images()
_register_broker()
_register_suspend()
_register_migrate()
_register_evacuate()

if __name__ == "__main__":
    sys.exit(main())
