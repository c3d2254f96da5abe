"""The skip policy (tests/conftest.py): a skip or xfail fails the session unless tests/skip_allowlist.txt
names the test and why. Run as pytest itself runs it, in a subprocess on a scratch project."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

PLUGIN = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("vtorque_tests_conftest", {str(CONFTEST)!r})
policy = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(policy)
pytest_configure = policy.pytest_configure
"""

TESTS = """
import pytest

def test_passes():
    pass

def test_skips():
    pytest.skip("no widget here")

@pytest.mark.skipif(True, reason="never on this machine")
def test_marked_skip():
    pass

@pytest.mark.xfail(reason="known bug")
def test_xfails():
    assert False

@pytest.mark.parametrize("n", [1, 2])
def test_param_skips(n):
    pytest.skip(f"param {n}")
"""


def run(tmp_path, allowlist: str | None, *select: str) -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text(PLUGIN)
    (tmp_path / "test_sample.py").write_text(TESTS)
    listing = tmp_path / "allow.txt"
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    if allowlist is None:
        listing.unlink(missing_ok=True)
    else:
        listing.write_text(allowlist)
    env["VTORQUE_SKIP_ALLOWLIST"] = str(listing)
    args = [f"test_sample.py::{s}" for s in select] or ["test_sample.py"]
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                           *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_only_passing_tests_pass(tmp_path):
    assert run(tmp_path, None, "test_passes").returncode == 0


@pytest.mark.parametrize("test", ["test_skips", "test_marked_skip", "test_xfails", "test_param_skips"])
def test_a_skip_or_xfail_not_on_the_list_fails_the_session(tmp_path, test):
    proc = run(tmp_path, "# nothing allowed\n", "test_passes", test)
    assert proc.returncode == 1, proc.stdout
    assert "skips not allowed (the session fails)" in proc.stdout
    assert f"test_sample.py::{test}" in proc.stdout
    assert "1 passed" in proc.stdout  # the tests themselves are reported as they were


def test_a_module_skipped_at_import_fails_the_session_unless_listed(tmp_path):
    (tmp_path / "test_gone.py").write_text('import pytest\npytest.importorskip("no_such_module_here")\n'
                                           'def test_never():\n    pass\n')
    env = dict(os.environ, VTORQUE_SKIP_ALLOWLIST=str(tmp_path / "allow.txt"))
    run(tmp_path, "", "test_passes")  # writes the scratch project
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
            "test_gone.py", "test_sample.py::test_passes"]
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1, proc.stdout
    assert "test_gone.py: skip: could not import 'no_such_module_here'" in proc.stdout
    (tmp_path / "allow.txt").write_text("test_gone.py  # the module is optional here\n")
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout


def test_a_missing_list_allows_nothing(tmp_path):
    assert run(tmp_path, None, "test_skips").returncode == 1


def test_listed_skips_pass_and_say_why(tmp_path):
    allow = ("test_sample.py::test_skips  # needs a widget this machine lacks\n"
             "test_sample.py::test_marked_skip  # the same\n"
             "test_sample.py::test_xfails  # bug 12, fixed upstream in 2.0\n"
             "test_sample.py::test_param_skips  # covers every parametrisation\n")
    proc = run(tmp_path, allow)
    assert proc.returncode == 0, proc.stdout
    assert "skips allowed by allow.txt" in proc.stdout
    assert "test_sample.py::test_skips: skip: no widget here (needs a widget this machine lacks)" in proc.stdout
    assert "test_sample.py::test_xfails: xfail: known bug (bug 12, fixed upstream in 2.0)" in proc.stdout


def test_one_listed_parametrisation_does_not_cover_the_other(tmp_path):
    proc = run(tmp_path, "test_sample.py::test_param_skips[1]  # only one\n", "test_param_skips")
    assert proc.returncode == 1
    assert "test_sample.py::test_param_skips[2]" in proc.stdout.split("skips not allowed")[1]
    assert "test_sample.py::test_param_skips[1]:" not in proc.stdout.split("skips not allowed")[1]


def test_an_entry_without_a_reason_is_refused(tmp_path):
    proc = run(tmp_path, "test_sample.py::test_skips\n", "test_skips")
    assert proc.returncode == 4  # pytest's usage error
    assert "an entry is 'NODEID  # why it may skip'" in proc.stderr + proc.stdout


def test_a_failing_session_stays_failing(tmp_path):
    (tmp_path / "test_fail.py").write_text("def test_fails():\n    assert False\n")
    proc = run(tmp_path, "", "test_skips")
    assert proc.returncode == 1
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                           "test_fail.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, VTORQUE_SKIP_ALLOWLIST=str(tmp_path / "allow.txt")))
    assert proc.returncode == 1


def test_the_projects_list_is_short_and_every_entry_says_why():
    from conftest import ALLOWLIST, load_allowlist

    entries = load_allowlist(ALLOWLIST)  # raises on an entry without a reason
    assert len(entries) <= 5, entries
    assert all(len(why) >= 10 for why in entries.values()), entries
