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


def test_compose_has_broker_tracing_and_the_three_services(compose):
    services = compose["services"]
    assert set(services) == {"rabbitmq", "jaeger", *VTORQUE_SERVICES}
    assert "management" in services["rabbitmq"]["image"] and "15672:15672" in services["rabbitmq"]["ports"]
    jaeger = services["jaeger"]
    assert "jaegertracing/jaeger:2." in jaeger["image"]
    assert {"16686:16686", "4318:4318", "4317:4317"} <= set(jaeger["ports"])
    assert "healthcheck" in services["rabbitmq"]


@pytest.mark.parametrize("name, service", VTORQUE_SERVICES.items())
def test_each_service_runs_the_tests_command_from_one_image(compose, name, service):
    svc = compose["services"][name]
    assert service in SERVICES
    assert svc["command"] == ["run", service]  # what the e2e test and the systemd units run
    assert svc["image"] == "vtorque:latest" and svc["build"] == "."
    env = svc["environment"]
    assert env["VTORQUE_TRACING__OTLP_ENDPOINT"] == "http://jaeger:4318"
    assert env["VTORQUE_BROKER__URL"].startswith("amqp://") and "@rabbitmq:5672" in env["VTORQUE_BROKER__URL"]
    assert svc["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    test = svc["healthcheck"]["test"]
    assert test[:3] == ["CMD", "vtorque", "doctor"]
    names = {check_name(c) for c in CHECKS}
    asked = [test[i + 1] for i, word in enumerate(test) if word == "--check"]
    assert asked and set(asked) <= names, asked


@pytest.mark.parametrize("name", ["image_stager", "scheduler_bridge"])
def test_scalable_services_have_nothing_that_forbids_replicas(compose, name):
    """`docker compose up --scale image_stager=3` fails with a container_name or a fixed host port."""
    svc = compose["services"][name]
    assert "container_name" not in svc and "ports" not in svc
    assert svc.get("network_mode") != "host"


def test_dockerfile_builds_the_one_vtorque_image():
    text = (REPO / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["vtorque"]' in text
    for src in ("shared", "services", "hooks", "cli", "pyproject.toml"):
        assert src in text
    assert "python3-libvirt" in text and "--system-site-packages" in text


@pytest.mark.parametrize("service", SERVICES)
def test_systemd_unit_runs_the_same_command(service):
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(REPO / "deploy" / "systemd" / f"vtorque-{service}.service")
    argv = shlex.split(unit["Service"]["ExecStart"])
    assert argv == ["/opt/vtorque/venv/bin/vtorque", "run", service]
    assert unit["Service"]["Restart"] == "on-failure" and unit["Install"]["WantedBy"] == "multi-user.target"
