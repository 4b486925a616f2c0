"""Merged-checkpoint export: a base checkpoint with adapters folded in, written as a standard sharded
safetensors checkpoint (``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``) that
transformers and vLLM load as is.

Streaming: every output header is computed up front from the base's headers, then tensors are read,
folded and written in order by three threads (disk reads, folding, disk writes overlap), through a
few pooled buffers: peak memory is a few tensors whatever the model's size. Shards are read and
written with direct I/O where the file system allows (:mod:`adapterhub.streamio`). The checkpoint is
built in a directory beside the target and renamed into place: an interrupted export leaves nothing
at the target.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import queue
import re
import shutil
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.adapter import Adapter
from adapterhub.base import BaseCheckpoint
from adapterhub.compose.merge import MergePlan, fold, plan_merge
from adapterhub.dtypes import st_to_torch
from adapterhub.errors import ExportError, storage_error
from adapterhub.tensorfile import DTYPE_SIZES, FLOAT_DTYPES, TensorInfo

if TYPE_CHECKING:
    import torch

#: top-level files of the base that hold its weights (rewritten by the export, or stale copies of the
#: unmerged weights in another format): never carried; every other file of the base is
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".ot")
WEIGHT_INDEX = re.compile(r".+\.(safetensors|bin|pt|pth|h5|msgpack)\.index\.json")
#: top-level folders of the base holding converted copies of its unmerged weights: never carried
STALE_DIRS = ("onnx", "openvino")
DTYPE_NAMES = {"float32": "F32", "fp32": "F32", "float16": "F16", "fp16": "F16", "bfloat16": "BF16", "bf16": "BF16"}


def import_torch_in_background() -> None:
    """Start importing torch in a daemon thread (unless it is imported already): an export needs it only
    to fold, so reading the adapters, checking them, planning and the first disk reads overlap the
    import, which takes seconds on a small machine. A later ``import torch`` waits for it to finish."""
    if "torch" in sys.modules:
        return
    threading.Thread(target=importlib.import_module, args=("torch",), name="adapterhub-import-torch",
                     daemon=True).start()


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"500MiB"`` -> 524_288_000, ints pass through."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ExportError(f"cannot read the size {text!r}.\n  fix: write a number with a unit, e.g. 5GB, 500MB, "
                          "2GiB.")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0]) if unit[0] in "KMGT" else 0
    return int(float(m.group(1)) * base**power)


@dataclass
class ExportResult:
    """Where the checkpoint went and what it holds."""

    path: Path
    shards: list[str]
    total_size: int
    folded: list[str]
    unmerged: list[str] = field(default_factory=list)
    #: files of the base copied beside the weights (relative paths)
    carried: list[str] = field(default_factory=list)
    #: what the user should know: files left out and why, a missing config.json
    warnings: list[str] = field(default_factory=list)


def _shard_plan(tensors: list[tuple[str, str, tuple[int, ...]]], max_shard_size: int) -> list[list[int]]:
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, dtype, shape) in enumerate(tensors):
        nbytes = math.ceil(math.prod(shape) * DTYPE_SIZES[dtype])
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def _header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, list[int]]:
    """Serialized safetensors header (padded to 8 bytes) and each tensor's byte size."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset, sizes = 0, []
    for name, dtype, shape in entries:
        nbytes = math.ceil(math.prod(shape) * DTYPE_SIZES[dtype])
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        sizes.append(nbytes)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, sizes


def export_merged(base_dir: str | Path, adapters: Sequence[Adapter], out: str | Path, *,
                  weights: Sequence[float] | None = None, max_shard_size: str | int = "5GB",
                  dtype: str | None = None, keep_unmerged: bool = False, provenance: dict[str, Any] | None = None,
                  overwrite: bool = False, direct_io: bool = True) -> ExportResult:
    """Write ``base`` with ``adapters`` folded in as an HF-layout safetensors checkpoint at ``out``.

    Args:
        weights: one per adapter (LoRA deltas scale by it; IA3 needs 1).
        max_shard_size: e.g. ``"5GB"``; one ``model.safetensors`` when everything fits.
        dtype: output dtype of floating tensors (``bfloat16``, ``float16``, ``float32``); default the base's.
        keep_unmerged: write prefix/bottleneck adapters (which cannot be folded) beside the checkpoint
            under ``unmerged/`` instead of refusing.
        provenance: recorded in every shard's metadata and in the model card.
        direct_io: read and write the shards with ``O_DIRECT`` where the file system allows it
            (bypassing the page cache: much less CPU on large checkpoints); buffered otherwise.

    Raises:
        ExportError, MergeError, CompatibilityError, BaseCheckpointError: nothing is written at ``out``.

    Memory: five pooled buffers (reading, folding, writing), each at most one tensor or a 64 MiB
    row piece of a 2-d one, plus small fixed buffers: independent of the model's size.
    """
    from adapterhub.formats import write_adapter
    from adapterhub.formats._files import atomic_directory

    import_torch_in_background()
    base = BaseCheckpoint.open(base_dir)
    adapters = list(adapters)
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    foldable = [(a, w) for a, w in zip(adapters, weights, strict=True) if a.kind in ("lora", "ia3")]
    unfoldable = [a for a in adapters if a.kind not in ("lora", "ia3")]
    if unfoldable and not keep_unmerged:
        kinds = ", ".join(sorted({a.kind for a in unfoldable}))
        raise ExportError(f"{len(unfoldable)} adapter(s) of kind {kinds} cannot be folded into weights (they add "
                          "computation). Export refuses to drop them silently.\n  fix: pass --keep-unmerged to write "
                          "them beside the checkpoint under unmerged/, or export without them.")
    plan = plan_merge(base, [a for a, _ in foldable], [w for _, w in foldable]) if foldable else MergePlan([], [])
    out_dtype = None
    if dtype is not None:
        out_dtype = DTYPE_NAMES.get(dtype.lower())
        if out_dtype is None:
            raise ExportError(f"unknown dtype {dtype!r}.\n  fix: choose one of {', '.join(sorted(DTYPE_NAMES))} "
                              "(or leave it out to keep the base's).")
    names = list(base.tensors)  # base order: shard by shard as the base is laid out
    entries = []
    for n in names:
        info = base.tensors[n]
        dt = out_dtype if (out_dtype and info.dtype in FLOAT_DTYPES) else info.dtype
        entries.append((n, dt, info.shape))
    shards = _shard_plan(entries, parse_size(max_shard_size))
    provenance = dict(provenance or {})
    provenance.setdefault("base", str(base.path))
    provenance.setdefault("created_at", datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"))
    metadata = {"format": "pt", "adapterhub.provenance": json.dumps(provenance, sort_keys=True)}
    out = Path(out)
    files = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map: dict[str, str] = {}
    total = 0
    with atomic_directory(out, overwrite=overwrite) as tmp:
        plans = []
        for fname, idx in zip(files, shards, strict=True):
            # widest dtypes first, as safetensors lays files out: every tensor starts aligned to its dtype
            shard_entries = sorted((entries[i] for i in idx), key=lambda e: -DTYPE_SIZES[e[1]])
            head, sizes = _header(shard_entries, metadata)
            placed, offset = [], len(head)
            for (name, dt, _), nbytes in zip(shard_entries, sizes, strict=True):
                placed.append((base.tensors[name], dt, offset))
                offset += nbytes
                weight_map[name] = fname
                total += nbytes
            plans.append(_Shard(tmp / fname, head, placed, offset))
        try:
            _stream(plans, plan, direct=direct_io)
        except OSError as e:
            raise storage_error(e, f"writing the merged checkpoint to {out}", f"{out.parent}") from e
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        carried, warnings = _carry_files(base, tmp)
        if out_dtype and (tmp / "config.json").is_file():
            config = json.loads((tmp / "config.json").read_text())
            torch_name = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[out_dtype]
            for key in ("torch_dtype", "dtype"):
                if key in config or key == "torch_dtype":
                    config[key] = torch_name
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        unmerged = []
        for i, a in enumerate(unfoldable):
            label = re.sub(r"[^a-z0-9._-]+", "-", str(a.name or f"adapter-{i}").lower()).strip("-") or f"adapter-{i}"
            fmt = "adapters" if a.kind == "bottleneck" else "peft"
            if a.kind == "prefix" and a.spec.layout != "peft":
                fmt = "adapters"
            write_adapter(a, tmp / "unmerged" / f"{i:02d}-{label}", format=fmt)
            unmerged.append(f"unmerged/{i:02d}-{label}")
        (tmp / "README.md").write_text(_model_card(base, provenance, plan, unmerged), encoding="utf-8")
    return ExportResult(out, files, total, sorted(plan.folds), unmerged, carried, warnings)


def _stays_in_base(base: BaseCheckpoint, real: Path) -> bool:
    """A resolved symlink target inside the base directory, or inside the ``blobs/`` of the Hugging
    Face cache repository whose snapshot the base is."""
    root = base.path.resolve()
    allowed = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    return any(real.is_relative_to(a) for a in allowed)


def _carry_files(base: BaseCheckpoint, dest: Path) -> tuple[list[str], list[str]]:
    """Copy every file of the base except its weights (see :data:`WEIGHT_SUFFIXES`), its README (merged
    into the model card) and hidden folders (``.git``, ``.cache``) into ``dest``, keeping the layout
    (sentence-transformers' ``modules.json``, ``1_Pooling/`` ...). A symlink is followed only if it
    stays inside the base directory (or, for a Hugging Face cache snapshot, inside that repository's
    ``blobs/``); others are left out with a warning. Returns (carried, warnings)."""
    weights = {p.resolve() for p in base.files}
    carried, warnings = [], []
    if not (base.path / "config.json").is_file():
        warnings.append(f"{base.path} has no config.json, so the exported checkpoint has none either; "
                        "transformers cannot load it without one. Copy the base's config.json into it.")
    for top, dirs, files in os.walk(base.path):
        here = Path(top)
        rel_dir = here.relative_to(base.path)
        at_top = rel_dir == Path(".")
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (at_top and d in STALE_DIRS))
        for d in dirs:
            if (here / d).is_symlink():
                warnings.append(f"left out {(rel_dir / d).as_posix()}/: a symlinked folder is not followed.")
        dirs[:] = [d for d in dirs if not (here / d).is_symlink()]
        for name in sorted(files):
            src, rel = here / name, (rel_dir / name).as_posix()
            if at_top and (name.endswith(WEIGHT_SUFFIXES) or WEIGHT_INDEX.fullmatch(name) or name == "README.md"):
                continue
            real = src.resolve()
            if real in weights:
                continue
            if src.is_symlink() and not _stays_in_base(base, real):
                warnings.append(f"left out {rel}: a symlink to {real}, outside the base directory.")
                continue
            if not real.is_file():
                warnings.append(f"left out {rel}: not a regular file.")
                continue
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(real, dest / rel)
            carried.append(rel)
    return carried, warnings


@dataclass
class _Shard:
    """One output file: its header and, per tensor, the base tensor, output dtype and file offset."""

    path: Path
    head: bytes
    entries: list[tuple[TensorInfo, str, int]]
    size: int


#: untouched tensors are copied in pieces of at most this many bytes
RAW_CHUNK = 16 << 20
#: 2-d tensors are folded (and any tensor converted) in row pieces of at most this many input or
#: output bytes, which bounds memory for huge tensors
FOLD_PIECE = 64 << 20


def _row_pieces(rows: int, cols: int, in_dtype: str, out_dtype: str) -> list[tuple[int, int]]:
    """Row ranges of a ``rows x cols`` tensor, each at most :data:`FOLD_PIECE` bytes in and out."""
    row_bytes = math.ceil(cols * max(DTYPE_SIZES[in_dtype], DTYPE_SIZES[out_dtype]))
    step = max(1, FOLD_PIECE // max(row_bytes, 1))
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


def _fold_pieces(info: TensorInfo, out_dtype: str, folded: bool) -> list[tuple[tuple[int, int] | None,
                                                                              tuple[int, ...]]]:
    """``(rows, piece shape)`` to read and fold a tensor in: row pieces of a folded 2-d tensor, flat
    pieces of a tensor only converted to another dtype, else the whole tensor (``rows`` None)."""
    if folded and len(info.shape) == 2 and info.shape[0]:
        return [((a, b), (b - a, info.shape[1])) for a, b in _row_pieces(*info.shape, info.dtype, out_dtype)]
    if not folded and info.numel:  # conversion only: element-wise, any shape splits as a column
        return [(None, (b - a, 1)) for a, b in _row_pieces(info.numel, 1, info.dtype, out_dtype)]
    return [(None, info.shape)]


def fold_workers() -> int:
    """Threads that fold at once: one per usable CPU (at most 8), each running torch single-threaded."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def _stream(shards: list[_Shard], plan: MergePlan, *, direct: bool, workers: int | None = None) -> None:
    """Write every shard: a reader thread fetches base bytes, ``workers`` threads fold pieces (each
    with torch single-threaded: no OpenMP team to wait on when other processes share the cores), a
    writer thread writes the pieces in file order; reads, folds and writes overlap. Memory is
    ``2 * workers + 4`` pooled buffers, each at most :data:`FOLD_PIECE` (or one tensor that is folded
    but not 2-d: a bias, a convolution).

    Every buffer is acquired by the reader, in file order, so the piece the writer waits for always
    holds its buffers: no thread can wait on another in a cycle. Raises the first error of any thread
    (the others stop at their next step).
    """
    from adapterhub.streamio import ALIGN, Aborted, BufferPool, DirectReader, DirectWriter

    workers = workers or fold_workers()
    abort = threading.Event()
    errors: list[BaseException] = []
    in_pool, out_pool = BufferPool(workers + 2, abort), BufferPool(workers + 2, abort)
    to_fold: queue.SimpleQueue[tuple[int, Any, Any, Any] | None] = queue.SimpleQueue()
    ready: dict[int, tuple[str, Any, Any]] = {}  # sequence number -> message for the writer
    ready_cv = threading.Condition()

    def post(seq: int, msg: tuple[str, Any, Any]) -> None:
        with ready_cv:
            ready[seq] = msg
            ready_cv.notify_all()

    def take(q: queue.SimpleQueue[Any]) -> Any:
        while True:
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                if abort.is_set():
                    raise Aborted from None

    finished = threading.Condition()
    ended: list[str] = []

    def guarded(body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                body()
            except Aborted:
                pass
            except BaseException as e:  # handed to the caller's thread
                errors.append(e)
                abort.set()
            finally:
                with finished:
                    ended.append(threading.current_thread().name)
                    finished.notify_all()
        return run

    launched: list[threading.Thread] = []

    def start_all() -> None:
        for t in threads:
            launched.append(t)
            try:
                t.start()
            except Exception:  # not created (a Ctrl-C arrives only once it runs, while start() waits for it)
                launched.pop()
                raise

    def wait_for_all() -> None:
        # not Thread.join: a Ctrl-C that interrupts join() can mark a running thread as stopped
        with finished:
            while len(ended) < len(launched):
                finished.wait(0.1)
        for t in launched:
            t.join()  # each has left its body: returns at once

    def read_bytes(reader: DirectReader, info: TensorInfo, start: int, nbytes: int) -> Any:
        try:
            return reader.read(info.path, info.start + start, nbytes, in_pool)
        except OSError as e:
            raise ExportError(f"reading {info.name} from {info.path} failed: {e.strerror or e}.\n  fix: check the "
                              "base checkpoint's disk and files; nothing was written.") from e

    def read() -> None:  # needs no torch: it runs while torch is still being imported
        seq = 0
        with DirectReader(direct=direct) as reader:
            for shard in shards:
                post(seq, ("open", shard, None))
                seq += 1
                for info, dt, offset in shard.entries:
                    if plan.touches(info.name) or dt != info.dtype:
                        done = 0  # elements before this piece
                        for rows, shape in _fold_pieces(info, dt, plan.touches(info.name)):
                            n = math.prod(shape)
                            start, at = (math.ceil(done * DTYPE_SIZES[d]) for d in (info.dtype, dt))
                            piece = read_bytes(reader, info, start, math.ceil(n * DTYPE_SIZES[info.dtype]))
                            try:  # output offsets are aligned to the dtype (widest first, header padded to 8)
                                out = out_pool.acquire(math.ceil(n * DTYPE_SIZES[dt]), phase=(offset + at) % ALIGN)
                            except BaseException:
                                piece.release()
                                raise
                            to_fold.put((seq, (info, dt, rows, shape), piece, out))
                            seq += 1
                            done += n
                        continue
                    for at in range(0, info.nbytes, RAW_CHUNK):  # untouched: passed through in pieces
                        post(seq, ("data", None, read_bytes(reader, info, at, min(RAW_CHUNK, info.nbytes - at))))
                        seq += 1
                post(seq, ("close", shard, None))
                seq += 1
        post(seq, ("end", None, None))
        for _ in range(workers):
            to_fold.put(None)

    def fold_pieces() -> None:
        import torch  # waits for the import started in the background; reads and writes go on meanwhile

        torch.set_num_threads(1)
        while (msg := take(to_fold)) is not None:
            seq, (info, dt, rows, shape), lease, out = msg
            target = st_to_torch(dt)
            try:
                if abort.is_set():
                    raise Aborted
                fold(info.name, _typed(lease.data, st_to_torch(info.dtype), shape), plan, dtype=target,
                     out=_typed(out.data, target, shape, writable=True), rows=rows)
            except BaseException:
                out.release()
                raise
            finally:
                lease.release()
            post(seq, ("data", None, out))

    def write() -> None:
        writer = None
        seq = 0
        try:
            while True:
                with ready_cv:
                    while seq not in ready:
                        if abort.is_set():
                            raise Aborted
                        ready_cv.wait(0.05)
                    kind, shard, lease = ready.pop(seq)
                seq += 1
                if abort.is_set():
                    if lease is not None:
                        lease.release()
                    raise Aborted
                if kind == "end":
                    return
                if kind == "open":
                    writer = DirectWriter(shard.path, direct=direct)
                    writer.write(shard.head)
                elif kind == "close":
                    if writer.size != shard.size:
                        raise ExportError(f"{shard.path.name}: wrote {writer.size} bytes, its header needs "
                                          f"{shard.size}; this is a bug in adapterhub, please report it.")
                    writer.close()
                    writer = None
                else:
                    try:
                        writer.write(lease.data)
                    finally:
                        lease.release()
        finally:
            if writer is not None:
                writer.abort()

    threads = [threading.Thread(target=guarded(read), name="adapterhub-export-read", daemon=True),
               threading.Thread(target=guarded(write), name="adapterhub-export-write", daemon=True)]
    threads += [threading.Thread(target=guarded(fold_pieces), name=f"adapterhub-export-fold-{i}", daemon=True)
                for i in range(workers)]
    try:
        start_all()
        wait_for_all()
    except BaseException as e:  # e.g. Ctrl-C: stop every thread before anything is removed
        errors.insert(0, e)
        abort.set()
        wait_for_all()
    finally:
        if "torch" in sys.modules:  # the workers' setting reaches process-wide pools: back to this thread's
            torch = sys.modules["torch"]
            torch.set_num_threads(torch.get_num_threads())
    if errors:
        raise errors[0]


def _typed(data: memoryview, dtype: torch.dtype, shape: tuple[int, ...], *, writable: bool = False
           ) -> torch.Tensor:
    """Bytes seen as a tensor of ``dtype`` and ``shape``, sharing their memory; a read-only piece
    misaligned for the dtype is copied first (an output piece must be aligned: it is written in place)."""
    from adapterhub.streamio import as_tensor

    try:
        return as_tensor(data, dtype, shape, copy_if_misaligned=not writable)
    except ValueError as e:
        raise ExportError(f"an output piece is misaligned ({e}); this is a bug in adapterhub, please report "
                          "it.") from e


def _model_card(base: BaseCheckpoint, provenance: dict[str, Any], plan: MergePlan, unmerged: list[str]) -> str:
    """Our card (what was folded, from what), under the base card's front matter when it has one, and
    the base's card below it."""
    front, body = ["---", "library_name: transformers", "tags: [adapterhub, merged]", "---"], ""
    readme = base.path / "README.md"
    real = readme.resolve() if readme.exists() else None
    if real is not None and real.is_file() and (not readme.is_symlink() or _stays_in_base(base, real)):
        text = real.read_text(encoding="utf-8", errors="replace")
        m = re.match(r"---\n(.*?\n)---\n?(.*)", text, re.DOTALL)
        if m:
            front, body = ["---", *m.group(1).rstrip("\n").split("\n"), "---"], m.group(2)
        else:
            body = text
    lines = [*front, "",
             f"# {base.name_or_path or base.path.name} with adapters merged", "",
             "Exported by adapterhub: the adapters below are folded into the base weights (float32 accumulation, "
             "rounded once to the output dtype).", "", "## Provenance", "", "```json",
             json.dumps(provenance, indent=2, sort_keys=True), "```", "",
             f"Folded into {len(plan.folds)} base tensors."]
    if unmerged:
        lines += ["", "## Not merged", "", "These adapters add computation and cannot be folded; they are written "
                  "beside the checkpoint and must be loaded as adapters:", ""] + [f"- `{u}`" for u in unmerged]
    if body.strip():
        lines += ["", "## Model card of the base", "", body.strip("\n")]
    return "\n".join(lines) + "\n"
