"""Every exception adapterhub raises, under one root.

Each message says what happened, where, and what to do about it. Specific classes also inherit
the matching standard-library type so that ``except FileNotFoundError`` keeps working.
"""

from __future__ import annotations

import errno
from pathlib import Path


class AdapterHubError(Exception):
    """Root of every error raised by adapterhub."""


# --- input files ---------------------------------------------------------------------------------


class FormatError(AdapterHubError, ValueError):
    """An adapter or checkpoint directory could not be read or written."""

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)


class UnknownFormatError(FormatError):
    """A directory holds no adapter format that adapterhub recognises."""


class MissingFileError(FormatError, FileNotFoundError):
    """A file the format requires is not there."""


class CorruptFileError(FormatError):
    """A weights or config file is truncated, malformed or lies about its own contents."""


class PickleRefusedError(FormatError):
    """A pickle (``.bin``/``.pt``) weights file was found and loading pickles was not allowed."""


class UnsupportedAdapterError(FormatError):
    """The adapter uses a feature adapterhub cannot represent exactly."""


# --- base checkpoints ----------------------------------------------------------------------------


class BaseCheckpointError(AdapterHubError, ValueError):
    """A base-model checkpoint directory could not be read."""

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)


# --- composition ---------------------------------------------------------------------------------


class CompatibilityError(AdapterHubError, ValueError):
    """Adapters and a base (or adapters among themselves) do not fit together.

    ``report`` holds the full :class:`adapterhub.compose.checks.Report`.
    """

    def __init__(self, message: str, *, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report


# --- composition, recipes, export (h10-cli: moved here from their modules) ------------------------


class BlendError(AdapterHubError, ValueError):
    """A blend was asked for with options or inputs it cannot honour."""


class BlendOptionError(BlendError):
    """A blend method was given an option it does not take, or a value of the wrong type; nothing ran."""


class MergeError(AdapterHubError, ValueError):
    """Adapters could not be folded into the base (unfoldable kind, non-finite result)."""


class RecipeError(AdapterHubError, ValueError):
    """A recipe file is malformed or names sources that cannot be found."""


class ExportError(AdapterHubError, ValueError):
    """An export could not be done; nothing was written at the target."""


class Aborted(AdapterHubError):
    """Internal: another thread of the same streaming pipeline failed, so this one stops; the first
    thread's error is the one raised to the caller."""

    def __init__(self, message: str = "stopped because another part of the same operation failed.") -> None:
        super().__init__(message)


# --- registry --------------------------------------------------------------------------------------


class RegistryError(AdapterHubError):
    """A registry operation failed."""


class InvalidReferenceError(RegistryError, ValueError):
    """A name, version, tag or reference is malformed; nothing was touched."""

    def __init__(self, message: str, *, ref: str | None = None) -> None:
        super().__init__(message)
        self.ref = ref


class NotFoundError(RegistryError, LookupError):
    """A reference names no version in the registry."""

    def __init__(self, message: str, *, ref: str | None = None) -> None:
        super().__init__(message)
        self.ref = ref


class VersionExistsError(RegistryError, FileExistsError):
    """A version already exists with different content; versions are immutable."""

    def __init__(self, message: str, *, ref: str | None = None) -> None:
        super().__init__(message)
        self.ref = ref


class IntegrityError(RegistryError):
    """Stored content does not hash to its recorded digest."""

    def __init__(self, message: str, *, path: str | Path | None = None, expected: str | None = None,
                 actual: str | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)
        self.expected = expected
        self.actual = actual


# --- storage and output paths (h10-cli) -----------------------------------------------------------


class StorageError(AdapterHubError, OSError):
    """Reading or writing files failed (disk full, read-only, permissions); nothing half-written was left.

    The root of adapterhub's I/O errors: raised by the registry, export, pull, convert and blend
    outputs alike, and still caught by ``except OSError`` (``errno`` and ``filename`` are the original ones).
    """

    def __str__(self) -> str:  # the message, whatever errno/filename say (OSError would reformat it)
        return str(self.args[0]) if self.args else ""


class OutputPathError(AdapterHubError, ValueError):
    """An output path was refused before anything was written: it is, contains or lies inside
    something the command must not replace (the registry, the current directory, a source it reads),
    or it already exists and replacing it was not asked for."""

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)


def storage_error(e: OSError, what: str, where: str = "the registry directory") -> StorageError:
    """A :class:`StorageError` for an OSError met while ``what``, with a hint (disk full, permissions)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "the disk is full; free space and retry (nothing half-written was kept)"
    elif e.errno == errno.EROFS:
        hint = f"{where} is on a read-only file system; write somewhere else"
    elif e.errno == errno.ENOENT:
        hint = f"check that {where} exists and accepts new files (/proc and /sys do not); write somewhere else"
    elif e.errno in (errno.EACCES, errno.EPERM):
        hint = f"permission denied; check that you may write to {where}"
    elif e.errno == errno.EXDEV:
        hint = ("hard links cannot cross file systems (or bind mounts): write the output on the registry's file "
                "system, or copy instead (pull without --link)")
    else:
        hint = f"check the file system of {where}"
    err = StorageError(f"{what} failed: {e.strerror or e}.\n  fix: {hint}.")
    err.errno = e.errno
    err.filename = e.filename
    return err


# --- registry and input hardening (issue 10, part B) ------------------------------------------------


class UnsafeLinkError(FormatError):
    """A symbolic link inside an adapter folder points outside it; adapterhub does not follow it."""

    def __init__(self, message: str, *, path: str | Path | None = None, target: str | Path | None = None) -> None:
        super().__init__(message, path=path)
        self.target = None if target is None else Path(target)


class AmbiguousReferenceError(InvalidReferenceError):
    """A digest prefix matches more than one version; ``candidates`` lists them."""

    def __init__(self, message: str, *, ref: str | None = None, candidates: tuple[str, ...] = ()) -> None:
        super().__init__(message, ref=ref)
        self.candidates = candidates


# --- runtime composition (adapterhub.runtime) ------------------------------------------------------


class CompositionError(AdapterHubError, ValueError):
    """A composition tree is malformed (an empty block, wrong weights, a kind a block cannot hold).

    Raised before anything touches the model.
    """


class AttachError(CompatibilityError):
    """A composition does not fit the live model; the model was left exactly as it was.

    ``reports`` holds one :class:`adapterhub.compose.checks.Report` per adapter that failed (the
    report ``adapterhub check`` prints, plus what the runtime cannot run); ``report`` is the first.
    """

    def __init__(self, message: str, *, reports: list[object] | None = None) -> None:
        reports = list(reports or [])
        super().__init__(message, report=reports[0] if reports else None)
        self.reports = reports


class AttachedStateError(AdapterHubError, RuntimeError):
    """An operation does not fit the state of an attachment (detached already, a second attachment on
    one model, a module's forward replaced by someone else after attaching)."""


# --- values: NaN/Inf and wrong types in weights or configs (hardening: correctness) -----------------


class InvalidValueError(CorruptFileError):
    """A value an adapter computes with is unusable: a boolean or text where a number belongs, a rank
    below 1, a pattern that is not a valid regular expression. ``where`` names the field or tensor."""

    def __init__(self, message: str, *, path: str | Path | None = None, where: str | None = None) -> None:
        super().__init__(message, path=path)
        self.where = where


class NonFiniteError(InvalidValueError):
    """NaN or Inf in an adapter's weights or in a number of its config (``lora_alpha``, a pattern value).

    ``counts`` maps each offending tensor (or config field) to its number of non-finite values.
    """

    def __init__(self, message: str, *, path: str | Path | None = None, where: str | None = None,
                 counts: dict[str, int] | None = None) -> None:
        super().__init__(message, path=path, where=where)
        self.counts = dict(counts or {})

# --- extraction of full fine-tunes (adapterhub.extraction) ----------------------------------------


class ExtractError(AdapterHubError, ValueError):
    """A full fine-tune could not be turned into a LoRA; nothing was written."""


class CheckpointMismatchError(ExtractError):
    """Base and fine-tune differ in architecture, tensor names or shapes beyond a resized vocabulary."""


class NotAFineTuneError(ExtractError):
    """The "fine-tune" differs from the base as much as an unrelated model does.

    ``module`` is the first module over the threshold, ``change`` its relative change
    ``||tuned - base|| / ||base||`` and ``threshold`` the limit it exceeded.
    """

    def __init__(self, message: str, *, module: str, change: float, threshold: float) -> None:
        super().__init__(message)
        self.module = module
        self.change = change
        self.threshold = threshold


class NonFiniteWeightsError(ExtractError):
    """A checkpoint holds NaN or Inf in a tensor that differs between base and fine-tune."""

    def __init__(self, message: str, *, tensor: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.tensor = tensor
        self.path = None if path is None else Path(path)


class UnrepresentableChangeError(ExtractError):
    """Tensors changed in ways a PEFT LoRA cannot carry; ``tensors`` names each of them."""

    def __init__(self, message: str, *, tensors: list[str]) -> None:
        super().__init__(message)
        self.tensors = list(tensors)


# --- remotes: S3, shared directories, the Hugging Face Hub (issue 12) ------------------------------


class RemoteError(RegistryError):
    """A remote registry cannot be used as asked: an unknown remote name, a malformed URL, a missing
    optional dependency (``adapterhub[s3]``), or a Hub repository that holds no adapter."""

    def __init__(self, message: str, *, remote: str | None = None) -> None:
        super().__init__(message)
        self.remote = remote


class UnsafeRemoteError(RemoteError):
    """The server ignores conditional writes (``If-None-Match: *`` / ``If-Match``), so two publishers
    could both create one version: refused at ``remote add``. ``failed`` names the checks that failed."""

    def __init__(self, message: str, *, remote: str | None = None, failed: tuple[str, ...] = ()) -> None:
        super().__init__(message, remote=remote)
        self.failed = failed


class VersionConflictError(VersionExistsError):
    """Copying a version between registries: the destination holds the same number with other content.
    ``ours`` is the digest being copied, ``theirs`` the one already there."""

    def __init__(self, message: str, *, ref: str | None = None, ours: str | None = None,
                 theirs: str | None = None) -> None:
        super().__init__(message, ref=ref)
        self.ours = ours
        self.theirs = theirs


# --- multi-tenant serving (adapterhub.runtime.pool, issue 14) ---------------------------------------


class PoolError(AdapterHubError, ValueError):
    """A batch (or a pool operation) the adapter pool refuses; it is refused before anything runs, and no
    slot, no weight and no earlier state changes.

    ``row`` is the batch row at fault (None when the fault is not one row's), ``ref`` what that row
    named, ``reports`` the compatibility reports when the adapter does not fit the model.
    """

    def __init__(self, message: str, *, row: int | None = None, ref: str | None = None,
                 reports: list[object] | None = None) -> None:
        super().__init__(message)
        self.row = row
        self.ref = ref
        self.reports = list(reports or [])


class VllmOptionError(AdapterHubError, ValueError):
    """A vLLM option adapterhub was asked to check against is not one vLLM accepts (``--max-lora-rank``)."""
