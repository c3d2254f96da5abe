"""Files a user names in a VM spec (vm_prologue, vm_epilogue, disk image, metadata): where they may live and
who must own them.

- vsub, running as the user, checks a path for the user's sake (`check_user_file`).
- Root (the node worker) never opens a user's file by path. `copy_user_image` runs a child that has become the
  owner (setgroups/setgid/setuid before exec); the child opens the file once (O_NOFOLLOW, O_NONBLOCK: a FIFO
  cannot block it), checks what it opened (fstat: a regular file of the owner's; /proc/self/fd: still under the
  owner's home or a site directory), inspects a qcow2 as the owner with `qemu-img info` on that open file, and
  copies its bytes into a file root created and passed in as an fd. Root then checks its own copy's header
  again (`image_refusal`) — the owner could rewrite the file between the child's look and its copy, but not
  root's copy. QEMU and libvirt only ever see root's copy: no symlink swap, no backing file, no FIFO, no
  relabelling or chown of the user's file. Every step has a deadline.

This module runs as a script too (the child): it imports only the standard library at module level.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

if __name__ != "__main__":
    from vtorque.shared.spec import SpecError

QCOW2_MAGIC = b"QFI\xfb"
QCOW2_INCOMPAT_DATA_FILE = 1 << 2
QCOW2_EXT_DATA_FILE = 0x44415441  # header extension naming the external data file
QCOW2_EXT_END = 0


def allowed_roots(home: str, user_dirs: list[str]) -> list[Path]:
    return [Path(os.path.realpath(home))] + [Path(os.path.realpath(d)) for d in user_dirs]


def _under(real: str, roots: list[Path]) -> bool:
    return any(Path(real) == root or root in Path(real).parents for root in roots)


def check_user_file(key: str, path: str, uid: int, home: str, user_dirs: list[str]) -> str:
    """The resolved path of a regular file owned by `uid` under the owner's home or a site directory.
    For vsub, as the user, for the user's sake: root must not rely on it (see copy_user_image)."""
    real = os.path.realpath(path)
    roots = allowed_roots(home, user_dirs)
    if not _under(real, roots):
        raise SpecError(key, path, f"must be under {', '.join(map(str, roots))}")
    try:
        st = os.stat(real)
    except OSError as exc:
        raise SpecError(key, path, f"cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SpecError(key, path, "must be a regular file")
    if st.st_uid != uid:
        raise SpecError(key, path, "must be your own file")
    return real


# -- what a disk image may be (pure) -------------------------------------------------------------------------

def image_refusal(header: bytes, fmt: str) -> str | None:
    """Why an image with this header (its first 64 KiB) may not be attached, or None. A raw image is bytes
    only (QEMU is told raw, never probes). A qcow2 may not name a backing file or an external data file."""
    if fmt == "raw":
        return None
    if fmt != "qcow2":
        return f"format {fmt} is not qcow2 or raw"
    if len(header) < 72 or header[:4] != QCOW2_MAGIC:
        return "is not a qcow2 image (no qcow2 header)"
    version, backing_offset, backing_size = struct.unpack(">IQI", header[4:20])
    if backing_offset or backing_size:
        return "is a qcow2 image that names a backing file: refused (a user image may not name other files)"
    if version >= 3:
        if len(header) < 104:
            return "has a truncated qcow2 header"
        incompatible = struct.unpack(">Q", header[72:80])[0]
        if incompatible & QCOW2_INCOMPAT_DATA_FILE:
            return "is a qcow2 image with an external data file: refused (a user image may not name other files)"
        header_length = struct.unpack(">I", header[100:104])[0]
        offset = (header_length + 7) & ~7
        while offset + 8 <= len(header):
            ext, length = struct.unpack(">II", header[offset:offset + 8])
            if ext == QCOW2_EXT_END:
                break
            if ext == QCOW2_EXT_DATA_FILE:
                return "is a qcow2 image that names an external data file: refused"
            offset += 8 + ((length + 7) & ~7)
    elif version != 2:
        return f"has qcow2 version {version}"
    return None


# -- root's side ----------------------------------------------------------------------------------------------

class UserFileRefused(Exception):
    """A user's file that will not be used; the message names it and why (one line)."""


def copy_user_image(key: str, path: str, fmt: str, uid: int, gid: int, home: str, user_dirs: list[str],
                    dest: int, timeout: float = 120.0, max_bytes: int = 1 << 40,
                    qemu_img: str = "qemu-img") -> int:
    """Copy the owner's image at `path` into the file open at `dest` (root's, created empty), as the owner.
    Returns the bytes of the image; raises UserFileRefused with the reason. Never blocks beyond `timeout`."""
    try:
        import pwd

        groups = os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)
    except (KeyError, OSError):
        groups = [gid]
    roots = [str(r) for r in allowed_roots(home, user_dirs)]
    argv = [sys.executable, "-I", "-S", os.path.abspath(__file__), "copy", json.dumps({
        "key": key, "path": path, "fmt": fmt, "uid": uid, "roots": roots, "dest": dest, "max_bytes": max_bytes,
        "qemu_img": qemu_img, "timeout": max(1.0, timeout - 1.0)})]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=(dest,), user=uid, group=gid, extra_groups=groups, cwd="/",
                                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"},
                                start_new_session=True, umask=0o077)
    except OSError as exc:
        raise UserFileRefused(f"{key}={path}: cannot start the copy as uid {uid}: {exc.strerror}") from None
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise UserFileRefused(f"{key}={path}: not read within {timeout:.0f}s (a hung file system?)") from None
    try:
        answer = json.loads(out.decode() or "{}")
    except ValueError:
        answer = {}
    if proc.returncode != 0 or "error" in answer or "bytes" not in answer:
        why = answer.get("error") or (err.decode(errors="replace").strip().splitlines() or ["failed"])[-1][:200]
        raise UserFileRefused(f"{key}={path}: {why}")
    # Root's own copy, which nobody else can change: its header decides.
    header = os.pread(dest, 65536, 0)
    refusal = image_refusal(header, fmt)
    if refusal:
        raise UserFileRefused(f"{key}={path} {refusal}")
    return int(answer["bytes"])


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


# -- the child (runs as the owner) ----------------------------------------------------------------------------

def _child_copy(args: dict) -> dict:
    path, fmt, uid = args["path"], args["fmt"], args["uid"]
    if os.getuid() != uid or os.geteuid() != uid:
        return {"error": "the copy did not run as the owner"}
    roots = [Path(r) for r in args["roots"]]
    real = os.path.realpath(path)
    if not _under(real, roots):
        return {"error": f"must be under {', '.join(map(str, roots))}"}
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        return {"error": f"cannot be opened as its owner: {exc.strerror}"}
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or
                stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a file")
        return {"error": f"must be a regular file, not {kind}"}
    if st.st_uid != uid:
        return {"error": "must be your own file"}
    opened = os.readlink(f"/proc/self/fd/{fd}")
    if not _under(opened, roots):
        return {"error": f"moved outside {', '.join(map(str, roots))} while it was opened"}
    if st.st_size > args["max_bytes"]:
        return {"error": f"is larger than {args['max_bytes']} bytes"}
    os.set_blocking(fd, True)
    refusal = image_refusal(os.pread(fd, 65536, 0), fmt)
    if refusal:
        return {"error": refusal}
    if fmt == "qcow2":
        # What QEMU itself makes of it, as the owner, on the file already open (its fd, not its path).
        os.set_inheritable(fd, True)
        try:
            info = subprocess.run([args["qemu_img"], "info", "-f", "qcow2", "--output=json", f"/proc/self/fd/{fd}"],
                                  capture_output=True, text=True, timeout=min(30.0, args["timeout"] / 2),
                                  pass_fds=(fd,), stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return {"error": "qemu-img info did not answer in time"}
        except OSError as exc:
            return {"error": f"qemu-img: {exc.strerror}"}
        if info.returncode != 0:
            return {"error": f"is not a usable qcow2 image: {(info.stderr.strip().splitlines() or ['?'])[-1][:200]}"}
        doc = json.loads(info.stdout)
        if doc.get("backing-filename") or doc.get("full-backing-filename"):
            return {"error": "is a qcow2 image that names a backing file: refused"}
        if (doc.get("format-specific", {}).get("data", {}) or {}).get("data-file"):
            return {"error": "is a qcow2 image with an external data file: refused"}
    dest = args["dest"]
    size = os.fstat(fd).st_size
    copied, offset, chunk = 0, 0, 1 << 20
    deadline = time.monotonic() + args["timeout"]
    while offset < size:
        try:
            data_at = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:
            break  # only a hole remains
        hole_at = os.lseek(fd, data_at, os.SEEK_HOLE)
        offset = data_at
        while offset < min(hole_at, size):
            if time.monotonic() > deadline:
                return {"error": "copy took too long"}
            buf = os.pread(fd, min(chunk, hole_at - offset), offset)
            if not buf:
                break
            if buf.count(0) != len(buf):
                os.pwrite(dest, buf, offset)
            offset += len(buf)
            copied += len(buf)
    os.ftruncate(dest, size)
    os.fsync(dest)
    return {"bytes": size, "data": copied}


def _main(argv: list[str]) -> int:
    if argv[:1] != ["copy"] or len(argv) != 2:
        print(json.dumps({"error": "usage: user_files.py copy JSON"}))
        return 2
    try:
        answer = _child_copy(json.loads(argv[1]))
    except OSError as exc:
        answer = {"error": f"cannot be read: {exc.strerror}"}
    print(json.dumps(answer))
    return 1 if "error" in answer else 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
