import pytest

from vtorque.shared.config import ConfigError, load_config


def write(tmp_path, text):
    path = tmp_path / "vtorque.toml"
    path.write_text(text)
    return str(path)


def test_file_and_environment_overrides(tmp_path):
    path = write(tmp_path, '[broker]\nurl = "amqp://a:5672//"\n[hooks]\nmax_requeues = 4\n')
    config = load_config(path, env={"VTORQUE_BROKER__HEARTBEAT": "7", "VTORQUE_NODE__NAME": "n1"})
    assert config.broker.url == "amqp://a:5672//"
    assert config.broker.heartbeat == 7
    assert config.hooks.max_requeues == 4
    assert config.node.node_name() == "n1"


@pytest.mark.parametrize("text,env,named", [
    ('[broker]\nurll = "x"\n', {}, "broker.urll: unknown key"),
    ('[broker]\nheartbeat = "often"\n', {}, "broker.heartbeat"),
    ("", {"VTORQUE_HOOKS__MAX_REQUEUES": "many"}, "hooks.max_requeues"),
    ("", {"VTORQUE_NOPE__X": "1"}, "nope: unknown key"),
    ('[images.catalog.tiny]\nsource = "/x"\n', {}, "images.catalog.tiny.sha256: required key missing"),
    ('[images.catalog.tiny]\nsource = "/x"\nsha256 = "xyz"\n', {}, "images.catalog.tiny.sha256"),
    ('[images.catalog."../x"]\nsource = "/x"\nsha256 = "' + "a" * 64 + '"\n', {}, "images.catalog.../x"),
    ("[broker\n", {}, "vtorque.toml"),
])
def test_errors_name_the_key(tmp_path, text, env, named):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), env=env)
    assert named in str(err.value)


def test_a_named_file_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(tmp_path / "missing.toml"), env={})


def test_credentials_file_joins_the_url(tmp_path):
    creds = tmp_path / "creds"
    creds.write_text("svc:s3cret\n")
    path = write(tmp_path, f'[broker]\nurl = "amqp://old:pw@host:5672/vh"\ncredentials_file = "{creds}"\n')
    assert load_config(path, env={}).broker.connection_url() == "amqp://svc:s3cret@host:5672/vh"


def test_other_vtorque_variables_are_not_configuration(tmp_path):
    path = write(tmp_path, "")
    config = load_config(
        path, env={"VTORQUE_PYTHON": "/x/python", "VTORQUE_STACK_DIR": "/s", "VTORQUE_STATE_DIR": "/st"}
    )
    assert config.state_dir == "/st"


def test_the_scheduler_and_its_binaries_are_named_once(tmp_path):
    torque = load_config(write(tmp_path, '[scheduler]\nkind = "torque"\n'), env={})
    assert torque.scheduler.binary("qstat") == "/usr/local/bin/qstat"  # Torque's `make install`, not PATH
    slurm = load_config(write(tmp_path, '[scheduler]\nkind = "slurm"\nscontrol = "/opt/slurm/bin/scontrol"\n'),
                        env={"VTORQUE_SCHEDULER__BIN_DIR": "/opt/slurm/sbin"})
    assert slurm.scheduler.binary("scontrol") == "/opt/slurm/bin/scontrol"
    assert slurm.scheduler.binary("squeue") == "/opt/slurm/sbin/squeue"


@pytest.mark.parametrize("text,moved", [
    ('[prefetch]\nscheduler = "slurm"\n', "prefetch.scheduler: moved to scheduler.kind"),
    ('[node]\nscheduler = "auto"\n', "node.scheduler: moved to scheduler.kind"),
    ('[torque]\nqstat = "/usr/bin/qstat"\n', "torque.qstat: moved to scheduler.qstat"),
])
def test_a_key_that_moved_to_scheduler_says_where(tmp_path, text, moved):
    with pytest.raises(ConfigError, match=moved):
        load_config(write(tmp_path, text), env={})


def test_each_part_reads_its_own_broker_credentials(tmp_path):
    (tmp_path / "vtorque-node-n4.credentials").write_text("vtorque-node-n4:s3cret\n")
    (tmp_path / "vtorque-operator.credentials").write_text("vtorque-operator:op\n")
    path = write(tmp_path, f'[broker]\nurl = "amqps://b:5671/vtorque"\ncredentials_dir = "{tmp_path}"\n'
                           f'ca_file = "/etc/ca.pem"\n[node]\nname = "n4"\n')
    node = load_config(path, env={}, role="node").broker.connection_url()
    assert node == "amqps://vtorque-node-n4:s3cret@b:5671/vtorque?cafile=/etc/ca.pem"
    assert load_config(path, env={}).broker.connection_url().startswith("amqps://vtorque-operator:op@")
    with pytest.raises(ConfigError, match="vtorque-hook.credentials"):
        load_config(path, env={}, role="hook").broker.connection_url()  # no file: a clear error, no guessing
