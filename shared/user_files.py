"""Files a user names in a VM spec (vm_prologue, vm_epilogue, disk image, metadata): where they may live and
who must own them. Checked by vsub (as the user) and again by the node worker (as root, for the job's owner),
after resolving symlinks, so a link cannot smuggle in someone else's file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from vtorque.shared.spec import SpecError


def allowed_roots(home: str, user_dirs: list[str]) -> list[Path]:
    return [Path(os.path.realpath(home))] + [Path(os.path.realpath(d)) for d in user_dirs]


def check_user_file(key: str, path: str, uid: int, home: str, user_dirs: list[str]) -> str:
    """The resolved path of a regular file owned by `uid` under the owner's home or a site directory."""
    real = os.path.realpath(path)
    roots = allowed_roots(home, user_dirs)
    if not any(Path(real) == root or root in Path(real).parents for root in roots):
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
