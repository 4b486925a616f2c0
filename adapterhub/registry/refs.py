"""Adapter names and references: ``NAME``, ``NAME@VERSION``, ``NAME@TAG``, ``NAME@sha256:HEX``.

Names are ``namespace/name`` or ``name``; every part, version and tag is lower-case
``[a-z0-9][a-z0-9._-]*`` (at most 64 characters, no ``..``). They become path components in the
registry, so everything else is rejected before anything touches disk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from adapterhub.errors import InvalidReferenceError

_PART = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
LATEST = "latest"


def _check_part(part: str, what: str, whole: str) -> str:
    if not _PART.fullmatch(part) or ".." in part:
        shown = part if part.isascii() else part.encode("unicode_escape").decode()
        raise InvalidReferenceError(
            f"invalid {what} {shown!r} in {whole!r}: use lower-case letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, at most 64 characters, no '..'.", ref=whole)
    return part


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid adapter name (``namespace/name`` or ``name``)."""
    if not isinstance(name, str) or not name:
        raise InvalidReferenceError("an adapter name cannot be empty.", ref=str(name))
    parts = name.split("/")
    if len(parts) > 2:
        raise InvalidReferenceError(f"invalid name {name!r}: at most one '/' (namespace/name).", ref=name)
    for p in parts:
        _check_part(p, "name part", name)
    return name


def check_label(label: str, what: str = "version") -> str:
    """Return a version or tag name if valid."""
    return _check_part(label, what, label)


def is_integer_version(version: str) -> bool:
    return version.isdigit() and not (len(version) > 1 and version.startswith("0"))


@dataclass(frozen=True)
class Ref:
    """A parsed reference: a name and at most one of a label (version or tag) or a digest."""

    name: str
    label: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        if self.digest:
            return f"{self.name}@{self.digest}"
        return f"{self.name}@{self.label or LATEST}"


def parse_ref(text: str) -> Ref:
    """Parse ``NAME[@VERSION|@TAG|@sha256:HEX]``; a bare ``NAME`` means ``NAME@latest``.

    Raises:
        InvalidReferenceError: for anything else, before any file is touched.
    """
    if not isinstance(text, str) or not text.strip():
        raise InvalidReferenceError("a reference cannot be empty; use NAME, NAME@VERSION, NAME@TAG or "
                                    "NAME@sha256:HEX.", ref=str(text))
    name, sep, rest = text.partition("@")
    check_name(name)
    if not sep:
        return Ref(name=name)
    if rest.startswith("sha256:"):
        if not _DIGEST.fullmatch(rest):
            raise InvalidReferenceError(f"invalid digest in {text!r}: expected sha256: and 64 hex digits.", ref=text)
        return Ref(name=name, digest=rest)
    if "@" in rest:
        raise InvalidReferenceError(f"invalid reference {text!r}: one '@' at most.", ref=text)
    return Ref(name=name, label=check_label(rest, "version or tag"))


def check_target(target: str) -> tuple[str, str | None]:
    """Validate a push target ``NAME[@VERSION]``; returns (name, version or None)."""
    name, sep, version = target.partition("@")
    check_name(name)
    if sep:
        check_label(version, "version")
        if version == LATEST or version.startswith("sha256"):
            raise InvalidReferenceError(f"'{version}' cannot be a version name.", ref=target)
    return name, version or None
