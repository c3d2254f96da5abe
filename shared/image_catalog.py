"""The writable image catalog (images.toml) and what `vtorque images add/update` learn about an image file.

The file holds [images.catalog.NAME] tables, the same shape as in vtorque.toml, so an entry can move between
the two unchanged; shared/config.py merges it over the main file's catalog (docs/design.md, "Image catalog").
Edits are read-modify-write under an flock on `<file>.lock`, written to a temporary file and renamed over the
old one, so readers (vsub, hooks, services) see the old catalog or the new one, never half of one.

Rendering, the distro guess and the qemu-img JSON reading are pure; the rest is file and subprocess I/O.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

from vtorque.shared.config import ImageEntry, read_catalog_file

from . import image_fetch as fetch

try:
    from vtorque.shared.spec import DISTROS
except ImportError:  # an older spec module
    DISTROS = ("debian", "ubuntu", "redhat", "centos", "osv")

HEADER = ("# vtorque image catalog, written by `vtorque images add|update|remove` (root). Entries here replace\n"
          "# entries of the same name in vtorque.toml. Keep the format if you edit it by hand.\n")
FIELD_ORDER = ("source", "sha256", "format", "source_format", "compress", "size", "distro", "kernel", "initrd",
               "cmdline")


# -- pure ---------------------------------------------------------------------------------------------------

def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    # A JSON string is a valid TOML basic string: the same escapes (\" \\ \n \t \uXXXX).
    return json.dumps(str(value), ensure_ascii=True)


def render_catalog(entries: dict[str, ImageEntry]) -> str:
    """The catalog file's text: entries by name, fields in a fixed order, defaults left out."""
    defaults = ImageEntry(source="", sha256="")
    lines = [HEADER]
    for name in sorted(entries):
        entry = entries[name]
        lines.append(f"\n[images.catalog.{name}]\n")
        for key in FIELD_ORDER:
            value = getattr(entry, key)
            if key in ("source", "sha256") or (value is not None and value != getattr(defaults, key)):
                lines.append(f"{key} = {toml_value(value)}\n")
    return "".join(lines)


_CODENAMES = {
    "bookworm": ("debian", "12"), "bullseye": ("debian", "11"), "buster": ("debian", "10"),
    "trixie": ("debian", "13"), "noble": ("ubuntu", "24.04"), "jammy": ("ubuntu", "22.04"),
    "focal": ("ubuntu", "20.04"), "bionic": ("ubuntu", "18.04"),
}
_FAMILIES = [
    (r"debian", "debian"), (r"ubuntu", "ubuntu"), (r"centos", "centos"),
    (r"rhel|redhat|red-hat|rocky|alma(?:linux)?|fedora|oracle(?:linux)?", "redhat"), (r"osv", "osv"),
]


def guess_distro(*texts: str | None) -> str | None:
    """The guest flavour (one of shared/spec.DISTROS) from names: the image name, its file name, its URL,
    qemu-img's view of it. Cloud images say what they are in their names (debian-12-genericcloud-amd64,
    jammy-server-cloudimg, CentOS-Stream-GenericCloud-9, Rocky-9-GenericCloud); None when nothing says."""
    for text in texts:
        words = (text or "").lower()
        for pattern, family in _FAMILIES:
            if re.search(rf"(?<![a-z]){pattern}", words) and family in DISTROS:
                return family
        for codename, (family, _) in _CODENAMES.items():
            if re.search(rf"(?<![a-z]){codename}(?![a-z])", words) and family in DISTROS:
                return family
    return None


@dataclass(frozen=True)
class ImageFacts:
    sha256: str
    size: int
    format: str  # "qcow2" | "raw"
    virtual_size: int | None = None
    backing_file: str | None = None


def facts_from_qemu_img(info: dict) -> tuple[str, int | None, str | None]:
    """(format, virtual size, backing file) from `qemu-img info --output=json`."""
    fmt = info.get("format", "raw")
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    return fmt, info.get("virtual-size"), backing


# -- I/O ----------------------------------------------------------------------------------------------------

class CatalogError(Exception):
    pass


def qemu_img_info(path: Path) -> dict:
    try:
        proc = subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True, text=True,
                              timeout=120)
    except FileNotFoundError:
        raise CatalogError("qemu-img is not installed: cannot tell the image's format") from None
    if proc.returncode != 0:
        raise CatalogError(f"qemu-img info {path}: {proc.stderr.strip()[:300]}")
    return json.loads(proc.stdout)


def inspect(source: str, *, sha256: str | None = None, fmt: str | None = None,
            progress: Callable[[int, int | None], None] | None = None) -> ImageFacts:
    """What the catalog needs to know about `source` (a path or an http(s) URL): its sha256 (computed unless
    given), size and format (qemu-img info for files, the first bytes for URLs). A qcow2 with a backing file
    is refused: it could make guests read any file of the node."""
    progress = progress or (lambda done, total: None)
    if fetch.is_url(source):
        return _inspect_url(source, sha256, fmt, progress)
    path = fetch.local_path(source)
    if not path.is_file():
        raise CatalogError(f"{path}: no such file")
    detected, virtual, backing = facts_from_qemu_img(qemu_img_info(path))
    if backing:
        raise CatalogError(f"{path} has a backing file ({backing}): flatten it first "
                           f"(qemu-img convert -O qcow2 {path} flat.qcow2)")
    if detected not in ("qcow2", "raw"):
        raise CatalogError(f"{path} is a {detected} image: vtorque stages qcow2 or raw (qemu-img convert it)")
    if fmt and fmt != detected:
        raise CatalogError(f"{path} is {detected}, not {fmt}")
    size, digest = fetch.hash_file(path, progress) if sha256 is None else (path.stat().st_size, sha256)
    return ImageFacts(digest, size, detected, virtual, None)


def _inspect_url(url: str, sha256: str | None, fmt: str | None, progress) -> ImageFacts:
    request = urllib.request.Request(url, headers={"User-Agent": "vtorque-images", "Accept-Encoding": "identity"})
    h = hashlib.sha256()
    head = b""
    done = 0
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            while chunk := response.read(1024 * 1024 if sha256 is None else 512):
                head = head or chunk[:512]
                if sha256 is not None:
                    done = total or 0
                    break
                h.update(chunk)
                done += len(chunk)
                progress(done, total)
    except OSError as exc:
        raise CatalogError(f"{fetch._shown(url)}: {fetch._reason(exc)}") from None
    detected = fetch.sniff_format(head)
    if fmt and fmt != detected and detected == "qcow2":
        raise CatalogError(f"{fetch._shown(url)} is qcow2, not {fmt}")
    return ImageFacts(sha256 or h.hexdigest(), done, fmt or detected)


@contextlib.contextmanager
def editing(path: str | Path) -> Iterator[dict[str, ImageEntry]]:
    """The catalog file's entries to change in the block; written back atomically (mode 0644) unless the
    block raised. Concurrent editors take turns (flock on <file>.lock)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries = dict(read_catalog_file(str(path)))
        yield entries
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w") as fh:
                fh.write(render_catalog(entries))
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)  # vsub (any user) reads the catalog
            os.rename(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        dir_fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def make_entry(facts: ImageFacts, source: str, **fields) -> ImageEntry:
    """A catalog entry from an inspection plus the admin's options (None = not given)."""
    given = {k: v for k, v in fields.items() if v is not None}
    return msgspec.convert({"source": source, "sha256": facts.sha256, "format": facts.format,
                            "size": facts.size or None, **given}, ImageEntry)
