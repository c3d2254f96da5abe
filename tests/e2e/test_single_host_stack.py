"""What `make` set up on this machine, read without changing it: the order of set-up and where things listen."""

import re
import subprocess
from pathlib import Path

from .conftest import PREFIX, STACK, _stack_env


def test_the_broker_epmd_and_erlang_distribution_listen_on_loopback_only():
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    mine = [line for line in out.splitlines() if re.search(r'"(beam\.smp|epmd)"', line)]
    assert mine, "no RabbitMQ listener found"
    local = [line.split()[3] for line in mine]
    assert all(re.match(r"(127\.[0-9.]+|\[::1\]):\d+$", addr) for addr in local), local


def test_slurmctld_runs_the_installed_hooks_since_its_last_start():
    """slurmctld checks PrologSlurmctld once, at start: it must have started after the hooks were in place."""
    env = _stack_env()
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, env=env,
                            check=True).stdout
    for key, hook in (("PrologSlurmctld", "prolog_slurmctld"), ("EpilogSlurmctld", "epilog_slurmctld")):
        assert re.search(rf"^{key}\s*=\s*{re.escape(str(PREFIX / 'hooks/slurm' / hook))}$", config, re.M), config
        assert (PREFIX / "hooks/slurm" / hook).stat().st_mode & 0o111
    log = (STACK / "slurm/log/slurmctld.log").read_text(errors="replace")
    since_start = log.rsplit("slurmctld version", 1)[-1]
    assert "Invalid PrologSlurmctld" not in since_start and "Invalid EpilogSlurmctld" not in since_start


def test_the_stacks_services_talk_to_the_broker_over_tls_as_their_own_users():
    """The stack's config names amqps and its CA; every connection to its vhost is TLS, by a vtorque user."""
    from vtorque.shared.config import load_config

    config = load_config("/etc/vtorque/vtorque.toml", env={})
    assert config.broker.url.startswith("amqps://127.0.0.1:5671/") and config.broker.ca_file
    vhost = config.broker.url.rsplit("/", 1)[1]
    out = subprocess.run(["rabbitmqctl", "-q", "list_connections", "user", "vhost", "ssl"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    theirs = [line.split("\t") for line in out.splitlines() if line.split("\t")[1:2] == [vhost]]
    assert theirs, "no connection to the stack's vhost: are its services running?"
    assert all(ssl == "true" and user.startswith("vtorque-") for user, _, ssl in theirs), theirs


def test_no_daemon_of_the_stack_holds_a_file_of_whoever_started_it():
    """The broker, libvirt, munge, Slurm and the vtorque services keep nothing their starter had open (a test's
    flock on /tmp/vtorque-e2e.lock was once held by RabbitMQ for as long as it ran)."""
    import os

    names = {"beam.smp", "epmd", "libvirtd", "virtlogd", "munged", "slurmctld", "slurmd"}
    held = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if comm not in names and "vtorque run" not in cmdline and "services.sh supervise" not in cmdline:
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                # a lock a starter holds must not outlive it: stack.sh's own, a test's flock (a daemon's own
                # lock, as munged's on its socket, is its business)
                if target.split(" (deleted)")[0].endswith(".lock") and (
                        target.startswith("/tmp/") or target.startswith(str(STACK / ".lock"))):
                    held.append(f"{comm} ({pid}) fd {fd} -> {target}")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    assert not held, held
