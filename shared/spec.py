"""The VM spec a user writes after `-vm`: parsing and validation against the site config. Pure logic.

The spec is untrusted: vsub checks it for the user's sake, and the bridge checks it again because the hook's
host is not trusted more than the user. Both call `validate`.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

import msgspec

from vtorque.shared.config import IMAGE_NAME, Config

KEYS = ("img", "vcpus", "ram")
_SIZE = re.compile(r"^([0-9]{1,12})([KMGT]?)(i?B)?$", re.IGNORECASE)
_UNIT_KIB = {"K": 1, "M": 1024, "G": 1024**2, "T": 1024**3}


class SpecError(ValueError):
    """One bad key: the message names the key, the value and what is allowed."""

    def __init__(self, key: str, value: str | None, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        shown = key if value is None else f"{key}={value}"
        super().__init__(f"-vm {shown}: {allowed}")


class VMSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    img: str
    vcpus: int
    ram_mib: int

    def as_options(self) -> dict[str, str]:
        return {"img": self.img, "vcpus": str(self.vcpus), "ram": f"{self.ram_mib}M"}


def parse_options(texts: Iterable[str]) -> dict[str, str]:
    """`-vm img=x,vcpus=2` values (repeatable) into a key → value map; a key given twice is an error."""
    options: dict[str, str] = {}
    for text in texts:
        if not text.strip():
            raise SpecError("-vm", None, "empty spec: give key=value pairs, e.g. -vm img=NAME,vcpus=2")
        for item in text.split(","):
            key, sep, value = item.partition("=")
            key = key.strip().lower()
            if not key:
                raise SpecError("-vm", text, "expected key=value pairs separated by commas")
            if not sep:
                raise SpecError(key, None, "expected key=value")
            if key not in KEYS:
                raise SpecError(key, value, f"unknown key; known keys: {', '.join(KEYS)}")
            if key in options:
                raise SpecError(key, value, f"given twice (first {key}={options[key]})")
            options[key] = value.strip()
    return options


def parse_size_mib(text: str) -> int:
    """'512M', '2G', '1T', '262144K', '512' (MiB): binary units, rounded up to whole MiB."""
    m = _SIZE.match(text.strip())
    if not m:
        raise ValueError(text)
    kib = int(m.group(1)) * _UNIT_KIB[(m.group(2) or "M").upper()]
    return -(-kib // 1024)


def validate(options: Mapping[str, str], config: Config) -> VMSpec:
    site = config.spec
    unknown = sorted(set(options) - set(KEYS))
    if unknown:
        raise SpecError(unknown[0], options[unknown[0]], f"unknown key; known keys: {', '.join(KEYS)}")

    catalog = config.images.catalog
    known = ", ".join(sorted(catalog)) or "(the catalog is empty)"
    img = options.get("img")
    if img is None:
        raise SpecError("img", None, f"required; images: {known}")
    if not IMAGE_NAME.match(img):
        raise SpecError("img", img, f"not an image name (images come from the catalog: {known})")
    if img not in catalog:
        raise SpecError("img", img, f"no such image; images: {known}")

    vcpus_text = options.get("vcpus", str(site.default_vcpus))
    if not re.fullmatch(r"[0-9]{1,6}", vcpus_text) or not 1 <= int(vcpus_text) <= site.max_vcpus:
        raise SpecError("vcpus", vcpus_text, f"a whole number from 1 to {site.max_vcpus}")

    ram_text = options.get("ram", site.default_ram)
    low, high = parse_size_mib(site.min_ram), parse_size_mib(site.max_ram)
    try:
        ram = parse_size_mib(ram_text)
    except ValueError:
        ram = -1
    if not low <= ram <= high:
        raise SpecError("ram", ram_text, f"a size from {site.min_ram} to {site.max_ram}, e.g. 512M or 2G")

    return VMSpec(img=img, vcpus=int(vcpus_text), ram_mib=ram)
