"""The wrapper job script vsub submits: its header carries the VM spec and the trace context to the hooks,
and its body hands the user's script to the launcher, which runs it in the guest. Pure: text in, text out.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

MARK = "# vtorque-"
SPEC_LINE = "# vtorque-spec: "  # the hooks' shell fast path greps for exactly this
HEADER_LINES = 64  # the header is within the first lines; hooks never read further
_DIRECTIVE = re.compile(r"^#(PBS|SBATCH)\s", re.ASCII)
DEFAULT_PREFIX = "#PBS"
_WS = " \t\n\r\f\v"  # ASCII whitespace, as the sh front (cli/vsub.sh) sees it
END = "VTORQUE_SCRIPT_END"


class ScriptError(ValueError):
    pass


@dataclass(frozen=True)
class JobHeader:
    spec: dict[str, str]
    ssh_pubkeys: list[str] = field(default_factory=list)
    traceparent: str | None = None
    user_metadata: dict = field(default_factory=dict)
    submitted_ns: int | None = None  # wall clock when vsub submitted: the queue wait starts here


def _vm_directive(prefix: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(prefix)}[{_WS}]+-vm(?:[{_WS}]+(.*?))?[{_WS}]*$", re.ASCII)


def inline_vm_options(script: str, prefix: str = DEFAULT_PREFIX) -> list[str]:
    """`<prefix> -vm ...` values from the script's leading directive block (the command line wins over these).
    The prefix is qsub's directive prefix (-C, $PBS_DPREFIX, #PBS); an empty one means no directives."""
    if not prefix:
        return []
    pattern = _vm_directive(prefix)
    found = []
    for line in _leading_block(script):
        match = pattern.match(line)
        if match:
            found.append(match.group(1) or "")
    return found


def _leading_block(script: str) -> list[str]:
    """The shebang, comments and blank lines before the first command: where qsub and sbatch read directives.
    Lines end at "\n" only (as qsub and the sh front read them)."""
    block = []
    for line in script.split("\n"):
        stripped = line.strip(_WS)
        if stripped and not stripped.startswith("#"):
            break
        block.append(line)
    return block


def render_wrapper(user_script: str, spec: dict[str, str], ssh_pubkey: str, ssh_key_path: str,
                   traceparent: str | None, launcher: str, user_metadata: dict | None = None,
                   submitted_ns: int | None = None, prefix: str = DEFAULT_PREFIX) -> str:
    for value in (ssh_pubkey, ssh_key_path, traceparent or "", *spec.values()):
        if "\n" in value or "\r" in value:
            raise ScriptError("a header value holds a line break")
    spec_text = ",".join(f"{k}={v}" for k, v in sorted(spec.items()))
    lines = ["#!/bin/sh", "# vtorque-job: 1", f"{SPEC_LINE}{spec_text}", f"# vtorque-ssh-pubkey: {ssh_pubkey}"]
    if traceparent:
        lines.append(f"# vtorque-traceparent: {traceparent}")
    if submitted_ns:
        lines.append(f"# vtorque-submitted: {submitted_ns}")
    if user_metadata:
        # The user's cloud-init additions travel with the job: the hooks cannot read the user's files.
        packed = base64.b64encode(json.dumps(user_metadata, sort_keys=True).encode()).decode()
        if len(packed) > 16384:
            raise ScriptError("-vm metadata: the cloud-init file is too large (16 KiB at most)")
        lines.append(f"# vtorque-metadata: {packed}")
    # The user's own directives stay in the leading block so qsub/sbatch still honour them; -vm is ours.
    vm_lines = [_vm_directive(DEFAULT_PREFIX)] + ([_vm_directive(prefix)] if prefix else [])
    lines += [line for line in _leading_block(user_script)
              if (_DIRECTIVE.match(line) or (prefix and line.startswith(prefix)))
              and not any(p.match(line) for p in vm_lines)]
    argv = [launcher, "--ssh-key", ssh_key_path]
    if traceparent:
        argv += ["--traceparent", traceparent]
    for key in ("vm_prologue", "vm_epilogue"):
        if spec.get(key):
            argv += [f"--{key.replace('_', '-')}", spec[key]]
    encoded = base64.encodebytes(user_script.encode()).decode()
    lines += ["", "# Runs the job's script inside its VM (vtorque).",
              f"exec {shlex.join(argv)} <<'{END}'", encoded.rstrip("\n"), END, ""]
    return "\n".join(lines)


def parse_header(text: str) -> JobHeader | None:
    """The vtorque header of a job script, or None for a job that is not a VM job."""
    # Here, not at the top: the launcher and vsub's plain-qsub path import this module and need no config.
    from vtorque.shared.spec import SpecError, split_pairs

    spec: dict[str, str] | None = None
    keys: list[str] = []
    traceparent = None
    metadata: dict = {}
    submitted = None
    for line in text.splitlines()[:HEADER_LINES]:
        if not line.startswith(MARK):
            continue
        name, _, value = line[len("# "):].partition(": ")
        value = value.strip()
        if name == "vtorque-spec":
            # Taken apart by the spec's one parser; its keys are judged by whoever validates the spec.
            try:
                spec = dict(split_pairs(value, skip_empty=True))
            except SpecError as exc:
                raise ScriptError(f"malformed vtorque-spec header: {exc}") from None
        elif name == "vtorque-ssh-pubkey" and value:
            keys.append(value)
        elif name == "vtorque-traceparent" and value:
            traceparent = value
        elif name == "vtorque-submitted" and value.isdigit():
            submitted = int(value)
        elif name == "vtorque-metadata" and value:
            try:
                metadata = json.loads(base64.b64decode(value, validate=True))
            except (ValueError, TypeError):
                raise ScriptError("malformed vtorque-metadata header") from None
    if spec is None:
        return None
    return JobHeader(spec=spec, ssh_pubkeys=keys, traceparent=traceparent, user_metadata=metadata,
                     submitted_ns=submitted)


def user_script_from_stdin(data: str) -> bytes:
    return base64.decodebytes(data.encode())


def read_head(path: str | Path) -> str:
    """The first HEADER_LINES lines of a job script file, where the hooks and prefetch look for the header (a
    Torque server's copy, a Torque prologue's $8, slurmctld's; shared/torque.py and shared/slurm.py say where
    those are). Raises OSError."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        return "".join(fh.readline() for _ in range(HEADER_LINES))
