"""requirements.lock is the one dependency set: the Makefile, CI and the admin guide install from it."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[2]


def _locked() -> dict[str, str]:
    text = ROOT.joinpath("requirements.lock").read_text()
    pins = dict(re.findall(r"(?m)^([A-Za-z0-9._-]+)==(\S+) \\$", text))
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in pins.items()}


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group()).lower()


def test_every_declared_dependency_is_locked_at_one_version_with_hashes():
    project = tomllib.loads(ROOT.joinpath("pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["test"]
    locked = _locked()
    assert {_name(r) for r in declared} <= set(locked), "run deploy/lock-deps.sh after changing pyproject.toml"
    text = ROOT.joinpath("requirements.lock").read_text()
    entries = re.split(r"(?m)^(?=[A-Za-z0-9])", text)[1:]
    assert all("--hash=sha256:" in entry for entry in entries), "every pin carries its hashes (--require-hashes)"


def test_the_build_backend_is_locked_too():
    """The Makefile installs vtorque with --no-build-isolation: setuptools must come from the lock."""
    backend = tomllib.loads(ROOT.joinpath("pyproject.toml").read_text())["build-system"]["requires"]
    assert {_name(r) for r in backend} <= set(_locked())


def test_the_makefile_installs_from_the_lock_and_hides_no_failure():
    makefile = ROOT.joinpath("Makefile").read_text()
    assert "--require-hashes -r requirements.lock" in makefile
    assert "--no-build-isolation" in makefile
    assert "pipefail" in makefile
    assert not re.search(r"pip install[^\n]*(\\\n[^\n]*)*\|\| true\s*$", makefile, re.M), "a failed pip must fail make"
