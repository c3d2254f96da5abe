"""vtorque-launch: the body of a VM job's wrapper script. Runs the user's script in the job's first guest.

It runs as the job's owner on the job's first node, after the prologue saw every guest ready. The user's
script arrives base64-encoded on stdin (from the wrapper's here-document); its stdout, stderr and exit code
become the job's, through ssh with the job's own key. The script runs detached in the guest (JOB_RUNNER), so a
batch step that Slurm starts again on a guest restored from a checkpoint re-attaches to it instead of starting it
again, and goes on with its output where the job's output files have it (JobOutput, resume_offsets).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import NamedTuple

import click

from vtorque.cli.launcher_ssh import SSH_OPTIONS, job_agent, ssh_argv

# Run the script from a private temp file so it keeps its own interpreter line; its stdin is /dev/null as for
# any batch job.
REMOTE = 'f=$(mktemp) && cat > "$f" && chmod 700 "$f" && "$f" </dev/null; rc=$?; rm -f "$f"; exit $rc'
# Inside the guest, as on a host: the job's node file (the job's guests, each once per vCPU) and its id.
NODEFILE = "/etc/vtorque/nodefile"


def remote_command(job_id: str) -> str:
    return (f"[ -r {NODEFILE} ] && export PBS_NODEFILE={NODEFILE}; "
            f"export PBS_JOBID={shlex.quote(job_id)} VTORQUE_JOB_ID={shlex.quote(job_id)}; {REMOTE}")


# The job's own script runs detached in guest 0 (its own session, its output and exit status in files of a
# per-job directory there), so that it outlives the batch step: Slurm kills the launcher and its ssh at a
# requeue before the epilogue checkpoints the guest, and the script must be in the checkpoint still running.
# The same ssh then streams those files back until the exit status is there. A batch step that starts again on
# a guest restored from that checkpoint finds the directory (a fresh guest cannot have it: /tmp is the guest's
# own tmpfs, never a host mount) and re-attaches: the script is not started again, the streams go on from the
# offsets the launcher gives. The runner, a subshell (no exec: every fork and exec costs ~13 ms in the test
# guest), starts the script as the leader of its own session, and traps (not ignores: the script would inherit
# that) the signals of the ssh session's end, so it outlives the script to write its status; `wait` interrupted by
# one of them is waited again. A kill of the batch step is passed on to the script's process group (_forwarder).
# The first line on stdout says which ("vtorque-run started|attached|refused"), so
# the launcher knows whether its offsets still count; everything after it is the script's output. The old
# stream of a restored guest (its ssh session died with the batch step) sees a newer one's pid in `streamer`
# and stops. Polled every 10 ms for the first half second (the script's first lines and a short job's end are
# not delayed), then 50 ms, then 250 ms after 3 s (a guest under TCG should not spend its CPU watching). POSIX
# sh: busybox ash in the test guest, dash/bash in Debian. $VT_OUT/$VT_ERR are the offsets, $VT_DIR the directory.
JOB_RUNNER = r"""
d=$VT_DIR
if mkdir -m 700 "$d" 2>/dev/null; then
  cat > "$d/script" && chmod 700 "$d/script" && : > "$d/out" && : > "$d/err" || exit 255
  if [ -n "$SSH_AUTH_SOCK" ]; then ln -sfn "$SSH_AUTH_SOCK" "$d/agent"; export SSH_AUTH_SOCK="$d/agent"; fi
  (
    trap : TERM INT HUP
    setsid "$d/script" </dev/null >>"$d/out" 2>>"$d/err" &
    p=$!; echo $p > "$d/pid"
    while :; do wait $p; rc=$?; kill -0 $p 2>/dev/null || break; done
    echo $rc > "$d/rc.new"; mv "$d/rc.new" "$d/rc"
  ) </dev/null >/dev/null 2>&1 &
  o=0; e=0; echo vtorque-run started
else
  cat > /dev/null
  if [ -L "$d" ] || [ ! -d "$d" ] || [ ! -O "$d" ] || { [ ! -e "$d/pid" ] && [ ! -e "$d/rc" ]; }; then
    echo vtorque-run refused; echo "vtorque: $d in the guest is not this job's run" >&2; exit 255
  fi
  if [ -n "$SSH_AUTH_SOCK" ]; then ln -sfn "$SSH_AUTH_SOCK" "$d/agent"; fi
  o=$VT_OUT; e=$VT_ERR; echo vtorque-run attached
fi
echo $$ > "$d/streamer"
exec 3<"$d/out" 4<"$d/err"
[ "$o" -gt 0 ] && dd bs=1 skip="$o" count=0 <&3 2>/dev/null
[ "$e" -gt 0 ] && dd bs=1 skip="$e" count=0 <&4 2>/dev/null
n=0; gone=0
while :; do
  if [ -e "$d/rc" ]; then cat <&3; cat <&4 >&2; read rc < "$d/rc"; exit "$rc"; fi
  cat <&3; cat <&4 >&2
  read s < "$d/streamer"; [ "$s" = $$ ] || exit 0
  if [ -e "$d/pid" ]; then
    read p < "$d/pid"
    # The script gone and no status: its runner writes it now, unless it was killed too (2 s).
    if [ -n "$p" ] && ! kill -0 "$p" 2>/dev/null && [ ! -e "$d/rc" ]; then
      gone=$((gone + 1))
      if [ $gone -gt 40 ]; then
        echo "vtorque: the job's script in the guest ended without an exit status" >&2; exit 255
      fi
      sleep 0.05; continue
    fi
  fi
  n=$((n + 1))
  if [ $n -lt 50 ]; then sleep 0.01; elif [ $n -lt 100 ]; then sleep 0.05; else sleep 0.25; fi
done
"""
HEADER = b"vtorque-run "


def guest_run_dir(job_id: str) -> str:
    """The job's directory in guest 0 (the guest's own /tmp): the job id made safe for a file name."""
    return "/tmp/vtorque-job." + re.sub(r"[^A-Za-z0-9._-]", "_", job_id)


def job_command(job_id: str, out_offset: int = 0, err_offset: int = 0) -> str:
    """The remote command that starts the job's script detached in guest 0, or re-attaches to it, and streams
    its stdout and stderr from these offsets (used only when re-attaching) until its exit status."""
    return (f"[ -r {NODEFILE} ] && export PBS_NODEFILE={NODEFILE}; "
            f"export PBS_JOBID={shlex.quote(job_id)} VTORQUE_JOB_ID={shlex.quote(job_id)}; "
            f"VT_DIR={shlex.quote(guest_run_dir(job_id))} VT_OUT={int(out_offset)} VT_ERR={int(err_offset)}; "
            + JOB_RUNNER.strip())


# -- how much of the guest's output the job's output files already have ------------------------------------
# The launcher copies the guest's streams to its stdout and stderr (the job's .out/.err) and notes, before each
# write, what it is about to write (stream, where, how long, its CRC) with the byte counts written before it, in
# a record beside the job's key (per job, the owner's, gone with the key). A batch step killed at any point and
# started again reads the record and the output files as they are now: what was written before the last note
# is there; the noted write is there if the file has those bytes at that place (a kill between the note and the
# write leaves them out, and slurmstepd's own "JOB REQUEUED" line may follow in the file: hence the CRC, not the
# size); a file that is another one now, or shorter than what was written (truncated), has none of it, and that
# stream starts again from 0. No line twice, none lost.

STREAMS = ("out", "err")
RECORD_SIZE = 1024  # one pwrite of a fixed size: a killed launcher leaves the old record or the new, not half


class FileNow(NamedTuple):
    """A job output file as the launcher sees it (fstat of its fd)."""
    dev: int
    ino: int
    size: int


def resume_offsets(record: dict | None, job_id: str, files: dict[str, FileNow | None], read_at) -> dict[str, int]:
    """Where each guest stream goes on from: bytes of it the job's output files already hold. `read_at(stream,
    position, length)` reads the host file of that stream (None if it cannot)."""
    offsets = {s: 0 for s in STREAMS}
    if not isinstance(record, dict) or record.get("job") != job_id:
        return offsets
    try:
        kept = set()
        for s in STREAMS:
            now, was, done = files.get(s), record["file"][s], int(record["done"][s])
            if now is None or was is None or [now.dev, now.ino] != was[:2] or now.size < was[2]:
                continue  # another file, or truncated: it has none of this run's output
            offsets[s] = done
            kept.add(s)
        pending = record.get("pending")
        if pending:
            s, at, length, crc = pending
            now = files.get(s)
            if s in kept and now is not None and now.size >= at + length:
                got = read_at(s, at, length)
                if got is not None and zlib.crc32(got) == crc:
                    offsets[s] += length
    except (KeyError, TypeError, ValueError):
        return {s: 0 for s in STREAMS}
    return offsets


def encode_record(doc: dict) -> bytes:
    raw = json.dumps(doc, separators=(",", ":")).encode()
    if len(raw) >= RECORD_SIZE:
        raise ValueError("stream record too long")
    return raw.ljust(RECORD_SIZE, b" ")


def decode_record(raw: bytes) -> dict | None:
    try:
        doc = json.loads(raw.decode().strip() or "null")
    except (UnicodeDecodeError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def record_path(ssh_key: str | Path) -> Path:
    """Beside the job's key: the owner's, per job, and removed with the key directory when the job's run ends
    (or by vsub's sweep_keys for a job that ended while its launcher was killed)."""
    key = Path(ssh_key)
    return key.with_name(key.name + ".stream")


class JobOutput:
    """The job's stdout and stderr (fds 1 and 2: the job's .out/.err) and the record of how much of the guest's
    streams they hold (resume_offsets)."""

    def __init__(self, path: Path, job_id: str, fds: dict[str, int] | None = None):
        import fcntl

        self.path, self.job_id = path, job_id
        self.fds = fds or {"out": 1, "err": 2}
        self.done = {s: 0 for s in STREAMS}
        self.file: dict[str, list[int] | None] = {}
        self.append = {s: bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND) for s, fd in self.fds.items()}
        self.rfd: int | None = None

    def files_now(self) -> dict[str, FileNow | None]:
        now: dict[str, FileNow | None] = {}
        for s, fd in self.fds.items():
            st = os.fstat(fd)
            now[s] = FileNow(st.st_dev, st.st_ino, st.st_size) if stat.S_ISREG(st.st_mode) else None
        return now

    def read_at(self, s: str, at: int, length: int) -> bytes | None:
        try:
            with open(f"/proc/self/fd/{self.fds[s]}", "rb") as fh:
                fh.seek(at)
                return fh.read(length)
        except OSError:
            return None

    def load(self) -> dict | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        with open(fd, "rb") as fh:
            return decode_record(fh.read(RECORD_SIZE))

    def resume(self) -> dict[str, int]:
        return resume_offsets(self.load(), self.job_id, self.files_now(), self.read_at)

    def begin(self, offsets: dict[str, int]) -> None:
        """The guest streams go on from `offsets` (0 for a script started now) into the files as they are."""
        self.done = dict(offsets)
        self.file = {s: [f.dev, f.ino, self._position(s, f)] if f else None for s, f in self.files_now().items()}
        if any(self.file.values()):
            with contextlib.suppress(OSError):  # no record: a restart would send everything again, lose nothing
                self.rfd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        self._note(None)

    def _position(self, s: str, f: FileNow) -> int:
        return f.size if self.append[s] else os.lseek(self.fds[s], 0, os.SEEK_CUR)

    def _note(self, pending: list | None) -> None:
        if self.rfd is not None:
            doc = {"job": self.job_id, "done": self.done, "file": self.file, "pending": pending}
            with contextlib.suppress(OSError, ValueError):
                os.pwrite(self.rfd, encode_record(doc), 0)

    def write(self, s: str, data: bytes) -> None:
        fd, was = self.fds[s], self.file.get(s)
        at = 0
        if was is not None:
            at = self._position(s, FileNow(was[0], was[1], os.fstat(fd).st_size))
            self._note([s, at, len(data), zlib.crc32(data)])
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        self.done[s] += len(data)
        if was is not None:
            was[2] = at + len(data)

    def write_raw(self, s: str, data: bytes) -> None:
        """Not the guest's streams (ssh's own words): not counted."""
        view = memoryview(data)
        while view:
            view = view[os.write(self.fds[s], view):]

    def close(self, remove: bool) -> None:
        if self.rfd is not None:
            os.close(self.rfd)
            self.rfd = None
        if remove:
            self.path.unlink(missing_ok=True)


def stream_job(argv_for, script: bytes, output: JobOutput, env: dict | None = None) -> tuple[int, str]:
    """Run the job's ssh (argv_for(offsets)): the script on its stdin, the guest's streams copied to the job's
    output as they come. Returns ssh's exit status (the script's) and the guest's word: started, attached,
    refused, or "" (none came: ssh failed, or not our runner)."""
    offsets = output.resume()
    proc = subprocess.Popen(argv_for(offsets), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        proc.stdin.write(script)
        proc.stdin.close()
    except (BrokenPipeError, OSError):
        pass
    word: str | None = None
    head, early = b"", b""  # stdout before its first line; stderr before that line came (then counted)
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, "out")
        sel.register(proc.stderr, selectors.EVENT_READ, "err")
        while sel.get_map():
            for key, _ in sel.select():
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                if word is None and key.data == "err":
                    early += data
                    continue
                if word is None:
                    head += data
                    if b"\n" not in head and len(head) < 256:
                        continue
                    line, _, rest = head.partition(b"\n")
                    if line.startswith(HEADER):
                        word = line[len(HEADER):].decode(errors="replace")
                        output.begin(offsets if word == "attached" else {s: 0 for s in STREAMS})
                        if early:
                            output.write("err", early)
                        data = rest
                    else:
                        word = ""
                        output.write_raw("err", early)
                        output.write_raw("out", head)
                        data = b""
                    early = head = b""
                    if not data:
                        continue
                if word:
                    output.write(key.data, data)
                else:
                    output.write_raw(key.data, data)
    if word is None:
        output.write_raw("out", head)
        output.write_raw("err", early)
    return proc.wait(), word or ""


def job_id_from_env(env=os.environ) -> str | None:
    return env.get("PBS_JOBID") or env.get("SLURM_JOB_ID")


def alone_in_its_job(job_dir: Path, env=os.environ) -> bool:
    """True when guest 0 is the job's only guest: one node (the scheduler says so) and one guest file here. Such
    a job needs no agent (an MPI launcher in it has no other guest to reach), so none is started: ssh-agent and
    ssh-add are two more processes before the script's first line. Unknown counts as not alone."""
    nodes = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or env.get("PBS_NUM_NODES")
    return nodes == "1" and len(list(job_dir.glob("*.json"))) == 1


def find_first_guest(job_dir: Path, wait: float) -> dict | None:
    deadline = time.monotonic() + wait
    while True:
        guests = []
        for path in job_dir.glob("*.json"):
            try:
                guests.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        if guests:
            return min(guests, key=lambda g: g["index"])
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.5)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--ssh-key", required=True, type=click.Path(dir_okay=False), help="The job's private ssh key.")
@click.option("--traceparent", default=None, help="W3C trace context of the job's submission.")
@click.option("--wait", default=30.0, show_default=True, help="Seconds to wait for the guest's address.")
@click.option("--vm-prologue", default=None, help="Your script to run in the guest before the job.")
@click.option("--vm-epilogue", default=None, help="Your script to run in the guest after the job.")
def main(ssh_key: str, traceparent: str | None, wait: float, vm_prologue: str | None,
         vm_epilogue: str | None) -> None:
    try:
        rc = _launch(ssh_key, traceparent, wait, vm_prologue, vm_epilogue)
    finally:
        # The key was made for this job only: gone when the job's run ends, however it ends.
        key_dir = Path(ssh_key).parent
        if key_dir.parent.name == "keys":
            shutil.rmtree(key_dir, ignore_errors=True)
    sys.exit(rc)


def _launch(ssh_key: str, traceparent: str | None, wait: float, vm_prologue: str | None,
            vm_epilogue: str | None) -> int:
    import binascii

    from vtorque.shared import tracing
    from vtorque.shared.config import ConfigError, load_config
    from vtorque.shared.job_script import user_script_from_stdin

    try:
        script = user_script_from_stdin(sys.stdin.read())
    except (binascii.Error, ValueError):
        raise click.ClickException("the job script in the wrapper is damaged (not base64)") from None
    job_id = job_id_from_env()
    if not job_id:
        raise click.ClickException("no PBS_JOBID or SLURM_JOB_ID: vtorque-launch runs inside a batch job")
    try:
        config = load_config()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    if os.environ.get("SLURM_JOB_ID"):
        # On Slurm a VM job the prologue did not start still runs this batch step (hooks/slurm/): its
        # Comment says why, and that one line goes to the job's own error file.
        from vtorque.hooks.slurm import refusal

        why = refusal(os.environ["SLURM_JOB_ID"], config)
        if why:
            print(why, file=sys.stderr)
            return 1
    guest = find_first_guest(config.job_dir(job_id), wait)
    if guest is None:
        raise click.ClickException(f"job {job_id} has no ready guest on this node ({config.job_dir(job_id)})")
    tracing.setup_tracing("vtorque-launcher", config.tracing, metrics=False)
    rc = 255
    try:
        # The job's agent, forwarded into guest 0: mpirun there reaches the job's other guests (job_agent).
        agent = contextlib.nullcontext(None) if alone_in_its_job(config.job_dir(job_id)) else job_agent(ssh_key)
        with tracing.job_trace(job_id, traceparent), agent as agent_env:
            def argv_for(command: str) -> list[str]:
                if "ssh_socket" in guest:
                    return ssh_argv(ssh_key, guest["ssh_socket"], guest["user"], command,
                                    forward_agent=agent_env is not None)
                # A job file of a node worker started before guests lost their host port (an upgrade whose
                # node worker has not restarted yet): its guest still listens there.
                return ["ssh", "-i", ssh_key, "-p", str(guest["ssh_port"]), *SSH_OPTIONS,
                        f"{guest['user']}@{guest['address']}", command]

            argv = argv_for(remote_command(job_id))
            output = JobOutput(record_path(ssh_key), job_id)
            rc = 0
            # A batch step started again (its record is there) on a guest restored with the job's script in
            # it has run its vm_prologue already: one more ssh, on a restart only, to know.
            if vm_prologue and not (output.load() and _started_in_guest(argv_for, job_id, agent_env)):
                rc = _run_in_guest("vm_prologue", argv, _read_own(vm_prologue), guest, agent_env)
                if rc != 0:
                    print(f"vtorque: vm_prologue {vm_prologue} exited {rc}; the job was not run", file=sys.stderr)
            if rc == 0:
                rc = _stream_in_guest(argv_for, job_id, script, guest, output, agent_env)
            if vm_epilogue:
                erc = _run_in_guest("vm_epilogue", argv, _read_own(vm_epilogue), guest, agent_env)
                if erc != 0:
                    print(f"vtorque: vm_epilogue {vm_epilogue} exited {erc}", file=sys.stderr)
    finally:
        tracing.shutdown_tracing()
    return rc


def _read_own(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise click.ClickException(f"cannot read {path}: {exc.strerror}") from exc


FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _forwarder(argv_for, job_id: str, env: dict | None):
    def forward(sig: int, _frame) -> None:
        # The script's runner leads its own session (setsid): the signal goes to its whole process group.
        command = f'read p < {shlex.quote(guest_run_dir(job_id))}/pid && kill -{int(sig)} -"$p"'
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(argv_for(command), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env=env, timeout=10)
        # Then ended by the signal, as before: the job's key stays for a batch step started again (a requeue).
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    return forward


def _started_in_guest(argv_for, job_id: str, env: dict | None) -> bool:
    command = f"test -d {shlex.quote(guest_run_dir(job_id))}"
    return subprocess.run(argv_for(command), stdin=subprocess.DEVNULL, env=env).returncode == 0


def _stream_in_guest(argv_for, job_id: str, script: bytes, guest: dict, output: JobOutput,
                     env: dict | None) -> int:
    from vtorque.shared import tracing

    with tracing.tracer().start_as_current_span("run job in guest", attributes={
            "vtorque.guest": guest["guest"], "vtorque.node": guest["node"]}) as span:
        # The scheduler's kill of the batch step (scancel, qdel, a requeue) goes on to the script, as on a host,
        # unless a requeue checkpoints the guest (the node worker's job file says so): then the script must stay
        # running in the checkpoint, and a job that ends for good ends it with its guests. An older job file
        # (or a migrated guest's) does not say: the script is left to the guests' end.
        forward = guest.get("checkpoint") is False
        old = {sig: signal.signal(sig, _forwarder(argv_for, job_id, env)) for sig in FORWARDED} if forward else {}
        try:
            rc, word = stream_job(lambda o: argv_for(job_command(job_id, o["out"], o["err"])), script, output, env)
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            output.close(remove=False)
        # Done: the record is of no more use (a killed launcher never gets here, and its record stays for the
        # batch step that starts again).
        output.close(remove=True)
        span.set_attribute("vtorque.exit_code", rc)
        span.set_attribute("vtorque.job.attached", word == "attached")
        if rc == 255 and not word:
            tracing.mark_error(span, "ssh to the guest failed")
            print(f"vtorque: could not reach guest {guest['guest']} over ssh", file=sys.stderr)
        return rc


def _run_in_guest(what: str, argv: list[str], script: bytes, guest: dict, env: dict | None = None) -> int:
    from vtorque.shared import tracing

    name = "run job in guest" if what == "job" else f"run {what} in guest"
    with tracing.tracer().start_as_current_span(name, attributes={
            "vtorque.guest": guest["guest"], "vtorque.node": guest["node"]}) as span:
        rc = subprocess.run(argv, input=script, env=env).returncode
        span.set_attribute("vtorque.exit_code", rc)
        if rc == 255:
            tracing.mark_error(span, "ssh to the guest failed")
            print(f"vtorque: could not reach guest {guest['guest']} over ssh", file=sys.stderr)
        return rc


if __name__ == "__main__":
    main()
