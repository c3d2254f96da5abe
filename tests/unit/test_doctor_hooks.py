"""`vtorque doctor` on the hooks: the interpreter and config hooks.env really gives them (any shell form), the
prologue timeout against the scheduler's own, and no import cycle between doctor and install_hooks."""

from __future__ import annotations

import ast
import stat
import sys
from pathlib import Path

import msgspec
import pytest

from vtorque.cli import checks, doctor
from vtorque.shared import torque
from vtorque.shared.config import Config, HooksConfig, SchedulerConfig, TorqueConfig
from vtorque.shared.slurm import slurm_user

CLI = Path(doctor.__file__).parent


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


# -- hooks.env --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("line", [
    ': "${VTORQUE_PYTHON:=/srv/vt/bin/python}"',  # what deploy/single-host/configure.sh writes
    "VTORQUE_PYTHON=/srv/vt/bin/python",
    "export VTORQUE_PYTHON='/srv/vt/bin/python'",
    'VTORQUE_PYTHON="/srv/vt/bin/python"; export VTORQUE_PYTHON',
])
def test_the_interpreter_is_what_the_shell_hooks_get_in_every_form(tmp_path, line):
    env_file = write(tmp_path / "hooks.env", f"# comment\n{line}\n")
    assert checks.hooks_python(str(env_file)) == "/srv/vt/bin/python"


def test_without_hooks_env_the_hooks_use_the_default_venv(tmp_path):
    assert checks.hooks_python(str(tmp_path / "absent")) == checks.DEFAULT_PYTHON


def test_the_schedulers_own_environment_comes_first_as_for_the_hooks(tmp_path):
    env_file = write(tmp_path / "hooks.env", ': "${VTORQUE_CONFIG:=/etc/vtorque/vtorque.toml}"\n')
    seen, problem = checks.hook_environment(str(env_file), {"VTORQUE_CONFIG": "/site/vt.toml"})
    assert problem == "" and seen["VTORQUE_CONFIG"] == "/site/vt.toml"  # := keeps a value already set


def test_a_broken_hooks_env_is_a_problem_not_a_guess(tmp_path):
    env_file = write(tmp_path / "hooks.env", 'VTORQUE_PYTHON="/x\nif then\n')
    seen, problem = checks.hook_environment(str(env_file))
    assert problem and str(env_file) in problem


def test_pbs_environment_lines(tmp_path):
    write(tmp_path / "pbs_environment", "PATH=/bin:/usr/bin\nVTORQUE_CONFIG=\"/site/vt.toml\"\n# x=y\nLANG=C\n")
    assert torque.hook_base_env(tmp_path) == {"PATH": "/bin:/usr/bin", "VTORQUE_CONFIG": "/site/vt.toml",
                                                     "LANG": "C"}
    assert torque.hook_base_env(tmp_path / "none") == {}


# -- which config the hooks read --------------------------------------------------------------------------

@pytest.fixture
def torque_site(tmp_path, monkeypatch):
    home = tmp_path / "torque"
    (home / "mom_priv").mkdir(parents=True)
    site_config = write(tmp_path / "vtorque.toml", f'state_dir = "{tmp_path}/var"\n')
    monkeypatch.setenv("VTORQUE_CONFIG", str(site_config))
    config = Config(scheduler=SchedulerConfig(kind="torque"), torque=TorqueConfig(home=str(home)))
    return config, home, site_config


def test_hook_config_ok_when_the_hooks_read_the_same_file(torque_site, tmp_path, monkeypatch):
    config, home, site_config = torque_site
    env_file = write(tmp_path / "hooks.env", f': "${{VTORQUE_PYTHON:={sys.executable}}}"\n'
                                             f': "${{VTORQUE_CONFIG:={site_config}}}"\n')
    monkeypatch.setattr(checks, "HOOKS_ENV", str(env_file))
    result = doctor.check_hook_config(config)
    assert result.status == doctor.OK, result
    assert sys.executable in result.detail and str(site_config) in result.detail


def test_hook_config_warns_when_pbs_environment_names_another_config(torque_site, tmp_path, monkeypatch):
    config, home, site_config = torque_site
    other = write(tmp_path / "other.toml", f'state_dir = "{tmp_path}/var2"\n')
    write(home / "pbs_environment", f"VTORQUE_CONFIG={other}\n")
    env_file = write(tmp_path / "hooks.env", f'VTORQUE_PYTHON={sys.executable}\n')
    monkeypatch.setattr(checks, "HOOKS_ENV", str(env_file))
    result = doctor.check_hook_config(config)
    assert result.status == doctor.WARN, result
    assert f"read {other}" in result.detail and str(site_config) in result.detail


def test_hook_config_fails_when_the_hooks_config_is_broken(torque_site, tmp_path, monkeypatch):
    config, home, _ = torque_site
    broken = write(tmp_path / "broken.toml", "state_dir = [\n")
    env_file = write(tmp_path / "hooks.env", f'VTORQUE_PYTHON={sys.executable}\nVTORQUE_CONFIG={broken}\n'
                                             "export VTORQUE_CONFIG\n")
    monkeypatch.setattr(checks, "HOOKS_ENV", str(env_file))
    result = doctor.check_hook_config(config)
    assert result.status == doctor.FAIL and str(broken) in result.detail, result


def test_hook_config_fails_with_an_interpreter_that_has_no_vtorque(torque_site, tmp_path, monkeypatch):
    config, _, _ = torque_site
    env_file = write(tmp_path / "hooks.env", ': "${VTORQUE_PYTHON:=/nonexistent/python}"\n')
    monkeypatch.setattr(checks, "HOOKS_ENV", str(env_file))
    result = doctor.check_hook_config(config)
    assert result.status == doctor.FAIL and "/nonexistent/python" in result.detail, result


def test_the_torque_hooks_check_uses_the_interpreter_hooks_env_names(torque_site, tmp_path, monkeypatch):
    config, home, _ = torque_site
    env_file = write(tmp_path / "hooks.env", ': "${VTORQUE_PYTHON:=/nonexistent/python}"\n')
    monkeypatch.setattr(checks, "HOOKS_ENV", str(env_file))
    result = doctor.check_torque_hooks(config)
    assert "/nonexistent/python" in result.detail  # the old parser read only VAR= lines: the default venv
    slurm_site = msgspec.structs.replace(config, scheduler=SchedulerConfig(kind="slurm"))
    assert doctor.check_torque_hooks(slurm_site).status == doctor.OK


# -- prologue timeout against the scheduler's ------------------------------------------------------------

def fake_scontrol(tmp_path, text: str) -> str:
    bin_dir = tmp_path / "bin"
    write(bin_dir / "scontrol", f"#!/bin/sh\n[ \"$1 $2\" = 'show config' ] && cat <<'EOF'\n{text}EOF\n",
          stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    return str(bin_dir)


@pytest.mark.parametrize("timeout,status,words", [
    (300, "ok", "waits up to hooks.prologue_timeout = 240 s"),
    (65534, "ok", "PrologEpilogTimeout unset"),
    (120, "warn", "guests get only 110 s; raise PrologEpilogTimeout to at least 250"),
    (8, "fail", "leaves no time"),
])
def test_slurm_prolog_timeout_against_hooks_prologue_timeout(tmp_path, monkeypatch, timeout, status, words):
    monkeypatch.setattr(checks, "HOOKS_ENV", str(tmp_path / "absent"))
    config = Config(scheduler=SchedulerConfig(kind="slurm", bin_dir=fake_scontrol(
        tmp_path, f"PrologEpilogTimeout     = {timeout}\nSlurmUser               = slurm(64030)\n")),
        hooks=HooksConfig(prologue_timeout=240))
    result = doctor.check_prologue_timeout(config)
    assert (result.status, words in result.detail) == (status, True), result


@pytest.mark.parametrize("alarm,status,words", [
    ("", "ok", "$prologalarm 300"),  # Torque's default
    ("$prologalarm 100\n", "warn", "guests get only 75 s; raise $prologalarm to at least 265"),
    ("$prologalarm 20\n", "fail", "leaves no time"),
])
def test_torque_prologalarm_against_hooks_prologue_timeout(torque_site, alarm, status, words):
    config, home, _ = torque_site
    write(home / "mom_priv" / "config", alarm)
    config = msgspec.structs.replace(config, hooks=HooksConfig(prologue_timeout=240))
    result = doctor.check_prologue_timeout(config)
    assert (result.status, words in result.detail) == (status, True), result


def test_slurm_user_from_show_config():
    assert slurm_user("SlurmUser               = slurm(64030)\n") == "slurm"
    assert slurm_user("SlurmctldPort = 1\n") is None


# -- structure ---------------------------------------------------------------------------------------------

def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_doctor_and_install_hooks_do_not_import_each_other():
    assert "vtorque.cli.doctor" not in imported(CLI / "install_hooks.py")
    assert not {"vtorque.cli.doctor", "vtorque.cli.install_hooks"} & imported(CLI / "checks.py")
    assert doctor.Check is checks.Check  # one type for every check's answer


def test_the_new_checks_are_run_by_default_and_named_for_check():
    names = {doctor.check_name(c) for c in doctor.CHECKS}
    assert {"hook config", "prologue timeout", "torque hooks"} <= names
