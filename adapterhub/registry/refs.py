"""Adapter names and references: ``NAME``, ``NAME@VERSION``, ``NAME@TAG``, ``NAME@sha256:HEX``.

``HEX`` is the manifest digest or a prefix of it of at least 8 digits that names one version.

Names are ``namespace/name`` or ``name``; every part, version and tag is lower-case
``[a-z0-9][a-z0-9._-]*`` (at most 64 characters, no ``..``). They become path components in the
registry, so everything else is rejected before anything touches disk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from adapterhub.errors import InvalidReferenceError

_PART = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{8,64}")
#: the shortest digest prefix a reference may use (``NAME@sha256:73f0f5ab``)
MIN_DIGEST_PREFIX = 8
LATEST = "latest"
#: tags that read as booleans (or null) to YAML/JSON tooling
_WORD_TAGS = frozenset({"true", "false", "null"})


def _check_part(part: str, what: str, whole: str) -> str:
    if not _PART.fullmatch(part) or ".." in part:
        shown = _short(part if part.isascii() else part.encode("unicode_escape").decode())
        suggest = re.sub(r"\.{2,}", ".", re.sub(r"[^a-z0-9._-]+", "-", part.lower())).strip("-._")[:64] or "adapter"
        raise InvalidReferenceError(
            f"invalid {what} {shown!r} in {_short(whole)!r}: use lower-case letters, digits, '.', '_' and '-', "
            f"starting with a letter or digit, at most 64 characters, no '..'.\n  fix: write it as e.g. {suggest!r}.",
            ref=whole)
    return part


def _short(text: str) -> str:
    """``text`` cut for a message (a 5,000-character name must not flood the terminal)."""
    return text if len(text) <= 80 else f"{text[:60]}...({len(text)} characters)"


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid adapter name (``namespace/name`` or ``name``)."""
    if not isinstance(name, str) or not name:
        raise InvalidReferenceError("an adapter name cannot be empty.\n  fix: give a name such as team/sentiment.",
                                    ref=str(name))
    parts = name.split("/")
    if len(parts) > 2:
        raise InvalidReferenceError(f"invalid name {_short(name)!r}: at most one '/' (namespace/name).\n  fix: join "
                                    "the rest with '-', e.g. team/project-sentiment.", ref=name)
    for p in parts:
        _check_part(p, "name part", name)
    return name


def check_label(label: str, what: str = "version") -> str:
    """Return a version or tag name if valid."""
    return _check_part(label, what, label)


def is_integer_version(version: str) -> bool:
    return version.isdigit() and not (len(version) > 1 and version.startswith("0"))


def reads_as_number(text: str) -> bool:
    """True for labels a program would read as a number (``01``, ``1.0``, ``1e3``, ``inf``, ``nan``)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_tag(tag: str) -> str:
    """Return ``tag`` if it may name a tag: a valid label that reads as neither a number, a boolean
    nor a digest (numbers are versions; ``true``/``1e3`` would change meaning in YAML or JSON tooling).

    Raises:
        InvalidReferenceError: before anything is touched.
    """
    check_label(tag, "tag")
    if tag.startswith("sha256"):
        raise InvalidReferenceError(f"tag '{tag}' would read as a digest.\n  fix: choose a tag that does not "
                                    "start with 'sha256'.", ref=tag)
    if reads_as_number(tag):
        raise InvalidReferenceError(
            f"tag '{tag}' reads as a number; numbers are reserved for versions.\n  fix: start the tag with a "
            f"letter, e.g. 'v{tag}'.", ref=tag)
    if tag in _WORD_TAGS:
        raise InvalidReferenceError(
            f"tag '{tag}' reads as a {'boolean' if tag != 'null' else 'null'} to YAML and JSON tools.\n"
            f"  fix: choose another word, e.g. 'is-{tag}'.", ref=tag)
    return tag


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
        raise InvalidReferenceError("a reference cannot be empty.\n  fix: use NAME, NAME@VERSION, NAME@TAG or "
                                    "NAME@sha256:HEX (`adapterhub list` shows them).", ref=str(text))
    name, sep, rest = text.partition("@")
    check_name(name)
    if not sep:
        return Ref(name=name)
    if rest.startswith("sha256:"):
        if not _DIGEST.fullmatch(rest):
            raise InvalidReferenceError(
                f"invalid digest in {_short(text)!r}: expected sha256: and {MIN_DIGEST_PREFIX} to 64 lower-case hex "
                f"digits.\n  fix: copy it from `adapterhub list {name} --json` (a unique prefix of at least "
                f"{MIN_DIGEST_PREFIX} digits is enough).", ref=text)
        return Ref(name=name, digest=rest)
    if "@" in rest:
        raise InvalidReferenceError(f"invalid reference {_short(text)!r}: one '@' at most.\n  fix: write NAME@VERSION "
                                    "or NAME@TAG.", ref=text)
    return Ref(name=name, label=check_label(rest, "version or tag"))


def check_target(target: str) -> tuple[str, str | None]:
    """Validate a push target ``NAME[@VERSION]``; returns (name, version or None)."""
    name, sep, version = target.partition("@")
    check_name(name)
    if sep:
        check_label(version, "version")
        if version == LATEST or version.startswith("sha256"):
            raise InvalidReferenceError(f"'{version}' cannot be a version name.\n  fix: push without @VERSION to get "
                                        "the next number, or choose another version.", ref=target)
    return name, version or None
