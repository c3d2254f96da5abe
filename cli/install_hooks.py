"""`vtorque install-hooks --torque-home DIR [--uninstall]`: put vtorque's Torque hooks into <DIR>/mom_priv, and
`hook_findings` for `vtorque doctor`.

What pbs_mom demands (../shared/reference/torque-hooks.md §5, `check_pelog_permissions`): root hooks owned by
uid 0, regular files, u+rx, no group/other write; `epilogue.precancel` runs as the job's owner, so it is 0555.
pbs_mom stats the hooks for every job, with no restart: each file is replaced by one rename (a job starting
mid-install sees the old hook or the new one, never half a file, never none).

A site hook already there is kept, not copied: hard-linked into <mom_priv>/vtorque-site/ (same inode, so its
bytes, owner, mode and times are exactly what they were) before ours replaces its name; our hook runs it first
and honours its failure. Not `prologue.site`: pbs_mom runs `prologue.<jobtype>` instead of `prologue` for a job
submitted with that job type, so a `prologue.<anything>` name could be picked by a user. `--uninstall` renames
the kept file back. Prologue.parallel/epilogue.parallel are not needed (the sister nodes' guests are booted and
removed by their node workers, on the mother superior's events) and are left alone.
"""

from __future__ import annotations

import os
import stat
import subprocess
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from vtorque.hooks.torque.cancel import CANCEL_DIR  # where epilogue.precancel asks, made by the prologue

HOOKS = {"prologue": 0o500, "epilogue": 0o500, "epilogue.precancel": 0o555}
SITE_DIR = "vtorque-site"
MARKER = "# vtorque-hook: "
HOOKS_ENV = "/etc/vtorque/hooks.env"
DEFAULT_PYTHON = "/opt/vtorque/venv/bin/python"


class InstallError(Exception):
    pass


def packaged_hook(name: str) -> bytes:
    """One of the shell entry points in hooks/torque/, as this vtorque ships it."""
    return (resources.files("vtorque.hooks.torque") / name).read_bytes()


def is_ours(path: Path, name: str) -> bool:
    """A regular file (not a link) carrying our marker for this hook name in its first lines."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        with open(path, "rb") as fh:
            head = fh.read(512).decode(errors="replace").splitlines()[:3]
    except OSError:
        return False
    return f"{MARKER}{name}" in head


def torque_root_hook_ok(st: os.stat_result, user_runs_it: bool = False) -> bool:
    """pbs_mom's check for a root-owned hook (plus o+rx when it runs as the job's owner)."""
    mode = st.st_mode
    ok = (st.st_uid == 0 and stat.S_ISREG(mode) and mode & 0o500 == 0o500 and not mode & 0o022)
    return ok and (not user_runs_it or mode & 0o005 == 0o005)


@dataclass
class Action:
    hook: str
    what: str  # installed, updated, unchanged, kept site hook, restored site hook, removed

    def __str__(self) -> str:
        return f"{self.hook}: {self.what}"


def _state(mom_priv: Path, name: str) -> str:
    path = mom_priv / name
    if not os.path.lexists(path):
        return "absent"
    if is_ours(path, name):
        return "ours"
    st = os.lstat(path)
    if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
        return "site"
    return "other"


def _mom_priv(torque_home: Path) -> Path:
    mom_priv = torque_home / "mom_priv"
    if not mom_priv.is_dir():
        raise InstallError(f"{mom_priv}: no such directory (is {torque_home} a TORQUE_HOME with a pbs_mom?)")
    return mom_priv


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    tmp = path.parent / f".{path.name}.vtorque-{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
        os.fchown(fd, 0, 0)
        os.fchmod(fd, mode)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, path)


def _drop_stamps(site_dir: Path, name: str) -> None:
    """The shell hooks' record that the kept site hook passed pbs_mom's permission rule (hooks/torque/prologue):
    `.<name>.checked` (and a `.new` one being made)."""
    for stamp in (site_dir / f".{name}.checked", site_dir / f".{name}.checked.new"):
        try:
            stamp.unlink()
        except OSError:  # absent, or something a person put there: then vtorque-site/ stays, as it is not ours
            pass


def install(torque_home: Path) -> list[Action]:
    mom_priv = _mom_priv(torque_home)
    site_dir = mom_priv / SITE_DIR
    states = {name: _state(mom_priv, name) for name in HOOKS}
    # Every refusal comes before the first change: nothing half-done.
    for name, state in states.items():
        if state == "other":
            raise InstallError(f"{mom_priv / name} is neither a file nor a symlink: move it away first")
        if state == "site" and os.path.lexists(site_dir / name):
            raise InstallError(f"{mom_priv / name} is not vtorque's, and {site_dir / name} already keeps a site "
                               f"{name}: decide which one the site wants, remove the other, run again")
    if os.path.lexists(site_dir) and not site_dir.is_dir():
        raise InstallError(f"{site_dir} exists and is not a directory")
    actions = []
    for name, mode in HOOKS.items():
        path, state, data = mom_priv / name, states[name], packaged_hook(name)
        if state == "site":
            site_dir.mkdir(mode=0o755, exist_ok=True)
            os.chmod(site_dir, 0o755)
            _drop_stamps(site_dir, name)  # a verdict on an earlier kept hook says nothing of this one
            os.link(path, site_dir / name, follow_symlinks=False)
            actions.append(Action(name, f"site {name} kept as {site_dir / name}, runs first"))
        if state == "ours":
            st = os.lstat(path)
            if path.read_bytes() == data and st.st_uid == 0 and st.st_gid == 0 and stat.S_IMODE(st.st_mode) == mode:
                actions.append(Action(name, "unchanged"))
                continue
        try:
            _write_atomically(path, data, mode)
        except OSError:
            if state == "site":
                os.unlink(site_dir / name)  # the site hook still has its own name: undo the keeping
            raise
        actions.append(Action(name, {"ours": "updated", "absent": "installed", "site": "installed"}[state]
                              + f" (root, {mode:o})"))
    cancel = mom_priv / CANCEL_DIR
    cancel.mkdir(mode=0o711, exist_ok=True)
    os.chown(cancel, 0, 0)
    os.chmod(cancel, 0o711)
    return actions


def uninstall(torque_home: Path) -> list[Action]:
    mom_priv = _mom_priv(torque_home)
    site_dir = mom_priv / SITE_DIR
    states = {name: _state(mom_priv, name) for name in HOOKS}
    for name, state in states.items():
        if state in ("site", "other") and os.path.lexists(site_dir / name):
            raise InstallError(f"{mom_priv / name} is no longer vtorque's, and {site_dir / name} keeps the site "
                               f"{name} vtorque replaced: decide which one to keep by hand")
    actions = []
    for name in HOOKS:
        path, kept = mom_priv / name, site_dir / name
        if os.path.lexists(kept) and states[name] in ("ours", "absent"):
            os.rename(kept, path)  # the very inode that was there: bytes, owner, mode, times
            actions.append(Action(name, "site hook restored"))
        elif states[name] == "ours":
            path.unlink()
            actions.append(Action(name, "removed"))
    for name in HOOKS:
        if site_dir.is_dir() and not os.path.lexists(site_dir / name):
            _drop_stamps(site_dir, name)
    if site_dir.is_dir() and not any(site_dir.iterdir()):
        site_dir.rmdir()
    cancel = mom_priv / CANCEL_DIR
    if cancel.is_dir() and not cancel.is_symlink():
        import shutil

        shutil.rmtree(cancel)
    return actions


# -- doctor -----------------------------------------------------------------------------------------------

def hooks_python(env_file: str = HOOKS_ENV) -> str:
    """The interpreter the shell hooks exec, as /bin/sh leaves VTORQUE_PYTHON after sourcing hooks.env (any form:
    `VTORQUE_PYTHON=…`, `: "${VTORQUE_PYTHON:=…}"`, …; cli/checks.py), else the default venv."""
    from vtorque.cli.checks import hooks_python as sourced

    return sourced(env_file)


def hook_findings(torque_home: Path, prologue_margin: float = 15.0, prologue_cap: float = 240.0,
                  python: str | None = None) -> list[tuple[str, str]]:
    """(status, text) per finding, status ok|warn|fail; what `vtorque doctor` prints for the Torque hooks."""
    from vtorque.hooks.torque.deadline import prologue_deadline
    from vtorque.shared.torque import read_prologalarm, torque_kill_after

    mom_priv = torque_home / "mom_priv"
    if not mom_priv.is_dir():
        return [("warn", f"{mom_priv}: no such directory (no pbs_mom here, or set [torque] home)")]
    found: list[tuple[str, str]] = []
    for name, mode in HOOKS.items():
        path = mom_priv / name
        state = _state(mom_priv, name)
        if state == "absent":
            found.append(("fail", f"{name}: not installed (vtorque install-hooks --torque-home {torque_home})"))
            continue
        if state != "ours":
            found.append(("fail", f"{name}: {path} is not vtorque's hook (replaced after install?)"))
            continue
        st = os.lstat(path)
        have = stat.S_IMODE(st.st_mode)
        if st.st_uid != 0 or have != mode:
            found.append(("fail", f"{name}: owner uid {st.st_uid}, mode {have:o}; want root, {mode:o}"
                          + (" (pbs_mom refuses it: every job requeues forever)"
                             if not torque_root_hook_ok(st, name == "epilogue.precancel") else "")))
        elif path.read_bytes() != packaged_hook(name):
            found.append(("warn", f"{name}: differs from this vtorque's version: run install-hooks again"))
        else:
            found.append(("ok", f"{name}: root, {mode:o}"))
        kept = mom_priv / SITE_DIR / name
        if os.path.lexists(kept):
            try:
                good = torque_root_hook_ok(os.stat(kept), name == "epilogue.precancel")
            except OSError as exc:
                good, _ = False, exc
            found.append(("ok" if good else "fail",
                          f"{name}: chains the site hook {kept}" if good else
                          f"{name}: the kept site hook {kept} fails pbs_mom's permission rule "
                          f"(root-owned, u+rx, no g/o write); vtorque will not run it and aborts the job"))
    for name in ("prologue.user", "epilogue.user"):
        path = mom_priv / name
        if os.path.lexists(path):
            try:
                st = os.stat(path)
                good = st.st_uid == 0 and torque_root_hook_ok(st, True)
            except OSError:
                good = False
            if not good:
                found.append(("fail", f"{name}: must be root-owned and o+rx, else pbs_mom requeues every job "
                                      f"forever (torque-hooks.md §5.4)"))
    for name in ("prologue.parallel", "epilogue.parallel"):
        if os.path.lexists(mom_priv / name):
            found.append(("ok", f"{name}: the site's own (vtorque needs none on sister nodes)"))
    cancel = mom_priv / CANCEL_DIR
    try:
        st = os.lstat(cancel)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or stat.S_IMODE(st.st_mode) != 0o711:
            found.append(("fail", f"{cancel}: want a root directory, mode 711"))
    except OSError:
        found.append(("fail", f"{cancel}: missing (qdel then waits for the epilogue): run install-hooks"))
    alarm = read_prologalarm(torque_home)
    wait = prologue_deadline(alarm, prologue_margin, prologue_cap)
    found.append(("ok" if wait >= 60 else "warn" if wait >= 1 else "fail",
                  f"$prologalarm {alarm}: pbs_mom kills a prologue after {torque_kill_after(alarm)} s; "
                  f"guests get up to {max(wait, 0):.0f} s to boot"))
    python = python or hooks_python()
    try:
        proc = subprocess.run([python, "-P", "-c", "import vtorque.hooks.torque.entry"], capture_output=True,
                              timeout=30, stdin=subprocess.DEVNULL, env={"PATH": "/bin:/usr/bin"})
        good, why = proc.returncode == 0, proc.stderr.decode(errors="replace").strip().splitlines()[-1:]
    except OSError as exc:
        good, why = False, [str(exc)]
    found.append(("ok", f"hooks run {python}") if good else
                 ("fail", f"the hooks' python {python} cannot import vtorque: {' '.join(why)} "
                          f"(set VTORQUE_PYTHON in {HOOKS_ENV})"))
    return found
