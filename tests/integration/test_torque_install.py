"""`vtorque install-hooks` on a TORQUE_HOME of its own, then the installed hooks replayed as pbs_mom runs them
(the recorded invocations): site hooks kept and chained, exact uninstall, the precancel as the job's owner,
and what `vtorque doctor` says. No broker needed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from vtorque.cli import install_hooks as ih

from . import torque_replay as tr
from .test_torque_contract import EPILOGUES, GOOD_SPEC, PROLOGUES, first, vm_invocation, vm_script

VTORQUE = Path(sys.executable).parent / "vtorque"
SITE_PROLOGUE = "#!/bin/sh\necho \"site prologue $*\" >> '{log}'\nexit $(cat '{rc}')\n"
SITE_EPILOGUE = "#!/bin/sh\necho \"site epilogue $*\" >> '{log}'\nexit $(cat '{rc}')\n"


@pytest.fixture
def site(request):
    """A TORQUE_HOME under /var/lib/vtorque (the precancel runs as `nobody`, who must reach mom_priv), with a
    site prologue (root, 0500) and no epilogue, as a cluster might have before vtorque."""
    root = Path("/var/lib/vtorque") / f"test-t6-{uuid.uuid4().hex[:8]}"
    home = tr.TorqueHome(root / "torque")
    for d in (root, home.root):
        os.chmod(d, 0o711)
    os.chmod(home.mom_priv, 0o751)
    log, rc = root / "site.log", root / "site.rc"
    rc.write_text("0\n")
    prologue = home.mom_priv / "prologue"
    prologue.write_text(SITE_PROLOGUE.format(log=log, rc=rc))
    prologue.chmod(0o500)
    (home.mom_priv / "config").write_text("$pbsserver vm\n$prologalarm 30\n")
    yield home, log, rc
    shutil.rmtree(root, ignore_errors=True)


def snapshot(mom_priv: Path) -> dict[str, tuple]:
    """name -> (bytes, uid, gid, mode, mtime_ns) of every entry (what an exact restore must give back)."""
    out = {}
    for p in sorted(mom_priv.rglob("*")):
        st = os.lstat(p)
        data = p.read_bytes() if p.is_file() and not p.is_symlink() else os.readlink(p) if p.is_symlink() else None
        out[str(p.relative_to(mom_priv))] = (data, st.st_uid, st.st_gid, st.st_mode, st.st_mtime_ns)
    return out


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VTORQUE), *args], capture_output=True, text=True, timeout=60)


def test_install_keeps_the_site_prologue_and_uninstall_restores_exactly(site):
    home, _, _ = site
    before = snapshot(home.mom_priv)
    original = os.lstat(home.mom_priv / "prologue")

    got = cli("install-hooks", "--torque-home", str(home.root))
    assert got.returncode == 0, got.stderr
    for name, mode in ih.HOOKS.items():
        st = os.lstat(home.mom_priv / name)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 0, mode), name
        assert (home.mom_priv / name).read_bytes() == ih.packaged_hook(name)
    kept = os.lstat(home.mom_priv / "vtorque-site" / "prologue")
    assert (kept.st_ino, kept.st_mode, kept.st_mtime_ns) == (original.st_ino, original.st_mode, original.st_mtime_ns)
    assert not (home.mom_priv / "vtorque-site" / "epilogue").exists()  # there was none to keep
    cancel = os.lstat(home.mom_priv / "vtorque-cancel")
    assert (cancel.st_uid, cancel.st_mode & 0o7777) == (0, 0o711)
    assert "kept" in got.stdout and "installed" in got.stdout

    again = cli("install-hooks", "--torque-home", str(home.root))  # idempotent
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("unchanged") == 3, again.stdout
    assert ih.hook_findings(home.root, 1.0, 240.0, sys.executable)[0][0] == "ok"

    gone = cli("install-hooks", "--torque-home", str(home.root), "--uninstall")
    assert gone.returncode == 0, gone.stderr
    assert snapshot(home.mom_priv) == before
    assert os.lstat(home.mom_priv / "prologue").st_ino == original.st_ino
    assert cli("install-hooks", "--torque-home", str(home.root), "--uninstall").returncode == 0  # idempotent too


def test_install_over_a_replaced_hook_refuses_and_changes_nothing(site):
    home, _, _ = site
    ih.install(home.root)
    (home.mom_priv / "prologue").unlink()
    (home.mom_priv / "prologue").write_text("#!/bin/sh\nexit 0\n")  # someone put a new site prologue there
    before = snapshot(home.mom_priv)
    got = cli("install-hooks", "--torque-home", str(home.root))
    assert got.returncode != 0
    assert "already keeps a site prologue" in got.stderr and len(got.stderr.strip().splitlines()) == 1
    assert snapshot(home.mom_priv) == before
    assert cli("install-hooks", "--torque-home", str(home.root), "--uninstall").returncode != 0
    assert snapshot(home.mom_priv) == before


def test_install_needs_a_mom_priv(tmp_path):
    got = cli("install-hooks", "--torque-home", str(tmp_path / "nothing"))
    assert got.returncode != 0 and "no such directory" in got.stderr


# -- the installed hooks, replayed --------------------------------------------------------------------------

def installed(home: tr.TorqueHome, hook: str) -> Path:
    return home.mom_priv / hook


@pytest.mark.parametrize("site_rc", [0, 1, 2])
def test_site_prologue_runs_first_with_the_same_arguments_and_its_code_wins(site, site_rc, sentinel_python):
    home, log, rc = site
    ih.install(home.root)
    rc.write_text(f"{site_rc}\n")
    python, called = sentinel_python
    inv = first(PROLOGUES, "1.vm")
    prepared = home.prepare(inv)  # a plain job
    result = tr.run_hook("prologue", prepared, {"VTORQUE_PYTHON": str(python)},
                         entry=installed(home, "prologue"))
    assert result.returncode == site_rc, str(result)
    assert log.read_text() == f"site prologue {' '.join(prepared.argv)}\n"
    assert not called.exists()


def test_failed_site_prologue_stops_a_vm_job_before_python(site, sentinel_python):
    home, log, rc = site
    ih.install(home.root)
    rc.write_text("1\n")
    python, called = sentinel_python
    prepared = home.prepare(vm_invocation(first(PROLOGUES, "1.vm")), vm_script(GOOD_SPEC))
    result = tr.run_hook("prologue", prepared, {"VTORQUE_PYTHON": str(python)}, entry=installed(home, "prologue"))
    assert result.returncode == 1, str(result)
    assert not called.exists()


def test_site_prologue_that_pbs_mom_would_refuse_is_not_run(site, sentinel_python):
    home, log, rc = site
    ih.install(home.root)
    os.chmod(home.mom_priv / "vtorque-site" / "prologue", 0o570)  # group-writable: a root exec hole
    result = tr.run_hook("prologue", home.prepare(first(PROLOGUES, "1.vm")), {},
                         entry=installed(home, "prologue"))
    assert result.returncode == 1, str(result)  # abort with the reason, not pbs_mom's endless -1 requeue
    assert "pbs_mom would refuse it" in result.stderr
    assert not log.exists()
    assert any(s == "fail" and "kept site hook" in t for s, t in ih.hook_findings(home.root, python=sys.executable))


@pytest.mark.parametrize("hook", ["prologue", "epilogue"])
def test_a_plain_job_execs_the_site_hook_no_fork_of_ours(site, hook, sentinel_python):
    """The fast path: for a job without -vm the site hook replaces our shell (same pid), so vtorque adds no
    process and no wait to it; its exit code is the hook's."""
    home, log, rc = site
    pid_file = home.root.parent / "site.pid"
    kept = home.mom_priv / hook
    kept.write_text(f"#!/bin/sh\necho $$ > '{pid_file}'\nexit 3\n")
    kept.chmod(0o500)
    ih.install(home.root)
    python, called = sentinel_python
    inv = first(PROLOGUES if hook == "prologue" else EPILOGUES, "1.vm")
    prepared = home.prepare(inv)
    proc = subprocess.Popen([str(installed(home, hook)), *prepared.argv], env={**prepared.env,
                            "VTORQUE_PYTHON": str(python)}, cwd=prepared.cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    proc.communicate(timeout=30)
    assert proc.returncode == 3
    assert int(pid_file.read_text()) == proc.pid
    assert not called.exists()


def test_the_site_hook_is_checked_again_once_someone_changed_it(site, sentinel_python):
    """The permission verdict is kept (a stamp, so the fast path needs no `stat` fork) only while the kept
    hook is root's and unchanged since: a write by anyone (which sets its mtime to now) or a new owner makes
    the hook check it again, and pbs_mom's rule refuses it."""
    home, log, rc = site
    ih.install(home.root)
    kept = home.mom_priv / "vtorque-site" / "prologue"
    stamp = home.mom_priv / "vtorque-site" / ".prologue.checked"
    plain = home.prepare(first(PROLOGUES, "1.vm"))
    assert tr.run_hook("prologue", plain, {}, entry=installed(home, "prologue")).returncode == 0
    assert stamp.exists() and os.lstat(stamp).st_uid == 0
    os.chmod(kept, 0o570)  # group-writable: a chmod alone leaves the mtime, the verdict stands ...
    with open(kept, "a") as fh:  # ... until someone writes it, as a group member now could
        fh.write("# changed\n")
    result = tr.run_hook("prologue", plain, {}, entry=installed(home, "prologue"))
    assert result.returncode == 1 and "pbs_mom would refuse it" in result.stderr, str(result)
    assert not stamp.exists()
    os.chmod(kept, 0o500)
    assert tr.run_hook("prologue", plain, {}, entry=installed(home, "prologue")).returncode == 0
    os.chown(kept, 65534, 0)  # a user's file now (who may set its mtime as they like): refused at once
    result = tr.run_hook("prologue", plain, {}, entry=installed(home, "prologue"))
    assert result.returncode == 1 and "pbs_mom would refuse it" in result.stderr, str(result)
    os.chown(kept, 0, 0)
    assert tr.run_hook("prologue", plain, {}, entry=installed(home, "prologue")).returncode == 0
    ih.uninstall(home.root)
    assert not (home.mom_priv / "vtorque-site").exists()  # the stamps go with it


def test_a_stamp_that_cannot_be_written_costs_the_check_not_the_job(site):
    """The verdict's stamp is written with `true >file`, not `: >file`: a failed redirection of a special
    builtin would end the shell (exit 2: Torque's endless requeue)."""
    home, log, rc = site
    ih.install(home.root)
    (home.mom_priv / "vtorque-site" / ".prologue.checked.new").mkdir()  # any write there now fails
    plain = home.prepare(first(PROLOGUES, "1.vm"))
    for _ in range(2):
        result = tr.run_hook("prologue", plain, {}, entry=installed(home, "prologue"))
        assert result.returncode == 0, str(result)
    assert log.read_text().count("site prologue") == 2
    assert not (home.mom_priv / "vtorque-site" / ".prologue.checked").exists()


def test_site_epilogue_code_wins_and_the_teardown_still_runs(site, sentinel_python):
    home, log, rc = site
    epilogue = home.mom_priv / "epilogue"
    epilogue.write_text(SITE_EPILOGUE.format(log=log, rc=rc))
    epilogue.chmod(0o500)
    ih.install(home.root)
    rc.write_text("1\n")
    python, called = sentinel_python
    prepared = home.prepare(vm_invocation(first(EPILOGUES, "10.vm")), vm_script(GOOD_SPEC))
    result = tr.run_hook("epilogue", prepared, {"VTORQUE_PYTHON": str(python)}, entry=installed(home, "epilogue"))
    assert result.returncode == 1, str(result)
    assert log.read_text().startswith("site epilogue ")
    assert called.read_text().split("\n")[:4] == ["-P", "-m", "vtorque.hooks.torque", "epilogue"]


def test_missing_interpreter_aborts_instead_of_requeueing(site):
    home, _, _ = site
    ih.install(home.root)
    prepared = home.prepare(vm_invocation(first(PROLOGUES, "1.vm")), vm_script(GOOD_SPEC))
    result = tr.run_hook("prologue", prepared, {"VTORQUE_PYTHON": "/nonexistent/python"},
                         entry=installed(home, "prologue"))
    assert result.returncode == 1, str(result)  # exec's 127 would have been an endless requeue
    assert "cannot be run" in result.stderr


# -- epilogue.precancel: as the owner, stdio /dev/null, returns at once ------------------------------------

PRECANCEL = tr.recorded_invocations("epilogue.precancel")


def test_the_precancel_recording_is_as_documented():
    assert len(PRECANCEL) == 1
    inv = PRECANCEL[0]
    assert inv.argc == 11 and inv.argv[9] == "0" and inv.cwd == inv.environ()["PBS_O_WORKDIR"]
    assert inv.umask == 0o022


def test_precancel_asks_for_the_owners_vm_job_and_returns_at_once(site):
    home, _, _ = site
    ih.install(home.root)
    nobody = (65534, 65534)
    workdir = home.root.parent / "work"
    workdir.mkdir()
    os.chown(workdir, *nobody)
    inv = PRECANCEL[0]
    job_dir = home.mom_priv / "vtorque-cancel" / inv.job_id
    job_dir.mkdir(mode=0o700)  # as the root prologue makes it for a VM job
    os.chown(job_dir, *nobody)
    prepared = home.prepare(inv, workdir=workdir)
    result = tr.run_hook("epilogue.precancel", prepared, entry=installed(home, "epilogue.precancel"),
                         as_user=nobody, devnull_stdio=True)
    assert result.returncode == 0
    assert result.seconds < 0.5, result.seconds  # pbs_mom waits for it
    request = job_dir / "requested"
    assert request.is_dir() and os.lstat(request).st_uid == nobody[0]

    again = tr.run_hook("epilogue.precancel", prepared, entry=installed(home, "epilogue.precancel"),
                        as_user=nobody, devnull_stdio=True)  # a second qdel: still instant, still 0
    assert again.returncode == 0


def test_precancel_of_a_plain_job_does_nothing(site):
    home, _, _ = site
    ih.install(home.root)
    workdir = home.root.parent / "work"
    workdir.mkdir()
    prepared = home.prepare(PRECANCEL[0], workdir=workdir)
    before = snapshot(home.mom_priv)
    result = tr.run_hook("epilogue.precancel", prepared, entry=installed(home, "epilogue.precancel"),
                         as_user=(65534, 65534), devnull_stdio=True)
    assert result.returncode == 0
    assert snapshot(home.mom_priv) == before


def test_another_user_cannot_ask_to_cancel_a_job(site):
    home, _, _ = site
    ih.install(home.root)
    job_dir = home.mom_priv / "vtorque-cancel" / "3.vm"
    job_dir.mkdir(mode=0o700)  # the owner is root here; nobody tries
    workdir = home.root.parent / "work"
    workdir.mkdir()
    result = tr.run_hook("epilogue.precancel", home.prepare(PRECANCEL[0], workdir=workdir),
                         entry=installed(home, "epilogue.precancel"), as_user=(65534, 65534), devnull_stdio=True)
    assert result.returncode == 0
    assert not (job_dir / "requested").exists()


# -- doctor ---------------------------------------------------------------------------------------------------

def test_doctor_names_what_is_wrong(site):
    home, _, _ = site
    assert any(s == "fail" and "not installed" in t for s, t in ih.hook_findings(home.root, python=sys.executable))
    ih.install(home.root)
    ok = ih.hook_findings(home.root, 5.0, 240.0, sys.executable)
    assert all(s == "ok" for s, t in ok if not t.startswith("$prologalarm")), ok
    assert ("warn", "$prologalarm 30: pbs_mom kills a prologue after 20 s; guests get up to 15 s to boot") in ok
    assert any("chains the site hook" in t for _, t in ok)
    assert any("$prologalarm 30" in t and "15 s" in t for _, t in ok)

    os.chmod(home.mom_priv / "epilogue", 0o755)
    user = home.mom_priv / "prologue.user"
    user.write_text("#!/bin/sh\nexit 0\n")
    user.chmod(0o500)  # recorded: a .user hook without o+rx requeues every job forever
    (home.mom_priv / "config").write_text("$prologalarm 12\n")
    found = dict((t.split(":")[0], s) for s, t in ih.hook_findings(home.root, 5.0, 240.0, "/nonexistent/python"))
    assert found["epilogue"] == "fail" and found["prologue.user"] == "fail"
    assert found["$prologalarm 12"] == "fail"
    assert any(s == "fail" and "cannot import vtorque" in t
               for s, t in ih.hook_findings(home.root, 5.0, 240.0, "/nonexistent/python"))


@pytest.fixture
def sentinel_python(tmp_path):
    return tr.sentinel_python(tmp_path)
