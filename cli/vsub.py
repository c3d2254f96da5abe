"""vsub: qsub with `-vm key=value,...` for jobs that run inside virtual machines (the Python half).

Users run the sh front (cli/vsub.sh, installed as `vsub`): a job without a VM goes from there to the site's
qsub without starting Python. This module (`vtorque-vsub`) gets the rest: VM jobs, --dry-run/-gf, --help,
--man. It decides exactly as the front does (split_args, is_vm_script, qsub_binary) so that run directly it
behaves the same. Every argument but `-vm`, `--dry-run`/`-gf` goes to the real qsub unchanged; for a VM job
vsub validates the spec against the site config, writes the wrapper script (spec + trace context in its
header), submits it under the user script's name so the output files keep their usual names, prints what qsub
printed and exits with qsub's status.
"""

from __future__ import annotations

import os
import stat
import sys

USAGE_EXIT = 2
# qsub options that take a value (Torque 6 and slurm-wlm-torque); everything else starting with '-' is a flag.
# cli/vsub.sh has the same list.
_QSUB_VALUE_OPTIONS = set("aAbcCdDeFjJkKlLmMNopPqrStuvwW")
# slurm-wlm-torque's qsub also has -wd DIR and -pe shm N (Torque's getopt reads those as -w d and -p e).
_SLURM_LONG_OPTIONS = {"-wd": 1, "-pe": 2}
DEFAULT_PREFIX = "#PBS"


class UsageError(Exception):
    pass


class _Help(Exception):
    pass


class _Man(Exception):
    pass


def split_args(argv: list[str], kind: str = "torque") -> tuple[list[str], list[str], int | None, bool]:
    """(qsub args without -vm/--dry-run/-gf, -vm values, index of the script in the qsub args, dry_run).

    Options end at the first argument that is not one (the script); what follows it is the script's.
    vTorque's `-gf` ("generate files only") is --dry-run. `kind`: the site's scheduler ([scheduler] kind)."""
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
        elif arg in ("--dry-run", "-gf"):
            dry_run = True
        elif arg == "--help":
            raise _Help()
        elif arg == "--man":
            raise _Man()
        elif arg.startswith("-") and len(arg) > 1:
            qsub_args.append(arg)
            if kind == "slurm" and arg in _SLURM_LONG_OPTIONS:
                values = argv[i + 1:i + 1 + _SLURM_LONG_OPTIONS[arg]]
                qsub_args += values
                i += len(values)
            elif len(arg) == 2 and arg[1] in _QSUB_VALUE_OPTIONS:
                if i + 1 >= len(argv):
                    if arg == "-C":
                        raise UsageError("-C needs a value: the directive prefix, e.g. -C '#PBS'")
                else:
                    qsub_args.append(argv[i + 1])
                    i += 1
        else:
            script_at = len(qsub_args)
            qsub_args.append(arg)
        i += 1
    return qsub_args, vm, script_at, dry_run


def directive_prefix(options: list[str], env=None, kind: str = "torque") -> str:
    """qsub's directive prefix for these options (those before the script): the last -C, else $PBS_DPREFIX,
    else #PBS. Empty: the script has no directives (qsub does not scan it)."""
    env = os.environ if env is None else env
    prefix = env.get("PBS_DPREFIX", DEFAULT_PREFIX)
    i = 0
    while i < len(options):
        arg = options[i]
        if arg == "-C" and i + 1 < len(options):
            prefix = options[i + 1]
            i += 1
        elif arg.startswith("-C") and len(arg) > 2:
            prefix = arg[2:]
        elif kind == "slurm" and arg in _SLURM_LONG_OPTIONS:
            i += _SLURM_LONG_OPTIONS[arg]
        elif len(arg) == 2 and arg[0] == "-" and arg[1] in _QSUB_VALUE_OPTIONS:
            i += 1
        i += 1
    return prefix


def is_vm_script(text: str, prefix: str) -> bool:
    from vtorque.shared.job_script import inline_vm_options

    return bool(inline_vm_options(text, prefix))


def _script_is_vm(path: str, prefix: str) -> bool:
    """A regular, readable script file with a leading `<prefix> -vm` line (anything else is qsub's to judge)."""
    if not prefix or not os.path.isfile(path):
        return False
    lines = []
    try:
        with open(path, "rb") as fh:
            for raw in fh:  # the leading block only: stop at the first command
                line = raw.decode("utf-8", "replace")
                lines.append(line)
                stripped = line.strip(" \t\n\r\f\v")
                if stripped and not stripped.startswith("#"):
                    break
    except OSError:
        return False
    return is_vm_script("".join(lines), prefix)


def needs_python(argv: list[str], stdin_data: bytes | None = None, kind: str = "torque") -> bool:
    """Whether the sh front hands this command line to the Python vsub (a VM job, --dry-run/-gf, --help,
    --man, a usage error); False: it goes to qsub untouched. `stdin_data`: the script piped in, if any."""
    try:
        qsub_args, vm, script_at, dry_run = split_args(argv, kind)
    except (UsageError, _Help, _Man):
        return True
    if vm or dry_run:
        return True
    prefix = directive_prefix(qsub_args if script_at is None else qsub_args[:script_at], kind=kind)
    if script_at is not None and qsub_args[script_at] != "-":
        return _script_is_vm(qsub_args[script_at], prefix)
    return stdin_data is not None and is_vm_script(stdin_data.decode("utf-8", "replace"), prefix)


def qsub_binary(config) -> str:
    """The site's qsub ([scheduler] in the config), never the first `qsub` on PATH."""
    from vtorque.shared.config import config_path

    path = config.scheduler.binary("qsub")
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise UsageError(f"the site's qsub {path} is not an executable file ([scheduler] in {config_path()})")
    return path


def _load_config():
    from vtorque.shared.config import ConfigError, load_config

    try:
        return load_config()
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def _exec_qsub(config, argv: list[str], stdin_data: bytes | None = None):
    qsub = qsub_binary(config)
    if stdin_data is not None:
        import tempfile

        tmp = tempfile.TemporaryFile()
        tmp.write(stdin_data)
        tmp.seek(0)
        os.dup2(tmp.fileno(), 0)
    sys.stdout.flush()
    os.execv(qsub, [qsub, *argv])


def _stdin_is_a_script() -> bool:
    """A pipe or a file on stdin holds the job script; a terminal, a device or no stdin is qsub's to read."""
    try:
        mode = os.fstat(0).st_mode
    except OSError:
        return False
    return not (os.isatty(0) or stat.S_ISCHR(mode))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        config = _load_config()
        qsub_args, vm, script_at, dry_run = split_args(argv, config.scheduler.kind)
        prefix = directive_prefix(qsub_args if script_at is None else qsub_args[:script_at],
                                  kind=config.scheduler.kind)
        script_path = qsub_args[script_at] if script_at is not None else None
        stdin_data = None
        if not vm and not dry_run:
            # Not a VM job unless the script says so in a "#PBS -vm" line; otherwise qsub gets it untouched.
            if script_path is not None and script_path != "-":
                if not _script_is_vm(script_path, prefix):
                    _exec_qsub(config, argv)
            elif not _stdin_is_a_script():
                _exec_qsub(config, argv)
            else:
                stdin_data = sys.stdin.buffer.read()
                if not is_vm_script(stdin_data.decode("utf-8", "replace"), prefix):
                    _exec_qsub(config, argv, stdin_data)
        return _submit_vm_job(qsub_args, vm, script_at, dry_run, prefix, stdin_data)
    except _Help:
        return _guarded(_print_help)
    except _Man:
        return _guarded(_print_man)
    except UsageError as exc:
        print(f"vsub: {exc}", file=sys.stderr)
        return USAGE_EXIT


def _guarded(func) -> int:
    try:
        return func()
    except UsageError as exc:
        print(f"vsub: {exc}", file=sys.stderr)
        return USAGE_EXIT


def _read_script(path: str | None, stdin_data: bytes | None = None) -> tuple[str, str]:
    if path is None or path == "-":
        if stdin_data is None:
            if not _stdin_is_a_script():
                raise UsageError("no job script: give a script file or pipe one on stdin")
            stdin_data = sys.stdin.buffer.read()
        try:
            text = stdin_data.decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError("the job script from stdin is not text (UTF-8)") from None
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


VSUB_OPTIONS = """\
  -vm key=value[,key=value]...   run the job inside virtual machines; repeatable, and also as '#PBS -vm ...'
                                 lines in the script's leading comment block. Keys are case-insensitive
                                 (IMG=, VCPUS= work); a key given again replaces the earlier value, so the
                                 last -vm wins and the command line wins over the script
  --dry-run, -gf                 print the qsub command and the wrapper script, submit nothing
                                 (-gf: vTorque's "generate files only")
  --help                         this summary
  --man                          vsub's manual: the -vm keys of this site, examples, exit status"""


def _qsub_usage(config) -> str:
    """The site's qsub's own --help text (qsub named vsub), or one line saying why there is none."""
    from vtorque.shared.scheduler import SchedulerError, scheduler_for

    try:
        qsub = qsub_binary(config)
    except UsageError as exc:
        return f"(no qsub usage: {exc})"
    try:
        usage = scheduler_for(config).run("qsub", "--help")  # the site's qsub, bounded by [scheduler] timeout
    except SchedulerError as exc:
        return f"(no qsub usage: {qsub} --help: {exc})"
    text = usage.stdout.strip()
    if usage.returncode != 0 or not text:
        first = (usage.stderr.strip().splitlines() or [f"exit status {usage.returncode}"])[0]
        return f"(no qsub usage: {qsub} --help: {first})"
    return text.replace("qsub", "vsub", 1)


def _print_help() -> int:
    from vtorque.shared.spec import help_table

    config = _load_config()
    print(_qsub_usage(config))
    print(f"\nvsub: every qsub option above, plus\n{VSUB_OPTIONS}\n\n-vm keys (defaults and limits of this site):")
    print(help_table(config.spec))
    return 0


MANUAL = """\
VSUB(1)                                   vtorque                                   VSUB(1)

NAME
  vsub - submit a batch job that runs inside virtual machines (qsub with -vm)

SYNOPSIS
  vsub [qsub options] [-vm key=value[,key=value]...]... [--dry-run | -gf] [script [script args]]
  vsub --help | --man

DESCRIPTION
  vsub takes every qsub option and passes it to the site's qsub ({qsub}) unchanged. With -vm (or a
  '#PBS -vm' line in the script's leading comment block) the job's script runs inside KVM guests booted for
  the job on its nodes, and the guests are removed when it ends. Without either, vsub is qsub: the job goes
  to qsub untouched and nothing of vtorque runs.

  For a VM job vsub checks the spec against this site's defaults, limits and image catalog, raises the
  job's ppn/ncpus and mem where the VMs need more (and says so on stderr), writes a wrapper script named like
  yours (so the .o/.e files keep their usual names) and submits it; it prints the job id as qsub does.
  A script on stdin works as with qsub (its name is then STDIN). Options end at the script: what follows it
  belongs to the script, as with qsub.

OPTIONS
{options}

  With -C PREFIX (or $PBS_DPREFIX) qsub reads directives with that prefix; so does vsub ('PREFIX -vm ...').

THE -vm KEYS (defaults and limits of this site)
{table}

  Booleans: true/false, yes/no, on/off, enabled/disabled, 1/0. Sizes: K, M, G, T (binary); a bare number is
  MiB. Files (vm_prologue, vm_epilogue, disk images, metadata) are relative to the directory vsub runs in
  and must be your own, under your home or a directory the site allows.

EXAMPLES
  vsub -l nodes=2,walltime=00:15:00 -vm vcpus=2 jobScript.sh        vTorque's form (the site's default image)
  vsub -vm IMG=tiny,VCPUS=2 job.sh                                   upper-case keys
  vsub -vm img=tiny -vm vms_per_node=2,vcpus=1 job.sh                several -vm options, merged
  vsub -gf -vm img=tiny job.sh                                       the qsub command and wrapper; submits nothing
  echo 'hostname' | vsub -vm img=tiny                                a script on stdin

  In a script:
    #!/bin/sh
    #PBS -l walltime=01:00:00
    #PBS -vm img=tiny,vcpus=2
    mpirun ./simulate

EXIT STATUS
  qsub's status when vsub ran qsub; 2 when vsub refused the job (bad -vm value, unreadable script, no such
  image, config error, on Slurm a script name, -N or argument with characters slurm-wlm-torque's qsub would
  run through a shell: one line on stderr naming the key, the value and what is allowed; nothing is
  submitted); 0 for --dry-run, --help and --man.

ENVIRONMENT
  VTORQUE_CONFIG   the site config (default /etc/vtorque/vtorque.toml); [scheduler] names the qsub vsub runs
  PBS_DPREFIX      the directive prefix when -C is not given (default #PBS)

FILES
  ~/.vtorque/keys/    the per-job ssh keys (removed when the job's run ends; a job that never ran: by
                      your next vsub, once the scheduler says it ended or no longer knows it)

SEE ALSO
  vtorque status JOBID, vtorque trace JOBID; the user guide (docs/user-guide.md)

QSUB'S OWN OPTIONS ({qsub} --help)
{usage}
"""


def _print_man() -> int:
    import textwrap

    from vtorque.shared.spec import help_table

    config = _load_config()
    qsub = config.scheduler.binary("qsub")
    text = MANUAL.format(qsub=qsub, options=VSUB_OPTIONS, table=help_table(config.spec),
                         usage=textwrap.indent(_qsub_usage(config), "  "))
    if sys.stdout.isatty():
        import shlex
        import subprocess

        try:
            pager = shlex.split(os.environ.get("PAGER") or "less -FRX")
            if pager and subprocess.run(pager, input=text, text=True).returncode == 0:
                return 0
        except (OSError, ValueError):
            pass
    sys.stdout.write(text)
    return 0


def _submit_vm_job(qsub_args: list[str], vm: list[str], script_at: int | None, dry_run: bool,
                   prefix: str = DEFAULT_PREFIX, stdin_data: bytes | None = None) -> int:
    import shlex
    import shutil
    import tempfile
    import threading
    import time
    import uuid
    from pathlib import Path

    from vtorque.cli.qsub_resources import fit
    from vtorque.shared import tracing
    from vtorque.shared.config import ConfigError
    from vtorque.shared.job_script import ScriptError, inline_vm_options, render_wrapper
    from vtorque.shared.scheduler import SchedulerError, scheduler_for
    from vtorque.shared.spec import SpecError, parse_options, validate, validate_user_metadata
    from vtorque.shared.user_files import check_user_file

    script_path = qsub_args[script_at] if script_at is not None else None
    user_script, script_name = _read_script(script_path, stdin_data)
    config = _load_config()
    try:
        # The script's lines first, then the command line: a key given again wins (vTorque's rule too).
        options = parse_options([*inline_vm_options(user_script, prefix), *vm])
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
    qsub = qsub_binary(config)

    before = qsub_args[:script_at] if script_at is not None else list(qsub_args)
    after = qsub_args[script_at + 1:] if script_at is not None else []
    if config.scheduler.kind == "slurm":
        # Before anything is said or made: a refused job leaves no key and no note behind.
        refuse_shell_words([*config.spec.exclusive_args, *before],
                           os.path.join(tempfile.gettempdir(), "vsub-XXXXXXXX", script_name), after)
    fitted = fit(before, spec.cores_per_node(config.spec), spec.ram_mib_per_node(config.spec))
    for note in fitted.notes:
        print(f"vsub: {note} so {spec.vms_per_node} VM(s) × {spec.vcpus} vCPU / {spec.ram_mib} MiB fit "
              f"beside the host reserve", file=sys.stderr)
    args = [*config.spec.exclusive_args, *fitted.args]
    scheduler = scheduler_for(config)

    tracing.setup_tracing("vtorque-vsub", config.tracing, metrics=False)
    key_dir = Path.home() / ".vtorque" / "keys" / uuid.uuid4().hex
    submitted = False
    cluster = None
    asked: dict[str, str | None] = {}
    asking: threading.Thread | None = None
    try:
        with tracing.tracer().start_as_current_span("vsub submit", attributes={
                "vtorque.image.name": spec.img, "vtorque.vcpus": spec.vcpus, "vtorque.ram_mib": spec.ram_mib,
                "vtorque.vms_per_node": spec.vms_per_node}) as span:
            pubkey = _make_key(key_dir)
            launcher = str(Path(sys.executable).parent / "vtorque-launch")
            wrapper = render_wrapper(user_script, spec.as_options(), pubkey, str(key_dir / "id_ed25519"),
                                     tracing.current_traceparent(), launcher, user_metadata, time.time_ns(),
                                     prefix)
            with tempfile.TemporaryDirectory(prefix="vsub-") as tmp:
                wrapper_path = Path(tmp) / script_name
                wrapper_path.write_text(wrapper)
                submit_args = [*args, str(wrapper_path), *after]
                if dry_run:
                    print(shlex.join([qsub, *submit_args]))
                    print(wrapper, end="")
                    return 0
                # Slurm's cluster name (a `scontrol show config`, for the key's CLUSTER_FILE) while qsub runs:
                # not one more round trip after the job id is known. Torque's is in the job id.
                asking = threading.Thread(target=lambda: asked.update(cluster=scheduler.cluster("")),
                                          daemon=True) if config.scheduler.kind == "slurm" else None
                if asking is not None:
                    asking.start()
                try:
                    proc = scheduler.submit(submit_args)
                except SchedulerError as exc:
                    raise UsageError(str(exc)) from None
            sys.stdout.write(proc.stdout)
            job_id = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
            if proc.returncode == 0 and job_id:
                span.set_attribute(tracing.JOB_ID, job_id)
                # Which job of which cluster the key is for, so that a later vsub can remove it once that
                # scheduler is done with the job even if it never ran (sweep_keys).
                if asking is not None:
                    asking.join()
                cluster = asked.get("cluster") if asking is not None else scheduler.cluster(job_id)
                (key_dir / JOB_FILE).write_text(job_id + "\n")
                (key_dir / CLUSTER_FILE).write_text((cluster or "") + "\n")
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
        if not dry_run:
            sweep_keys(key_dir.parent, config, cluster, keep=key_dir.name)


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


# What /bin/sh reads as more than a word: slurm-wlm-torque's qsub (a Perl wrapper) pastes its arguments, the
# script's path and its name (for -o/-e), unquoted into one sbatch command line that it runs through the shell.
SHELL_SPECIAL = frozenset(" \t\n\r|&;<>()$`\\\"'*?[]#~{}!")


def _short(word: str, limit: int = 80) -> str:
    """A value quoted for a one-line error: escaped, and never a 100 kB value echoed whole."""
    return repr(word) if len(word) <= limit else repr(word[:limit]) + f"… ({len(word)} characters)"


def refuse_shell_words(options: list[str], wrapper_path: str, script_args: list[str]) -> None:
    """UsageError naming the first argument the Slurm site's qsub would run as shell syntax. vsub refuses it
    rather than submitting through sbatch itself: the user asked for qsub's options, and their translation is
    slurm-wlm-torque's; a name without those characters goes through it as with plain qsub."""
    named = []
    for i, word in enumerate(options):
        if i > 0 and options[i - 1] == "-N":
            named.append((f"the job name (-N) {_short(word)}", word))
        elif word.startswith("-N") and len(word) > 2:
            named.append((f"the job name (-N) {_short(word[2:])}", word[2:]))
        else:
            named.append((f"the qsub argument {_short(word)}", word))
    named.append((f"the script's name or $TMPDIR in {_short(wrapper_path)}", wrapper_path))
    named += [(f"the script argument {_short(word)}", word) for word in script_args]
    for what, word in named:
        found = sorted({c for c in word if c in SHELL_SPECIAL or ord(c) < 32})
        if found:
            raise UsageError(f"{what} has {' '.join(repr(c) for c in found)}, which this site's qsub "
                             f"(slurm-wlm-torque) runs through a shell: rename it; nothing was submitted")


JOB_FILE = "job"  # in a key directory: the id of the job the key was made for
CLUSTER_FILE = "cluster"  # ... and the scheduler that has it (Scheduler.cluster)
ORPHAN_AGE = 3600.0  # a key directory with no job after this long: its vsub died before qsub answered


def sweep_keys(keys_root, config, cluster: str | None, now: float | None = None, keep: str = "") -> list[str]:
    """Remove the keys of jobs that will never use them: this cluster's scheduler says the job ended (cancelled
    while queued, failed, a node failure: the launcher that removes a key at the end of its run never ran) or no
    longer knows it; and keys of a vsub that died before it had a job id. A key of another cluster (or none
    known), a job the scheduler cannot be asked about or in a state vtorque does not know keeps its key until a
    later vsub; so does `keep` (this vsub's own job). Returns the removed directories."""
    import shutil
    import time
    from pathlib import Path

    from vtorque.shared.scheduler import ALIVE, SchedulerError, scheduler_for

    now = time.time() if now is None else now
    removed: list[str] = []
    try:
        entries = list(os.scandir(keys_root))
    except OSError:
        return removed
    scheduler = None
    for entry in entries:
        if entry.name == keep or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            job_id = (Path(entry.path) / JOB_FILE).read_text().strip()
        except FileNotFoundError:
            job_id = ""
        except OSError:
            continue
        if not job_id:
            try:
                done = now - entry.stat(follow_symlinks=False).st_mtime > ORPHAN_AGE
            except OSError:
                continue
        elif cluster is None or _read(Path(entry.path) / CLUSTER_FILE) != cluster:
            continue
        else:
            scheduler = scheduler or scheduler_for(config)
            try:
                info = scheduler.job(job_id)
            except SchedulerError:
                break  # asked again at the next vsub; one scheduler time limit at most, not one per key
            done = info is None or (info.state not in ALIVE and info.state != "unknown")
        if done:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


def _read(path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


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
