"""Integration tests run against the real RabbitMQ and libvirt of this host, but never against the stack's
own: the broker, node names and state directories they use come from tests/conftest.py (`broker_url` and
`test_broker`: a vhost and user of the session's own; `node_name`; `test_site`: a config of the test's own
whose directories are all under a temporary root; `test_guest`: the test guest image, independent of the
site's catalog). A test here must not call load_config() without a path, publish on vhost "/", or use this
host's name as a node name."""
