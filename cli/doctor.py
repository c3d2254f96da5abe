"""`vtorque doctor`: is this host able to run vtorque? One line per check, non-zero exit if any failed.

A check is a function (config) -> Check, listed in CHECKS; add yours there (the hook checks belong here too).
Each check does its own I/O and never raises: whatever goes wrong is its answer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from vtorque.cli.checks import FAIL, OK, WARN, Check, hook_environment, is_root, worst

# Check, OK, WARN, FAIL live in cli/checks.py (install_hooks.py needs them too) and are used from here as before.


def check_broker(config) -> Check:
    """The broker answers with the credentials the services use (broker.credentials_file)."""
    from vtorque.shared.bus import connect
    from vtorque.shared.config import ConfigError

    try:
        url = config.broker.connection_url()
    except ConfigError as exc:
        return Check("broker", FAIL, str(exc))
    try:
        conn = connect(url, timeout=config.broker.connect_timeout)
    except Exception as exc:  # noqa: BLE001 - any failure to connect is the answer
        return Check("broker", FAIL, f"{config.broker.url}: {exc}")
    try:
        props = conn.connection.server_properties or {}
        version = props.get("version", b"?")
        version = version.decode() if isinstance(version, bytes) else str(version)
    finally:
        conn.release()
    return Check("broker", OK, f"{config.broker.url} (RabbitMQ {version})")


def _rabbitmqctl(*args: str) -> list[list[str]]:
    """Rows of a rabbitmqctl listing (tab-separated). Raises OSError/RuntimeError with rabbitmqctl's reason."""
    tool = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    proc = subprocess.run([tool, "-q", *args, "--no-table-headers"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(((proc.stderr or proc.stdout).strip().splitlines() or ["no message"])[0][:200])
    return [line.split("\t") for line in proc.stdout.splitlines() if line.strip()]


def broker_user_differences(vhost: str, permissions: list[list[str]], topic_permissions: list[list[str]],
                            prefix: str) -> list[str]:
    """What the vhost's users and rights have that shared/topology.py does not derive, or lack; [] if equal.
    Every vtorque role but node must have its user; a node user is checked whichever nodes there are."""
    from vtorque.cli.broker import SERVICE_ROLES
    from vtorque.shared import topology

    given = {row[0]: tuple(row[1:4]) for row in permissions if len(row) >= 4}
    topics: dict[str, dict[str, tuple[str, str]]] = {}
    for row in topic_permissions:
        if len(row) >= 4:
            topics.setdefault(row[0], {})[row[1]] = (row[2], row[3])
    wrong = []
    for user in sorted(set(given) | set(topics)):
        role, node = topology.role_of(user, prefix)
        if user == "guest":
            wrong.append(f"guest has rights on vhost {vhost} (delete it: vtorque broker setup --remove-guest)")
            continue
        if role is None:
            wrong.append(f"{user} has rights on vhost {vhost} but is no vtorque part")
            continue
        want = topology.broker_permissions(role, node)
        for what, have, should in zip(("configure", "write", "read"), given.get(user, ("", "", "")),
                                      (want.configure, want.write, want.read), strict=True):
            if have != should:
                wrong.append(f"{user} {what} is {have or 'unset'!r}, the topology gives {should!r}")
        for exchange in sorted(set(want.topics) | set(topics.get(user, {}))):
            have_t, should_t = topics.get(user, {}).get(exchange), want.topics.get(exchange)
            if have_t != should_t:
                wrong.append(f"{user} topic rights on {exchange} are {have_t or 'unset'}, the topology gives "
                             f"{should_t or 'none'}")
    for role in SERVICE_ROLES:
        user = topology.broker_user(role, prefix=prefix)
        if user not in given:
            wrong.append(f"{user} has no rights on vhost {vhost} (vtorque broker setup)")
    return wrong


def credential_file_problems(directory: str) -> list[str]:
    """Each `*.credentials` file must be root's regular file, readable by no one else (the hooks' by its group)."""
    import stat

    problems = []
    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        return [f"{directory}: {exc.strerror}"]
    for name in names:
        if not name.endswith(".credentials"):
            continue
        path = os.path.join(directory, name)
        st = os.lstat(path)
        hook = name.startswith("vtorque-hook")
        allowed = 0o640 if hook else 0o600
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or stat.S_IMODE(st.st_mode) & ~allowed:
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else f"mode {stat.S_IMODE(st.st_mode):04o} uid {st.st_uid}"
            problems.append(f"{path} is {kind}; must be root's, {allowed:04o} at most")
    return problems


def check_broker_users(config, prefix: str | None = None) -> Check:
    """The broker vhost's users and rights are exactly what the topology table derives (no guest, no one else),
    and the credential files here are root's alone. Needs rabbitmqctl: run it on a broker node as root."""
    from urllib.parse import unquote, urlparse

    from vtorque.shared import topology

    path = urlparse(config.broker.url).path[1:]
    vhost = "/" if path in ("", "/") else unquote(path)
    problems = credential_file_problems(config.broker.credentials_dir) if config.broker.credentials_dir else []
    try:
        wrong = broker_user_differences(vhost, _rabbitmqctl("list_permissions", "-p", vhost),
                                        _rabbitmqctl("list_topic_permissions", "-p", vhost),
                                        prefix or topology.USER_PREFIX)
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        if problems:
            return Check("broker users", FAIL, "; ".join(problems))
        return Check("broker users", WARN, f"cannot list vhost {vhost}'s rights here ({exc}): run doctor as root "
                                           f"on a broker node")
    problems += wrong
    if problems:
        return Check("broker users", FAIL, "; ".join(problems))
    return Check("broker users", OK, f"vhost {vhost}: every user's rights are the topology's, no guest")


def check_libvirt(config) -> Check:
    try:
        import libvirt
    except ImportError:
        return Check("libvirt", FAIL, "python3-libvirt is not installed")
    try:
        conn = libvirt.open(config.node.libvirt_uri)
    except libvirt.libvirtError as exc:
        return Check("libvirt", FAIL, f"{config.node.libvirt_uri}: {exc.get_error_message()}")
    try:
        v = conn.getLibVersion()
        return Check("libvirt", OK, f"{config.node.libvirt_uri} (libvirt {v // 1000000}.{v // 1000 % 1000}.{v % 1000})")
    finally:
        conn.close()


def check_accel(config) -> Check:
    """KVM or TCG: either works; TCG (software emulation) boots guests several times slower."""
    from vtorque.shared.domain_type import detect_domain_type

    kind = detect_domain_type(config.node.domain_type)
    if kind == "kvm":
        return Check("accel", OK, "KVM (/dev/kvm)")
    why = ("node.domain_type = qemu" if config.node.domain_type == "qemu"
           else "no /dev/kvm" if not os.path.exists("/dev/kvm") else "KVM is the PVM flavour (no stock guests)")
    return Check("accel", WARN, f"TCG software emulation ({why}): guests boot several times slower")


def check_image_store(config) -> Check:
    store = config.images.store
    try:
        os.makedirs(store, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=store, prefix=".doctor-"):
            pass
    except OSError as exc:
        return Check("image store", FAIL, f"{store}: not writable ({exc.strerror})")
    free = shutil.disk_usage(store).free
    status = OK if free > 2 * 2**30 else WARN
    return Check("image store", status, f"{store} writable, {free / 2**30:.1f} GiB free")


def skew_bounds(age_s: float, interval_s: float) -> tuple[float, float]:
    """A heartbeat read `age_s` after its created_at was sent at most `interval_s` before we read it (the node
    beats every interval), so the node's clock runs ahead of ours by between -age_s and interval_s - age_s."""
    return -age_s, interval_s - age_s


def check_clock(config, max_skew: float = 2.0) -> Check:
    """NTP sync here (timedatectl), and the other nodes' clocks from their heartbeats' timestamps."""
    from vtorque.shared.messages import utcnow
    from vtorque.shared.node_registry import is_stale, latest_per_node, read_heartbeats

    notes, status = [], OK
    if shutil.which("timedatectl"):
        got = subprocess.run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"], capture_output=True,
                             text=True, timeout=5, check=False)
        synced = got.stdout.strip()
        if synced == "yes":
            notes.append("NTP synchronized")
        elif synced == "no":
            notes.append("NTP not synchronized")
            status = WARN
    try:
        beats = latest_per_node(read_heartbeats(config.broker.connection_url(), timeout=config.broker.connect_timeout))
    except Exception as exc:  # noqa: BLE001
        return Check("clock", WARN, "; ".join(notes + [f"no heartbeats to compare with: {exc}"]))
    now = utcnow()
    off = []
    for beat in beats:
        if is_stale(beat, now) and (now - beat.created_at).total_seconds() > 0:
            continue  # silent node (or far behind): `vtorque nodes` shows it stale
        low, high = skew_bounds((now - beat.created_at).total_seconds(), beat.interval)
        # Only "ahead" is provable: an old heartbeat may as well come from a node that just stopped.
        if low > max_skew:
            off.append(f"{beat.node} ahead by ≥{low:.1f}s")
    if off:
        return Check("clock", FAIL, "; ".join(notes + off))
    notes.append(f"no node's heartbeat is from the future (checked {len(beats)}; a clock behind shows as stale "
                 "in `vtorque nodes`)")
    return Check("clock", status, "; ".join(notes))


def _hooks_base_env(config) -> dict[str, str]:
    """What the scheduler gives its hooks before hooks.env: Slurm's PrologSlurmctld gets (almost) nothing,
    Torque's prologue gets <TORQUE_HOME>/pbs_environment."""
    from vtorque.shared.torque import hook_base_env

    return hook_base_env(config.torque.home) if config.scheduler.kind == "torque" else {}


def _slurm_config(config, hook_env: dict[str, str]) -> tuple[str, str]:
    """(`scontrol show config`, problem), asked with the SLURM_CONF the hooks use."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    value = hook_env.get("SLURM_CONF") or os.environ.get("SLURM_CONF")
    if value:
        env["SLURM_CONF"] = value
    from vtorque.shared.scheduler import SchedulerError
    from vtorque.shared.slurm import Slurm

    try:
        return Slurm(config.scheduler).show_config(env=env), ""
    except SchedulerError as exc:
        return "", str(exc)


HOOK_PROBE = """from vtorque.shared.config import config_path, load_config
print(config_path(), flush=True)
config = load_config(role="hook")  # the hook's own broker user, as the hooks load it
config.broker.connection_url()
import vtorque.hooks.{module}
"""


def check_torque_hooks(config) -> Check:
    """Torque hooks on this node: owner, mode, chaining, $prologalarm, the interpreter hooks.env names."""
    from vtorque.cli.install_hooks import hook_findings

    if config.scheduler.kind != "torque":
        return Check("torque hooks", OK, f"not a Torque site ([scheduler] kind = {config.scheduler.kind})")
    from vtorque.cli.checks import DEFAULT_PYTHON

    python = hook_environment(base=_hooks_base_env(config))[0].get("VTORQUE_PYTHON")
    found = hook_findings(Path(config.torque.home), config.torque.prologue_margin, config.hooks.prologue_timeout,
                          python or DEFAULT_PYTHON)
    shown = [t for s, t in found if s != OK] or [t for _, t in found]
    return Check("torque hooks", worst(s for s, _ in found), "; ".join(shown))


def check_hook_config(config) -> Check:
    """The interpreter and the config file the hooks will use: hooks.env sourced as the entry points source it
    (in the scheduler's hook environment), then that Python run as the user the hooks run as, loading the
    config and the broker credentials as a hook does. Compared with the config this doctor read."""
    from vtorque.cli import checks
    from vtorque.shared.config import config_path

    env_file = checks.HOOKS_ENV
    env, problem = hook_environment(base=_hooks_base_env(config))
    if problem:
        return Check("hook config", FAIL, problem)
    python = env.get("VTORQUE_PYTHON") or checks.DEFAULT_PYTHON
    module, user = "torque.entry", "root"  # the Python side the entry points exec (its package imports nothing)
    if config.scheduler.kind == "slurm":
        from vtorque.shared.slurm import slurm_user

        module = "slurm"
        user = slurm_user(_slurm_config(config, env)[0]) or "slurm"
    run_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **_hooks_base_env(config), **env}
    argv = [python, "-P", "-c", HOOK_PROBE.format(module=module)]
    as_whom = user
    if user != "root" and is_root():
        argv = ["runuser", "-u", user, "--", *argv]
    elif (user == "root") != is_root():
        as_whom = f"uid {os.geteuid()} (the hooks run as {user}: run doctor as root to check as {user})"
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=run_env, cwd="/", timeout=60,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as exc:
        return Check("hook config", FAIL, f"the hooks' python {python} does not start: {exc} "
                                          f"(set VTORQUE_PYTHON in {env_file})")
    hook_config = proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else None
    if proc.returncode != 0 or hook_config is None:  # a probe that printed no path did not run either
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        if hook_config is None:
            return Check("hook config", FAIL, f"the hooks' python {python} cannot run vtorque as {as_whom}: {last} "
                                              f"(set VTORQUE_PYTHON in {env_file})")
        return Check("hook config", FAIL, f"the {module} hooks ({python}, as {as_whom}) cannot load "
                                          f"{hook_config}: {last}")
    mine = config_path()
    if os.path.realpath(hook_config) != os.path.realpath(mine):
        where = ("pbs_environment or " if module == "torque" else "") + env_file
        return Check("hook config", WARN, f"the {module} hooks read {hook_config} (VTORQUE_CONFIG from {where}), "
                                          f"this doctor read {mine}: they may disagree")
    return Check("hook config", OK, f"{module} hooks run {python} as {as_whom}, read {hook_config}")


def check_prologue_timeout(config) -> Check:
    """hooks.prologue_timeout against the scheduler's own prologue timeout (Slurm: PrologEpilogTimeout; Torque:
    $prologalarm): the hook waits the shorter, and a scheduler that kills the hook first loops the job."""
    cap = config.hooks.prologue_timeout
    if config.scheduler.kind == "slurm":
        from vtorque.hooks.slurm import PROLOG_MARGIN, prolog_deadline
        from vtorque.shared.slurm import prolog_epilog_timeout

        env, _ = hook_environment(base={})
        shown, problem = _slurm_config(config, env)
        if problem:
            return Check("prologue timeout", WARN, f"cannot ask Slurm: {problem}")
        timeout = prolog_epilog_timeout(shown)
        if timeout is None:
            return Check("prologue timeout", OK, f"PrologEpilogTimeout unset (Slurm never kills the hook); the "
                                                 f"prologue waits up to hooks.prologue_timeout = {cap:.0f} s")
        margin, kill = PROLOG_MARGIN, timeout
        wait, scheduler = prolog_deadline(timeout, margin, cap), f"PrologEpilogTimeout={timeout}"
        need = f"PrologEpilogTimeout to at least {cap + margin:.0f}"
    else:
        from vtorque.hooks.torque.deadline import prologue_deadline
        from vtorque.shared.torque import TORQUE_ALARM_SLACK, read_prologalarm, torque_kill_after

        home = Path(config.torque.home)
        alarm = read_prologalarm(home)
        margin = config.torque.prologue_margin
        wait, scheduler = prologue_deadline(alarm, margin, cap), f"$prologalarm {alarm} ({home}/mom_priv/config)"
        kill = torque_kill_after(alarm)
        need = f"$prologalarm to at least {cap + margin + TORQUE_ALARM_SLACK:.0f}"
    if wait < 1:
        return Check("prologue timeout", FAIL, f"{scheduler}: the scheduler kills the prologue after {kill} s, "
                                              f"which leaves no time to boot guests (vtorque keeps {margin:.0f} s): "
                                              "every VM job is refused; raise it")
    if wait < cap:
        return Check("prologue timeout", WARN, f"hooks.prologue_timeout = {cap:.0f} s disagrees with {scheduler}: the "
                                              f"scheduler kills the prologue after {kill} s, so guests get only "
                                              f"{wait:.0f} s; raise {need} or lower hooks.prologue_timeout to "
                                              f"{wait:.0f}")
    return Check("prologue timeout", OK, f"{scheduler}: the prologue waits up to hooks.prologue_timeout = {cap:.0f} s, "
                                        f"{kill - cap:.0f} s before the scheduler would kill it")


def job_network_problems(node, tools: dict[str, str | None], interfaces: dict[str, tuple[str, int]]) -> Check:
    """Can this node carry job networks (services/node_worker/job_segment.py)? `tools`: ip, bridge, iptables →
    their path or None; `interfaces`: this host's IPv4 addresses → (interface, MTU)."""
    missing = [name for name, path in tools.items() if not path]
    if missing:
        return Check("job network", FAIL, f"{', '.join(missing)} not found (Debian: iproute2, iptables): "
                                          "jobs of several guests fail on this node")
    local = node.job_network_localaddr
    if local not in interfaces:
        return Check("job network", FAIL, f"[node] job_network_localaddr {local} is not an address of this host")
    dev, mtu = interfaces[local]
    problems, status = [], OK
    if node.job_network_port >= 1024:
        problems.append(f"port {node.job_network_port} is not below 1024: a user can bind it first")
        status = WARN
    if dev != "lo" and node.job_network_mtu + 50 > mtu:
        problems.append(f"guest MTU {node.job_network_mtu} + 50 bytes of VXLAN exceeds {dev}'s {mtu}")
        status = WARN
    if dev == "lo":
        problems.append("loopback: a job's guests on other nodes cannot reach this node's (one test host only)")
        status = WARN
    where = f"VXLAN from {local} ({dev}, MTU {mtu}), UDP {node.job_network_port}, guest MTU {node.job_network_mtu}"
    return Check("job network", status, "; ".join([where, *problems]))


def check_job_network(config) -> Check:
    import json

    tools = {name: shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin") for name in ("ip", "bridge", "iptables")}
    interfaces: dict[str, tuple[str, int]] = {}
    if tools["ip"]:
        try:
            links = {link["ifname"]: link.get("mtu", 0) for link in json.loads(
                subprocess.run([tools["ip"], "-j", "link"], capture_output=True, text=True, timeout=10).stdout)}
            for entry in json.loads(subprocess.run([tools["ip"], "-j", "-4", "addr"], capture_output=True,
                                                   text=True, timeout=10).stdout):
                for addr in entry.get("addr_info", []):
                    interfaces[addr["local"]] = (entry["ifname"], links.get(entry["ifname"], 0))
        except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
            return Check("job network", FAIL, f"ip: {exc}")
    return job_network_problems(config.node, tools, interfaces)


CHECKS: list[Callable] = [check_broker, check_broker_users, check_libvirt, check_accel, check_image_store,
                          check_clock, check_torque_hooks, check_hook_config, check_prologue_timeout,
                          check_job_network]


def check_name(check: Callable) -> str:
    """The name `--check` takes: the function's name without check_, underscores as spaces."""
    return check.__name__.removeprefix("check_").replace("_", " ")


def run_checks(config, checks: list[Callable] | None = None) -> list[Check]:
    results = []
    for check in checks or CHECKS:
        try:
            results.append(check(config))
        except Exception as exc:  # noqa: BLE001 - a broken check is a failed check, not a crash of the others
            results.append(Check(check_name(check), FAIL, f"check crashed: {exc!r}"))
    return results


def render(results: list[Check]) -> str:
    mark = {OK: "ok  ", WARN: "warn", FAIL: "FAIL"}
    return "\n".join(f"{mark.get(r.status, r.status)}  {r.name:<16} {r.detail}" for r in results)
