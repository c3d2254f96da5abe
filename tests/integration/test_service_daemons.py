"""Services are proper daemons: supervised (restart on failure), holding nothing of their starter, and patient
with a broker that is still starting. Nothing here touches the running stack: the supervisor runs a stand-in
service under run/log dirs of the test's own, and the real service talks to a vhost of the test's own."""

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SERVICES_SH = ROOT / "deploy/single-host/services.sh"
VENV_BIN = Path(sys.executable).parent


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@pytest.fixture
def supervised(tmp_path):
    """services.sh with a stand-in `vtorque run NAME`: logs "consuming", then does what $tmp/<name>.do says."""
    prefix = tmp_path / "prefix"
    (prefix / "venv/bin").mkdir(parents=True)
    stand_in = prefix / "venv/bin/vtorque"
    stand_in.write_text(f"""#!/bin/sh
echo "$$" >> {tmp_path}/$2.starts
echo consuming
ls /proc/$$/fd > {tmp_path}/$2.fds
trap 'exit 0' TERM
while :; do
  case $(cat {tmp_path}/$2.do 2>/dev/null) in
    crash) rm -f {tmp_path}/$2.do; exit 3 ;;
    finish) rm -f {tmp_path}/$2.do; exit 0 ;;
  esac
  sleep 0.05
done
""")
    stand_in.chmod(0o755)
    env = dict(os.environ, PREFIX=str(prefix), RUN_DIR=str(tmp_path / "run"), LOG_DIR=str(tmp_path / "log"),
               VTORQUE_STACK_DIR=str(tmp_path / "no-stack"))

    def sh(*args, **kw):
        return subprocess.run([str(SERVICES_SH), *args], env=env, capture_output=True, text=True, timeout=60, **kw)

    yield sh, tmp_path
    sh("stop")


def _starts(tmp_path: Path, name: str) -> list[int]:
    f = tmp_path / f"{name}.starts"
    return [int(x) for x in f.read_text().split()] if f.exists() else []


def test_a_crashed_service_is_restarted_a_finished_one_is_not(supervised):
    sh, tmp = supervised
    assert sh("start").returncode == 0
    first = _starts(tmp, "stager")
    assert len(first) == 1 and _alive(first[0])
    (tmp / "stager.do").write_text("crash")
    _wait(lambda: len(_starts(tmp, "stager")) == 2, 10, "the supervisor to start the crashed stager again")
    assert "stager exited with status 3; restarting" in (tmp / "log/stager.log").read_text()
    _wait(lambda: sh("status").returncode == 0, 10, "status to say every service is up again")
    (tmp / "bridge.do").write_text("finish")  # exit 0 = stopped on purpose, as systemd's Restart=on-failure
    _wait(lambda: "bridge: down" in sh("status").stdout, 10, "the finished bridge to be down")
    time.sleep(1.5)
    assert len(_starts(tmp, "bridge")) == 1


def test_one_service_is_stopped_and_started_alone_with_the_callers_overrides(supervised):
    sh, tmp = supervised
    assert sh("start").returncode == 0
    others = {name: _starts(tmp, name) for name in ("bridge", "stager", "prefetch")}
    worker = _starts(tmp, "node-worker")
    assert sh("stop", "node-worker").returncode == 0
    _wait(lambda: not _alive(worker[0]), 10, "the node worker to stop")
    assert all(_alive(pids[0]) for pids in others.values())  # the others run on
    assert sh("status").returncode == 1 and "node-worker: down" in sh("status").stdout
    env_seen = tmp / "node-worker.env"
    (tmp / "prefix/venv/bin/vtorque").write_text(
        (tmp / "prefix/venv/bin/vtorque").read_text().replace(
            "echo consuming", f'echo "$VTORQUE_NODE__WARM_POOL" > {tmp}/$2.env\necho consuming'))
    started = subprocess.run([str(SERVICES_SH), "start", "node-worker"], capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, PREFIX=str(tmp / "prefix"), RUN_DIR=str(tmp / "run"),
                                      LOG_DIR=str(tmp / "log"), VTORQUE_STACK_DIR=str(tmp / "no-stack"),
                                      VTORQUE_NODE__WARM_POOL="2"))
    assert started.returncode == 0 and "node-worker up" in started.stdout and "bridge" not in started.stdout
    assert env_seen.read_text().strip() == "2"  # the override reached the service
    assert {name: _starts(tmp, name) for name in others} == others  # none of the others started again
    assert sh("status").returncode == 0


def test_an_unknown_service_is_refused_in_one_line(supervised):
    sh, _ = supervised
    refused = sh("stop", "bridge", "nodeworker")
    assert refused.returncode == 2
    assert refused.stderr.strip() == ("services: no service 'nodeworker' "
                                      "(one of: bridge stager node-worker prefetch)")


def test_status_does_not_take_a_killed_service_for_running(supervised):
    sh, tmp = supervised
    assert sh("start").returncode == 0
    supervisor = int((tmp / "run/node-worker.pid").read_text())
    child = int((tmp / "run/node-worker.child").read_text())
    os.kill(supervisor, 9)
    os.kill(child, 9)
    _wait(lambda: not _alive(child), 5, "the killed service to go")
    out = sh("status")
    assert out.returncode == 1 and "node-worker: down" in out.stdout
    assert sh("start").returncode == 0  # start brings it back instead of saying "already running"
    assert len(_starts(tmp, "node-worker")) == 2
    assert sh("status").returncode == 0


def test_supervised_services_keep_no_descriptor_of_their_starter(supervised, tmp_path):
    sh, tmp = supervised
    with open(tmp_path / "held.lock", "w") as held:
        os.set_inheritable(held.fileno(), True)
        assert sh("start", pass_fds=(held.fileno(),)).returncode == 0
        fd = str(held.fileno())
        fds = (tmp / "bridge.fds").read_text().split()
        assert fd not in fds, f"the service inherited the starter's fd {fd}: {fds}"
        supervisor = int((tmp / "run/bridge.pid").read_text())
        targets = [os.readlink(f"/proc/{supervisor}/fd/{n}") for n in os.listdir(f"/proc/{supervisor}/fd")]
        assert str(tmp_path / "held.lock") not in targets


# -- the real service process -------------------------------------------------------------------------------

def _rabbitmqctl(*args) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def own_vhost(private_broker):
    """A vhost and user of this test's own (tests/conftest.py), which the test deletes and makes again."""
    with private_broker() as broker:
        yield broker


class LateBroker:
    """A TCP port that refuses AMQP (accepts, then closes) until `open()`, then forwards to 127.0.0.1:5672:
    what a client sees of a broker that is still starting."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.forwarding = threading.Event()
        self.refused = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if not self.forwarding.is_set():
                self.refused += 1
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", 5672))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.sock.close()


def test_a_service_waits_for_a_broker_that_is_still_starting_and_keeps_no_inherited_fd(tmp_path, own_vhost):
    broker = LateBroker()
    config = tmp_path / "vtorque.toml"
    config.write_text(f"""state_dir = "{tmp_path}/state"
[broker]
url = "amqp://{own_vhost.user}:{own_vhost.password}@127.0.0.1:{broker.port}/{own_vhost.vhost}"
[tracing]
dir = "{tmp_path}/traces"
""")
    log = tmp_path / "bridge.log"
    with open(tmp_path / "held.lock", "w") as held, open(log, "w") as out:
        proc = subprocess.Popen([str(VENV_BIN / "vtorque"), "run", "bridge"], stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, VTORQUE_CONFIG=str(config)), pass_fds=(held.fileno(),))
        try:
            _wait(lambda: broker.refused >= 2, 20, "the bridge to try the broker twice")
            assert proc.poll() is None, f"the bridge gave up on a starting broker: {log.read_text()[-2000:]}"
            targets = [os.readlink(f"/proc/{proc.pid}/fd/{n}") for n in os.listdir(f"/proc/{proc.pid}/fd")]
            assert str(tmp_path / "held.lock") not in targets
            broker.forwarding.set()
            _wait(lambda: '"msg": "consuming"' in log.read_text(), 20, "the bridge to consume once the broker is up")
            assert proc.poll() is None
            # The broker cancels the consumers and closes the connection (as when a node goes down), then
            # refuses the vhost (530 NOT_ALLOWED) until it is back: the service rides it all out by itself.
            lost = log.read_text().count("broker connection lost")
            _rabbitmqctl("delete_vhost", own_vhost.vhost)
            _wait(lambda: "NOT_ALLOWED" in log.read_text() and log.read_text().count("broker connection lost") > lost,
                  20, "the bridge to lose the vhost")
            time.sleep(1.0)
            _rabbitmqctl("add_vhost", own_vhost.vhost)
            _rabbitmqctl("set_permissions", "-p", own_vhost.vhost, own_vhost.user, ".*", ".*", ".*")
            _wait(lambda: log.read_text().count('"msg": "consuming"') >= 2, 20, "the bridge to consume again")
            assert proc.poll() is None
        finally:
            proc.terminate()
            proc.wait(30)
            broker.close()
    assert proc.returncode == 0
