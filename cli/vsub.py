"""vsub: qsub with `-vm key=value,...` for jobs that run inside virtual machines.

Every argument but `-vm` goes to the real qsub unchanged; a job without a VM spec is handed to qsub as is
(exec, nothing else imported). For a VM job vsub validates the spec against the site config, writes the
wrapper script (spec + trace context in its header), submits it under the user script's name so the output
files keep their usual names, prints what qsub printed and exits with qsub's status.
"""

from __future__ import annotations

import os
import sys

USAGE_EXIT = 2
# qsub options that take a value (Torque 6 and slurm-wlm-torque); everything else starting with '-' is a flag.
_QSUB_VALUE_OPTIONS = set("aAbcCdDeFjkKlLmMNopPqrStuvwW")


class UsageError(Exception):
    pass


class _Help(Exception):
    pass


def split_args(argv: list[str]) -> tuple[list[str], list[str], int | None, bool]:
    """(qsub args without -vm/--dry-run, -vm values, index of the script in the qsub args, dry_run)."""
    qsub_args: list[str] = []
    vm: list[str] = []
    script_at: int | None = None
    dry_run = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if script_at is not None:
            qsub_args.append(arg)
        elif arg == "-vm":
            if i + 1 >= len(argv):
                raise UsageError("-vm needs a value, e.g. -vm img=NAME,vcpus=2")
            vm.append(argv[i + 1])
            i += 1
        elif arg.startswith("-vm="):
            vm.append(arg[4:])
        elif arg == "--dry-run":
            dry_run = True
        elif arg == "--help":
            raise _Help()
        elif arg.startswith("-") and len(arg) > 1:
            qsub_args.append(arg)
            if len(arg) == 2 and arg[1] in _QSUB_VALUE_OPTIONS and i + 1 < len(argv):
                qsub_args.append(argv[i + 1])
                i += 1
        else:
            script_at = len(qsub_args)
            qsub_args.append(arg)
        i += 1
    return qsub_args, vm, script_at, dry_run


def _read_script(path: str | None) -> tuple[str, str]:
    if path is None or path == "-":
        if sys.stdin.isatty():
            raise UsageError("no job script: give a script file or pipe one on stdin")
        text = sys.stdin.read()
        if not text.strip():
            raise UsageError("the job script from stdin is empty")
        return text, "STDIN"
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        if not text.strip():
            raise UsageError(f"job script {path} is empty")
        return text, os.path.basename(path)
    except OSError as exc:
        raise UsageError(f"cannot read job script {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"job script {path} is not text (UTF-8)") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        qsub_args, vm, script_at, dry_run = split_args(argv)
        script_path = qsub_args[script_at] if script_at is not None else None
        if not vm and not dry_run:
            # Fast path: only an inline "#PBS -vm" makes this a VM job; otherwise qsub gets it untouched.
            if script_path is None or not _has_inline_vm(script_path):
                os.execvp("qsub", ["qsub", *argv])
        return _submit_vm_job(qsub_args, vm, script_at, dry_run)
    except _Help:
        try:
            return _print_help()
        except UsageError as exc:
            print(f"vsub: {exc}", file=sys.stderr)
            return USAGE_EXIT
    except UsageError as exc:
        print(f"vsub: {exc}", file=sys.stderr)
        return USAGE_EXIT


def _has_inline_vm(path: str) -> bool:
    from vtorque.shared.job_script import inline_vm_options

    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return bool(inline_vm_options(fh.read(65536)))
    except OSError:
        return False  # qsub reports an unreadable script in its own words


PATH_KEYS = ("vm_prologue", "vm_epilogue", "metadata")


def resolve_paths(options: dict[str, str], cwd: str) -> dict[str, str]:
    """Relative file names in the spec are relative to where vsub runs, as qsub's own paths are."""
    out = dict(options)
    for key in (*PATH_KEYS, "disk"):
        value = out.get(key)
        if not value or (key == "disk" and "/" not in value and not value.endswith((".img", ".qcow2", ".raw"))):
            continue
        out[key] = os.path.normpath(os.path.join(cwd, os.path.expanduser(value)))
    return out


def _print_help() -> int:
    import subprocess

    from vtorque.shared.config import ConfigError, load_config
    from vtorque.shared.spec import help_table

    try:
        site = load_config().spec
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    try:
        usage = subprocess.run(["qsub", "--help"], capture_output=True, text=True, timeout=30)
        text = (usage.stdout or usage.stderr).strip()
    except OSError:
        text = "(qsub not found on PATH)"
    print(text.replace("qsub", "vsub", 1) if text else "usage: vsub [qsub options] [script]")
    print("\nvsub: every qsub option above, plus\n  -vm key=value[,key=value]...   run the job inside virtual "
          "machines (repeatable; also as '#PBS -vm ...' lines in the script; the command line wins)\n"
          "  --dry-run                      print the qsub command and the wrapper script, submit nothing\n\n"
          "-vm keys (defaults and limits of this site):")
    print(help_table(site))
    return 0


def _submit_vm_job(qsub_args: list[str], vm: list[str], script_at: int | None, dry_run: bool) -> int:
    import shlex
    import shutil
    import subprocess
    import tempfile
    import time
    import uuid
    from pathlib import Path

    from vtorque.cli.qsub_resources import fit
    from vtorque.shared import tracing
    from vtorque.shared.config import ConfigError, load_config
    from vtorque.shared.job_script import ScriptError, inline_vm_options, render_wrapper
    from vtorque.shared.spec import SpecError, parse_options, validate, validate_user_metadata
    from vtorque.shared.user_files import check_user_file

    script_path = qsub_args[script_at] if script_at is not None else None
    user_script, script_name = _read_script(script_path)
    try:
        config = load_config()
        options = parse_options(inline_vm_options(user_script)) if inline_vm_options(user_script) else {}
        options.update(parse_options(vm))  # the command line wins over the script, as with qsub
        options = resolve_paths(options, os.getcwd())
        spec = validate(options, config)
        home = str(Path.home())
        for key in PATH_KEYS:
            if getattr(spec, key):
                check_user_file(key, getattr(spec, key), os.getuid(), home, config.spec.user_dirs)
        if spec.disk and spec.disk.image:
            check_user_file("disk", spec.disk.image, os.getuid(), home, config.spec.user_dirs)
        user_metadata = validate_user_metadata(_load_metadata(spec.metadata)) if spec.metadata else {}
    except (ConfigError, SpecError) as exc:
        raise UsageError(str(exc)) from None
    if shutil.which("qsub") is None:
        raise UsageError("qsub not found on PATH")

    before = qsub_args[:script_at] if script_at is not None else list(qsub_args)
    after = qsub_args[script_at + 1:] if script_at is not None else []
    fitted = fit(before, spec.cores_per_node(config.spec), spec.ram_mib_per_node(config.spec))
    for note in fitted.notes:
        print(f"vsub: {note} so {spec.vms_per_node} VM(s) × {spec.vcpus} vCPU / {spec.ram_mib} MiB fit "
              f"beside the host reserve", file=sys.stderr)
    args = [*config.spec.exclusive_args, *fitted.args]

    tracing.setup_tracing("vtorque-vsub", config.tracing)
    key_dir = Path.home() / ".vtorque" / "keys" / uuid.uuid4().hex
    submitted = False
    try:
        with tracing.tracer().start_as_current_span("vsub submit", attributes={
                "vtorque.image.name": spec.img, "vtorque.vcpus": spec.vcpus, "vtorque.ram_mib": spec.ram_mib,
                "vtorque.vms_per_node": spec.vms_per_node}) as span:
            pubkey = _make_key(key_dir)
            launcher = str(Path(sys.executable).parent / "vtorque-launch")
            wrapper = render_wrapper(user_script, spec.as_options(), pubkey, str(key_dir / "id_ed25519"),
                                     tracing.current_traceparent(), launcher, user_metadata, time.time_ns())
            with tempfile.TemporaryDirectory(prefix="vsub-") as tmp:
                wrapper_path = Path(tmp) / script_name
                wrapper_path.write_text(wrapper)
                argv = ["qsub", *args, str(wrapper_path), *after]
                if dry_run:
                    print(shlex.join(argv))
                    print(wrapper, end="")
                    return 0
                proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
            sys.stdout.write(proc.stdout)
            job_id = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
            if proc.returncode == 0 and job_id:
                span.set_attribute(tracing.JOB_ID, job_id)
                submitted = True
            else:
                tracing.mark_error(span, f"qsub exited {proc.returncode}")
            return proc.returncode
    except ScriptError as exc:
        raise UsageError(str(exc)) from None
    finally:
        if not submitted:
            shutil.rmtree(key_dir, ignore_errors=True)
        tracing.shutdown_tracing()


def _load_metadata(path: str):
    import yaml

    from vtorque.shared.spec import SpecError

    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError("metadata", path, f"cannot be read: {exc}") from None
    except yaml.YAMLError as exc:
        raise SpecError("metadata", path, f"is not valid YAML: {str(exc).splitlines()[0]}") from None


def _make_key(key_dir) -> str:
    """A per-job ssh key: the private half stays in the owner's home, the public half goes to the guest."""
    import subprocess

    key_dir.mkdir(parents=True, mode=0o700)
    os.chmod(key_dir.parent.parent, 0o700)
    key = key_dir / "id_ed25519"
    try:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "vtorque-job", "-f", str(key)],
                       check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise UsageError(f"cannot make the job's ssh key with ssh-keygen: {exc}") from None
    return key.with_suffix(".pub").read_text().strip()


if __name__ == "__main__":
    sys.exit(main())
