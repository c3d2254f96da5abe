"""Every command README.md's "Using it" block shows runs here, as a user would type it.

The block is the first ```sh block after "## Using it"; every line that starts with `vsub` or `vtorque` is a
command (a trailing `# comment` is dropped; `a|b` inside a word and `[--opt]` are expanded to each command
they stand for, in case the block still uses that notation). Each command is run by the handler whose pattern
matches it; a command no handler matches fails `test_every_readme_command_has_a_test`, so a new README line
needs a test before it lands. UPPER-CASE words (JOBID, NAME, ...) and /path/to/... are placeholders the handler fills.

Commands about jobs (vsub, trace, status, nodes, doctor) drive the single-host stack, as the README's first
line sets up; they use only the job this module submitted, from a work directory of its own. Commands that
change things (images add/update/remove/pull, install-hooks, run) work on a site of the test's own
(tests/conftest.py `test_site`: its own vhost, catalog file, store, TORQUE_HOME), never the stack's.
Run under the shared lock: `flock /tmp/vtorque-e2e.lock pytest tests/e2e/test_readme_commands.py`.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import PREFIX, _stack_env, stack_slurm

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
VENV_BIN = Path(sys.executable).parent
JOB_SCRIPT = "#!/bin/sh\necho README-JOB-RAN\necho \"kernel $(uname -r)\"\n"


# -- the README's commands ----------------------------------------------------------------------------------

def using_it_block(text: str) -> list[str]:
    heading = re.search(r"^## Using it[ \t]*$", text, re.M)
    assert heading, "README.md has no '## Using it' section"
    block = re.search(r"^```sh[ \t]*\n(.*?)^```", text[heading.end():], re.M | re.S)
    assert block, "README.md's 'Using it' section has no ```sh block"
    return block.group(1).splitlines()


def expand(command: str) -> list[str]:
    """`a | vtorque b` (two commands), words `x|y`, and `[--opt]` (without and with it) → plain commands."""
    parts = re.split(r"\s+\|\s+(?=(?:vsub|vtorque)\b)", command)
    if len(parts) > 1:
        return [c for part in parts for c in expand(part)]
    choices = []
    for word in command.split():
        if word.startswith("[") and word.endswith("]"):
            choices.append(["", word[1:-1]])
        elif "|" in word:
            choices.append(word.split("|"))
        else:
            choices.append([word])
    return [" ".join(w for w in combo if w) for combo in itertools.product(*choices)]


def readme_commands(text: str) -> list[str]:
    commands = []
    for line in using_it_block(text):
        line = re.sub(r"\s+#.*$", "", line).strip()
        if re.match(r"(vsub|vtorque)(\s|$)", line):
            commands += [c for c in expand(line) if c not in commands]
    return commands


# -- how each command runs ----------------------------------------------------------------------------------

@dataclass
class Ran:
    argv: list[str]
    proc: subprocess.CompletedProcess

    @property
    def out(self) -> str:
        return self.proc.stdout

    def ok(self) -> Ran:
        assert self.proc.returncode == 0, (f"`{shlex.join(self.argv)}` exited {self.proc.returncode}\n"
                                           f"stdout: {self.proc.stdout[-3000:]}\nstderr: {self.proc.stderr[-3000:]}")
        return self


def run(argv: list[str], env: dict, cwd: Path, timeout: float = 120) -> Ran:
    argv = [str(VENV_BIN / argv[0]) if argv[0] in ("vsub", "vtorque") else argv[0], *argv[1:]]
    return Ran(argv, subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout))


def is_placeholder(word: str) -> bool:
    return bool(re.fullmatch(r"[A-Z][A-Z0-9_]*", word)) or word.startswith("/path/to/")


def fill(words: list[str], **values: str) -> list[str]:
    """Placeholders (UPPER-CASE words, /path/to/...) → the values given by name, else in order of the rest."""
    spare = [v for k, v in values.items() if k not in words]
    out = []
    for w in words:
        if is_placeholder(w):
            out.append(values[w] if w in values else spare.pop(0))
        else:
            out.append(w)
    return out


class Ctx:
    """What the handlers share: the stack's environment, the job this module submitted, a test site."""

    def __init__(self, request):
        self.request = request

    @property
    def stack_env(self) -> dict:
        return _stack_env()

    def job(self) -> SubmittedJob:
        return self.request.getfixturevalue("readme_job")

    def site(self):
        site = self.request.getfixturevalue("readme_site")
        return site

    def site_env(self) -> dict:
        env = self.site().env()
        env["PATH"] = f"{VENV_BIN}:{PREFIX}/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        return env

    @property
    def tmp(self) -> Path:
        return self.request.getfixturevalue("tmp_path")


def h_vsub_help(words, ctx):
    ran = run(words, ctx.stack_env, ctx.tmp).ok()
    assert "-vm" in ran.out and "vcpus" in ran.out and "img" in ran.out, ran.out


def h_vsub_dry_run(words, ctx):
    with stack_slurm() as slurm:
        slurm.write(words[-1], JOB_SCRIPT)
        ran = run(words, slurm.env, slurm.workdir).ok()
        assert re.search(r"(^|/)(qsub|sbatch) ", ran.out, re.M), ran.out  # the exact submit command
        assert "# vtorque-spec: " in ran.out and "vms_per_node=2" in ran.out  # and the wrapper
        assert slurm.submitted_here() == []  # nothing was submitted


def h_vsub_submit(words, ctx):
    job = ctx.job()
    assert job.words == words
    assert job.exit_code == 0, job.output
    assert "README-JOB-RAN" in job.output
    host_kernel = subprocess.run(["uname", "-r"], capture_output=True, text=True).stdout.strip()
    assert f"kernel {host_kernel}" not in job.output  # it ran in its guest


def h_trace(words, ctx):
    job = ctx.job()
    ran = run(fill(words, JOBID=job.id), ctx.stack_env, ctx.tmp).ok()
    assert "vsub submit" in ran.out, ran.out  # the trace's root span, from vsub


def h_status(words, ctx):
    job = ctx.job()
    ran = run(fill(words, JOBID=job.id), ctx.stack_env, ctx.tmp).ok()
    assert job.id in ran.out, ran.out


def h_nodes(words, ctx):
    ran = run(words, ctx.stack_env, ctx.tmp).ok()
    lines = ran.out.splitlines()
    assert lines and lines[0].split()[0] == "node", ran.out
    assert any(line.split()[1:2] == ["up"] for line in lines[1:]), ran.out  # the stack's node worker


def h_doctor(words, ctx):
    ran = run(words, ctx.stack_env, ctx.tmp).ok()
    verdicts = [line.split()[0] for line in ran.out.splitlines() if line.strip()]
    assert verdicts and set(verdicts) <= {"ok", "warn"}, ran.out


def h_contract(words, ctx):
    ran = run(words, ctx.stack_env, ctx.tmp).ok()
    schema = json.loads(ran.out)
    assert {"JobStarted", "BootGuests", "GuestReady"} <= set(schema["$defs"]), sorted(schema["$defs"])


def h_broker_permissions(words, ctx):
    ran = run(words, ctx.stack_env, ctx.tmp).ok()
    users = [line for line in ran.out.splitlines() if line and not line.startswith(" ")]
    assert users == ["vtorque-hook", "vtorque-prefetch", "vtorque-bridge", "vtorque-stager", "vtorque-operator",
                     "vtorque-node-NODE"], ran.out


ADDED = "readme-img"


def _add(ctx, env):
    source = ctx.site().catalog["tiny"].source
    run(["vtorque", "images", "add", ADDED, source], env, ctx.tmp).ok()


def h_images(words, ctx):
    site, env = ctx.site(), ctx.site_env()
    sub = words[2]
    tiny = site.catalog["tiny"]
    if sub == "list":
        ran = run(words, env, ctx.tmp).ok()
        assert "tiny" in ran.out, ran.out
    elif sub == "show":
        ran = run(fill(words, NAME="tiny") if len(words) > 3 else [*words, "tiny"], env, ctx.tmp).ok()
        assert tiny.sha256[:12] in ran.out, ran.out
    elif sub == "add":
        argv = fill(words, NAME=ADDED, SOURCE=tiny.source) if len(words) > 3 else [*words, ADDED, tiny.source]
        run(argv, env, ctx.tmp).ok()
        shown = run(["vtorque", "images", "show", ADDED], env, ctx.tmp).ok()
        assert tiny.sha256[:12] in shown.out, shown.out
    elif sub == "update":
        _add(ctx, env)
        ran = run(fill(words, NAME=ADDED), env, ctx.tmp).ok()
        assert f"{ADDED}: unchanged" in ran.out, ran.out
    elif sub == "remove":
        _add(ctx, env)
        run(fill(words, NAME=ADDED) if len(words) > 3 else [*words, ADDED], env, ctx.tmp).ok()
        assert ADDED not in run(["vtorque", "images", "list"], env, ctx.tmp).ok().out
    elif sub == "pull":
        stager = start_service(ctx, "stager")
        try:
            ran = run(fill(words, NAME="tiny") if len(words) > 3 else [*words, "tiny"], env, ctx.tmp,
                      timeout=300).ok()
        finally:
            stop_service(stager)
        from vtorque.shared.image_store import ImageStore

        assert ImageStore(str(site.root / "images")).has(tiny.sha256), ran.out
    else:
        pytest.fail(f"no test for `vtorque images {sub}`")


def h_install_hooks(words, ctx):
    home = ctx.tmp / "torque"
    (home / "mom_priv").mkdir(parents=True)
    site_prologue = home / "mom_priv" / "prologue"
    site_prologue.write_text("#!/bin/sh\nexit 0\n")
    site_prologue.chmod(0o500)
    argv = list(words)
    if "--torque-home" in argv:  # never the machine's own TORQUE_HOME
        argv[argv.index("--torque-home") + 1] = str(home)
    else:
        argv += ["--torque-home", str(home)]
    env = ctx.site_env()
    install = [a for a in argv if a != "--uninstall"]
    ran = run(install, env, ctx.tmp).ok()
    for hook in ("prologue", "epilogue", "epilogue.precancel"):
        assert f"{hook}: installed" in ran.out, ran.out
    assert "vtorque" in site_prologue.read_text()
    run(install, env, ctx.tmp).ok()  # idempotent
    # --uninstall (the README's comment says it restores): the site's own prologue is back, vtorque's gone.
    run([*install, "--uninstall"], env, ctx.tmp).ok()
    assert site_prologue.read_text() == "#!/bin/sh\nexit 0\n"
    assert not (home / "mom_priv" / "epilogue.precancel").exists()


def start_service(ctx, service: str) -> tuple[subprocess.Popen, Path]:
    log = ctx.tmp / f"{service}.log"
    proc = subprocess.Popen([str(VENV_BIN / "vtorque"), "run", service], env=ctx.site_env(), cwd=ctx.tmp,
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    deadline = time.monotonic() + 60
    while "consuming" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, f"{service} did not start:\n{log.read_text()}"
        time.sleep(0.1)
    return proc, log


def stop_service(started) -> int:
    proc, log = started
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{proc.args} did not stop within 60 s of SIGTERM:\n{log.read_text()[-3000:]}")


def h_run(words, ctx):
    service = words[2]
    site = ctx.site()
    if service == "prefetch":  # follows Torque's accounting in the test site's own TORQUE_HOME
        home = site.root / "torque"
        for sub in ("server_priv/accounting", "server_priv/jobs"):
            (home / sub).mkdir(parents=True, exist_ok=True)
    started = start_service(ctx, service)
    code = stop_service(started)
    assert code == 0, started[1].read_text()[-3000:]


HANDLERS = [  # (pattern, handler, marks)
    (r"vsub --help", h_vsub_help, ["slurm"]),
    (r"vsub (.* )?--dry-run( .*)?", h_vsub_dry_run, ["slurm"]),
    (r"vsub (?!.*--(help|dry-run)).+", h_vsub_submit, ["slow", "slurm", "guest"]),
    (r"vtorque trace JOBID( .*)?", h_trace, ["slow", "slurm", "guest"]),
    (r"vtorque status JOBID( .*)?", h_status, ["slow", "slurm", "guest"]),
    (r"vtorque nodes", h_nodes, ["slurm"]),
    (r"vtorque doctor", h_doctor, ["slurm"]),
    (r"vtorque contract", h_contract, []),
    (r"vtorque broker permissions", h_broker_permissions, []),
    (r"vtorque images (list|show|add|update|remove|pull)( .*)?", h_images, []),
    (r"vtorque install-hooks( .*)?", h_install_hooks, []),
    (r"vtorque run (bridge|stager|node-worker|prefetch)", h_run, ["slow"]),
]


def handler_for(command: str):
    for pattern, handler, marks in HANDLERS:
        if re.fullmatch(pattern, command):
            return handler, marks
    return None, []


COMMANDS = readme_commands(README.read_text())


def _params():
    for command in COMMANDS:
        _, marks = handler_for(command)
        yield pytest.param(command, id=command, marks=[getattr(pytest.mark, m) for m in marks])


def test_every_readme_command_has_a_test():
    assert COMMANDS, "no vsub/vtorque command in README.md's 'Using it' block"
    missing = [c for c in COMMANDS if handler_for(c)[0] is None]
    assert missing == [], (f"README.md shows commands no test runs: {missing}; add a handler to "
                           f"tests/e2e/test_readme_commands.py")


def test_the_block_parser():
    text = ("# x\n## Using it\n```sh\n. env; export PATH=x\nvtorque trace JOBID | vtorque status JOBID   # a / b\n"
            "vtorque images list|show\nvtorque install-hooks --torque-home /t [--uninstall]\nvsub -vm img=a job.sh"
            "\n```\n```sh\nvtorque later\n```\n")
    assert readme_commands(text) == ["vtorque trace JOBID", "vtorque status JOBID", "vtorque images list",
                                     "vtorque images show", "vtorque install-hooks --torque-home /t",
                                     "vtorque install-hooks --torque-home /t --uninstall", "vsub -vm img=a job.sh"]
    assert fill(["vtorque", "images", "add", "NAME", "FILE"], NAME="n", SOURCE="/s") == [
        "vtorque", "images", "add", "n", "/s"]
    assert fill(["vtorque", "images", "add", "NAME", "/path/to/image.qcow2"], NAME="n", SOURCE="/s")[-2:] == [
        "n", "/s"]


@pytest.mark.parametrize("command", list(_params()))
def test_readme_command(command, request):
    handler, _ = handler_for(command)
    if handler is None:
        pytest.fail(f"README.md shows `{command}` and no test runs it")
    handler(shlex.split(command), Ctx(request))


# -- fixtures -----------------------------------------------------------------------------------------------

@dataclass
class SubmittedJob:
    words: list[str]
    id: str
    exit_code: int
    output: str


@pytest.fixture(scope="module")
def readme_job():
    """The README's submit line, run once as written (with a job.sh of ours) through the stack's Slurm."""
    submits = [c for c in COMMANDS if handler_for(c)[0] is h_vsub_submit]
    assert submits, "README.md shows no `vsub ... job.sh` submission: trace and status need a job"
    words = shlex.split(submits[0])
    with stack_slurm() as slurm:
        slurm.write(words[-1], JOB_SCRIPT)
        ran = run(words, slurm.env, slurm.workdir).ok()
        job_id = ran.out.strip().splitlines()[-1]
        assert re.fullmatch(r"\d+(\.\S+)?", job_id), ran.out
        slurm.wait(job_id)
        out = slurm.workdir / f"{Path(words[-1]).name}.o{job_id}"
        if not out.exists():  # Slurm's qsub names it as sbatch does unless told otherwise
            found = sorted(slurm.workdir.glob(f"*{job_id}*"))
            out = found[0] if found else out
        output = out.read_text() if out.exists() else f"(no output file in {slurm.workdir}: " \
            f"{[p.name for p in slurm.workdir.iterdir()]})"
        yield SubmittedJob(words=words, id=job_id, exit_code=slurm.exit_code(job_id), output=output)


@pytest.fixture
def readme_site(test_site, test_guest):
    test_site.catalog = {"tiny": test_guest}
    test_site.sections["images"] = {"catalog_file": str(test_site.root / "catalog.toml")}
    test_site.sections["scheduler"] = {"kind": "torque", "bin_dir": str(test_site.root / "no-scheduler")}
    test_site.write()
    return test_site
