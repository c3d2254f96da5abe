#!/usr/bin/python3
"""Boot the vtorque test guest with plain libvirt and time it.

Builds the guest with tests/guest/build.sh (cached), then boots it N times
through libvirt (qemu:///system, TCG) with a fresh qcow2 overlay, seed ISO and
ssh key per run, and measures:

  create   conn.createXML() duration
  kernel   createXML start -> "VTORQUE-KERNEL-UP" in the serial log
  ready    createXML start -> "VTORQUE-GUEST-READY" in the serial log
  banner   createXML start -> first "SSH-" bytes on the forwarded port
  ssh      duration of `ssh ... 'sh -s' < job` running `uname -r; nproc; exit 3`
  total    createXML start -> ssh command finished

The exit code (must be 3), stdout and stderr of the job are verified.

Use from another benchmark (bench/ is not a package)::

    import importlib.util
    spec = importlib.util.spec_from_file_location("bare_boot", "/path/to/bench/bare_boot.py")
    bare_boot = importlib.util.module_from_spec(spec); spec.loader.exec_module(bare_boot)
    timings = bare_boot.boot_bare("/var/cache/vtorque/testguest", "/tmp/somedir")

Needs root, the system python3-libvirt, a running libvirtd, genisoimage,
qemu-img, ssh and ssh-keygen.
"""

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from xml.sax.saxutils import escape

import libvirt

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_SH = os.path.join(HERE, "..", "tests", "guest", "build.sh")
DEFAULT_GUEST_DIR = "/var/cache/vtorque/testguest"
LIBVIRT_URI = "qemu:///system"
CMDLINE = "console=ttyS0 root=/dev/vda rw quiet panic=-1"

MARK_KERNEL = b"VTORQUE-KERNEL-UP"
MARK_READY = b"VTORQUE-GUEST-READY"
MARK_FAILED = b"VTORQUE-GUEST-FAILED"

JOB = b"uname -r; nproc; echo vtorque-stderr-check >&2; exit 3\n"
EXPECTED_EXIT = 3

SSH_OPTS = [
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "BatchMode=yes",
    "-o", "LogLevel=ERROR",
    "-o", "ConnectTimeout=30",
]


class BootError(RuntimeError):
    """The guest did not boot or the ssh check failed; .timings has what was measured."""

    def __init__(self, msg, timings=None):
        super().__init__(msg)
        self.timings = timings or {}


def _silence_libvirt(_ctx, _err):
    pass


def build_guest(guest_dir=DEFAULT_GUEST_DIR, quiet=False):
    """Run tests/guest/build.sh GUEST_DIR (a no-op when cached)."""
    out = subprocess.DEVNULL if quiet else sys.stderr
    subprocess.run([BUILD_SH, guest_dir], check=True, stdout=out, stderr=sys.stderr)


def guest_kernel_release(guest_dir):
    """Kernel release the guest should report (from build.sh's .kernel-pkg), or None."""
    try:
        with open(os.path.join(guest_dir, ".kernel-pkg")) as f:
            pkg = f.read().split()[1]
    except (OSError, IndexError):
        return None
    return pkg[len("linux-image-"):] if pkg.startswith("linux-image-") else None


def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


def make_seed(path, rundir, env, instance_id):
    """genisoimage a NoCloud-style seed (label cidata) holding vtorque.env."""
    src = os.path.join(rundir, "seed")
    os.mkdir(src)
    with open(os.path.join(src, "meta-data"), "w") as f:
        f.write(f"instance-id: {instance_id}\nlocal-hostname: {env['VT_HOSTNAME']}\n")
    with open(os.path.join(src, "user-data"), "w") as f:
        f.write("#cloud-config\n{}\n")
    with open(os.path.join(src, "vtorque.env"), "w") as f:
        for k, v in env.items():
            f.write(f"{k}={shlex.quote(str(v))}\n")
    subprocess.run(
        ["genisoimage", "-quiet", "-output", path, "-volid", "cidata", "-joliet", "-rock",
         "meta-data", "user-data", "vtorque.env"],
        cwd=src, check=True)


def domain_xml(name, guest_dir, overlay, seed, serial_log, port, memory_mib=128, vcpus=1,
               virtio_rng=False):
    e = lambda s: escape(str(s), {"'": "&apos;"})  # noqa: E731
    rng = ("\n    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>"
           if virtio_rng else "")
    return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{e(name)}</name>
  <memory unit='MiB'>{int(memory_mib)}</memory>
  <vcpu>{int(vcpus)}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{e(os.path.join(guest_dir, 'vmlinux'))}</kernel>
    <initrd>{e(os.path.join(guest_dir, 'initrd.img'))}</initrd>
    <cmdline>{CMDLINE}</cmdline>
  </os>
  <features><acpi/></features>
  <cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model></cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{e(overlay)}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{e(seed)}'/>
      <target dev='vdb' bus='virtio'/>
      <readonly/>
    </disk>
    <serial type='file'>
      <source path='{e(serial_log)}'/>
      <target port='0'/>
    </serial>{rng}
  </devices>
  <qemu:commandline>
    <qemu:arg value='-netdev'/>
    <qemu:arg value='user,id=vtnet0,hostfwd=tcp:127.0.0.1:{int(port)}-:22'/>
    <qemu:arg value='-device'/>
    <qemu:arg value='virtio-net-pci,netdev=vtnet0,addr=0x10'/>
  </qemu:commandline>
</domain>
"""


def _probe_banner(port, deadline, stop, result, start_evt, interval=0.2, max_age=3.0):
    """Find the first moment the forwarded port yields bytes starting with "SSH-".

    slirp accepts the host side of a forwarded connection at once, whatever the
    guest does, so a single probe can hang (SYN lost before the guest NIC is
    up) or be slow (the first dropbear connection under TCG). Keep several
    overlapping non-blocking probes: open a new one every `interval` seconds,
    drop those older than `max_age`, first banner wins.
    """
    import selectors
    start_evt.wait(max(0.0, deadline - time.monotonic()))
    sel = selectors.DefaultSelector()
    next_open = 0.0
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            now = time.monotonic()
            if now >= next_open:
                next_open = now + interval
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", port))
                sel.register(s, selectors.EVENT_READ, now)
            for key, _ in sel.select(timeout=0.02):
                s = key.fileobj
                try:
                    data = s.recv(64)
                except OSError:
                    data = b""
                if data.startswith(b"SSH-"):
                    result["t"] = time.monotonic()
                    result["banner"] = data.split(b"\r\n")[0].decode("ascii", "replace")
                    return
                sel.unregister(s)
                s.close()
            now = time.monotonic()
            for key in list(sel.get_map().values()):
                if now - key.data > max_age:
                    sel.unregister(key.fileobj)
                    key.fileobj.close()
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()
        sel.close()


def _check_dir_reachable(path):
    """QEMU runs as libvirt-qemu: every ancestor of the run dir must be o+x."""
    p = os.path.abspath(path)
    while True:
        if not os.stat(p).st_mode & 0o001:
            raise BootError(f"{p} is not searchable by others (mode "
                            f"{oct(os.stat(p).st_mode & 0o777)}); QEMU runs as libvirt-qemu "
                            f"and cannot reach files below it")
        parent = os.path.dirname(p)
        if parent == p:
            return
        p = parent


def boot_bare(guest_dir, workdir, *, conn=None, memory_mib=128, vcpus=1, timeout=180.0,
              user="vtbench", uid=2000, gid=2000, name=None, virtio_rng=False):
    """Boot the built test guest once and return a dict of timings (seconds).

    All files go to a fresh subdirectory of `workdir` that is removed again, and
    the domain is destroyed, on success, failure and KeyboardInterrupt.
    Raises BootError (with .timings) if a marker, the banner or the ssh check fails.
    """
    guest_dir = os.path.abspath(guest_dir)
    for f in ("vmlinux", "initrd.img", "rootfs.qcow2"):
        if not os.path.isfile(os.path.join(guest_dir, f)):
            raise BootError(f"{guest_dir}/{f} missing; run tests/guest/build.sh {guest_dir}")
    own_conn = conn is None
    if own_conn:
        libvirt.registerErrorHandler(_silence_libvirt, None)
        conn = libvirt.open(LIBVIRT_URI)
    name = name or f"vtbench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    rundir = tempfile.mkdtemp(prefix=f"{name}.", dir=workdir)
    dom = None
    stop = threading.Event()
    timings = {"name": name}
    try:
        os.chmod(rundir, 0o755)
        _check_dir_reachable(rundir)
        overlay = os.path.join(rundir, "overlay.qcow2")
        seed = os.path.join(rundir, "seed.iso")
        serial_log = os.path.join(rundir, "serial.log")
        key = os.path.join(rundir, "id_ed25519")
        port = free_port()

        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", key],
                       check=True)
        with open(key + ".pub") as f:
            pubkey = f.read().strip()
        env = {
            "VT_HOSTNAME": name,
            "VT_USER": user,
            "VT_UID": 0 if user == "root" else uid,
            "VT_GID": 0 if user == "root" else gid,
            "VT_HOME": "/root" if user == "root" else f"/home/{user}",
            "VT_JOB_ID": f"{name}.bench",
            "VT_SSH_AUTHORIZED_KEYS": pubkey + "\n",
        }
        make_seed(seed, rundir, env, name)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b",
                        os.path.join(guest_dir, "rootfs.qcow2"), "-F", "qcow2", overlay],
                       check=True)
        xml = domain_xml(name, guest_dir, overlay, seed, serial_log, port, memory_mib, vcpus,
                         virtio_rng)

        t0 = time.monotonic()
        deadline = t0 + timeout
        dom = conn.createXML(xml, 0)
        timings["create_s"] = time.monotonic() - t0

        banner = {}
        kernel_up = threading.Event()  # no point probing before the guest kernel runs
        prober = threading.Thread(target=_probe_banner,
                                  args=(port, deadline, stop, banner, kernel_up), daemon=True)
        prober.start()

        seen = {}
        data = b""
        while time.monotonic() < deadline:
            try:
                with open(serial_log, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                data = b""
            now = time.monotonic()
            for key_, mark in (("kernel_up_s", MARK_KERNEL), ("guest_ready_s", MARK_READY)):
                if key_ not in seen and mark in data:
                    seen[key_] = now - t0
                    line = data[data.index(mark):].split(b"\n")[0].decode("ascii", "replace")
                    for tok in line.split():
                        if tok.startswith("uptime="):
                            seen[key_.replace("_s", "_uptime")] = float(tok[len("uptime="):])
            if "kernel_up_s" in seen:
                kernel_up.set()
            if MARK_FAILED in data:
                line = data[data.index(MARK_FAILED):].split(b"\n")[0].decode("ascii", "replace")
                raise BootError(f"guest reported: {line.strip()}", {**timings, **seen})
            if "guest_ready_s" in seen and "t" in banner:
                break
            try:
                if not dom.isActive():
                    raise BootError("domain stopped during boot", {**timings, **seen})
            except libvirt.libvirtError as exc:
                raise BootError("domain vanished during boot (kernel panic?)",
                                {**timings, **seen}) from exc
            time.sleep(0.02)
        timings.update(seen)
        if "guest_ready_s" not in seen or "t" not in banner:
            tail = data[-2000:].decode("utf-8", "replace")
            raise BootError(f"timeout after {timeout:.0f}s (seen: {sorted(seen)}, "
                            f"banner: {'t' in banner}); serial log tail:\n{tail}", timings)
        timings["ssh_banner_s"] = banner["t"] - t0
        timings["banner"] = banner["banner"]

        t1 = time.monotonic()
        r = subprocess.run(["ssh", "-i", key, "-p", str(port), *SSH_OPTS,
                            f"{user}@127.0.0.1", "sh -s"],
                           input=JOB, capture_output=True, timeout=max(30.0, deadline - t1))
        t2 = time.monotonic()
        timings["ssh_cmd_s"] = t2 - t1
        timings["total_s"] = t2 - t0
        timings["stdout"] = r.stdout.decode("utf-8", "replace")
        out = timings["stdout"].split()
        timings["exit_code"] = r.returncode
        timings["uname_r"] = out[0] if out else None
        timings["nproc"] = int(out[1]) if len(out) > 1 and out[1].isdigit() else None
        timings["stderr"] = r.stderr.decode("utf-8", "replace").strip()
        problems = []
        if r.returncode != EXPECTED_EXIT:
            problems.append(f"exit code {r.returncode} != {EXPECTED_EXIT}")
        want = guest_kernel_release(guest_dir)
        if not timings["uname_r"] or (want and timings["uname_r"] != want):
            problems.append(f"uname -r {timings['uname_r']!r} != {want!r}")
        if timings["nproc"] != vcpus:
            problems.append(f"nproc {timings['nproc']!r} != {vcpus}")
        if timings["stderr"] != "vtorque-stderr-check":
            problems.append(f"stderr {timings['stderr']!r} != 'vtorque-stderr-check'")
        timings["ok"] = not problems
        if problems:
            raise BootError("ssh check failed: " + "; ".join(problems), timings)
        return timings
    finally:
        stop.set()
        if dom is not None:
            try:
                dom.destroy()
            except libvirt.libvirtError:
                pass  # already gone
        shutil.rmtree(rundir, ignore_errors=True)
        if own_conn:
            conn.close()


COLUMNS = [("create", "create_s"), ("kernel", "kernel_up_s"), ("ready", "guest_ready_s"),
           ("banner", "ssh_banner_s"), ("ssh", "ssh_cmd_s"), ("total", "total_s")]


def print_table(results):
    hdr = f"{'run':>6} " + " ".join(f"{c:>7}" for c, _ in COLUMNS) + \
        f" {'g-up':>6} {'g-ready':>7} {'exit':>4}  uname -r / nproc"
    print(hdr)
    print("-" * len(hdr))
    for i, r in enumerate(results, 1):
        cells = " ".join(f"{r[k]:7.2f}" if k in r else f"{'-':>7}" for _, k in COLUMNS)
        gu = f"{r['kernel_up_uptime']:6.2f}" if "kernel_up_uptime" in r else f"{'-':>6}"
        gr = f"{r['guest_ready_uptime']:7.2f}" if "guest_ready_uptime" in r else f"{'-':>7}"
        ex = r.get("exit_code", "-")
        extra = f"{r.get('uname_r')} / {r.get('nproc')}" if r.get("ok") else \
            f"FAILED: {r.get('error', '?')[:60]}"
        print(f"{i:>6} {cells} {gu} {gr} {ex!s:>4}  {extra}")
    ok = [r for r in results if r.get("ok")]
    if ok:
        med = " ".join(f"{statistics.median(r[k] for r in ok):7.2f}" for _, k in COLUMNS)
        gu = statistics.median(r["kernel_up_uptime"] for r in ok)
        gr = statistics.median(r["guest_ready_uptime"] for r in ok)
        print("-" * len(hdr))
        print(f"{'median':>6} {med} {gu:6.2f} {gr:7.2f}")
    print("(seconds from createXML start; g-up/g-ready = guest /proc/uptime at the marker)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guest-dir", default=DEFAULT_GUEST_DIR)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--memory", type=int, default=128, help="guest MiB (default 128)")
    ap.add_argument("--vcpus", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=180.0, help="per boot, seconds")
    ap.add_argument("--user", default="vtbench", help="job user in the guest (or root)")
    ap.add_argument("--no-build", action="store_true", help="do not run build.sh first")
    ap.add_argument("--virtio-rng", action="store_true",
                    help="add a virtio-rng device (not part of the standard domain shape)")
    args = ap.parse_args(argv)

    if os.geteuid() != 0:
        sys.exit("bare_boot.py: error: must run as root (qemu:///system)")
    for tool in ("genisoimage", "qemu-img", "ssh", "ssh-keygen"):
        if not shutil.which(tool):
            sys.exit(f"bare_boot.py: error: required tool {tool!r} not found")
    if not args.no_build:
        build_guest(args.guest_dir)

    libvirt.registerErrorHandler(_silence_libvirt, None)
    try:
        conn = libvirt.open(LIBVIRT_URI)
    except libvirt.libvirtError as e:
        sys.exit(f"bare_boot.py: error: cannot connect to {LIBVIRT_URI}: {e}\n"
                 "  start it with: chgrp kvm /dev/kvm; chmod 660 /dev/kvm; virtlogd -d; libvirtd -d")

    # SIGINT/SIGTERM -> KeyboardInterrupt so the finally blocks clean up (SIGINT
    # explicitly too: a shell's background job inherits it ignored).
    def _term(_sig, _frm):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)

    workdir = tempfile.mkdtemp(prefix="vtorque-bare-boot.")
    results = []
    failed = False
    try:
        os.chmod(workdir, 0o755)
        for i in range(args.runs):
            try:
                r = boot_bare(args.guest_dir, workdir, conn=conn, memory_mib=args.memory,
                              vcpus=args.vcpus, timeout=args.timeout, user=args.user,
                              virtio_rng=args.virtio_rng)
            except BootError as e:
                failed = True
                r = {**e.timings, "ok": False, "error": str(e)}
                print(f"run {i + 1}: {e}", file=sys.stderr)
            results.append(r)
            if not args.json:
                print(f"run {i + 1}/{args.runs}: " +
                      ("ok" if r.get("ok") else "FAILED") +
                      (f" ready={r['guest_ready_s']:.2f}s" if "guest_ready_s" in r else ""),
                      file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        conn.close()

    if args.json:
        ok = [r for r in results if r.get("ok")]
        summary = {k: statistics.median(r[k] for r in ok) for _, k in COLUMNS} if ok else {}
        print(json.dumps({"runs": results, "median": summary, "guest_dir": args.guest_dir,
                          "memory_mib": args.memory, "vcpus": args.vcpus,
                          "virtio_rng": args.virtio_rng}, indent=2))
    else:
        print_table(results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
