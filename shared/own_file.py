"""Appending to a file in a directory others may write (the traces directory is 1777: vsub and the launcher run
as users, the Slurm hooks as SlurmUser): the name is predictable, so the file may have been planted. It is
opened without following a symlink, and written only if it is a regular file of this process's own user;
created, it is 0600 (another user's spans are not hers to read)."""

from __future__ import annotations

import os
import stat


class NotOwnFile(OSError):
    pass


def append_own(path: str | os.PathLike, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                 0o600)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise NotOwnFile(f"{path}: not a file of uid {os.geteuid()}: not written")
        os.write(fd, text.encode())
    finally:
        os.close(fd)
