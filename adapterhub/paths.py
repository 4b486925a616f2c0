"""Where adapterhub may write: one guard for every output path, and modes that follow the umask.

Every command that writes (pull, convert, blend ``-o``, export, ``--save-recipe``) and every
directory written through :func:`adapterhub.formats._files.atomic_directory` passes its target
through :func:`check_output` before anything is created or replaced. It refuses a target that is,
contains or lies inside

- a registry (found by its ``registry.json`` + ``blobs/``, or registered with :func:`reading`); only
  a staging entry this process created in its ``tmp/`` (the registry staging a push) may be written inside,
- the current directory or one of its parents (``-o .``, ``-o ..``),
- a source the command is reading (adapter directories, the base, recipe files: :func:`reading`).

Example:
    >>> with reading("my-lora", "llama-7b"):                 # doctest: +SKIP
    ...     check_output("my-lora/merged")                   # OutputPathError: lies inside a source
"""

from __future__ import annotations

import contextvars
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from adapterhub.errors import OutputPathError, StorageError, storage_error

#: paths the current command reads (or must otherwise never write over), with what they are
_GUARDED: contextvars.ContextVar[tuple[tuple[Path, str], ...]] = contextvars.ContextVar("adapterhub_guarded",
                                                                                        default=())
REGISTRY_MARKER = "registry.json"
#: a registry's staging folder: the one place inside a registry where writing is the registry's own business
STAGING = "tmp"


@contextmanager
def reading(*paths: str | Path | None, role: str = "a source this command reads") -> Iterator[None]:
    """While the block runs, :func:`check_output` refuses to write at, over or inside ``paths``.

    ``None`` entries are skipped; nested blocks add to the outer ones.
    """
    added = tuple((_absolute(p), role) for p in paths if p is not None and str(p) != "")
    token = _GUARDED.set(_GUARDED.get() + added)
    try:
        yield
    finally:
        _GUARDED.reset(token)


def shown(path: str | Path) -> str:
    """A path as a message shows it: as written, or quoted with escapes if it holds control characters
    (a newline in a name must not split the message)."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def guarded() -> tuple[tuple[Path, str], ...]:
    """The paths :func:`reading` blocks currently protect, with their roles."""
    return _GUARDED.get()


def check_output(target: str | Path, *, replace: bool = False, reads: tuple[str | Path, ...] = ()) -> Path:
    """Refuse ``target`` as an output path if writing there could destroy something; return it absolute.

    Args:
        replace: the caller will replace ``target`` if it exists (``--force``): a registry anywhere
            inside it is then looked for too.
        reads: more paths the caller reads, besides those of the enclosing :func:`reading` blocks.

    Raises:
        OutputPathError: what the target is, contains or lies inside, and what to do instead.
    """
    given = shown(target)
    if str(target) == "" or "\0" in str(target):
        raise OutputPathError(f"{given!r} is not a usable output path.\n  fix: name a new folder, e.g. ./out.",
                              path=None)
    lexical = _absolute(target)
    real = _resolved(lexical)
    here = _resolved(Path.cwd())
    for t in {lexical, real}:
        if t == here or _inside(here, t):
            what = "the current directory" if t == here else "a parent of the current directory"
            raise OutputPathError(
                f"{given} is {what}; adapterhub never writes over it (it would replace the folder you are in).\n"
                f"  fix: name a new folder for the output, e.g. {_suggest(given)}.", path=lexical)
    protected = [(_resolved(p), role) for p, role in _GUARDED.get()]
    protected += [(_resolved(_absolute(p)), "a source this command reads") for p in reads]
    for t in {lexical, real}:
        for p, role in protected:
            if t == p:
                what, fix = role, "choose a new output path"
            elif _inside(p, t):
                what, fix = f"contains {role} ({p})", f"choose an output path that does not contain {p}"
            elif _inside(t, p):
                what, fix = f"lies inside {role} ({p})", f"choose an output path outside {p}"
            else:
                continue
            what = f"is {what}" if t == p else what
            raise OutputPathError(f"{given} {what}; writing there could destroy it.\n  fix: {fix}.", path=lexical)
        registry = _registry_at_or_above(t)
        if registry is not None and not _own_staging(t, registry):  # the registry's own staging writes
            relation = "is" if registry == t else "lies inside"
            raise OutputPathError(
                f"{given} {relation} the adapterhub registry at {registry}; writing there would damage it.\n"
                "  fix: choose an output path outside the registry (`adapterhub pull` copies a version out).",
                path=lexical)
        if replace:
            inner = _registry_below(t)
            if inner is not None:
                raise OutputPathError(
                    f"{given} contains the adapterhub registry at {inner}; replacing it would delete the registry.\n"
                    "  fix: choose another output path.", path=lexical)
    return lexical


def registry_enclosing(path: str | Path) -> Path | None:
    """The registry that ``path`` lies strictly inside (as written or with symlinks resolved), or None.

    A registry made there would be a foreign entry of that one (in its ``blobs/``, ``refs/`` ...)."""
    lexical = _absolute(path)
    for p in {lexical, _resolved(lexical)}:
        found = _registry_at_or_above(p.parent) if p.parent != p else None
        if found is not None:
            return found
    return None


def check_new_file(path: str | Path, *, what: str = "file", overwrite: bool = False) -> Path:
    """Check a single output file before any work: the guard of :func:`check_output`, an existing
    parent folder, no directory at ``path``, and no file there unless ``overwrite``.

    Raises:
        OutputPathError: refused by the guard, the folder is missing, ``path`` is a directory, or it
            exists and ``overwrite`` is false.
    """
    path = check_output(path, replace=True)
    if path.exists() and not path.is_dir() and not overwrite:
        raise OutputPathError(f"{shown(path)} already exists.\n  fix: choose a new file name, or pass "
                              "overwrite=True (CLI: --force) to replace it.", path=path)
    if overwrite and not path.is_symlink() and path.exists() and not path.is_dir() and not _replaceable_file(path):
        raise OutputPathError(
            f"{shown(path)} exists and is not an adapterhub {what}; overwrite (--force) replaces only an earlier "
            f"{what} (or an empty file), so nothing else is ever lost.\n  fix: choose a new file name, or remove "
            f"{shown(path)} yourself first if it really should go.", path=path)
    if path.is_dir():
        raise OutputPathError(f"{path} is a directory; the {what} is a file.\n  fix: give a file name, e.g. "
                              f"{path / 'recipe.json'}.", path=path)
    if not path.parent.is_dir():
        raise OutputPathError(f"the folder {path.parent} for the {what} does not exist.\n  fix: create it first "
                              f"(mkdir -p {path.parent}) or choose another path.", path=path)
    return path


@contextmanager
def pending_text_file(path: str | Path, *, what: str = "file", overwrite: bool = False
                      ) -> Iterator[Callable[[str], Path]]:
    """Reserve an output file before long work, write it after: the temp file beside ``path`` is
    created on entry (so a read-only or missing place fails at once), and the yielded
    ``commit(text)`` writes it and renames it into place. Without a commit nothing is left behind.

    Raises:
        OutputPathError: see :func:`check_new_file`.
        StorageError: the file system refused the file (read-only, full, permissions).
    """
    path = check_new_file(path, what=what, overwrite=overwrite)
    remove_dead_leftovers(path.parent)
    tmp = path.with_name(f".{path.name}.{writer_tag()}.tmp")
    with _storage(f"writing the {what} {path}", path.parent):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)

    def commit(text: str) -> Path:
        with _storage(f"writing the {what} {path}", path.parent), os.fdopen(os.dup(fd), "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)
        return path

    try:
        yield commit
    finally:
        os.close(fd)
        tmp.unlink(missing_ok=True)


def write_text_file(path: str | Path, text: str, *, what: str = "file", overwrite: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically (a temp file beside it, then a rename), mode per the umask.

    Raises:
        OutputPathError: see :func:`check_new_file`.
        StorageError: the file system refused the write (read-only, full, permissions).
    """
    with pending_text_file(path, what=what, overwrite=overwrite) as commit:
        return commit(text)


#: what an existing directory holds at its top when adapterhub may replace it (--force): an adapter
#: (PEFT, the `adapters` library, adapterhub) or a model checkpoint, i.e. something it could have written
OUTPUT_MARKERS = ("adapter_config.json", "adapterhub.json", "config.json")
#: never replaced, whatever they hold: the file system's top-level folders and the home directory
_SYSTEM = ("/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/media", "/mnt", "/opt",
           "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var")


def check_replaceable(target: str | Path) -> None:
    """Refuse to replace (``--force``) an existing directory that adapterhub cannot have written: one without
    an adapter or model config at its top (:data:`OUTPUT_MARKERS`), a git work tree, one holding a registry
    anywhere inside, a mount point, a top-level system folder or the home directory. A symbolic link is
    always replaceable: only the link goes, not what it names.

    Raises:
        OutputPathError: what the directory is, and what to do instead.
    """
    target = _absolute(target)
    if target.is_symlink() or not target.is_dir():
        return
    home = _resolved(_absolute("~"))
    real = _resolved(target)
    if str(real) in _SYSTEM or real == home or str(target) in _SYSTEM or target == home or os.path.ismount(real):
        what = "the home directory" if home in (real, target) else "a system folder or mount point"
        raise OutputPathError(f"{shown(target)} is {what}; adapterhub never replaces it.\n  fix: name a new folder "
                              "for the output, e.g. ./out.", path=target)
    try:
        ours = any((target / m).is_file() for m in OUTPUT_MARKERS)
        repository = os.path.lexists(target / ".git")
    except OSError:
        ours, repository = False, False
    if repository:
        raise OutputPathError(f"{shown(target)} is a git work tree; adapterhub never replaces one (its history would "
                              "go).\n  fix: choose a new output path.", path=target)
    inner = _registry_below(target)
    if inner is not None:
        raise OutputPathError(
            f"{shown(target)} contains the adapterhub registry at {inner}; replacing it would delete the registry.\n"
            "  fix: choose another output path.", path=target)
    if not ours:
        raise OutputPathError(
            f"{shown(target)} exists and holds no adapter or model (no {', '.join(OUTPUT_MARKERS)}); overwrite "
            "(--force) replaces only a directory adapterhub could have written, so nothing else is ever lost.\n"
            f"  fix: choose a new output path, or remove {shown(target)} yourself first if it really should go.",
            path=target)


def _replaceable_file(path: Path) -> bool:
    """An existing file ``--force`` may replace: a regular file that is empty or holds an adapterhub recipe."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            return False
        if st.st_size == 0:
            return True
        if st.st_size > 1 << 20:
            return False
        from adapterhub import _json

        doc = _json.loads(path.read_bytes())
        return isinstance(doc, dict) and str(doc.get("recipe", "")).startswith("adapterhub.recipe")
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def writer_tag() -> str:
    """What names this process's temporary files beside an output: ``adapterhub-<pid>@<host>``."""
    return f"adapterhub-{os.getpid()}@{_host()}"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:old-)?adapterhub-(?P<pid>\d+)@(?P<host>[A-Za-z0-9_-]+)"
                       r"(?:\.[A-Za-z0-9_]+)?\.tmp$")


def remove_dead_leftovers(folder: str | Path) -> list[Path]:
    """Remove what killed adapterhub processes left in ``folder`` beside their outputs: temporary output
    directories and files (``.<name>.adapterhub-<pid>@<host>.<random>.tmp``) and replaced outputs not yet
    deleted (``.<name>.old-adapterhub-<pid>@<host>.tmp``, only when ``<name>`` exists again), of processes of
    this host that are gone. Entries of running processes and of other hosts are never touched.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    host = _host()
    for entry in entries:
        m = _LEFTOVER.match(entry.name)
        if m is None or m.group("host") != host or _alive(int(m.group("pid"))):
            continue
        path = Path(entry.path)
        if ".old-adapterhub-" in entry.name and not os.path.lexists(path.with_name(m.group("name"))):
            continue  # the previous output, and no new one in its place (killed between the two renames): keep it
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except OSError:
            continue
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def probe_directory(target: str | Path) -> None:
    """Fail now, not after long work, if a directory cannot be created where ``target`` will be: a
    temporary folder is made and removed in the nearest existing folder above it.

    Raises:
        StorageError: the place is read-only, full, not writable, or accepts no folders (``/proc``).
    """
    target = _absolute(target)
    where = next((a for a in target.parents if a.is_dir()), Path("/"))
    with _storage(f"creating {target}", where):
        os.rmdir(tempfile.mkdtemp(prefix=f".{target.name}.{writer_tag()}.", suffix=".tmp", dir=where))


@contextmanager
def _storage(what: str, where: Path) -> Iterator[None]:
    """OSErrors become a :class:`StorageError` naming ``what`` and ``where`` with a fix."""
    try:
        yield
    except StorageError:
        raise
    except OSError as e:
        raise storage_error(e, what, str(where)) from e


def umask() -> int:
    """The process umask, read without changing it where the system allows (Linux: /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but only a fallback)
    os.umask(mask)
    return mask


def dir_mode() -> int:
    """The mode a new directory gets under the umask (0755 under umask 022)."""
    return 0o777 & ~umask()


# --- helpers ---------------------------------------------------------------------------------------


def _absolute(p: str | Path) -> Path:
    """Absolute and normalised (``..`` folded) without following symlinks."""
    return Path(os.path.abspath(os.path.expanduser(str(p))))


def _resolved(p: Path) -> Path:
    try:
        return p.resolve()
    except (OSError, RuntimeError):  # a symlink loop: compare the path as written
        return p


def _inside(inner: Path, outer: Path) -> bool:
    """``inner`` lies strictly inside ``outer``."""
    return inner != outer and inner.is_relative_to(outer)


def _is_registry(d: Path) -> bool:
    try:
        return (d / REGISTRY_MARKER).is_file() and (d / "blobs").is_dir()
    except OSError:
        return False


def _registry_at_or_above(p: Path) -> Path | None:
    for d in (p, *p.parents):
        if _is_registry(d):
            return d
    return None


def _own_staging(p: Path, registry: Path) -> bool:
    """``p`` lies inside a staging entry this process already created in the registry's ``tmp/``
    (``tmp/w<pid>-<hex>.<purpose>...``): the registry writing its own staging copy, never a user's output."""
    if not _inside(p, registry / STAGING):
        return False
    entry = registry / STAGING / p.relative_to(registry / STAGING).parts[0]
    return entry != p and entry.name.startswith(f"w{os.getpid()}-") and entry.is_dir() and not entry.is_symlink()


def _registry_below(p: Path) -> Path | None:
    """A registry anywhere inside the directory ``p`` (symlinks not followed)."""
    if not p.is_dir() or p.is_symlink():
        return None
    for top, dirs, files in os.walk(p, onerror=lambda e: None):
        if REGISTRY_MARKER in files and "blobs" in dirs:
            return Path(top)
    return None


def _suggest(given: str) -> str:
    return "./out" if given.rstrip("/") in (".", "") else f"{given.rstrip('/')}/out"
