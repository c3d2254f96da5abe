"""libvirt's QEMU save file: its header, the domain XML in it, and a copy of it with another domain XML.

A warm image (warm.py) is one save file restored many times, each copy as another guest. libvirt refuses a new
name or uuid through `restoreFlags(path, dxml)` (its ABI check: "Target domain uuid … does not match source"),
so each copy gets its new XML in the header instead (../shared/reference/warm-start-restore.md). The format
(libvirt 9.0 `virQEMUSaveHeader`, host byte order): magic "LibvirtQemudSave", then uint32 version, data_len,
was_running, compressed, cookieOffset and 14 unused, 92 bytes; then data_len bytes: the XML and a NUL, the
migration cookie (version 2) at cookieOffset and a NUL, zero padding; then QEMU's migration stream, untouched
(names, uuids and file paths are QEMU command-line things, not migration state).

The pure part (parse, build) works on bytes; `read_xml` and `copy_with_xml` do the file I/O.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"LibvirtQemudSave"
HEADER = struct.Struct("=16s5I14I")  # 92 bytes
BLOCK = 4096  # a header that must grow grows by whole pages, as libvirt pads it


class SaveImageError(Exception):
    pass


@dataclass(frozen=True)
class SaveHeader:
    version: int
    data_len: int
    was_running: int
    compressed: int
    cookie_offset: int
    xml: str
    cookie: bytes  # without its NUL; b"" when none

    @property
    def stream_offset(self) -> int:
        return HEADER.size + self.data_len


def parse(head: bytes) -> SaveHeader:
    """The header from the first bytes of a save file (at least HEADER.size + data_len of them)."""
    if len(head) < HEADER.size:
        raise SaveImageError("not a libvirt save file: too short")
    magic, version, data_len, was_running, compressed, cookie_offset, *_ = HEADER.unpack_from(head)
    if magic != MAGIC:
        raise SaveImageError(f"not a complete libvirt save file (magic {magic[:16]!r})")
    if version not in (2, 3) or not 0 < data_len < 1 << 24:
        raise SaveImageError(f"unsupported libvirt save file (version {version}, {data_len} bytes of XML)")
    data = head[HEADER.size:HEADER.size + data_len]
    if len(data) < data_len:
        raise SaveImageError("libvirt save file cut short in its header")
    xml_end = data.find(b"\0")
    if xml_end < 0:
        raise SaveImageError("libvirt save file: its XML has no end")
    cookie = b""
    if cookie_offset:
        if not xml_end < cookie_offset < data_len:
            raise SaveImageError("libvirt save file: its cookie is outside its header")
        end = data.find(b"\0", cookie_offset)
        cookie = data[cookie_offset:end if end >= 0 else data_len]
    return SaveHeader(version=version, data_len=data_len, was_running=was_running, compressed=compressed,
                      cookie_offset=cookie_offset, xml=data[:xml_end].decode(), cookie=cookie)


def build(old: SaveHeader, xml: str) -> bytes:
    """The header of a copy of `old` that carries `xml`: the same size when the new XML fits in it, else grown
    by whole pages (the stream then starts further on; libvirt hands QEMU the file from there)."""
    body = xml.encode() + b"\0"
    cookie_offset = 0
    if old.cookie:
        cookie_offset = len(body)
        body += old.cookie + b"\0"
    data_len = old.data_len
    if len(body) > data_len:
        data_len += -(-(len(body) - data_len) // BLOCK) * BLOCK
    head = HEADER.pack(MAGIC, old.version, data_len, old.was_running, old.compressed, cookie_offset, *[0] * 14)
    return head + body + b"\0" * (data_len - len(body))


def read_header(path: str | Path) -> SaveHeader:
    with open(path, "rb") as fh:
        first = fh.read(HEADER.size)
        if len(first) < HEADER.size:
            raise SaveImageError(f"{path}: not a libvirt save file")
        data_len = HEADER.unpack_from(first)[2]
        return parse(first + fh.read(min(data_len, 1 << 24)))


def copy_with_xml(src: str | Path, dest: str | Path, xml: str) -> None:
    """`dest` (new, root's, 0600) = `src` with `xml` in its header; the stream is copied in the kernel."""
    old = read_header(src)
    head = build(old, xml)
    fd_in = os.open(src, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd_in).st_size
        fd_out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd_out, head)
            offset = old.stream_offset
            while offset < size:
                sent = os.sendfile(fd_out, fd_in, offset, min(size - offset, 1 << 30))
                if sent == 0:
                    raise SaveImageError(f"{src} shrank while it was copied")
                offset += sent
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)
