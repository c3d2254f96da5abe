"""[broker] hosts: one URL per RabbitMQ cluster node, in kombu's failover form, the same list for pika."""

import pytest
from kombu import Connection

from vtorque.shared.config import BrokerConfig, ConfigError
from vtorque.shared.hook_channel import HookChannel


def test_one_url_per_node_with_the_credentials_and_vhost(tmp_path):
    creds = tmp_path / "c"
    creds.write_text("vtorque-bridge:s3cret\n")
    b = BrokerConfig(url="amqp://10.213.0.1:5672/vtorque", credentials_file=str(creds),
                     hosts=["10.213.0.11:5672", "10.213.0.1", "10.213.0.12:5672"])
    url = b.connection_url()
    assert url.split(";") == ["amqp://vtorque-bridge:s3cret@10.213.0.11:5672/vtorque",
                              "amqp://vtorque-bridge:s3cret@10.213.0.1/vtorque",
                              "amqp://vtorque-bridge:s3cret@10.213.0.12:5672/vtorque"]
    conn = Connection(url)  # kombu's failover list: the first, then the others in turn
    assert conn.alt == url.split(";") and conn.hostname == "10.213.0.11" and conn.virtual_host == "vtorque"


def test_without_hosts_the_url_is_unchanged():
    assert BrokerConfig(url="amqp://127.0.0.1:5672/vtorque").connection_url() == "amqp://127.0.0.1:5672/vtorque"


@pytest.mark.parametrize("host", ["10.0.0.1:5672/x", "a b", "h@x", ""])
def test_a_host_that_is_not_host_port_is_refused(host):
    with pytest.raises(ConfigError, match="broker.hosts"):
        BrokerConfig(url="amqp://127.0.0.1/vtorque", hosts=[host]).connection_url()


def test_amqps_with_several_nodes_is_refused_not_half_verified():
    with pytest.raises(ConfigError, match="amqps"):
        BrokerConfig(url="amqps://127.0.0.1:5671/vtorque", hosts=["a:5671", "b:5671"]).connection_url()


def test_the_hooks_get_one_pika_parameter_set_per_node():
    url = "amqp://u:p@10.213.0.11:5672/vtorque;amqp://u:p@10.213.0.1:5672/vtorque"
    params = [HookChannel._parameters(one, 3, 5.0) for one in url.split(";")]
    assert [(p.host, p.port, p.virtual_host, p.credentials.username) for p in params] == [
        ("10.213.0.11", 5672, "vtorque", "u"), ("10.213.0.1", 5672, "vtorque", "u")]
