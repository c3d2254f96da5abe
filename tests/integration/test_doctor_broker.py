"""`vtorque doctor` verifies the broker (issue 11): the vhost's users and their configure/write/read and topic
rights are what shared/topology.py derives, no guest, credential files root's alone. Against a private vhost set
up by `vtorque broker setup` with user names of this test's own (broker users are broker-wide: the stack's own
users are never touched)."""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from vtorque.cli.checks import FAIL, OK
from vtorque.cli.doctor import check_broker_users, render
from vtorque.shared import topology as t
from vtorque.shared.config import BrokerConfig, Config

VTORQUE = str(Path(sys.executable).parent / "vtorque")


def _ctl(*args):
    proc = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def site(private_broker, tmp_path_factory):
    prefix, creds = f"vtd{uuid.uuid4().hex[:6]}-", tmp_path_factory.mktemp("doctor-creds")
    with private_broker() as broker:
        setup = subprocess.run([VTORQUE, "broker", "setup", "--vhost", broker.vhost, "--node", "n1",
                                "--credentials-dir", str(creds), "--user-prefix", prefix],
                               capture_output=True, text=True, timeout=300)
        try:
            assert setup.returncode == 0, setup.stdout + setup.stderr
            # The fixture's own user is no vtorque part: on a site set up right it has no rights here.
            _ctl("clear_permissions", "-p", broker.vhost, broker.user)
            config = Config(broker=BrokerConfig(url=f"amqp://127.0.0.1:5672/{broker.vhost}",
                                                credentials_dir=str(creds)))
            yield {"vhost": broker.vhost, "prefix": prefix, "creds": creds, "config": config}
        finally:
            for line in _ctl("list_users").splitlines():
                if line.startswith(prefix):
                    _ctl("delete_user", line.split("\t")[0])


def check(site):
    result = check_broker_users(site["config"], prefix=site["prefix"])
    assert "\n" not in result.detail and "\n" not in render([result])
    return result


def test_a_broker_set_up_by_the_topology_passes(site):
    result = check(site)
    assert result.status == OK, result.detail
    assert site["vhost"] in result.detail


def test_one_widened_permission_is_named(site):
    bridge = t.broker_user("bridge", prefix=site["prefix"])
    want = t.broker_permissions("bridge")
    _ctl("set_permissions", "-p", site["vhost"], bridge, want.configure, ".*", want.read)
    try:
        result = check(site)
        assert result.status == FAIL
        assert result.detail == f"{bridge} write is '.*', the topology gives {want.write!r}"
    finally:
        _ctl("set_permissions", "-p", site["vhost"], bridge, want.configure, want.write, want.read)
    assert check(site).status == OK


def test_a_widened_topic_permission_is_named(site):
    node = t.broker_user("node", "n1", site["prefix"])
    publish, bind = t.broker_permissions("node", "n1").topics["vtorque.commands"]
    _ctl("set_topic_permissions", "-p", site["vhost"], node, "vtorque.commands", ".*", bind)
    try:
        result = check(site)
        assert result.status == FAIL
        assert result.detail.startswith(f"{node} topic rights on vtorque.commands are ('.*', {bind!r})")
        assert str((publish, bind)) in result.detail
    finally:
        _ctl("set_topic_permissions", "-p", site["vhost"], node, "vtorque.commands", publish, bind)
    assert check(site).status == OK


def test_guest_on_the_vhost_is_named(site):
    made = "guest" not in {line.split("\t")[0] for line in _ctl("list_users").splitlines()}
    if made:  # a broker without guest (a real site): one for this test, with a secret no one knows
        _ctl("add_user", "guest", uuid.uuid4().hex)
    _ctl("set_permissions", "-p", site["vhost"], "guest", ".*", ".*", ".*")
    try:
        result = check(site)
        assert result.status == FAIL
        assert result.detail == (f"guest has rights on vhost {site['vhost']} "
                                 "(delete it: vtorque broker setup --remove-guest)")
    finally:
        if made:
            _ctl("delete_user", "guest")
        else:
            _ctl("clear_permissions", "-p", site["vhost"], "guest")
    assert check(site).status == OK


def test_a_credential_file_others_can_read_is_named(site):
    path = site["creds"] / f"{t.broker_user('stager', prefix=site['prefix'])}.credentials"
    os.chmod(path, 0o644)
    try:
        result = check(site)
        assert result.status == FAIL
        assert result.detail == f"{path} is mode 0644 uid 0; must be root's, 0600 at most"
    finally:
        os.chmod(path, 0o600)
    assert check(site).status == OK
