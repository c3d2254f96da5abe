"""vtorque: the operator's command — run a service, look at a job's trace, print the message contract."""

from __future__ import annotations

import json
import signal
import sys

import click

from vtorque.shared.config import ConfigError, load_config

SERVICES = ("bridge", "stager", "node-worker")


def _config():
    try:
        return load_config()
    except ConfigError as exc:
        raise click.ClickException(str(exc))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """vtorque: batch jobs in virtual machines."""


@main.command()
@click.argument("service", type=click.Choice(SERVICES))
def run(service: str) -> None:
    """Run one service in the foreground until SIGTERM/SIGINT."""
    from vtorque.shared import tracing
    from vtorque.shared.bus import Publisher, ServiceRunner
    from vtorque.shared.logs import setup_logging

    config = _config()
    setup_logging(f"vtorque-{service}", config.log_level)
    tracing.setup_tracing(f"vtorque-{service}", config.tracing)
    url = config.broker.connection_url()
    publisher = Publisher(url)  # used by the handler thread only
    if service == "bridge":
        from vtorque.services.scheduler_bridge.service import SchedulerBridge as cls
    elif service == "stager":
        from vtorque.services.image_stager.service import ImageStager as cls
    else:
        from vtorque.services.node_worker.service import NodeWorker as cls
    svc = cls(config, publisher)
    runner = ServiceRunner(url, svc.queues(), svc.handlers(), heartbeat=config.broker.heartbeat)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: runner.stop())
    import logging

    logging.getLogger("vtorque").info("%s consuming %s", service, ", ".join(q.name for q in svc.queues()))
    try:
        runner.run()
    finally:
        publisher.close()
        tracing.shutdown_tracing()


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="The spans as JSON lines, for scripts.")
def trace(job_id: str, as_json: bool) -> None:
    """Draw a job's trace as a waterfall (from the local OTLP-JSON span files)."""
    from vtorque.cli.trace_view import job_spans, load, waterfall

    config = _config()
    spans = job_spans(load(config.tracing.dir), job_id)
    if not spans:
        raise click.ClickException(f"no spans for job {job_id} in {config.tracing.dir}")
    if as_json:
        for s in spans:
            click.echo(json.dumps(s.__dict__))
        return
    traces = {s.trace_id for s in spans}
    click.echo(f"job {job_id}: {len(spans)} spans in {len(traces)} trace(s) {', '.join(sorted(traces))}")
    click.echo(waterfall(spans))


@main.command()
def contract() -> None:
    """Print the message contract (JSON Schema generated from the message Structs)."""
    from vtorque.shared.messages import contract_schema

    click.echo(json.dumps(contract_schema(), indent=2, sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
