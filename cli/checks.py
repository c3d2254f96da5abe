"""What `vtorque doctor` (cli/doctor.py) and the hook installer (cli/install_hooks.py) both need, so neither
imports the other: a check's answer, and the environment the hooks' shell entry points really run with.

The entry points (hooks/torque/*, hooks/slurm/*) source /etc/vtorque/hooks.env with /bin/sh, then exec
`${VTORQUE_PYTHON:-/opt/vtorque/venv/bin/python}`. That file may use any shell form (`VAR=…`, `export VAR=…`,
`: "${VAR:=…}"` as deploy/single-host/configure.sh writes it), so it is not parsed here: it is sourced by the
same /bin/sh, in the environment the scheduler gives its hooks, and the result is read back.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

OK, WARN, FAIL = "ok", "warn", "fail"
HOOKS_ENV = "/etc/vtorque/hooks.env"
DEFAULT_PYTHON = "/opt/vtorque/venv/bin/python"
HOOK_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # what the entry points set before sourcing hooks.env
# What the entry points read from hooks.env (or the scheduler's environment) besides the interpreter.
HOOK_VARIABLES = ("VTORQUE_PYTHON", "VTORQUE_CONFIG", "VTORQUE_SLURM_STATE", "SLURM_CONF")


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok, warn, fail
    detail: str


def worst(statuses) -> str:
    statuses = list(statuses)
    return FAIL if FAIL in statuses else WARN if WARN in statuses else OK


def hook_environment(env_file: str | None = None, base: dict[str, str] | None = None,
                     timeout: float = 10.0) -> tuple[dict[str, str], str]:
    """(the HOOK_VARIABLES as the entry points see them after sourcing `env_file` (default HOOKS_ENV), problem
    or ''). `base` is what the scheduler passes its hooks (Slurm: nothing; Torque: pbs_environment)."""
    env_file = env_file or HOOKS_ENV
    env = {"PATH": HOOK_PATH, **(base or {})}
    script = ('[ -r "$1" ] && . "$1"; shift; for v in "$@"; do eval "printf \'%s=%s\\0\' \\"$v\\" \\"\\${$v-}\\""; '
              'done')
    try:
        proc = subprocess.run(["/bin/sh", "-c", script, "sh", env_file, *HOOK_VARIABLES], env=env,
                              capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as exc:
        return {}, f"cannot source {env_file}: {exc}"
    seen = {}
    for item in proc.stdout.decode(errors="replace").split("\0"):
        name, sep, value = item.partition("=")
        if sep and value:
            seen[name] = value
    problem = "" if proc.returncode == 0 else (
        f"{env_file}: /bin/sh exit {proc.returncode}: {proc.stderr.decode(errors='replace').strip()[:200]}")
    return seen, problem


def hooks_python(env_file: str | None = None, base: dict[str, str] | None = None) -> str:
    """The interpreter the shell hooks exec: VTORQUE_PYTHON as hooks.env leaves it, else the default venv."""
    return hook_environment(env_file, base)[0].get("VTORQUE_PYTHON") or DEFAULT_PYTHON


def is_root() -> bool:
    return os.geteuid() == 0
