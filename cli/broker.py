"""`vtorque broker setup|permissions`: one broker user per service (per node for node workers), each allowed only
what shared/topology.py says its part publishes and consumes, with a random secret in a file only that part's
OS user can read.

Runs as root on a broker node (it drives `rabbitmqctl`, which talks to the local node of the cluster). Passwords
go to rabbitmqctl on its standard input, never on a command line another local user could read in /proc.
The plan (users, permissions, files) is pure and unit-tested; `apply` runs it.
"""

from __future__ import annotations

import grp
import os
import secrets
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import amqp.exceptions
import click

from vtorque.shared import topology

# The roles that get a broker user. `node` is one user per node.
SERVICE_ROLES: tuple[topology.Role, ...] = ("hook", "prefetch", "bridge", "stager", "operator")


@dataclass(frozen=True)
class BrokerUser:
    name: str
    role: topology.Role
    node: str | None
    permissions: topology.Permissions
    file_group: str | None  # the OS group that may read its credentials file (0640); None: root only (0600)


def plan_users(nodes: list[str], hook_group: str | None, prefix: str = topology.USER_PREFIX) -> list[BrokerUser]:
    users = [BrokerUser(topology.broker_user(role, prefix=prefix), role, None, topology.broker_permissions(role),
                        hook_group if role == "hook" else None) for role in SERVICE_ROLES]
    users += [BrokerUser(topology.broker_user("node", n, prefix), "node", n, topology.broker_permissions("node", n),
                         None) for n in nodes]
    return users


def permission_commands(vhost: str, user: BrokerUser) -> list[list[str]]:
    p = user.permissions
    return [["set_permissions", "-p", vhost, user.name, p.configure, p.write, p.read]] + [
        ["set_topic_permissions", "-p", vhost, user.name, exchange, write, read]
        for exchange, (write, read) in sorted(p.topics.items())]


def _ctl(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["rabbitmqctl", "-q", *args], input=stdin, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise click.ClickException(f"rabbitmqctl {args[0]}: {(proc.stderr or proc.stdout).strip()[:300]}")
    return proc


def _write_secret(path: Path, text: str, group: str | None) -> None:
    """Written whole under a temporary name and renamed: a reader sees the old secret or the new one."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o640 if group else 0o600)
        if group:
            os.fchown(fd, 0, grp.getgrnam(group).gr_gid)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# Shared queues whose content is transient (they hold the last minute of heartbeats): made again when the table
# changed their arguments. Others are never deleted by the set-up.
REMADE_WHEN_CHANGED = frozenset({topology.NODES_Q})


def _declare_shared_topology(url: str) -> None:
    """The exchanges and the durable queues no single service may create (their users hold no configure right
    on them): made once here, by a set-up user that exists only for this."""
    from vtorque.shared.bus import connect, declare_topology, kombu_queue

    with connect(url) as conn:
        channel = conn.channel()
        declare_topology(channel)
        for spec in topology.QUEUES.values():
            if spec.kind != "private" and "{" not in spec.name:
                try:
                    kombu_queue(spec)(channel).declare()
                except amqp.exceptions.PreconditionFailed:
                    # Declared before with other arguments (vtorque.nodes was a classic queue until 2026-12):
                    # a queue that holds only the last minute of heartbeats is made again; any other is the
                    # operator's to move, its messages may matter.
                    if spec.name not in REMADE_WHEN_CHANGED:
                        raise click.ClickException(
                            f"queue {spec.name} exists with other arguments than the topology's "
                            f"({spec.queue_arguments}): move its messages, delete it, and run broker setup again"
                        ) from None
                    channel = conn.channel()  # the failed declare closed the last one
                    channel.queue_delete(spec.name)
                    kombu_queue(spec)(channel).declare()
                    click.echo(f"broker setup: {spec.name} made again as a {spec.kind} queue "
                               f"(it held only the last minute of heartbeats)")


def _secret_on_file(path: Path, user: str) -> str | None:
    try:
        name, _, secret = path.read_text().strip().partition(":")
    except OSError:
        return None
    return secret if name == user and secret else None


def credentials_path(directory: str, user: str) -> Path:
    return Path(directory) / f"{user}.credentials"


@click.group()
def broker() -> None:
    """The broker's users and permissions, derived from the topology table."""


@broker.command()
@click.option("--vhost", default="vtorque", show_default=True, help="The vhost vtorque lives in (not '/').")
@click.option("--node", "nodes", multiple=True, help="A compute node (one broker user each); repeat it.")
@click.option("--credentials-dir", default="/etc/vtorque/broker", show_default=True)
@click.option("--hook-group", default=None, help="OS group of the hooks (Slurm: slurm) that may read their file.")
@click.option("--amqp", default="amqp://127.0.0.1:5672", show_default=True, help="Where this broker node listens.")
@click.option("--remove-guest", is_flag=True, help="Delete RabbitMQ's guest user (do it on every real site).")
@click.option("--rotate", is_flag=True, help="New secrets for every user (default: keep a secret already on file).")
@click.option("--user-prefix", default=topology.USER_PREFIX, show_default=True,
              help="Start of every user name (a test site uses one of its own; users are broker-wide).")
def setup(vhost: str, nodes: tuple[str, ...], credentials_dir: str, hook_group: str | None, amqp: str,
          remove_guest: bool, rotate: bool, user_prefix: str) -> None:
    """Create every vtorque broker user (idempotent) with the permissions the topology table gives it."""
    if os.geteuid() != 0:
        raise click.ClickException("must run as root on a broker node")
    if vhost in ("", "/"):
        raise click.ClickException("--vhost: vtorque needs a vhost of its own, not '/'")
    if hook_group:
        try:
            grp.getgrnam(hook_group)
        except KeyError:
            raise click.ClickException(f"--hook-group: no group {hook_group!r}") from None
    existing = {line.split("\t")[0] for line in _ctl("list_users").stdout.splitlines()[1:] if line}
    if vhost not in _ctl("list_vhosts").stdout.split():
        _ctl("add_vhost", vhost)
    setup_user = f"vtorque-setup-{secrets.token_hex(4)}"
    setup_secret = secrets.token_urlsafe(24)
    _ctl("add_user", setup_user, stdin=setup_secret + "\n")
    try:
        names = topology.namespace_regex()  # what the set-up declares: the table's exchanges and queues
        _ctl("set_permissions", "-p", vhost, setup_user, names, names, names)
        scheme, _, where = amqp.partition("://")
        _declare_shared_topology(f"{scheme}://{setup_user}:{setup_secret}@{where.rstrip('/')}/{vhost}")
    finally:
        _ctl("delete_user", setup_user, check=False)
    for user in plan_users(list(nodes), hook_group, user_prefix):
        secret = None if rotate else _secret_on_file(credentials_path(credentials_dir, user.name), user.name)
        secret = secret or secrets.token_urlsafe(24)
        _ctl("change_password" if user.name in existing else "add_user", user.name, stdin=secret + "\n")
        for argv in permission_commands(vhost, user):
            _ctl(*argv)
        _write_secret(credentials_path(credentials_dir, user.name), f"{user.name}:{secret}\n", user.file_group)
        click.echo(f"broker: {user.name}: permissions set, secret in {credentials_path(credentials_dir, user.name)}")
    if remove_guest and "guest" in existing:
        _ctl("delete_user", "guest")
        click.echo("broker: guest removed")


@broker.command()
@click.option("--node", default="NODE", show_default=True)
def permissions(node: str) -> None:
    """The broker users and what each may do, as `setup` sets them."""
    for user in plan_users([node], None):
        p = user.permissions
        click.echo(f"{user.name}\n  configure {p.configure}\n  write     {p.write}\n  read      {p.read}")
        for exchange, (write, read) in sorted(p.topics.items()):
            click.echo(f"  {exchange}: publish {write}\n  {' ' * len(exchange)}  bind    {read}")
