"""compose.yaml, the Dockerfile and the systemd units, checked with what runs here (no Docker engine, no
compose plugin): compose.yaml against the Compose Specification's JSON schema (tests/data/compose-spec.json,
from compose-spec/compose-spec, Apache-2.0), and every service command against the CLI the tests run."""

from __future__ import annotations

import configparser
import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from vtorque.cli.doctor import CHECKS, check_name
from vtorque.cli.main import SERVICES

REPO = Path(__file__).resolve().parents[2]
VTORQUE_SERVICES = {"scheduler_bridge": "bridge", "image_stager": "stager", "node_worker": "node-worker"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "compose.yaml").read_text())


def test_compose_file_is_valid_against_the_compose_spec(compose):
    schema = json.loads((REPO / "tests" / "data" / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    validator.validate(compose)
    # The positive control: the schema does reject a misspelt key and a wrongly typed value.
    broken = yaml.safe_load((REPO / "compose.yaml").read_text())
    broken["services"]["image_stager"]["healthcheck"]["intervall"] = "30s"
    assert not validator.is_valid(broken)
    broken = yaml.safe_load((REPO / "compose.yaml").read_text())
    broken["services"]["image_stager"]["command"] = {"run": "stager"}
    assert not validator.is_valid(broken)


IMAGE = "${VTORQUE_IMAGE:-localhost/vtorque:dev}"
STATE = "${VTORQUE_STATE_DIR:-/var/lib/vtorque}"


def packages() -> list[str]:
    """deploy/compose/packages.txt: what build-image.sh and the Dockerfile both install."""
    text = (REPO / "deploy" / "compose" / "packages.txt").read_text()
    return [w for line in text.splitlines() for w in line.split("#")[0].split()]


def test_compose_has_broker_tracing_and_the_three_services(compose):
    services = compose["services"]
    assert set(services) == {"rabbitmq", "jaeger", *VTORQUE_SERVICES}
    # The broker is Debian's RabbitMQ from vtorque's own image (no rabbitmq image to pull), its start script as
    # PID 1 (Debian's su wrapper, a shell, would ignore SIGTERM), with the management UI.
    rabbit = services["rabbitmq"]
    assert rabbit["image"] == IMAGE and rabbit["user"] == "rabbitmq"
    assert rabbit["entrypoint"] == ["/usr/lib/rabbitmq/bin/rabbitmq-server"]
    assert "rabbitmq-server" in packages()
    assert any(p.endswith(":${VTORQUE_AMQP_PORT:-5672}:5672") for p in rabbit["ports"])
    assert any(p.endswith(":${VTORQUE_MANAGEMENT_PORT:-15672}:15672") for p in rabbit["ports"])
    mounts = {v.split(":")[1]: v.split(":")[0] for v in rabbit["volumes"]}
    conf = (REPO / mounts["/etc/rabbitmq/rabbitmq.conf"]).read_text()
    assert "loopback_users = none" in conf  # guest from the other containers
    assert "rabbitmq_management" in (REPO / mounts["/etc/rabbitmq/enabled_plugins"]).read_text()
    assert "healthcheck" in rabbit
    jaeger = services["jaeger"]
    assert "jaegertracing/jaeger:2." in jaeger["image"]
    assert {p.split("}:", 1)[1] for p in jaeger["ports"]} == {"16686:16686", "4318:4318", "4317:4317"}
    # Published on loopback unless the site widens it.
    for svc in (rabbit, jaeger):
        assert all(p.startswith("${VTORQUE_PUBLISH_ADDRESS:-127.0.0.1}:") for p in svc["ports"])


@pytest.mark.parametrize("name, service", VTORQUE_SERVICES.items())
def test_each_service_runs_the_tests_command_from_one_image(compose, name, service):
    svc = compose["services"][name]
    assert service in SERVICES
    assert svc["command"] == ["run", service]  # what the e2e test and the systemd units run
    assert svc["image"] == IMAGE and svc["build"] == "."
    env = svc["environment"]
    assert env["VTORQUE_BROKER__URL"].startswith("amqp://")
    if name == "node_worker":  # on the host's network: the published ports
        assert env["VTORQUE_BROKER__URL"].endswith("@127.0.0.1:${VTORQUE_AMQP_PORT:-5672}//")
        assert env["VTORQUE_TRACING__OTLP_ENDPOINT"] == "${VTORQUE_OTLP_ENDPOINT:-http://127.0.0.1:4318}"
    else:
        assert "@rabbitmq:5672" in env["VTORQUE_BROKER__URL"]
        assert env["VTORQUE_TRACING__OTLP_ENDPOINT"] == "${VTORQUE_OTLP_ENDPOINT:-http://jaeger:4318}"
    assert env["VTORQUE_STATE_DIR"] == STATE and env["VTORQUE_IMAGES__STORE"] == f"{STATE}/images"
    # Services reconnect until the broker answers; podman-compose's --requires links from depends_on make
    # `down` of a scaled project fail (tests/e2e/test_compose.py runs it).
    assert "depends_on" not in svc
    test = svc["healthcheck"]["test"]
    assert test[:3] == ["CMD", "vtorque", "doctor"]
    names = {check_name(c) for c in CHECKS}
    asked = [test[i + 1] for i, word in enumerate(test) if word == "--check"]
    assert asked and set(asked) <= names, asked


@pytest.mark.parametrize("name", ["image_stager", "node_worker"])
def test_the_store_and_guests_are_at_the_same_path_inside_and_outside(compose, name):
    """The host's libvirtd opens the overlays, seeds and base images by the paths the containers wrote."""
    assert f"{STATE}:{STATE}" in compose["services"][name]["volumes"]


@pytest.mark.parametrize("name", ["scheduler_bridge", "node_worker"])
def test_the_scheduler_client_is_mounted_where_the_bridge_confirms_jobs(compose, name):
    """The bridge confirms each job event with the scheduler ([scheduler] verify_jobs), the node worker's
    reconciliation asks it too; the image has no scheduler client of its own."""
    assert "${VTORQUE_SCHEDULER_DIR:-./deploy/compose/scheduler}:/opt/vtorque/scheduler:ro" in \
        compose["services"][name]["volumes"]
    assert (REPO / "deploy" / "compose" / "scheduler").is_dir()


def test_the_node_worker_drives_the_hosts_libvirt(compose):
    svc = compose["services"]["node_worker"]
    assert svc["network_mode"] == "host"  # the guests' ssh is forwarded to the host's loopback
    assert "/run/libvirt:/run/libvirt" in svc["volumes"]
    assert {"/etc/passwd:/etc/passwd:ro", "/etc/group:/etc/group:ro"} <= set(svc["volumes"])  # job owners
    assert {"qemu-utils", "genisoimage", "python3-libvirt", "openssh-client"} <= set(packages())


@pytest.mark.parametrize("name", ["image_stager", "scheduler_bridge"])
def test_scalable_services_have_nothing_that_forbids_replicas(compose, name):
    """`docker compose up --scale image_stager=3` fails with a container_name or a fixed host port."""
    svc = compose["services"][name]
    assert "container_name" not in svc and "ports" not in svc
    assert svc.get("network_mode") != "host"


def test_podman_compose_makes_no_pod(compose):
    assert compose["x-podman"]["in_pod"] is False


def test_dockerfile_and_build_image_install_the_same_things():
    text = (REPO / "Dockerfile").read_text()
    script = (REPO / "deploy" / "compose" / "build-image.sh").read_text()
    assert 'ENTRYPOINT ["vtorque"]' in text and 'ENTRYPOINT ["vtorque"]' in script
    for src in ("shared", "services", "hooks", "cli", "pyproject.toml"):
        assert f"COPY {src} /src/" in text or f"{src} README.md /src/" in text, src
        assert src in script
    for source in (text, script):
        assert "packages.txt" in source and "--system-site-packages" in source
        assert "--require-hashes -r" in source and "requirements.lock" in source
        assert "--no-deps --no-build-isolation" in source


def test_the_compose_tool_is_pinned_by_hash():
    pins = (REPO / "deploy" / "compose" / "podman-compose.txt").read_text()
    assert "podman-compose==1.6.0" in pins and "--hash=sha256:" in pins


@pytest.mark.parametrize("service", SERVICES)
def test_systemd_unit_runs_the_same_command(service):
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(REPO / "deploy" / "systemd" / f"vtorque-{service}.service")
    argv = shlex.split(unit["Service"]["ExecStart"])
    assert argv == ["/opt/vtorque/venv/bin/vtorque", "run", service]
    assert unit["Service"]["Restart"] == "on-failure" and unit["Install"]["WantedBy"] == "multi-user.target"


def test_the_evacuation_watcher_unit_runs_vtorque_evacuate_watch():
    """Not a service of `vtorque run` (it consumes no queue): the operator's command, in a loop, supervised."""
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(REPO / "deploy" / "systemd" / "vtorque-evacuate.service")
    argv = shlex.split(unit["Service"]["ExecStart"])
    assert argv[:3] == ["/opt/vtorque/venv/bin/vtorque", "evacuate", "--watch"]
    from click.testing import CliRunner

    from vtorque.cli.main import main
    assert CliRunner().invoke(main, [*argv[1:], "--help"]).exit_code == 0  # options the command has
    assert unit["Service"]["Restart"] == "on-failure" and unit["Install"]["WantedBy"] == "multi-user.target"
