"""TLS to the broker: the single-host stack's listener (127.0.0.1:5671, its own CA), used by the services, the
hooks and the CLI through the one broker URL. Each test uses a vhost of its own."""

import ssl
import subprocess
from pathlib import Path

import kombu
import pytest

from vtorque.shared import broker_tls
from vtorque.shared import messages as m
from vtorque.shared.bus import Publisher, connect
from vtorque.shared.config import BrokerConfig
from vtorque.shared.hook_channel import BrokerUnreachable, HookChannel

CA = Path("/etc/vtorque/tls/ca.pem")


@pytest.fixture
def vhost(private_broker):
    """A vhost and user of this test's own (tests/conftest.py)."""
    with private_broker() as broker:
        yield broker


def _url(broker, ca=CA) -> str:
    where = f"amqps://{broker.user}:{broker.password}@127.0.0.1:5671/{broker.vhost}"
    return BrokerConfig(url=where, ca_file=str(ca)).connection_url()


def _tls_connections() -> list[list[str]]:
    out = subprocess.run(["rabbitmqctl", "-q", "list_connections", "user", "vhost", "ssl", "ssl_protocol"],
                         capture_output=True, text=True, timeout=60).stdout
    return [line.split("\t") for line in out.splitlines() if line]


def test_the_url_carries_the_ca_and_the_clients_verify_the_broker(vhost):
    url = _url(vhost)
    assert broker_tls.split(url) == (f"amqps://{vhost.user}:{vhost.password}@127.0.0.1:5671/{vhost.vhost}", str(CA))
    with connect(url) as conn:
        conn.channel()
        mine = [c for c in _tls_connections() if c[1] == vhost.vhost]
        assert mine and all(c[2] == "true" and c[3].startswith("tlsv1.") for c in mine), mine
    Publisher(url).publish(m.JobEnded.new(job_id="1", deadline=5.0, scheduler="slurm", nodes=["n"]))


def test_the_hooks_channel_speaks_tls_too(vhost):
    channel = HookChannel(_url(vhost), ["job.7.#"], attempts=1)
    try:
        channel.publish(m.JobEnded.new(job_id="7", deadline=5.0, scheduler="slurm", nodes=["n"]))
    finally:
        channel.close()


def test_a_broker_whose_certificate_another_ca_signed_is_refused(vhost, tmp_path):
    other = tmp_path / "other-ca.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=other",
                    "-keyout", str(tmp_path / "k"), "-out", str(other)], check=True, capture_output=True)
    with pytest.raises(Exception) as kombu_err:
        connect(_url(vhost, other), timeout=5).release()
    assert isinstance(kombu_err.value, (ssl.SSLError, OSError, kombu.exceptions.OperationalError))
    assert "CERTIFICATE_VERIFY_FAILED" in str(kombu_err.value) or "certificate verify failed" in str(kombu_err.value)
    with pytest.raises(BrokerUnreachable):
        HookChannel(_url(vhost, other), ["job.7.#"], attempts=1)
