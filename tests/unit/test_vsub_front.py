"""The sh front (cli/vsub.sh, the user's `vsub`): a job without a VM goes to the site's qsub with builtins only,
everything else to the Python vsub, deciding exactly as cli/vsub.py does (needs_python) and finding the same
qsub as the Python config does ([scheduler])."""

import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtorque.cli.vsub import needs_python
from vtorque.shared.config import load_config

FRONT = Path(__file__).resolve().parents[2] / "cli" / "vsub.sh"

# Stand-ins that record how they were called: argv one per line, then stdin's bytes.
RECORDER = """#!/bin/sh
{{ echo "{name}"; for a do printf '%s\\n' "$a"; done; }} > "$VSUB_TEST_OUT"
[ -t 0 ] || /bin/cat > "$VSUB_TEST_OUT.stdin"
"""

SCRIPTS = {
    "plain.sh": "#!/bin/sh\n#PBS -N plain\n\necho hi\n#PBS -vm img=tiny\n",
    "vm.sh": "#!/bin/sh\n#PBS -N x\n#PBS -vm img=tiny,vcpus=1\necho hi\n",
    "tab.sh": "#!/bin/sh\n#PBS\t-vm\timg=tiny\t\necho hi\n",
    "crlf.sh": "#!/bin/sh\r\n#PBS -vm img=tiny\r\necho hi\r\n",
    "bare.sh": "#!/bin/sh\n#PBS -vm\necho hi\n",
    "vmfoo.sh": "#!/bin/sh\n#PBS -vmfoo\n#PBS -vm=img\necho hi\n",
    "indented.sh": "#!/bin/sh\n  #PBS -vm img=tiny\necho hi\n",
    "blank.sh": "\n   \n\t\n#PBS -vm img=tiny\n",
    "xvm.sh": "#!/bin/sh\n#X -vm img=tiny\necho hi\n",
    "nonl.sh": "#PBS -vm img=tiny",
    "late.sh": "#!/bin/sh\nexport A=1\n#PBS -vm img=tiny\n",
}


@pytest.fixture
def front(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # needs_python reads the scripts from here, as the front does
    for name, text in SCRIPTS.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "dir.sh").mkdir()
    for name in ("qsub", "vtorque-vsub"):
        (tmp_path / name).write_text(RECORDER.format(name=name))
        (tmp_path / name).chmod(0o755)
    config = tmp_path / "vtorque.toml"
    config.write_text(f'state_dir = "{tmp_path}"\n\n[spec]\nmax_vcpus = 4\n\n[scheduler]\nkind = "slurm"\n'
                      f'qsub = "{tmp_path}/qsub"  # the stand-in\n\n[hooks]\nepilogue_timeout = 5\n')
    out = tmp_path / "out"

    def run(argv, stdin=None, env=None, config_text=None):
        if config_text is not None:
            config.write_text(config_text)
        for f in (out, Path(f"{out}.stdin")):
            f.unlink(missing_ok=True)
        environ = {"PATH": "/nonexistent", "VTORQUE_CONFIG": str(config), "VSUB_TEST_OUT": str(out),
                   "VTORQUE_VSUB_PY": str(tmp_path / "vtorque-vsub"), **(env or {})}
        proc = subprocess.run(["/bin/sh", str(FRONT), *argv], cwd=tmp_path, env=environ, capture_output=True,
                              input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL, timeout=30)
        if not out.exists():
            return proc.returncode, None, None, None, proc.stderr.decode()
        lines = out.read_text().split("\n")[:-1]
        data = Path(f"{out}.stdin").read_bytes() if Path(f"{out}.stdin").exists() else None
        return proc.returncode, lines[0], lines[1:], data, proc.stderr.decode()

    run.dir = tmp_path
    return run


CASES = [
    ["plain.sh"], ["-N", "x", "-l", "nodes=1:ppn=2", "plain.sh", "arg1"], ["vm.sh"], ["tab.sh"], ["crlf.sh"],
    ["bare.sh"], ["vmfoo.sh"], ["indented.sh"], ["blank.sh"], ["nonl.sh"], ["late.sh"], ["missing.sh"],
    ["dir.sh"], ["-vm", "img=tiny", "plain.sh"], ["-vm=img=tiny", "plain.sh"], ["-gf", "plain.sh"],
    ["--dry-run", "plain.sh"], ["--help"], ["--man"], ["-v", "X=-vm", "plain.sh"], ["-N", "-vm", "plain.sh"],
    ["plain.sh", "-vm", "img=tiny"], ["-C", "#X", "vm.sh"], ["-C", "#X", "xvm.sh"], ["-C#X", "xvm.sh"],
    ["-C", "", "vm.sh"], ["-C"], ["-V", "-h", "vm.sh"], ["-I"], ["-vm"], ["-", "-N"],
    ["-wd", "/tmp", "-vm", "img=tiny", "plain.sh"], ["-pe", "shm", "2", "vm.sh"], ["-J", "1-3", "vm.sh"],
]


@pytest.mark.parametrize("argv", CASES, ids=" ".join)
def test_the_front_decides_as_the_python_vsub(front, argv):
    rc, who, args, _, err = front(argv)
    assert who == ("vtorque-vsub" if needs_python(argv, kind="slurm") else "qsub"), err
    assert args == argv and rc == 0


@pytest.mark.parametrize("text,vm", [(SCRIPTS["vm.sh"], True), (SCRIPTS["plain.sh"], False),
                                     (SCRIPTS["nonl.sh"], True), ("echo no newline at the end", False),
                                     ("#!/bin/sh\n" + "echo x\n" * 5000, False)])
def test_a_script_on_stdin_is_read_and_handed_on_byte_for_byte(front, text, vm):
    data = text.encode()
    for argv in ([], ["-N", "piped"], ["-"]):
        rc, who, args, got, err = front(argv, stdin=data)
        assert who == ("vtorque-vsub" if vm else "qsub") == ("vtorque-vsub" if needs_python(argv, data, "slurm")
                                                             else "qsub")
        assert args == argv and rc == 0, err
        # qsub gets the same bytes (a missing final newline comes back as one, as the shell reads lines)
        assert got in (data, data + b"\n")


def test_a_script_file_on_stdin_is_left_for_qsub_to_read_from_its_start(front):
    for name, who in (("vm.sh", "vtorque-vsub"), ("plain.sh", "qsub")):
        with open(front.dir / name, "rb") as fh:
            proc = subprocess.run(["/bin/sh", str(FRONT)], stdin=fh, capture_output=True, cwd=front.dir, env={
                "PATH": "/nonexistent", "VTORQUE_CONFIG": str(front.dir / "vtorque.toml"),
                "VSUB_TEST_OUT": str(front.dir / "out"), "VTORQUE_VSUB_PY": str(front.dir / "vtorque-vsub")})
        assert proc.returncode == 0, proc.stderr
        assert (front.dir / "out").read_text().split("\n")[0] == who
        assert (front.dir / "out.stdin").read_bytes() == (front.dir / name).read_bytes()


def test_the_directive_prefix_from_the_environment(front):
    assert front(["xvm.sh"], env={"PBS_DPREFIX": "#X"})[1] == "vtorque-vsub"
    assert front(["vm.sh"], env={"PBS_DPREFIX": "#X"})[1] == "qsub"
    assert front(["-C", "#PBS", "vm.sh"], env={"PBS_DPREFIX": "#X"})[1] == "vtorque-vsub"


LINES = ["#!/bin/sh", "#PBS -N x", "#PBS -vm img=tiny", "  #PBS -vm x", "#PBS\t-vm", "#PBS -vmx", "", "   ",
         "\r", "echo hi", "# c", "#X -vm a=b", "#PBS  -vm  a=b  ", "\t# x", "#PBS -vm\r", "#PBS\f-vm a"]
TOKENS = ["-N", "x", "-vm", "img=t", "-C", "#X", "-V", "-h", "-l", "nodes=1", "--dry-run", "-gf", "-v",
          "A=-vm", "-vm=a", "-Cx", "--help", "-", "-wd", "-pe", "shm"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.sampled_from(LINES), max_size=8), before=st.lists(st.sampled_from(TOKENS), max_size=5),
       after=st.lists(st.sampled_from(TOKENS), max_size=2), on_stdin=st.booleans(),
       kind=st.sampled_from(["torque", "slurm"]))
def test_any_command_line_and_script_are_decided_alike(front, lines, before, after, on_stdin, kind):
    text = "\n".join(lines) + "\n"
    (front.dir / "gen.sh").write_text(text)
    argv = before + after if on_stdin else [*before, "gen.sh", *after]
    stdin = text.encode() if on_stdin else None
    _, who, args, _, err = front(argv, stdin=stdin, env={"VTORQUE_SCHEDULER__KIND": kind})
    assert who == ("vtorque-vsub" if needs_python(argv, stdin, kind) else "qsub"), (argv, kind, text, err)
    assert args == argv


def scheduler_config(body: str, tmp: Path) -> str:
    return f'state_dir = "{tmp}"\n{body}\n'


@pytest.mark.parametrize("body", [
    '[scheduler]\nkind = "slurm"\nqsub = "{d}/qsub"',
    "[scheduler]\nqsub = '{d}/qsub'   # literal string",
    '[ scheduler ]\nbin_dir = "{d}"\nkind = "slurm"',
    '[scheduler]\nkind="torque"\n# qsub = "/elsewhere/qsub"\nbin_dir="{d}"\n[hooks]\nepilogue_timeout = 5',
    '[node]\nname = "n1"\n\n[scheduler]\n  bin_dir = "{d}"  # indented\n  qsub = ""',
])
def test_the_front_runs_the_qsub_the_config_names(front, body):
    text = scheduler_config(body.format(d=front.dir), front.dir)
    rc, who, args, _, err = front(["plain.sh"], config_text=text)
    assert (rc, who, args) == (0, "qsub", ["plain.sh"]), err
    (front.dir / "vtorque.toml").write_text(text)
    assert load_config(str(front.dir / "vtorque.toml"), env={}).scheduler.binary("qsub") == f"{front.dir}/qsub"


@pytest.mark.parametrize("body", [
    'scheduler.qsub = "{d}/qsub"', 'scheduler = {{ qsub = "{d}/qsub" }}', '[scheduler]\nqsub = "{d}/\\u0071sub"',
    '[scheduler.more]\nx = 1', '[scheduler]\n"qsub" = "{d}/qsub"', 'x = """\n[scheduler]\n"""',
    '[scheduler]\nkind = "pbs"', '[scheduler]\nqsub = {d}/qsub',
])
def test_a_config_the_front_cannot_read_plainly_goes_to_python(front, body):
    rc, who, args, _, err = front(["plain.sh"], config_text=scheduler_config(body.format(d=front.dir), front.dir))
    assert (rc, who, args) == (0, "vtorque-vsub", ["plain.sh"]), err


def test_overrides_from_the_environment_and_a_missing_named_config(front):
    rc, who, *_ = front(["plain.sh"], env={"VTORQUE_SCHEDULER__QSUB": str(front.dir / "qsub")},
                        config_text=scheduler_config('[scheduler]\nqsub = "/nonexistent/qsub"', front.dir))
    assert (rc, who) == (0, "qsub")
    assert front(["plain.sh"], env={"VTORQUE_CONFIG": str(front.dir / "none.toml")})[1] == "vtorque-vsub"
    assert front(["plain.sh"], env={"VTORQUE_SCHEDULER": "x"})[1] == "vtorque-vsub"


def test_a_missing_qsub_is_one_line_and_exit_2_and_nothing_runs(front):
    rc, who, _, _, err = front(["plain.sh"], config_text=scheduler_config(
        '[scheduler]\nqsub = "/nonexistent/qsub"', front.dir))
    assert rc == 2 and who is None
    assert err.splitlines() == [f"vsub: the site's qsub /nonexistent/qsub is not an executable file "
                                f"([scheduler] in {front.dir}/vtorque.toml)"]


def test_without_the_python_vsub_a_vm_job_is_one_line_and_exit_2(front):
    rc, who, _, _, err = front(["vm.sh"], env={"VTORQUE_VSUB_PY": str(front.dir / "none")})
    assert rc == 2 and who is None
    assert err.startswith("vsub: the Python vsub (vtorque-vsub) is neither beside ") and len(err.splitlines()) == 1
