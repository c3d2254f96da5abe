import uuid

import kombu
import pytest

BROKER = "amqp://guest:guest@127.0.0.1:5672//"


@pytest.fixture
def broker_url():
    try:
        with kombu.Connection(BROKER, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"RabbitMQ is not reachable at 127.0.0.1:5672 ({exc}); `make test` starts it")
    return BROKER


@pytest.fixture
def node_name():
    """A node name of this test's own, and its queue removed afterwards."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    with kombu.Connection(BROKER) as conn:
        try:
            conn.channel().queue_delete(f"vtorque.node.{name}")
        except Exception:  # noqa: BLE001
            pass
