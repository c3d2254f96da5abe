"""vtorque-launch: the body of a VM job's wrapper script. Runs the user's script in the job's first guest.

It runs as the job's owner on the job's first node, after the prologue saw every guest ready. The user's
script arrives base64-encoded on stdin (from the wrapper's here-document); its stdout, stderr and exit code
become the job's, through ssh with the job's own key.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click

from vtorque.cli.launcher_ssh import SSH_OPTIONS, job_agent, ssh_argv

# Run the script from a private temp file so it keeps its own interpreter line; its stdin is /dev/null as for
# any batch job.
REMOTE = 'f=$(mktemp) && cat > "$f" && chmod 700 "$f" && "$f" </dev/null; rc=$?; rm -f "$f"; exit $rc'
# Inside the guest, as on a host: the job's node file (the job's guests, each once per vCPU) and its id.
NODEFILE = "/etc/vtorque/nodefile"


def remote_command(job_id: str) -> str:
    return (f"[ -r {NODEFILE} ] && export PBS_NODEFILE={NODEFILE}; "
            f"export PBS_JOBID={shlex.quote(job_id)} VTORQUE_JOB_ID={shlex.quote(job_id)}; {REMOTE}")


def job_id_from_env(env=os.environ) -> str | None:
    return env.get("PBS_JOBID") or env.get("SLURM_JOB_ID")


def alone_in_its_job(job_dir: Path, env=os.environ) -> bool:
    """True when guest 0 is the job's only guest: one node (the scheduler says so) and one guest file here. Such
    a job needs no agent (an MPI launcher in it has no other guest to reach), so none is started: ssh-agent and
    ssh-add are two more processes before the script's first line. Unknown counts as not alone."""
    nodes = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or env.get("PBS_NUM_NODES")
    return nodes == "1" and len(list(job_dir.glob("*.json"))) == 1


def find_first_guest(job_dir: Path, wait: float) -> dict | None:
    deadline = time.monotonic() + wait
    while True:
        guests = []
        for path in job_dir.glob("*.json"):
            try:
                guests.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        if guests:
            return min(guests, key=lambda g: g["index"])
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.5)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--ssh-key", required=True, type=click.Path(dir_okay=False), help="The job's private ssh key.")
@click.option("--traceparent", default=None, help="W3C trace context of the job's submission.")
@click.option("--wait", default=30.0, show_default=True, help="Seconds to wait for the guest's address.")
@click.option("--vm-prologue", default=None, help="Your script to run in the guest before the job.")
@click.option("--vm-epilogue", default=None, help="Your script to run in the guest after the job.")
def main(ssh_key: str, traceparent: str | None, wait: float, vm_prologue: str | None,
         vm_epilogue: str | None) -> None:
    try:
        rc = _launch(ssh_key, traceparent, wait, vm_prologue, vm_epilogue)
    finally:
        # The key was made for this job only: gone when the job's run ends, however it ends.
        key_dir = Path(ssh_key).parent
        if key_dir.parent.name == "keys":
            shutil.rmtree(key_dir, ignore_errors=True)
    sys.exit(rc)


def _launch(ssh_key: str, traceparent: str | None, wait: float, vm_prologue: str | None,
            vm_epilogue: str | None) -> int:
    import binascii

    from vtorque.shared import tracing
    from vtorque.shared.config import ConfigError, load_config
    from vtorque.shared.job_script import user_script_from_stdin

    try:
        script = user_script_from_stdin(sys.stdin.read())
    except (binascii.Error, ValueError):
        raise click.ClickException("the job script in the wrapper is damaged (not base64)") from None
    job_id = job_id_from_env()
    if not job_id:
        raise click.ClickException("no PBS_JOBID or SLURM_JOB_ID: vtorque-launch runs inside a batch job")
    try:
        config = load_config()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    if os.environ.get("SLURM_JOB_ID"):
        # On Slurm a VM job the prologue did not start still runs this batch step (hooks/slurm/): its
        # Comment says why, and that one line goes to the job's own error file.
        from vtorque.hooks.slurm import refusal

        why = refusal(os.environ["SLURM_JOB_ID"], config)
        if why:
            print(why, file=sys.stderr)
            return 1
    guest = find_first_guest(config.job_dir(job_id), wait)
    if guest is None:
        raise click.ClickException(f"job {job_id} has no ready guest on this node ({config.job_dir(job_id)})")
    tracing.setup_tracing("vtorque-launcher", config.tracing, metrics=False)
    rc = 255
    try:
        # The job's agent, forwarded into guest 0: mpirun there reaches the job's other guests (job_agent).
        agent = contextlib.nullcontext(None) if alone_in_its_job(config.job_dir(job_id)) else job_agent(ssh_key)
        with tracing.job_trace(job_id, traceparent), agent as agent_env:
            if "ssh_socket" in guest:
                argv = ssh_argv(ssh_key, guest["ssh_socket"], guest["user"], remote_command(job_id),
                                forward_agent=agent_env is not None)
            else:
                # A job file of a node worker started before guests lost their host port (an upgrade whose
                # node worker has not restarted yet): its guest still listens there.
                argv = ["ssh", "-i", ssh_key, "-p", str(guest["ssh_port"]), *SSH_OPTIONS,
                        f"{guest['user']}@{guest['address']}", remote_command(job_id)]
            rc = 0
            if vm_prologue:
                rc = _run_in_guest("vm_prologue", argv, _read_own(vm_prologue), guest, agent_env)
                if rc != 0:
                    print(f"vtorque: vm_prologue {vm_prologue} exited {rc}; the job was not run", file=sys.stderr)
            if rc == 0:
                rc = _run_in_guest("job", argv, script, guest, agent_env)
            if vm_epilogue:
                erc = _run_in_guest("vm_epilogue", argv, _read_own(vm_epilogue), guest, agent_env)
                if erc != 0:
                    print(f"vtorque: vm_epilogue {vm_epilogue} exited {erc}", file=sys.stderr)
    finally:
        tracing.shutdown_tracing()
    return rc


def _read_own(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise click.ClickException(f"cannot read {path}: {exc.strerror}") from exc


def _run_in_guest(what: str, argv: list[str], script: bytes, guest: dict, env: dict | None = None) -> int:
    from vtorque.shared import tracing

    name = "run job in guest" if what == "job" else f"run {what} in guest"
    with tracing.tracer().start_as_current_span(name, attributes={
            "vtorque.guest": guest["guest"], "vtorque.node": guest["node"]}) as span:
        rc = subprocess.run(argv, input=script, env=env).returncode
        span.set_attribute("vtorque.exit_code", rc)
        if rc == 255:
            tracing.mark_error(span, "ssh to the guest failed")
            print(f"vtorque: could not reach guest {guest['guest']} over ssh", file=sys.stderr)
        return rc


if __name__ == "__main__":
    main()
