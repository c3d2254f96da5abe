"""Contract tests: our Torque root prologue/epilogue (hooks/torque/*), replayed with the invocations recorded
from a real TORQUE 6.1 (torque-hooks.md, torque-recorded/). Fast; needs only RabbitMQ at 127.0.0.1:5672.

The shell entry points come from this checkout; the Python side they exec (`-m vtorque.hooks.torque`) is the
package installed in the interpreter running pytest: reinstall it after changing hooks/*.py.
"""

from __future__ import annotations

import grp
import pwd
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pika
import pytest

from vtorque.shared import messages as m
from vtorque.shared.job_script import render_wrapper

from . import torque_replay as tr

STACK_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"  # the running stack's vhost: never published on as "vm"
EVENTS_EXCHANGE = "vtorque.events"
GUARD_SECONDS = 30.0  # a guard against endless loops, not a benchmark
HOOK_DEFAULT_PYTHON = "/opt/vtorque/venv/bin/python"  # what hooks/torque/* exec without VTORQUE_PYTHON

PROLOGUES = tr.recorded_invocations("prologue")
EPILOGUES = tr.recorded_invocations("epilogue")


def _ids(invocations):
    return [inv.source for inv in invocations]


# -- fixtures ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vhost():
    """A broker vhost of this module's own: this host is called `vm`, the recorded mother superior's name, so a
    JobStarted for node `vm` on the stack's vhost would make the running bridge and node worker boot guests."""
    try:
        pika.BlockingConnection(pika.URLParameters(STACK_URL)).close()
    except pika.exceptions.AMQPError as exc:
        pytest.fail(f"RabbitMQ is required at 127.0.0.1:5672: {exc!r}")
    with tr.PrivateVhost(f"vtorque-test-contract-{random.randrange(16**8):08x}") as v:
        yield v


@pytest.fixture
def torque_home(tmp_path, owner_workdir):
    home = tr.TorqueHome(tmp_path / "torque", workdir=owner_workdir)
    yield home
    # A VM job's prologue leaves a cancel watcher that lives until the epilogue removes the job's cancel
    # directory; tests that run no epilogue end theirs here.
    shutil.rmtree(home.mom_priv / "vtorque-cancel", ignore_errors=True)


@pytest.fixture
def sentinel(tmp_path):
    return tr.sentinel_python(tmp_path)


@pytest.fixture
def image_source(tmp_path) -> Path:
    path = tmp_path / "images" / "tiny.raw"
    path.parent.mkdir()
    path.write_bytes(b"\0" * 4096 + b"vtorque contract test image\n")
    return path


@pytest.fixture
def make_config(tmp_path, image_source, vhost):
    """Writes a config; keyword arguments override hooks/broker settings. Returns (path, state_dir)."""
    state_dir = tmp_path / "state"

    def make(broker_url: str | None = None, torque: dict | None = None, scheduler: dict | None = None,
             **hooks) -> tuple[Path, Path]:
        settings = {"prologue_timeout": 5.0, "epilogue_timeout": 2.0, "broker_attempts": 1, "max_requeues": 2}
        settings.update(hooks)
        # No node worker check by default: these tests run no node worker "vm" of their own.
        torque_settings = {"home": str(tmp_path / "torque"), "log_file": str(tmp_path / "torque-hooks.log"),
                           "require_node_workers": False, "prologue_margin": 1.0}
        torque_settings.update(torque or {})
        scheduler_settings = {"kind": "torque", "qstat": str(tmp_path / "no-qstat"), "timeout": 5.0}
        scheduler_settings.update(scheduler or {})
        return tr.write_config(tmp_path / "vtorque.toml", {
            "state_dir": str(state_dir),
            "broker": {"url": broker_url or vhost.url, "connect_timeout": 1.0},
            "tracing": {"dir": str(tmp_path / "traces")},
            "hooks": settings,
            "torque": torque_settings,
            "scheduler": scheduler_settings,
            "images.catalog.tiny": {"source": str(image_source), "sha256": tr.sha256_file(image_source),
                                    "format": "raw"},
        }), state_dir

    return make


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is


def _events(url: str):
    try:
        conn = pika.BlockingConnection(pika.URLParameters(url))
    except pika.exceptions.AMQPError as exc:
        pytest.fail(f"RabbitMQ is required at {url}: {exc!r}")
    channel = conn.channel()
    channel.exchange_declare(EVENTS_EXCHANGE, exchange_type="topic", durable=True)
    queue = f"vtorque.test.events.{random.randrange(16**8):08x}"  # vtorque's namespace: §2's permissions allow it
    channel.queue_declare(queue, exclusive=True, auto_delete=True)
    channel.queue_bind(queue, EVENTS_EXCHANGE, routing_key="job.#")

    class Events:
        def drain(self) -> list[tuple[str, str | None, m.Message | None]]:
            """(routing key, AMQP type, decoded message or None) of everything queued so far."""
            conn.sleep(0.2)  # publisher confirms mean routed already; this is slack only
            got = []
            while True:
                method, props, body = channel.basic_get(queue, auto_ack=True)
                if method is None:
                    return got
                try:
                    message = m.decode(body)
                except Exception:  # noqa: BLE001 - someone else's traffic on the shared broker
                    message = None
                got.append((method.routing_key, props.type, message))

        def job_started(self, job_id: str) -> list:
            return [msg for key, kind, msg in self.drain()
                    if (isinstance(msg, m.JobStarted) and msg.job_id == job_id)
                    or (kind == "JobStarted" and key.startswith(f"job.{m.routing_word(job_id)}."))]

    return Events(), conn


@pytest.fixture
def events(vhost):
    """An exclusive queue bound to vtorque.events `job.#` on the test's vhost, declared before the hook runs;
    drain() reads it."""
    ev, conn = _events(vhost.url)
    yield ev
    conn.close()


def owner_on_this_host() -> tuple[str, str]:
    """The recorded job owner, `trqtest` (an ordinary account: node workers refuse system accounts and
    `nobody` as guest owners), made here when missing, as the recording host had it (`useradd -m`)."""
    try:
        pw = pwd.getpwnam("trqtest")
    except KeyError:
        made = subprocess.run(["useradd", "-m", "-U", "-s", "/bin/sh", "trqtest"], capture_output=True, text=True,
                              timeout=30)
        if made.returncode not in (0, 9):  # 9: made meanwhile by another test process
            pytest.fail(f"cannot make the job owner trqtest: {made.stderr.strip()}")
        pw = pwd.getpwnam("trqtest")
    return "trqtest", grp.getgrgid(pw.pw_gid).gr_name


def unique_job_id() -> str:
    """Torque-shaped (<seq>.<server>), unlikely to meet other traffic on the shared broker."""
    return f"{random.randrange(10**6, 10**7)}.vm"


def vm_invocation(inv: tr.Invocation, job_id: str | None = None) -> tr.Invocation:
    user, group = owner_on_this_host()
    inv = inv.with_args(a2=user, a3=group)
    return inv.with_job_id(job_id) if job_id else inv


def vm_script(spec: dict[str, str]) -> str:
    """The wrapper vsub submits, with `spec` in its header (rendered as is: validation is the hook's job)."""
    return render_wrapper(
        "#!/bin/sh\n#PBS -N vmjob\nhostname\n",
        spec,
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4f test@vsub",
        "/home/trqtest/.ssh/vtorque_job",
        None,
        "/opt/vtorque/venv/bin/vtorque-launch",
    )


def hook_env(config: Path) -> dict[str, str]:
    """The environment additions for a run that must reach the real Python side.

    VTORQUE_PYTHON is added only when pytest's interpreter is not the hooks' default one. The entry points
    source this machine's /etc/vtorque/hooks.env, which may name the broker user of the running stack
    (VTORQUE_BROKER__CREDENTIALS_FILE, a value already in the environment wins): the test's own user, the one in
    its config's broker URL, is set here instead, as a credentials file beside the config.
    """
    import tomllib
    import urllib.parse

    env = {"VTORQUE_CONFIG": str(config)}
    if sys.executable != HOOK_DEFAULT_PYTHON:
        env["VTORQUE_PYTHON"] = sys.executable
    url = tomllib.loads(Path(config).read_text()).get("broker", {}).get("url", "")
    parts = urllib.parse.urlsplit(url)
    if parts.username:
        creds = Path(f"{config}.credentials")
        creds.write_text(f"{parts.username}:{parts.password or ''}\n")
        creds.chmod(0o600)
        env["VTORQUE_BROKER__CREDENTIALS_FILE"] = str(creds)
    return env


def first(invocations: list[tr.Invocation], job_id: str) -> tr.Invocation:
    return next(inv for inv in invocations if inv.job_id == job_id and "run2" not in inv.source)


GOOD_SPEC = {"img": "tiny", "vcpus": "1", "ram": "256M"}


def published(state_dir: Path, job_id: str) -> Path:
    """What the prologue leaves just before it publishes JobStarted: for an epilogue replayed on its own, the
    job's guests may exist somewhere (hooks/job_hook.py guests_marker)."""
    marker = state_dir / "hooks" / "torque" / f"{m.routing_word(job_id)}.guests"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return marker


# -- the recordings themselves ----------------------------------------------------------------------------

@pytest.mark.parametrize("hook", ["prologue", "epilogue"])
def test_recordings_match_the_documented_contract(hook):
    logs = tr.root_hook_logs(hook)
    assert len(logs) >= 16, f"expected the 13 + 3 recorded {hook} logs, found {[p.name for p in logs]}"
    for path in logs:
        runs = tr.parse_log(path)
        assert runs, f"{path}: no hook run parsed"
        for inv in runs:
            where = inv.source
            assert inv.hook == hook, where
            assert inv.argc == tr.ARGC[hook] == len(inv.argv), where
            assert inv.argv0 == f"{tr.RECORDED_HOME}/mom_priv/{hook}", where
            assert inv.cwd == f"{tr.RECORDED_HOME}/mom_priv", where
            assert inv.umask == (0o077 if hook == "prologue" else 0o022), where
            assert inv.script_path == f"{tr.RECORDED_HOME}/mom_priv/jobs/{inv.job_id}.SC", where
            env = inv.environ()
            assert env["PBS_NODEFILE"] == f"{tr.RECORDED_HOME}/aux//{inv.job_id}", where
            assert {"PATH", "LANG", "PBS_MSHOST", "PBS_NP", "PBS_NUM_NODES", "PBS_NUM_PPN", "PBS_NODENUM",
                    "PBS_O_WORKDIR", "PBS_RESOURCE_NODES"} <= set(env), where
            assert not {"PBS_JOBID", "PBS_JOBNAME", "PBS_QUEUE", "HOME", "USER", "FOO"} & set(env), where
            if hook == "epilogue":
                assert inv.argv[9].lstrip("-").isdigit(), where  # $10 = exit status


# -- 2. non-VM jobs: exit 0, no Python ---------------------------------------------------------------------

@pytest.mark.parametrize("inv", PROLOGUES + EPILOGUES, ids=_ids(PROLOGUES + EPILOGUES))
def test_plain_job_leaves_without_python(inv, torque_home, sentinel):
    python, called = sentinel
    assert len(inv.argv) == tr.ARGC[inv.hook], "argv[1..] count differs from the recorded contract"
    prepared = torque_home.prepare(inv)
    assert prepared.script.read_text() == tr.PLAIN_SCRIPT
    assert prepared.nodefile.read_text().split() == [inv.environ()["PBS_MSHOST"]] * int(inv.environ()["PBS_NP"])
    result = tr.run_hook(inv.hook, prepared, {"VTORQUE_PYTHON": str(python),
                                              "VTORQUE_CONFIG": str(torque_home.root / "absent.toml")})
    assert result.returncode == 0, str(result)
    assert not called.exists(), f"Python was started for a plain job: {called.read_text()}"
    assert result.stdout == result.stderr == "", str(result)


@pytest.mark.parametrize("hook", ["prologue", "epilogue"])
def test_missing_job_script_leaves_without_python(hook, torque_home, sentinel):
    python, called = sentinel
    inv = first(PROLOGUES if hook == "prologue" else EPILOGUES, "1.vm")
    result = tr.run_hook(hook, torque_home.prepare(inv, script_text=None), {"VTORQUE_PYTHON": str(python)})
    assert result.returncode == 0, str(result)
    assert not called.exists()


@pytest.mark.parametrize("hook", ["prologue", "epilogue"])
def test_spec_line_past_the_header_is_not_a_vm_job(hook, torque_home, sentinel):
    """Both sides read only the first 64 lines (job_script.HEADER_LINES)."""
    python, called = sentinel
    inv = first(PROLOGUES if hook == "prologue" else EPILOGUES, "1.vm")
    script = "#!/bin/sh\n" + "# filler\n" * 63 + "# vtorque-spec: img=tiny\nhostname\n"
    result = tr.run_hook(hook, torque_home.prepare(inv, script), {"VTORQUE_PYTHON": str(python)})
    assert result.returncode == 0, str(result)
    assert not called.exists()


@pytest.mark.parametrize("job_id", ["1.vm", "0.vm"])  # job 0 has no account: an empty $7 / $9
@pytest.mark.parametrize("hook", ["prologue", "epilogue"])
def test_vm_job_execs_python_with_the_recorded_arguments(hook, job_id, torque_home, sentinel):
    """The positive control for the sentinel: a vtorque header reaches Python, with argv[1..] unchanged; an
    exit code Python did not mean (the sentinel's 97) aborts the job (1), it never requeues it."""
    python, called = sentinel
    inv = first(PROLOGUES if hook == "prologue" else EPILOGUES, job_id)
    prepared = torque_home.prepare(inv, vm_script(GOOD_SPEC))
    result = tr.run_hook(hook, prepared, {"VTORQUE_PYTHON": str(python)})
    assert result.returncode == (1 if hook == "prologue" else 0), str(result)
    if hook == "prologue":
        assert "failed unexpectedly (exit 97)" in result.stderr, str(result)
    assert called.read_text().split("\n")[:-1] == ["-P", "-m", "vtorque.hooks.torque", hook, *prepared.argv]
    assert len(called.read_text().split("\n")[:-1]) == 4 + tr.ARGC[hook]


# -- 3. VM job with a bad spec: abort, one line naming the key, nothing published ---------------------------

@pytest.mark.parametrize("spec, key", [
    ({"img": "tiny", "vcpus": "abc"}, "vcpus"),
    ({"img": "nosuchimage"}, "img"),
    ({"img": "../../etc/passwd"}, "img"),
    ({"img": "tiny", "color": "red"}, "color"),
    ({"img": "tiny", "ram": "lots"}, "ram"),
    ({"vcpus": "2"}, "img"),
], ids=["vcpus-not-a-number", "unknown-image", "image-path", "unknown-key", "ram-not-a-size", "no-image"])
def test_bad_spec_aborts_without_publishing(spec, key, torque_home, make_config, events):
    config, _ = make_config()
    inv = vm_invocation(first(PROLOGUES, "1.vm"), unique_job_id())
    prepared = torque_home.prepare(inv, vm_script(spec))
    result = tr.run_hook("prologue", prepared, hook_env(config), timeout=GUARD_SECONDS)
    assert result.returncode == 1, str(result)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, str(result)
    assert f"-vm {key}" in lines[0], str(result)
    assert events.job_started(inv.job_id) == []


def test_good_spec_publishes_job_started(torque_home, make_config, events):
    """The positive control for the consumer above: a valid spec is published (then times out: no bridge)."""
    config, state_dir = make_config(prologue_timeout=1.0)
    inv = vm_invocation(first(PROLOGUES, "1.vm"), unique_job_id())
    prepared = torque_home.prepare(inv, vm_script(GOOD_SPEC))
    result = tr.run_hook("prologue", prepared, hook_env(config), timeout=GUARD_SECONDS)
    assert result.returncode == 2, str(result)  # an infrastructure failure (no guests in time): requeue
    assert "timed out" in result.stderr, str(result)
    started = events.job_started(inv.job_id)
    assert len(started) == 1, started
    event = started[0]
    assert (event.scheduler, event.spec, event.owner.user) == ("torque", GOOD_SPEC, inv.argv[1])
    assert [(n.host, n.ncpus) for n in event.nodes] == [("vm", 2)]  # PBS_NODEFILE: vm twice (PBS_NP=2)


def test_unknown_job_owner_aborts(torque_home, make_config, events):
    """An owner that is no local account: the prologue aborts and says why."""
    config, _ = make_config()
    inv = first(PROLOGUES, "1.vm").with_job_id(unique_job_id()).with_args(a2="vtorque-nosuchuser")
    result = tr.run_hook("prologue", torque_home.prepare(inv, vm_script(GOOD_SPEC)),
                         hook_env(config), timeout=GUARD_SECONDS)
    assert result.returncode == 1, str(result)
    assert "vtorque-nosuchuser" in result.stderr and "unknown" in result.stderr, str(result)
    assert events.job_started(inv.job_id) == []


# -- 4. broker unreachable: bounded requeues, counted per job under state_dir -------------------------------

def test_broker_unreachable_requeues_twice_then_aborts(torque_home, make_config, closed_port):
    config, state_dir = make_config(broker_url=f"amqp://guest:guest@127.0.0.1:{closed_port}/%2F",
                                    max_requeues=2, broker_attempts=1)
    job_a, job_b = unique_job_id(), unique_job_id()
    base = vm_invocation(first(PROLOGUES, "1.vm"))
    env = hook_env(config)

    def counter(job_id: str) -> Path:
        return state_dir / "hooks" / "torque" / f"{m.routing_word(job_id)}.requeues"

    def run(job_id: str) -> tr.Result:
        inv = base.with_job_id(job_id)
        result = tr.run_hook("prologue", torque_home.prepare(inv, vm_script(GOOD_SPEC)), env,
                             timeout=GUARD_SECONDS)
        assert result.seconds < GUARD_SECONDS, str(result)
        return result

    for n in (1, 2):
        result = run(job_a)
        assert result.returncode == 2, str(result)
        assert f"requeued ({n} of 2)" in result.stderr and "broker unreachable" in result.stderr, str(result)
        assert counter(job_a).read_text().strip() == str(n)

    other = run(job_b)  # another job counts from 0
    assert other.returncode == 2, str(other)
    assert "requeued (1 of 2)" in other.stderr, str(other)
    assert counter(job_b).read_text().strip() == "1"

    last = run(job_a)
    assert last.returncode == 1, str(last)
    assert "aborted" in last.stderr and "broker unreachable" in last.stderr, str(last)
    assert not counter(job_a).exists()
    assert counter(job_b).read_text().strip() == "1"
    assert all(p.is_relative_to(state_dir) for p in state_dir.rglob("*.requeues"))


# -- 5. epilogue of a VM job, broker unreachable -------------------------------------------------------------

def test_epilogue_without_broker_exits_0_and_says_so(torque_home, make_config, closed_port):
    config, state_dir = make_config(broker_url=f"amqp://guest:guest@127.0.0.1:{closed_port}/%2F",
                                    broker_attempts=1)
    inv = vm_invocation(first(EPILOGUES, "1.vm"), unique_job_id())
    published(state_dir, inv.job_id)
    result = tr.run_hook("epilogue", torque_home.prepare(inv, vm_script(GOOD_SPEC)),
                         hook_env(config), timeout=GUARD_SECONDS)
    assert result.returncode == 0, str(result)
    assert result.seconds < GUARD_SECONDS
    assert "broker unreachable" in result.stdout and "reconciliation" in result.stdout, str(result)


def test_epilogue_publishes_job_ended(torque_home, make_config, events):
    """No record of the prologue either way (one of an older vtorque, or one killed early): ask and wait."""
    config, state_dir = make_config(epilogue_timeout=1.0)
    inv = vm_invocation(first(EPILOGUES, "1.vm"), unique_job_id())
    result = tr.run_hook("epilogue", torque_home.prepare(inv, vm_script(GOOD_SPEC)),
                         hook_env(config), timeout=GUARD_SECONDS)
    assert result.returncode == 0, str(result)
    ended = [msg for _, _, msg in events.drain() if isinstance(msg, m.JobEnded) and msg.job_id == inv.job_id]
    assert [(e.nodes, e.exit_status) for e in ended] == [(["vm"], 3)]  # $10 = 3 recorded for job 1


# -- 6. the Python side's own argument check ----------------------------------------------------------------

@pytest.mark.parametrize("hook, args, code, message", [
    ("prologue", 7, 1, "expects 8 arguments, got 7"),
    ("prologue", 9, 1, "expects 8 arguments, got 9"),
    ("epilogue", 10, 0, "expects 11 arguments, got 10"),  # Torque ignores epilogue codes
])
def test_python_side_rejects_wrong_argument_counts(hook, args, code, message, tmp_path):
    argv = [sys.executable, "-m", "vtorque.hooks.torque", hook, *[f"a{i}" for i in range(1, args + 1)]]
    proc = subprocess.run(argv, env={"PATH": "/bin:/usr/bin", "LANG": "C.UTF-8"}, cwd=tmp_path,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=GUARD_SECONDS)
    assert proc.returncode == code, proc
    assert message in proc.stderr, proc.stderr


@pytest.mark.parametrize("argv", [[], ["precancel", "x"]])
def test_python_side_usage(argv, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vtorque.hooks.torque", *argv], cwd=tmp_path,
                          env={"PATH": "/bin:/usr/bin"}, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=GUARD_SECONDS)
    assert proc.returncode == 1
    assert "usage:" in proc.stderr


# -- the broker URL form the deployment writes ------------------------------------------------------------

def test_default_style_broker_url_reaches_the_broker(torque_home, make_config, events):
    """'amqp://host:5672//' (config default, deploy/single-host/configure.sh) is kombu's way to say vhost "/";
    pika alone reads it as vhost '' (NOT_ALLOWED), so the hooks must read it as kombu does."""
    ev, conn = _events(STACK_URL)  # vhost "/": no longer the stack's (it lives in "vtorque"); no node of this host
    try:
        config, _ = make_config(broker_url="amqp://guest:guest@127.0.0.1:5672//", prologue_timeout=1.0)
        inv = vm_invocation(first(PROLOGUES, "1.vm"), unique_job_id())
        prepared = torque_home.prepare(inv, vm_script(GOOD_SPEC), nodefile_hosts=[f"t-nowhere-{inv.job_id[:7]}"])
        result = tr.run_hook("prologue", prepared, hook_env(config), timeout=GUARD_SECONDS)
        assert "broker unreachable" not in result.stderr, str(result)
        assert len(ev.job_started(inv.job_id)) == 1
    finally:
        conn.close()


def test_vtorque_python_does_not_break_the_config(torque_home, make_config, events):
    config, _ = make_config(prologue_timeout=1.0)
    inv = vm_invocation(first(PROLOGUES, "1.vm"), unique_job_id())
    result = tr.run_hook("prologue", torque_home.prepare(inv, vm_script(GOOD_SPEC)),
                         {**hook_env(config), "VTORQUE_PYTHON": sys.executable}, timeout=GUARD_SECONDS)
    assert "unknown key" not in result.stderr, str(result)
    assert len(events.job_started(inv.job_id)) == 1, str(result)


def test_requeue_counter_is_dropped_when_the_job_really_ends(torque_home, make_config, closed_port):
    config, state_dir = make_config(broker_url=f"amqp://guest:guest@127.0.0.1:{closed_port}/%2F")
    job_id = unique_job_id()
    counter = state_dir / "hooks" / "torque" / f"{m.routing_word(job_id)}.requeues"
    prologue = vm_invocation(first(PROLOGUES, "4.vm"), job_id)
    assert tr.run_hook("prologue", torque_home.prepare(prologue, vm_script(GOOD_SPEC)), hook_env(config),
                       timeout=GUARD_SECONDS).returncode == 2
    requeued = vm_invocation(first(EPILOGUES, "4.vm"), job_id)  # recorded after a requeue: $10 = -14
    assert requeued.argv[9] == "-14"
    tr.run_hook("epilogue", torque_home.prepare(requeued, vm_script(GOOD_SPEC)), hook_env(config),
                timeout=GUARD_SECONDS)
    assert counter.read_text().strip() == "1"  # the job is coming back: keep counting
    deleted = vm_invocation(first(EPILOGUES, "10.vm"), job_id)  # recorded qdel of a running job: $10 = 271
    assert deleted.argv[9] == "271"
    tr.run_hook("epilogue", torque_home.prepare(deleted, vm_script(GOOD_SPEC)), hook_env(config),
                timeout=GUARD_SECONDS)
    assert not counter.exists(), "the job has ended, but its requeue count stays for the next job with its id"


# -- the server's accounting records: every recorded end, and exec_host --------------------------------------

def test_each_recorded_epilogue_saw_the_exit_status_the_server_accounted():
    """$10 of a job's last recorded epilogue run is the Exit_status of its accounting E record (first db)."""
    ended: dict[str, str] = {}
    for record in tr.accounting_records():
        if record.type == "E":
            ended.setdefault(record.job_id, record.attrs["Exit_status"])
    seen = 0
    for path in tr.root_hook_logs("epilogue"):
        if path.parent != tr.RECORDED:
            continue
        runs = tr.parse_log(path)
        if runs[-1].job_id == "9.vm":
            # The permission-error requeue loop (-14 in every epilogue run) ended by qdel: accounted as 0.
            assert {r.argv[9] for r in runs} == {"-14"} and ended["9.vm"] == "0"
            continue
        assert runs[-1].argv[9] == ended[runs[-1].job_id], path.name
        seen += 1
    assert seen == 12
    assert {ended[j] for j in ("3.vm", "4.vm", "10.vm", "11.vm")} == {"-2", "-14", "271", "-11"}


@pytest.mark.parametrize("job_id", ["1.vm", "3.vm", "4.vm", "10.vm", "11.vm"],
                         ids=["exit-3", "prologue-abort--2", "requeue--14", "qdel-271", "walltime--11"])
def test_every_recorded_end_still_tears_down(job_id, torque_home, make_config, events):
    """Walltime (-11), qdel (271), a failed prologue (-2, -14) and a normal end: the epilogue always asks for
    the teardown, with Torque's exit status."""
    config, state_dir = make_config(epilogue_timeout=0.5)
    inv = vm_invocation(first(EPILOGUES, job_id), unique_job_id())
    published(state_dir, inv.job_id)
    result = tr.run_hook("epilogue", torque_home.prepare(inv, vm_script(GOOD_SPEC)), hook_env(config),
                         timeout=GUARD_SECONDS)
    assert result.returncode == 0, str(result)
    ended = [msg for _, _, msg in events.drain() if isinstance(msg, m.JobEnded) and msg.job_id == inv.job_id]
    assert [(e.nodes, e.exit_status) for e in ended] == [(["vm"], int(inv.argv[9]))]


@pytest.mark.parametrize("job_id, cores", [("1.vm", [0, 1]), ("3.vm", [1]), ("2.vm", [0])])
def test_cores_come_from_exec_host_as_the_server_recorded_it(job_id, cores, torque_home, make_config, events,
                                                             tmp_path):
    """qstat -f (a stand-in answering from the recorded S record) gives exec_host; JobStarted carries the
    cores next to the node file's host and count."""
    record = tr.first_start_record(job_id)
    inv = vm_invocation(first(PROLOGUES, job_id), unique_job_id())
    qstat = tr.qstat_stand_in(tmp_path / "bin", {inv.job_id: record.attrs})
    config, _ = make_config(prologue_timeout=0.5, scheduler={"qstat": str(qstat)})
    result = tr.run_hook("prologue", torque_home.prepare(inv, vm_script(GOOD_SPEC)), hook_env(config),
                         timeout=GUARD_SECONDS)
    assert result.returncode == 2, str(result)
    started = events.job_started(inv.job_id)
    assert [(n.host, n.ncpus, n.cores) for n in started[0].nodes] == [("vm", len(cores), cores)]


def test_without_qstat_the_cores_are_unknown(torque_home, make_config, events):
    config, _ = make_config(prologue_timeout=0.5)  # [scheduler] qstat names nothing that exists
    inv = vm_invocation(first(PROLOGUES, "1.vm"), unique_job_id())
    tr.run_hook("prologue", torque_home.prepare(inv, vm_script(GOOD_SPEC)), hook_env(config), timeout=GUARD_SECONDS)
    assert [(n.host, n.ncpus, n.cores) for n in events.job_started(inv.job_id)[0].nodes] == [("vm", 2, None)]


def test_guests_carry_the_walltime_and_are_removed_once_it_passed(torque_home, make_config, events, tmp_path):
    """qstat gives the cores (the normal case): the JobStarted must still carry Resource_List's walltime, the
    plan gives each guest its end time, and the node worker's reconciliation removes a guest past it."""
    from datetime import timedelta

    from vtorque.services.node_worker.reconcile import Domain, decide
    from vtorque.services.scheduler_bridge.planning import plan_guests
    from vtorque.shared.config import load_config
    from vtorque.shared.spec import validate

    record = tr.first_start_record("1.vm")  # walltime=00:05:00, exec_host=vm/0-1
    inv = vm_invocation(first(PROLOGUES, "1.vm"), unique_job_id())
    assert "walltime=00:05:00" in inv.argv[4]
    qstat = tr.qstat_stand_in(tmp_path / "bin", {inv.job_id: record.attrs})
    config, _ = make_config(prologue_timeout=0.5, scheduler={"qstat": str(qstat)})
    tr.run_hook("prologue", torque_home.prepare(inv, vm_script(GOOD_SPEC)), hook_env(config), timeout=GUARD_SECONDS)
    started = events.job_started(inv.job_id)
    assert [n.cores for n in started[0].nodes] == [[0, 1]]  # qstat answered
    assert started[0].walltime == 300

    site = load_config(str(config))
    guests = plan_guests(started[0], validate(started[0].spec, site), site)
    end_by = started[0].created_at + timedelta(seconds=300)
    assert [g.end_by for g in guests] == [end_by]
    domain = Domain(name=guests[0].name, job_id=inv.job_id, boot_deadline=None, end_by=guests[0].end_by, ready=True)
    grace = timedelta(minutes=2)
    running = lambda job_id: True  # noqa: E731 - Torque still says R: only the walltime can end it
    assert decide([domain], {}, set(), running, end_by + grace - timedelta(seconds=1), 0.0, grace) == ([], [])
    removed, _ = decide([domain], {}, set(), running, end_by + grace + timedelta(seconds=1), 0.0, grace)
    assert [(r.name, r.reason) for r in removed] == [(guests[0].name, f"job {inv.job_id} passed its walltime")]


def test_a_prologalarm_too_small_for_any_boot_aborts_with_the_reason(torque_home, make_config, events):
    (torque_home.mom_priv / "config").write_text("$prologalarm 2\n")
    config, _ = make_config()
    inv = vm_invocation(first(PROLOGUES, "1.vm"), unique_job_id())
    result = tr.run_hook("prologue", torque_home.prepare(inv, vm_script(GOOD_SPEC)), hook_env(config),
                         timeout=GUARD_SECONDS)
    assert result.returncode == 1, str(result)
    assert "$prologalarm 2" in result.stderr and "raise it" in result.stderr
    assert events.job_started(inv.job_id) == []


def test_a_garbled_requeue_counter_aborts_instead_of_looping(torque_home, make_config, closed_port):
    config, state_dir = make_config(broker_url=f"amqp://guest:guest@127.0.0.1:{closed_port}/%2F")
    inv = vm_invocation(first(PROLOGUES, "4.vm"), unique_job_id())
    counter = state_dir / "hooks" / "torque" / f"{m.routing_word(inv.job_id)}.requeues"
    counter.parent.mkdir(parents=True)
    counter.write_text("not a number")
    result = tr.run_hook("prologue", torque_home.prepare(inv, vm_script(GOOD_SPEC)), hook_env(config),
                         timeout=GUARD_SECONDS)
    assert result.returncode == 1, str(result)


# -- the broker permissions of docs/admin-guide.md §2, and a broker that refuses ------------------------------

@pytest.fixture(scope="module")
def guide_broker():
    """A vhost and a broker user of this module's own, the user with exactly the admin guide's permissions
    (`set_permissions -p vtorque vtorque-node '^vtorque\\.' '^vtorque\\.' '^vtorque\\.'`), and a second user with
    none on that vhost. Both users and the vhost are deleted afterwards."""
    tag = f"{random.randrange(16**8):08x}"
    vhost, guide_user, bare_user, password = f"vtorque-test-perm-{tag}", f"vt-node-{tag}", f"vt-bare-{tag}", tag * 2

    def ctl(*args: str) -> None:
        subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)

    ctl("add_vhost", vhost)
    try:
        ctl("add_user", guide_user, password)
        ctl("add_user", bare_user, password)
        ctl("set_permissions", "-p", vhost, guide_user, r"^vtorque\.", r"^vtorque\.", r"^vtorque\.")
        ctl("set_permissions", "-p", vhost, bare_user, "^$", "^$", "^$")
        yield {"guide": f"amqp://{guide_user}:{password}@127.0.0.1:5672/{vhost}",
               "bare": f"amqp://{bare_user}:{password}@127.0.0.1:5672/{vhost}"}
    finally:
        for user in (guide_user, bare_user):
            subprocess.run(["rabbitmqctl", "-q", "delete_user", user], capture_output=True, timeout=60)
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], capture_output=True, timeout=60)


@pytest.fixture
def owner_workdir():
    """A PBS_O_WORKDIR the job's owner can write (the reason file goes there); pytest's tmp_path is root's 0700."""
    import tempfile

    user, _ = owner_on_this_host()
    pw = pwd.getpwnam(user)
    top = Path(tempfile.mkdtemp(prefix="vtorque-contract-", dir="/tmp"))
    top.chmod(0o711)
    work = top / "work"
    work.mkdir()
    import os

    os.chown(work, pw.pw_uid, pw.pw_gid)
    yield work
    shutil.rmtree(top, ignore_errors=True)


def test_admin_guide_permissions_let_the_prologue_declare_its_queue(torque_home, make_config, guide_broker,
                                                                      owner_workdir):
    """With exactly §2's permissions the hook's reply queue (vtorque.hook.…, not amq.gen-…) is declared and
    JobStarted published; with no bridge on that vhost the prologue then times out: a counted requeue with a
    reason file, no traceback."""
    ev, conn = _events(guide_broker["guide"])  # the same user's view: it may read vtorque.events too
    try:
        config, _ = make_config(broker_url=guide_broker["guide"], prologue_timeout=1.0)
        inv = vm_invocation(first(PROLOGUES, "1.vm"), unique_job_id())
        prepared = torque_home.prepare(inv, vm_script(GOOD_SPEC), workdir=owner_workdir)
        result = tr.run_hook("prologue", prepared, hook_env(config), timeout=GUARD_SECONDS)
        assert result.returncode == 2, str(result)
        assert "Traceback" not in result.stderr + result.stdout, str(result)
        assert "requeued (1 of 2)" in result.stderr and "timed out" in result.stderr, str(result)
        assert len(ev.job_started(inv.job_id)) == 1
        reason = (owner_workdir / f"{inv.argv[3]}.v{inv.job_id.split('.')[0]}").read_text()
        assert "timed out" in reason and "requeue 1 of 2" in reason, reason
    finally:
        conn.close()


def test_a_broker_that_refuses_is_a_bounded_requeue_with_a_reason(torque_home, make_config, guide_broker,
                                                                  owner_workdir):
    """Access refused on the vhost (pika's ChannelClosedByBroker 403): like an unreachable broker, counted,
    never Torque's endless requeue and never a traceback; then the abort."""
    config, state_dir = make_config(broker_url=guide_broker["bare"], max_requeues=1)
    inv = vm_invocation(first(PROLOGUES, "1.vm"), unique_job_id())
    reason_file = owner_workdir / f"{inv.argv[3]}.v{inv.job_id.split('.')[0]}"
    codes = []
    for attempt in (1, 2):
        result = tr.run_hook("prologue", torque_home.prepare(inv, vm_script(GOOD_SPEC), workdir=owner_workdir),
                             hook_env(config), timeout=GUARD_SECONDS)
        codes.append(result.returncode)
        assert "Traceback" not in result.stderr + result.stdout, str(result)
        assert "refused" in result.stderr and "ACCESS_REFUSED" in result.stderr, str(result)
        text = reason_file.read_text()
        assert "ACCESS_REFUSED" in text and (("requeue 1 of 1" in text) if attempt == 1 else "aborted" in text)
    assert codes == [2, 1]
    # Nothing was published: the epilogue (-2 after the abort) knows no guest was asked for and ends at once.
    end = vm_invocation(first(EPILOGUES, "3.vm"), inv.job_id)
    result = tr.run_hook("epilogue", torque_home.prepare(end, vm_script(GOOD_SPEC), workdir=owner_workdir),
                         hook_env(config), timeout=GUARD_SECONDS)
    assert result.returncode == 0 and "Traceback" not in result.stderr, str(result)
    assert "nothing to remove" in result.stdout, str(result)


def test_epilogue_of_a_job_that_never_published_ends_at_once(torque_home, make_config, events):
    """A bad spec aborts before anything is published; the epilogue ($10 = -2) must not wait its 30 s for
    teardown confirmations no node will send (its node has no node worker on this vhost)."""
    config, state_dir = make_config(epilogue_timeout=30.0)
    inv = vm_invocation(first(PROLOGUES, "3.vm"), unique_job_id())
    bad = vm_script({"img": "tiny", "vcpus": "abc"})
    assert tr.run_hook("prologue", torque_home.prepare(inv, bad), hook_env(config),
                       timeout=GUARD_SECONDS).returncode == 1
    end = vm_invocation(first(EPILOGUES, "3.vm"), inv.job_id)
    assert end.argv[9] == "-2"
    result = tr.run_hook("epilogue", torque_home.prepare(end, bad), hook_env(config), timeout=GUARD_SECONDS)
    assert result.returncode == 0, str(result)
    assert result.seconds < 5, str(result)
    assert [msg for _, _, msg in events.drain() if getattr(msg, "job_id", None) == inv.job_id] == []


def test_epilogue_of_a_published_job_waits_for_its_nodes(torque_home, make_config, events):
    """The other side: once JobStarted went out, guests may exist, so the epilogue asks and waits (bounded)."""
    config, state_dir = make_config(prologue_timeout=0.5, epilogue_timeout=2.0)
    inv = vm_invocation(first(PROLOGUES, "4.vm"), unique_job_id())
    assert tr.run_hook("prologue", torque_home.prepare(inv, vm_script(GOOD_SPEC)), hook_env(config),
                       timeout=GUARD_SECONDS).returncode == 2  # timed out: no bridge on this vhost
    end = vm_invocation(first(EPILOGUES, "4.vm"), inv.job_id)  # -14
    result = tr.run_hook("epilogue", torque_home.prepare(end, vm_script(GOOD_SPEC)), hook_env(config),
                         timeout=GUARD_SECONDS)
    assert "teardown not confirmed by vm" in result.stdout, str(result)
    assert result.seconds >= 2.0
    assert [type(msg).__name__ for _, _, msg in events.drain() if getattr(msg, "job_id", None) == inv.job_id] == [
        "JobStarted", "JobEnded"]


def test_the_final_files_say_the_final_outcome(torque_home, make_config, guide_broker, owner_workdir, tmp_path):
    """Real Torque delivers the .o/.e of every requeued attempt, but not those of the attempt it aborts: the
    .e the owner finds would still say "requeued (1 of 1)". The requeue line says it is not the end and where
    the end goes; the abort appends the final outcome to the delivered .o/.e (found with qstat -f) and the
    reason file says it is the end."""
    import os

    inv = vm_invocation(first(PROLOGUES, "1.vm"), unique_job_id())
    seq = inv.job_id.split(".")[0]
    out, err = owner_workdir / f"{inv.argv[3]}.o{seq}", owner_workdir / f"{inv.argv[3]}.e{seq}"
    reason_file = owner_workdir / f"{inv.argv[3]}.v{seq}"
    attrs = dict(tr.first_start_record("1.vm").attrs, Output_Path=f"vm:{out}", Error_Path=f"vm:{err}")
    qstat = tr.qstat_stand_in(tmp_path / "bin", {inv.job_id: attrs})
    config, _ = make_config(broker_url=guide_broker["bare"], max_requeues=1, scheduler={"qstat": str(qstat)})
    pw = pwd.getpwnam(inv.argv[1])

    first_try = tr.run_hook("prologue", torque_home.prepare(inv, vm_script(GOOD_SPEC), workdir=owner_workdir),
                            hook_env(config), timeout=GUARD_SECONDS)
    assert first_try.returncode == 2, str(first_try)
    assert "requeued (1 of 1)" in first_try.stderr and f"what finally happens goes to {reason_file}" in (
        first_try.stderr), str(first_try)
    assert "not the job's end" in reason_file.read_text()
    for path, text in ((out, first_try.stdout), (err, first_try.stderr)):  # what Torque delivers, as the owner
        path.write_text(text)
        os.chown(path, pw.pw_uid, pw.pw_gid)

    last = tr.run_hook("prologue", torque_home.prepare(inv, vm_script(GOOD_SPEC), workdir=owner_workdir),
                       hook_env(config), timeout=GUARD_SECONDS)
    assert last.returncode == 1, str(last)
    for path in (out, err):
        final = path.read_text().splitlines()[-1]
        assert final.startswith(f"vtorque: FINAL: job {inv.job_id} was aborted on attempt 2"), path.read_text()
        assert "ACCESS_REFUSED" in final and str(reason_file) in final
        assert os.lstat(path).st_uid == pw.pw_uid
    text = reason_file.read_text()
    assert "this is its end" in text and "requeue" not in text.split("\n")[0], text


def test_a_job_the_bridge_rejected_before_any_plan_has_nothing_to_tear_down(torque_home, make_config, events,
                                                                           vhost):
    """JobStarted went out, but the bridge answered JobRejected before any plan (here the test plays the
    bridge): no node was asked for a guest, so the epilogue ends at once."""
    import time

    config, _ = make_config(prologue_timeout=20.0, epilogue_timeout=30.0)
    inv = vm_invocation(first(PROLOGUES, "3.vm"), unique_job_id())
    prepared = torque_home.prepare(inv, vm_script(GOOD_SPEC))
    env = {**prepared.env, **hook_env(config)}
    prologue = subprocess.Popen([str(tr.HOOKS / "prologue"), *prepared.argv], env=env, cwd=prepared.cwd,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                umask=prepared.umask, start_new_session=True)
    end = time.monotonic() + GUARD_SECONDS
    while not events.job_started(inv.job_id):
        assert prologue.poll() is None and time.monotonic() < end, prologue.communicate()
    conn = pika.BlockingConnection(pika.URLParameters(vhost.url))
    rejected = m.JobRejected.new(job_id=inv.job_id, deadline=60, reason="image tiny: not on this cluster")
    conn.channel().basic_publish(EVENTS_EXCHANGE, rejected.routing_key(), m.encode(rejected))
    conn.close()
    out, err = prologue.communicate(timeout=GUARD_SECONDS)
    assert prologue.returncode == 1 and "not on this cluster" in err, (out, err)
    result = tr.run_hook("epilogue", torque_home.prepare(vm_invocation(first(EPILOGUES, "3.vm"), inv.job_id),
                                                         vm_script(GOOD_SPEC)), hook_env(config), timeout=GUARD_SECONDS)
    assert result.returncode == 0 and "nothing to remove" in result.stdout, str(result)
    assert result.seconds < 5, str(result)


def test_the_least_privilege_hook_user_can_run_the_prologue(torque_home, make_config, tmp_path):
    """A broker user with exactly what `vtorque broker setup` gives the `hook` role (shared/topology.py): its
    own reply queue, vtorque.events (checked, not declared: the set-up declares it), the routing keys of
    JobStarted/JobEnded; the node-worker check (a passive declare of vtorque.node.vm) needs nothing more."""
    from vtorque.shared import topology

    perms = topology.broker_permissions("hook")
    tag = f"{random.randrange(16**8):08x}"
    vhost, user, password = f"vtorque-test-hookperm-{tag}", f"vt-hook-{tag}", tag * 2

    def ctl(*args: str) -> None:
        subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)

    ctl("add_vhost", vhost)
    try:
        ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        ctl("add_user", user, password)
        ctl("set_permissions", "-p", vhost, user, perms.configure, perms.write, perms.read)
        for exchange, (write, read) in perms.topics.items():
            ctl("set_topic_permissions", "-p", vhost, user, exchange, write, read)
        admin = pika.BlockingConnection(pika.URLParameters(f"amqp://guest:guest@127.0.0.1:5672/{vhost}"))
        ch = admin.channel()
        ch.exchange_declare(EVENTS_EXCHANGE, exchange_type="topic", durable=True)  # what the set-up does
        ch.queue_declare("vtorque.node.vm", auto_delete=True)
        ch.basic_consume("vtorque.node.vm", lambda *a: None, auto_ack=True)  # a node worker of node vm
        watch = f"vtorque.test.events.{tag}"
        ch.queue_declare(watch, exclusive=True)
        ch.queue_bind(watch, EVENTS_EXCHANGE, routing_key="job.#")
        config, _ = make_config(broker_url=f"amqp://{user}:{password}@127.0.0.1:5672/{vhost}", prologue_timeout=1.0,
                                torque={"require_node_workers": True, "node_worker_grace": 1.0})
        inv = vm_invocation(first(PROLOGUES, "1.vm"), unique_job_id())
        result = tr.run_hook("prologue", torque_home.prepare(inv, vm_script(GOOD_SPEC)), hook_env(config),
                             timeout=GUARD_SECONDS)
        assert result.returncode == 2 and "timed out" in result.stderr, str(result)  # no bridge here
        assert "refused" not in result.stderr and "no node worker" not in result.stderr, str(result)
        admin.sleep(0.2)
        method, props, _ = ch.basic_get(watch, auto_ack=True)
        assert method is not None and props.type == "JobStarted" and props.user_id in (None, user), props
        admin.close()
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_user", user], capture_output=True, timeout=60)
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], capture_output=True, timeout=60)
