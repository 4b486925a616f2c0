"""Full fine-tunes as LoRA adapters: a truncated SVD of ``tuned - base``, module by module.

Both checkpoints are read through their safetensors headers (single file or sharded), tensor by
tensor in row pieces of at most :data:`PIECE_ELEMENTS` elements, by a reader thread that overlaps
the disk with the math: memory is a few pieces plus one module's float32 difference, whatever the
model's size. Differences are taken in float32, so a fine-tune saved in another dtype than its base
is handled exactly.

What goes where:

=============================================  ================================================================
tensor                                         in the adapter
=============================================  ================================================================
identical to the base                          nothing (counted, never stored)
2-d ``weight`` of a linear layer, changed      ``lora_A``/``lora_B``: best rank-k factors of the difference
2-d ``weight`` of an embedding, changed        ``lora_embedding_A``/``lora_embedding_B`` (PEFT's embedding LoRA)
``bias`` of a LoRA'd linear layer, changed     ``lora_B.bias`` (PEFT ``lora_bias=True``): the exact difference
anything else changed (norms, other biases)    its module in ``modules_to_save`` (the fine-tune's values, exact)
rows of a resized vocabulary                   embedding / LM head in ``modules_to_save`` (resize the base first)
a change PEFT cannot carry                     refused with every such tensor named (or named as not extracted)
=============================================  ================================================================

Rank: a fixed ``rank``, or per module the smallest rank whose relative Frobenius error
``||D - D_k|| / ||D||`` is at most ``max_error`` (``energy`` F is the same with ``max_error = sqrt(1 - F)``),
found with a randomized range finder (Halko, Martinsson & Tropp 2011: Gaussian sketch with
oversampling and power iterations) grown until the criterion holds; small modules use a dense SVD.
Every module's scale is 1 (``alpha == r``, exact ``rank_pattern``/``alpha_pattern``), and its reported
error is measured on the stored factors (after rounding to the output dtype), not estimated.
"""

from __future__ import annotations

import math
import os
import queue
import re
import threading
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.adapter import Adapter, BaseModelRef, LoraSpec, Tensors
from adapterhub.base import BaseCheckpoint
from adapterhub.errors import (
    CheckpointMismatchError,
    ExtractError,
    NonFiniteWeightsError,
    NotAFineTuneError,
    UnrepresentableChangeError,
)
from adapterhub.tensorfile import DTYPE_SIZES, FLOAT_DTYPES, TensorInfo

if TYPE_CHECKING:
    import torch

    from adapterhub.registry import PushResult, Registry

LINEAGE_SCHEMA = "adapterhub.extract.v1"
#: a module whose ``||tuned - base|| / ||base||`` exceeds this is not a fine-tune of ``base``. Fine-tuning
#: moves weights by well under 10% (typically 0.1-5%); two independently trained or initialised models of
#: one shape differ by about sqrt(2) = 1.41 (two unrelated vectors of equal norm). 0.5 sits 5x above the
#: first and ~3x below the second.
MAX_CHANGE = 0.5
#: the largest piece of a tensor read and compared at once (elements; rows of a 2-d tensor)
PIECE_ELEMENTS = 8 << 20
#: columns of the random sketch beyond the rank sought, and subspace (power) iterations
OVERSAMPLE = 8
POWER_ITERS = 2
#: where the sketched spectrum is this flat around the rank (s_width / s_k above it), the range finder
#: converges slowly (noise-like changes): the sketch is redone with :data:`FLAT_EXTRA_ITERS` more iterations
FLAT_SPECTRUM = 0.8
FLAT_EXTRA_ITERS = 4
DTYPES = {"float32": "F32", "fp32": "F32", "float16": "F16", "fp16": "F16", "bfloat16": "BF16", "bf16": "BF16"}
#: leaf module names of embedding layers (2-d ``weight`` indexed by token, not multiplied)
_EMBED_LEAF = re.compile(r"embed|^(wte|wpe|shared|word_embeddings)$")
#: architectures whose linear layers are transformers ``Conv1D`` (weights stored in x out)
_CONV1D_MODELS = frozenset({"gpt2", "openai-gpt", "imagegpt"})


# --- results ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleReport:
    """One extracted module: its rank, the relative error of its stored factors, its relative change
    ``||tuned - base|| / ||base||`` and how the factors were found (``randomized``, ``dense``, ``bias-only``)."""

    rank: int
    error: float
    change: float
    method: str


@dataclass
class Extraction:
    """An extracted adapter and everything said about it: per-module errors, what was not stored and why."""

    adapter: Adapter
    base_path: Path
    tuned_path: Path
    base_fingerprint: str
    tuned_fingerprint: str
    modules: dict[str, ModuleReport]
    modules_to_save: list[str]
    unchanged: list[str]
    rounding_only: list[str]
    not_extracted: dict[str, str]
    notes: list[str]
    full_bytes: int
    options: dict[str, Any]

    @property
    def max_error(self) -> float:
        return max((m.error for m in self.modules.values()), default=0.0)

    @property
    def mean_error(self) -> float:
        return sum(m.error for m in self.modules.values()) / len(self.modules) if self.modules else 0.0

    @property
    def adapter_bytes(self) -> int:
        return self.adapter.nbytes

    def lineage(self) -> dict[str, Any]:
        """What the adapter was made from and how: stored as the registry manifest's ``recipe``."""
        return lineage_of(self.adapter)

    def summary(self) -> dict[str, Any]:
        """A JSON-ready report (what ``adapterhub extract --json`` prints)."""
        worst = max(self.modules, key=lambda m: self.modules[m].error) if self.modules else None
        return {
            "modules": len(self.modules), "max_error": self.max_error, "max_error_module": worst,
            "mean_error": self.mean_error, "ranks": sorted({m.rank for m in self.modules.values()}),
            "modules_to_save": self.modules_to_save, "unchanged_tensors": len(self.unchanged),
            "rounding_only": self.rounding_only, "not_extracted": self.not_extracted, "notes": self.notes,
            "adapter_bytes": self.adapter_bytes, "full_bytes": self.full_bytes,
            "base_fingerprint": self.base_fingerprint, "tuned_fingerprint": self.tuned_fingerprint,
        }


def lineage_of(adapter: Adapter) -> dict[str, Any]:
    """The extraction record an extracted adapter carries (``adapter.extra["extract"]``).

    Raises:
        ExtractError: the adapter was not made by :func:`extract`.
    """
    info = adapter.extra.get("extract")
    if not isinstance(info, dict):
        raise ExtractError(f"{adapter.source or adapter.name or 'this adapter'} carries no extraction record; "
                           "it was not made by `adapterhub extract`.")
    return info


# --- the plan: what each tensor is, from the headers alone ----------------------------------------------


@dataclass
class _Tensor:
    name: str
    module: str
    param: str
    role: str  # linear | embedding | bias | other
    base: TensorInfo
    tuned: TensorInfo
    selected: bool
    resized: bool = False


def _module_of(name: str) -> tuple[str, str]:
    module, _, param = name.rpartition(".")
    return module, param


def _role(name: str, info: TensorInfo) -> str:
    module, param = _module_of(name)
    if param == "weight" and len(info.shape) == 2 and info.dtype in FLOAT_DTYPES:
        return "embedding" if _EMBED_LEAF.search(module.rpartition(".")[2]) else "linear"
    if param == "bias" and len(info.shape) == 1:
        return "bias"
    return "other"


def _selector(target: str | None, exclude: str | None) -> Callable[[str], bool]:
    try:
        inc = re.compile(target) if target else None
        exc = re.compile(exclude) if exclude else None
    except re.error as e:
        raise ExtractError(f"--target/--exclude: {e.pattern!r} is not a valid regular expression ({e}).\n"
                           "  fix: pass a Python regular expression, e.g. 'self_attn|mlp'.") from e
    return lambda m: (inc is None or inc.search(m) is not None) and (exc is None or exc.search(m) is None)


def _vocab(ckpt: BaseCheckpoint) -> int | None:
    v = ckpt.text_config.get("vocab_size")
    return int(v) if isinstance(v, int) else None


def _plan(base: BaseCheckpoint, tuned: BaseCheckpoint, selected: Callable[[str], bool]
          ) -> tuple[list[_Tensor], list[str], list[str]]:
    """Every tensor pair with its role; the base-only integer buffers; notes. Refuses mismatched checkpoints."""
    bc, tc = base.text_config, tuned.text_config
    for key in ("model_type", "architectures"):
        if bc.get(key) and tc.get(key) and bc[key] != tc[key]:
            raise CheckpointMismatchError(
                f"the base ({base.path}) is {key} {bc[key]!r}, the fine-tune ({tuned.path}) is {tc[key]!r}.\n"
                "  fix: pass the base model this fine-tune was trained from.")
    if (tc.get("model_type") or bc.get("model_type")) in _CONV1D_MODELS:
        raise ExtractError(f"{tuned.path}: {tc.get('model_type') or bc.get('model_type')} models use Conv1D layers "
                           "(weights stored in x out), which extraction does not support.\n"
                           "  fix: extract from a model with nn.Linear layers (Llama, Mistral, Qwen, BERT ...).")
    for ckpt, what in ((base, "base"), (tuned, "fine-tune")):
        q = ckpt.quantization
        if q is not None:
            raise ExtractError(f"the {what} {ckpt.path} is quantized ({q['method']}, {q['evidence']}); its weights "
                               "cannot be differenced.\n  fix: extract from the full-precision checkpoints.")
    only_tuned = sorted(set(tuned.tensors) - set(base.tensors))
    only_base = sorted(set(base.tensors) - set(tuned.tensors))
    missing_floats = [n for n in only_base if base.tensors[n].dtype in FLOAT_DTYPES]
    if only_tuned or missing_floats:
        parts = []
        if only_tuned:
            parts.append(f"{len(only_tuned)} tensor(s) only in the fine-tune ({_some(only_tuned)})")
        if missing_floats:
            parts.append(f"{len(missing_floats)} weight(s) only in the base ({_some(missing_floats)})")
        raise CheckpointMismatchError(
            f"base {base.path} and fine-tune {tuned.path} hold different tensors: {'; '.join(parts)}. An adapter "
            "can only change tensors the base has.\n  fix: pass the base this fine-tune was made from (a new head "
            "or layer cannot be carried as a LoRA).")
    vb, vt = _vocab(base), _vocab(tuned)
    notes = []
    out = []
    for name in base.tensors:  # the base's order: shard by shard, as it is laid out
        if name not in tuned.tensors:
            continue
        b, t = base.tensors[name], tuned.tensors[name]
        module, param = _module_of(name)
        resized = False
        if b.shape != t.shape:
            if (vb and vt and vb != vt and len(b.shape) == len(t.shape) >= 1 and b.shape[1:] == t.shape[1:]
                    and (b.shape[0], t.shape[0]) == (vb, vt)):
                resized = True
            else:
                raise CheckpointMismatchError(
                    f"tensor '{name}' is {list(b.shape)} in the base ({b.path}) but {list(t.shape)} in the "
                    f"fine-tune ({t.path}).\n  fix: pass the base model this fine-tune was trained from.")
        if (b.dtype in FLOAT_DTYPES) != (t.dtype in FLOAT_DTYPES):
            raise CheckpointMismatchError(f"tensor '{name}' is {b.dtype} in the base but {t.dtype} in the fine-tune.\n"
                                          "  fix: pass the base model this fine-tune was trained from.")
        out.append(_Tensor(name, module, param, _role(name, b), b, t, selected(module), resized))
    if any(t.resized for t in out):
        notes.append(f"vocabulary resized from {vb} to {vt} tokens: "
                     f"{', '.join(sorted({t.module for t in out if t.resized}))} carried whole in modules_to_save; "
                     f"call model.resize_token_embeddings({vt}) on the base before loading the adapter.")
    buffers = [n for n in only_base if n not in missing_floats]
    if buffers:
        notes.append(f"{len(buffers)} integer buffer(s) only in the base ({_some(buffers)}) are kept from the base.")
    return out, buffers, notes


def _some(names: Sequence[str], n: int = 4) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


# --- reading both checkpoints in step --------------------------------------------------------------------


def _pieces(t: _Tensor) -> list[tuple[tuple[int, int] | None, tuple[int, ...]]]:
    """``(rows, piece shape)`` to read a tensor pair in: row ranges along dim 0 of at most
    :data:`PIECE_ELEMENTS` elements; ``rows`` None (the whole tensor) for 0-d and sub-byte tensors."""
    shape = t.base.shape
    if not shape or not shape[0] or any(DTYPE_SIZES[d] != int(DTYPE_SIZES[d]) for d in (t.base.dtype, t.tuned.dtype)):
        return [(None, shape)]
    row = max(1, math.prod(shape[1:]))
    step = max(1, PIECE_ELEMENTS // row)
    return [((r, min(r + step, shape[0])), (min(r + step, shape[0]) - r, *shape[1:]))
            for r in range(0, shape[0], step)]


def _byte_range(info: TensorInfo, rows: tuple[int, int] | None) -> tuple[int, int]:
    """(file offset, length) of a row range of a tensor."""
    if rows is None:
        return info.start, info.nbytes
    per_row = math.prod(info.shape[1:]) * int(DTYPE_SIZES[info.dtype])
    return info.start + rows[0] * per_row, (rows[1] - rows[0]) * per_row


def _stream(tensors: list[_Tensor], *, direct: bool) -> Iterator[tuple[_Tensor, Any, tuple[int, ...], Any, Any]]:
    """(tensor, rows, piece shape, base lease, tuned lease) for every piece, read ahead by a thread; the caller
    releases the leases. At most three pairs of pieces are held at once."""
    from adapterhub.streamio import Aborted, BufferPool, DirectReader

    abort = threading.Event()
    pool = BufferPool(6, abort)
    q: queue.Queue[Any] = queue.Queue()
    errors: list[BaseException] = []

    def read_one(reader: DirectReader, info: TensorInfo, rows: tuple[int, int]) -> Any:
        offset, nbytes = _byte_range(info, rows)
        try:
            return reader.read(info.path, offset, nbytes, pool)
        except OSError as e:
            raise ExtractError(f"reading '{info.name}' from {info.path} failed: {e.strerror or e}.\n"
                               "  fix: check the checkpoint's disk and files; nothing was written.") from e

    def run() -> None:
        try:
            with DirectReader(direct=direct) as reader:
                for t in tensors:
                    for rows, shape in _pieces(t):
                        b = read_one(reader, t.base, rows)
                        try:
                            tu = read_one(reader, t.tuned, rows)
                        except BaseException:
                            b.release()
                            raise
                        q.put((t, rows, shape, b, tu))
        except Aborted:
            pass
        except BaseException as e:  # handed to the consumer
            errors.append(e)
        finally:
            q.put(None)

    thread = threading.Thread(target=run, name="adapterhub-extract-read", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not None:
            yield item
        if errors:
            raise errors[0]
    finally:
        abort.set()
        while thread.is_alive():  # drain so a reader blocked on the pool or queue can finish
            try:
                item = q.get(timeout=0.05)
            except queue.Empty:
                continue
            if item is not None:
                item[3].release()
                item[4].release()
        thread.join()


def _typed(data: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Bytes seen as a tensor of ``dtype`` and ``shape`` (copied first if misaligned for the dtype)."""
    from adapterhub.streamio import as_tensor

    return as_tensor(data, dtype, shape)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    import torch

    a, b = a.reshape(-1), b.reshape(-1)
    if a.numel() != b.numel():
        return False
    for wide in (torch.int64, torch.int32):  # a wide view compares several times faster than bytes
        size = wide.itemsize
        if a.numel() % size == 0 and a.data_ptr() % size == 0 and b.data_ptr() % size == 0:
            return torch.equal(a.view(wide), b.view(wide))
    return torch.equal(a, b)


# --- factorization ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    rank: int | None
    max_error: float | None
    oversample: int
    power_iters: int
    svd: str


def _sketch(D: torch.Tensor, width: int, power_iters: int, gen: torch.Generator, k: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized SVD of width ``width``: (U, S, Vh) with U = Q U_b, D ~ U S Vh on the sketched subspace.

    With ``k``, a spectrum that is flat beyond the k-th value gets :data:`FLAT_EXTRA_ITERS` more iterations.
    """

    state = gen.get_state()
    U, S, Vh = _sketch_once(D, width, power_iters, gen)
    if k is not None and k < S.numel() and S[k - 1] > 0 and float(S[-1] / S[k - 1]) > FLAT_SPECTRUM:
        gen.set_state(state)
        U, S, Vh = _sketch_once(D, width, power_iters + FLAT_EXTRA_ITERS, gen)
    return U, S, Vh


def _sketch_once(D: torch.Tensor, width: int, power_iters: int, gen: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    import torch

    omega = torch.randn(D.shape[1], width, generator=gen, dtype=D.dtype)
    Q, _ = torch.linalg.qr(D @ omega)
    for _ in range(power_iters):
        Z, _ = torch.linalg.qr(D.T @ Q)
        Q, _ = torch.linalg.qr(D @ Z)
    U, S, Vh = torch.linalg.svd(Q.T @ D, full_matrices=False)
    return Q @ U, S, Vh


def _sq_norm(x: torch.Tensor) -> float:
    """``||x||^2`` accumulated in float64 over 64K-element blocks (a float32 reduction over 10M elements
    drifts by ~5e-4); NaN and Inf propagate."""
    if not x.is_contiguous():
        x = x.T if x.T.is_contiguous() else x.contiguous()
    return math.fsum(float(c.dot(c)) for c in x.reshape(-1).split(1 << 16))


class _Buffers:
    """``count`` reusable float32 buffers (the differences being built or factorized), handed out in turn;
    :meth:`acquire` waits for a free one. They grow to the largest tensor and are kept, so streaming
    allocates and page-faults nothing per tensor."""

    def __init__(self, count: int) -> None:
        self._free: queue.SimpleQueue[torch.Tensor | None] = queue.SimpleQueue()
        for _ in range(count):
            self._free.put(None)

    def acquire(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the whole buffer, to give back; a view of ``shape`` on it)."""
        import torch

        buf = self._free.get()
        n = math.prod(shape)
        if buf is None or buf.numel() < n:
            buf = None
            buf = torch.empty(n, dtype=torch.float32)
        return buf, buf[:n].view(shape)

    def release(self, buf: torch.Tensor) -> None:
        self._free.put(buf)


def _choose_rank(S: torch.Tensor, total_sq: float, max_error: float, cap: int) -> int | None:
    """Smallest k whose projection error sqrt(total - sum_{i<=k} s_i^2) / ||D|| is <= max_error, or None."""
    import torch

    kept = torch.cumsum(S.double().square(), 0)
    err = torch.sqrt(torch.clamp(total_sq - kept, min=0.0) / total_sq)
    ok = torch.nonzero(err <= max_error)
    if ok.numel() == 0:
        return None
    k = int(ok[0]) + 1
    return k if k <= cap else None


def _factorize(D: torch.Tensor, total_sq: float, rule: _Rule, gen: torch.Generator, out_dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor, float, str]:
    """(A, B, relative error of B @ A in ``out_dtype``, method) for the difference D (out x in) whose
    squared Frobenius norm is ``total_sq``. ``D`` is overwritten with the residual."""
    import torch

    m, n = D.shape
    full = min(m, n)
    total = math.sqrt(total_sq)
    cap = min(rule.rank or full, full)
    p = rule.oversample
    if rule.max_error is None:
        width = min(cap + p, full)
        dense = rule.svd == "dense" or (rule.svd == "auto" and 4 * width >= full)
        if dense:
            U, S, Vh = torch.linalg.svd(D, full_matrices=False)
        else:
            U, S, Vh = _sketch(D, width, rule.power_iters, gen, k=cap)
        k = cap
    else:
        width = min(max(32, 2 * p), full)
        while True:
            dense = rule.svd == "dense" or (rule.svd == "auto" and 4 * width >= full) or width >= full
            if dense:
                U, S, Vh = torch.linalg.svd(D, full_matrices=False)
                k = _choose_rank(S, total_sq, rule.max_error, cap) or cap
                break
            U, S, Vh = _sketch(D, width, rule.power_iters, gen)
            k = _choose_rank(S, total_sq, rule.max_error, min(cap, width - p))
            if k is not None and k < S.numel() and float(S[-1] / S[k - 1]) > FLAT_SPECTRUM:
                U, S, Vh = _sketch_once(D, width, rule.power_iters + FLAT_EXTRA_ITERS, gen)  # iterate more
                k = _choose_rank(S, total_sq, rule.max_error, min(cap, width - p))
            if k is not None:
                break
            if width - p >= cap:  # the cap is reached: use it
                k = cap
                break
            width = min(2 * width, full)
    k = max(1, min(k, S.numel()))
    root = S[:k].sqrt()
    A = (root[:, None] * Vh[:k]).to(out_dtype)
    B = (U[:, :k] * root).to(out_dtype)
    D.addmm_(B.float(), A.float(), alpha=-1)  # the residual of the stored (rounded) factors
    error = math.sqrt(_sq_norm(D)) / total if total > 0 else 0.0
    if not (math.isfinite(error) and bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())):
        raise ExtractError(f"the factors overflow {out_dtype}.\n  fix: pass --dtype bfloat16 or float32.")
    return A, B, error, "dense" if dense else "randomized"


def _generator(seed: int, name: str) -> torch.Generator:
    """A generator per module: results do not depend on the order modules are processed in."""
    import torch

    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) & (2**63 - 1))


# --- the extraction ------------------------------------------------------------------------------------


@dataclass
class _State:
    """One tensor pair while its pieces stream by."""

    equal: bool = True  # every piece identical (bytes, or values across dtypes)
    rounding: bool = True  # every piece equal to the base rounded to the fine-tune's dtype
    delta: torch.Tensor | None = None  # float32 difference (a view of ``buffer``), from the first changed piece
    buffer: torch.Tensor | None = None
    copy: torch.Tensor | None = None  # the fine-tune's values (tensors that may be saved whole)
    base_sq: float = 0.0  # ||base||^2 over the pieces seen since the first change
    skipped: list[tuple[int, int]] = field(default_factory=list)  # identical rows before the first change
    pieces_left: int = 0


@dataclass
class _Found:
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # module -> (A, B)
    reports: dict[str, ModuleReport] = field(default_factory=dict)
    bias_delta: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> delta of its bias
    copies: dict[str, torch.Tensor] = field(default_factory=dict)  # tensor -> the fine-tune's values
    changed: list[_Tensor] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    rounding_only: list[str] = field(default_factory=list)
    value_equal: list[str] = field(default_factory=list)  # bytes differ, values do not (-0.0 vs 0.0)


def extract(base: str | Path, tuned: str | Path, *, rank: int | None = None, energy: float | None = None,
            max_error: float | None = None, target: str | None = None, exclude: str | None = None,
            dtype: str | None = None, allow_other_base: bool = False, max_change: float = MAX_CHANGE,
            oversample: int = OVERSAMPLE, power_iters: int = POWER_ITERS, svd: str = "auto", seed: int = 0,
            direct_io: bool = True, progress: Callable[[int], None] | None = None) -> Extraction:
    """A PEFT LoRA that turns the checkpoint ``base`` into (approximately) the full fine-tune ``tuned``.

    Args:
        base, tuned: Hugging Face model directories (``config.json`` + single-file or sharded safetensors).
        rank: the rank of every module; with ``energy``/``max_error``, an upper bound.
        energy: per module, the smallest rank keeping this fraction of ``||tuned - base||^2`` (0 < F <= 1).
        max_error: per module, the smallest rank with relative error ``||D - D_k|| / ||D||`` at most E.
        target, exclude: regular expressions searched in module paths: only modules matching ``target``
            and not ``exclude`` are represented; changed tensors elsewhere are listed in ``not_extracted``.
        dtype: dtype of the LoRA factors and bias deltas (``bfloat16``, ``float16``, ``float32``); default
            each tensor's dtype in the fine-tune. ``modules_to_save`` copies keep the fine-tune's dtype.
        allow_other_base: extract even when a module changed by more than ``max_change`` of its norm.
        oversample, power_iters, svd: the randomized SVD (``svd="auto"`` is dense for small modules,
            ``"randomized"`` or ``"dense"`` forces one); ``seed`` makes it reproducible.
        direct_io: read with ``O_DIRECT`` where the file system allows (less CPU, no page-cache churn).
        progress: called with the number of bytes read, as reading goes.

    Returns:
        An :class:`Extraction`: the adapter (write it with :func:`save`, push it with :func:`push`)
        and the report.

    Raises:
        BaseCheckpointError: a checkpoint is unreadable, truncated or inconsistent.
        CheckpointMismatchError: different architectures, tensor names or shapes.
        NotAFineTuneError: a module changed as much as an unrelated model's would.
        NonFiniteWeightsError: NaN or Inf in a changed tensor.
        UnrepresentableChangeError: changed tensors PEFT cannot carry (all named).
        ExtractError: bad options, or nothing changed.

    Memory: six pieces of at most :data:`PIECE_ELEMENTS` elements, one float32 difference per worker plus
    one being filled (the residual overwrites it), plus the result; independent of the number of layers.

    Threads: a reader thread and one worker thread per core (at most 4). torch's intra-op threads are set
    to 1 for the duration of the call (OpenMP barriers stall on a busy machine) and restored after it;
    other threads of the process running torch meanwhile run single-threaded too.

    Example:
        >>> result = extract("llama-7b", "llama-7b-tuned", rank=16)      # doctest: +SKIP
        >>> result.max_error, result.modules_to_save                       # doctest: +SKIP
        (0.31, [])
        >>> save(result, "tuned-lora")                                    # doctest: +SKIP
    """
    import torch

    rule = _rule(rank, energy, max_error, oversample, power_iters, svd)
    out_st = None
    if dtype is not None:
        out_st = DTYPES.get(dtype.lower())
        if out_st is None:
            raise ExtractError(f"unknown dtype {dtype!r} for the LoRA factors.\n  fix: choose one of "
                               f"{', '.join(sorted(DTYPES))} (--dtype).")
    if not max_change > 0:
        raise ExtractError(f"max_change must be > 0, not {max_change}.\n  fix: pass e.g. max_change=0.5.")
    base_ckpt, tuned_ckpt = BaseCheckpoint.open(base), BaseCheckpoint.open(tuned)
    tensors, _, notes = _plan(base_ckpt, tuned_ckpt, _selector(target, exclude))
    options = {"rank": rank, "energy": energy, "max_error": max_error, "target": target, "exclude": exclude,
               "dtype": dtype, "allow_other_base": allow_other_base, "max_change": max_change, "svd": svd,
               "oversample": oversample, "power_iters": power_iters, "seed": seed}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core per worker thread: no OpenMP barriers, which stall on a busy machine
    try:
        found = _run(tensors, base_ckpt, tuned_ckpt, rule, out_st, options, direct_io, progress)
    finally:
        torch.set_num_threads(threads)
    return _assemble(base_ckpt, tuned_ckpt, tensors, found, notes, rule, options=options)


def _run(tensors: list[_Tensor], base_ckpt: BaseCheckpoint, tuned_ckpt: BaseCheckpoint, rule: _Rule,
         out_st: str | None, options: dict[str, Any], direct_io: bool,
         progress: Callable[[int], None] | None) -> _Found:
    """Stream every tensor pair; hand each changed tensor's difference to a worker thread (one per core)
    that checks it, and factorizes it when it is a linear or embedding weight."""
    import contextlib
    from concurrent.futures import Future, ThreadPoolExecutor

    import torch

    from adapterhub.dtypes import st_to_torch

    workers = max(1, min(4, os.cpu_count() or 1))
    buffers = _Buffers(workers + 1)  # one being filled, one per worker
    work = torch.empty(0, dtype=torch.float32)
    streamed = [t for t in tensors if not t.resized]
    states = {t.name: _State(pieces_left=len(_pieces(t))) for t in streamed}
    found = _Found()
    max_change, allow_other_base, seed = options["max_change"], options["allow_other_base"], options["seed"]

    def factor_dtype(t: _Tensor) -> torch.dtype:
        if out_st is not None:
            return st_to_torch(out_st)
        return st_to_torch(t.tuned.dtype) if t.tuned.dtype in ("F32", "F16", "BF16", "F64") else torch.float32

    def check_and_factor(t: _Tensor, st: _State) -> None:
        """In a worker: the difference's norm, the fine-tune check, then the factors (or the bias delta)."""
        try:
            D = st.delta
            total_sq = _sq_norm(D)
            if not math.isfinite(total_sq):
                raise _nonfinite(t)
            if total_sq == 0.0:  # other bytes, same values (-0.0 and 0.0): unchanged
                found.value_equal.append(t.name)
                return
            change = math.nan
            if len(t.base.shape) >= 2:
                base_sq = st.base_sq + sum(_rows_sq(t.base, r) for r in st.skipped)
                change = math.sqrt(total_sq / base_sq) if base_sq > 0 else math.inf
                if change > max_change and not allow_other_base:
                    raise NotAFineTuneError(
                        f"'{t.name}' differs from the base by {change:.1%} of its norm (||tuned - base|| / "
                        f"||base||); a fine-tune changes weights by a few percent, an unrelated model by about "
                        f"141%. {tuned_ckpt.path} is not a fine-tune of {base_ckpt.path} (threshold "
                        f"{max_change:.0%}).\n  fix: pass the base it was trained from; if you are sure, pass "
                        "--allow-other-base (the LoRA will need a high rank).", module=t.module, change=change,
                        threshold=max_change)
            if t.role in ("linear", "embedding"):
                mat = D if t.role == "linear" else D.T  # PEFT's embedding LoRA: weight delta = (B @ A).T
                A, B, error, how = _factorize(mat, total_sq, rule, _generator(seed, t.module), factor_dtype(t))
                found.factors[t.module] = (A, B)
                found.reports[t.module] = ModuleReport(A.shape[0], error, change, how)
            elif t.role == "bias":
                found.bias_delta[t.module] = D.to(factor_dtype(t), copy=True)  # D lives in a reused buffer
        finally:
            buffers.release(st.buffer)

    def finish(t: _Tensor, st: _State) -> Future[None] | None:
        if st.equal:
            found.unchanged.append(t.name)
        elif st.rounding and t.base.dtype != t.tuned.dtype:
            found.rounding_only.append(t.name)
        else:
            found.changed.append(t)
            if st.copy is not None:
                found.copies[t.name] = st.copy
            if st.delta is not None and t.selected:
                return pool.submit(check_and_factor, t, st)
        if st.buffer is not None:
            buffers.release(st.buffer)
        return None

    pending: list[Future[None]] = []
    with ThreadPoolExecutor(workers, thread_name_prefix="adapterhub-extract") as pool:
        try:
            with contextlib.closing(_stream(streamed, direct=direct_io)) as pieces:
                for t, rows, shape, b_lease, t_lease in pieces:
                    st = states[t.name]
                    try:
                        if work.numel() < math.prod(shape):
                            work = torch.empty(math.prod(shape), dtype=torch.float32)
                        _compare_piece(t, st, rows, shape, b_lease.data, t_lease.data, buffers, work)
                    finally:
                        nbytes = b_lease.data.nbytes + t_lease.data.nbytes
                        b_lease.release()
                        t_lease.release()
                    if progress is not None:
                        progress(nbytes)
                    st.pieces_left -= 1
                    if st.pieces_left == 0:
                        del states[t.name]
                        if (job := finish(t, st)) is not None:
                            pending.append(job)
                        for job in [j for j in pending if j.done()]:  # fail fast: a worker's error stops reading
                            pending.remove(job)
                            job.result()
            for job in pending:
                job.result()
        except BaseException:
            for job in pending:
                job.cancel()
            raise
    return found


def _rule(rank: int | None, energy: float | None, max_error: float | None, oversample: int, power_iters: int,
          svd: str) -> _Rule:
    if energy is not None and max_error is not None:
        raise ExtractError("--energy and --max-error were both given.\n  fix: give one of them (--energy F is "
                           "--max-error sqrt(1 - F)).")
    if rank is None and energy is None and max_error is None:
        raise ExtractError("no rank rule was given.\n  fix: give --rank K, --energy F or --max-error E to choose "
                           "the rank.")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ExtractError(f"rank must be a positive integer, not {rank!r}.\n  fix: pass e.g. --rank 16.")
    if energy is not None:
        if not 0.0 < energy <= 1.0:
            raise ExtractError(f"energy must be in (0, 1], not {energy}.\n  fix: pass e.g. --energy 0.9.")
        max_error = math.sqrt(1.0 - energy)
    if max_error is not None and not 0.0 <= max_error < 1.0:
        raise ExtractError(f"max_error must be in [0, 1), not {max_error}.\n  fix: pass e.g. --max-error 0.1.")
    if svd not in ("auto", "randomized", "dense"):
        raise ExtractError(f"svd must be 'auto', 'randomized' or 'dense', not {svd!r}.\n  fix: pass one of them.")
    if oversample < 0 or power_iters < 0:
        raise ExtractError(f"oversample and power_iters must be >= 0, not {oversample} and {power_iters}.\n"
                           "  fix: pass 0 or more.")
    return _Rule(rank, max_error, oversample, power_iters, svd)


def _compare_piece(t: _Tensor, st: _State, rows: tuple[int, int] | None, shape: tuple[int, ...],
                   b_bytes: memoryview, t_bytes: memoryview, buffers: _Buffers, work: torch.Tensor) -> None:
    """Compare one piece; from the first difference on, fill the tensor's float32 delta (zeros where
    identical) and the base's squared norm, and, for tensors that may be saved whole (role
    ``bias``/``other``), a copy of the fine-tune's values. ``work`` holds at least one piece in float32."""
    import torch

    from adapterhub.dtypes import st_to_torch

    is_float = t.base.dtype in FLOAT_DTYPES
    b_raw, t_raw = _typed(b_bytes, torch.uint8, (b_bytes.nbytes,)), _typed(t_bytes, torch.uint8, (t_bytes.nbytes,))
    b = _typed(b_bytes, st_to_torch(t.base.dtype), shape)
    tu = _typed(t_bytes, st_to_torch(t.tuned.dtype), shape)
    bf = None
    if t.base.dtype == t.tuned.dtype:
        equal = _same_bytes(b_raw, t_raw)
    elif is_float:
        bf = work[: b.numel()].view(shape).copy_(b)
        equal = torch.equal(bf, tu.float())
    else:
        equal = torch.equal(b.double(), tu.double())
    part = (lambda x: x[rows[0]: rows[1]]) if rows is not None else (lambda x: x)
    if equal:
        if st.delta is not None:  # after the first change: zero rows, and the base's share of the norm
            part(st.delta).zero_()
            if len(shape) >= 2:
                st.base_sq += float(torch.linalg.vector_norm(b.float())) ** 2
        elif rows is not None:
            st.skipped.append(rows)
        return
    if st.equal and is_float:  # the first change: rows before it were identical
        st.buffer, st.delta = buffers.acquire(t.base.shape)
        if rows is not None:
            st.delta[: rows[0]].zero_()
    st.equal = False
    if st.rounding and t.base.dtype != t.tuned.dtype:
        st.rounding = _same_bytes(b.to(tu.dtype).contiguous().view(torch.uint8), t_raw)
    if t.role in ("bias", "other"):
        if st.copy is None:
            st.copy = torch.empty(t.tuned.shape, dtype=tu.dtype)
        part(st.copy).copy_(tu)
    if not is_float:
        return
    if bf is None:
        bf = work[: b.numel()].view(shape).copy_(b)
    if len(shape) >= 2:
        st.base_sq += float(torch.linalg.vector_norm(bf)) ** 2
    d = part(st.delta)
    d.copy_(tu)
    d.sub_(bf)


def _nonfinite(t: _Tensor) -> NonFiniteWeightsError:
    """The error for a tensor whose difference is not finite, naming the checkpoint that holds NaN/Inf."""
    import torch

    from adapterhub.tensorfile import load_tensor

    bad_base = not bool(torch.isfinite(load_tensor(t.base, cached=False)).all())
    which, where = ("base", t.base.path) if bad_base else ("fine-tune", t.tuned.path)
    return NonFiniteWeightsError(
        f"'{t.name}' holds NaN or Inf in the {which} ({where}); its difference cannot be factorized.\n"
        f"  fix: the {which} checkpoint is damaged or diverged in training; use a healthy checkpoint.",
        tensor=t.name, path=where)


def _rows_sq(info: TensorInfo, rows: tuple[int, int]) -> float:
    """``||base[rows]||^2``, read again (rows that were identical before a tensor's first change)."""
    import torch
    from safetensors import safe_open

    with safe_open(str(info.path), framework="pt") as f:
        piece = f.get_slice(info.name)[rows[0]: rows[1]]
    return float(torch.linalg.vector_norm(piece.float())) ** 2


def _assemble(base: BaseCheckpoint, tuned: BaseCheckpoint, tensors: list[_Tensor], found: _Found, notes: list[str],
              rule: _Rule, *, options: dict[str, Any]) -> Extraction:
    """Decide, module by module, what carries each change; refuse what PEFT cannot carry."""
    import torch

    from adapterhub.tensorfile import load_tensor

    if found.value_equal:
        same = set(found.value_equal)
        found.changed = [t for t in found.changed if t.name not in same]
        found.unchanged = sorted(found.unchanged + found.value_equal)
    by_name = {t.name: t for t in tensors}
    roles = {t.module: t.role for t in tensors if t.param == "weight" and t.role in ("linear", "embedding")}
    lora = dict(found.factors)  # module -> (A, B)
    reports = dict(found.reports)
    not_extracted = {t.name: "excluded by --target/--exclude" for t in found.changed if not t.selected}
    save: dict[str, str] = {}  # module -> why
    bias: dict[str, torch.Tensor] = {}
    for t in found.changed:
        if not t.selected:
            continue
        if t.role == "bias" and roles.get(t.module) == "linear" and t.module in found.bias_delta:
            bias[t.module] = found.bias_delta[t.module]
        elif t.role == "other" or t.role == "bias":
            save.setdefault(t.module, "changed")
    for t in tensors:
        if t.resized and not t.selected:
            not_extracted[t.name] = "resized vocabulary, excluded by --target/--exclude"
        elif t.resized:
            save[t.module] = "resized vocabulary"
            lora.pop(t.module, None)
            reports.pop(t.module, None)
    if bias:
        for m in bias:  # a changed bias on a linear layer whose weight did not change: a zero LoRA carries it
            if m not in lora:
                w = by_name[f"{m}.weight"].tuned
                A = torch.zeros(1, w.shape[1], dtype=bias[m].dtype)
                B = torch.zeros(w.shape[0], 1, dtype=bias[m].dtype)
                lora[m] = (A, B)
                reports[m] = ModuleReport(1, 0.0, 0.0, "bias-only")
        for m in [m for m in lora if roles.get(m) == "embedding"]:  # PEFT has no lora_bias for embeddings
            lora.pop(m)
            reports.pop(m)
            save[m] = "embedding (lora_bias is in use, which PEFT's embedding LoRA does not support)"
        no_bias = [m for m in lora if f"{m}.bias" not in by_name]
        if no_bias:
            notes.append(f"lora_bias is on for the changed biases; {len(no_bias)} LoRA module(s) without a bias in "
                         f"the base ({_some(sorted(no_bias))}) get a zero one: PEFT warns that it cannot merge them.")
    unrepresentable = _check_saved(save, lora, tensors, base)
    if unrepresentable:
        lines = "\n".join(f"  {n}: {why}" for n, why in sorted(unrepresentable.items()))
        raise UnrepresentableChangeError(
            f"{len(unrepresentable)} changed tensor(s) cannot be carried by a PEFT LoRA:\n{lines}\n"
            "  fix: leave them out knowingly with --exclude REGEX (they are then listed as not extracted), "
            "or keep the full fine-tune.", tensors=sorted(unrepresentable))
    if not lora and not save:
        raise ExtractError(f"nothing to extract: every tensor of {tuned.path} that the options select equals the "
                           f"base's ({base.path}).\n  fix: check that --tuned names the fine-tune, and --target.")
    out: dict[str, torch.Tensor] = {}
    for m, (A, B) in lora.items():
        prefix = "lora_embedding_" if roles[m] == "embedding" else "lora_"
        out[f"{m}.{prefix}A"] = A.contiguous()
        out[f"{m}.{prefix}B"] = B.contiguous()
        if bias and prefix == "lora_":
            delta = bias.get(m)
            out[f"{m}.lora_B.bias"] = (delta if delta is not None else torch.zeros(B.shape[0], dtype=B.dtype)
                                       ).contiguous()
    for m in save:
        for t in tensors:
            if t.module == m:
                copy = found.copies.get(t.name)
                out[t.name] = copy if copy is not None else load_tensor(t.tuned, cached=False)
    ranks = {m: A.shape[0] for m, (A, _) in lora.items()}
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    pattern = {re.escape(m): k for m, k in sorted(ranks.items()) if k != r}
    spec = LoraSpec(r=r, alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern), target_modules=None,
                    lora_bias=bool(bias), modules_to_save=tuple(sorted(save)))
    base_fp, tuned_fp = base.fingerprint(), tuned.fingerprint()
    full_bytes = sum(t.nbytes for t in tuned.tensors.values())
    record = {
        "recipe": LINEAGE_SCHEMA, "method": "extract",
        "svd": {"kind": "randomized range finder" if rule.svd != "dense" else "dense",
                "oversample": rule.oversample, "power_iters": rule.power_iters, "seed": options["seed"]},
        "base": {"path": str(base.path), "name_or_path": base.name_or_path, "fingerprint": base_fp},
        "tuned": {"path": str(tuned.path), "name_or_path": tuned.name_or_path, "fingerprint": tuned_fp},
        "options": {k: v for k, v in options.items() if k not in ("oversample", "power_iters", "seed")},
        "modules": {m: {"rank": rep.rank, "error": rep.error,
                        "change": None if math.isnan(rep.change) else rep.change, "method": rep.method}
                    for m, rep in sorted(reports.items()) if m in lora},
        "modules_to_save": dict(sorted(save.items())), "not_extracted": dict(sorted(not_extracted.items())),
        "unchanged_tensors": len(found.unchanged), "rounding_only": sorted(found.rounding_only),
        "full_bytes": full_bytes, "notes": notes,
    }
    ref = BaseModelRef(name_or_path=base.name_or_path or str(base.path), fingerprint=base_fp,
                       model_type=base.model_type, architectures=base.architectures)
    adapter = Adapter(kind="lora", spec=spec, tensors=Tensors(out), base=ref, extra={"extract": record})
    return Extraction(adapter=adapter, base_path=base.path, tuned_path=tuned.path, base_fingerprint=base_fp,
                      tuned_fingerprint=tuned_fp, modules={m: reports[m] for m in sorted(lora)},
                      modules_to_save=sorted(save), unchanged=found.unchanged, rounding_only=found.rounding_only,
                      not_extracted=not_extracted, notes=notes, full_bytes=full_bytes, options=options)


def _check_saved(save: dict[str, str], lora: dict[str, Any], tensors: list[_Tensor], base: BaseCheckpoint
                 ) -> dict[str, str]:
    """Tensors of modules that cannot go to PEFT's ``modules_to_save`` (tensor -> why)."""
    modules = {t.module for t in tensors}
    every = set()  # every module path PEFT will see, ancestors included
    for m in modules:
        parts = m.split(".")
        every.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    tied = bool(base.text_config.get("tie_word_embeddings")) and "lm_head.weight" not in base.tensors
    vocab = _vocab(base)
    bad: dict[str, str] = {}
    for m, why in save.items():
        names = [t.name for t in tensors if t.module == m]
        reason = None
        if m == "":
            reason = "a parameter of the model itself, not of a module"
        elif m in lora:
            reason = "its module also carries a LoRA; PEFT cannot save it whole as well"
        elif any(n.startswith(m + ".") for n in modules):
            reason = "its module has submodules; saving it whole would copy them all"
        elif tied and why != "resized vocabulary" and any(
                t.module == m and t.role == "embedding" and t.base.shape[0] == vocab for t in tensors):
            reason = "the input embedding is tied to the LM head; PEFT would change only one of them"
        elif any(p != m and p.endswith(m) for p in every):
            reason = "PEFT matches modules_to_save by suffix and this name is a suffix of another module's"
        if reason:
            bad.update({n: reason for n in names})
    for m in lora:
        if tied and any(t.module == m and t.role == "embedding" and t.base.shape[0] == vocab for t in tensors):
            bad[f"{m}.weight"] = "the input embedding is tied to the LM head; PEFT's embedding LoRA changes only " \
                                 "the input side"
    return bad


# --- writing and pushing -------------------------------------------------------------------------------


def input_bytes(base: str | Path, tuned: str | Path) -> int:
    """Bytes :func:`extract` reads from both checkpoints (for a progress bar); headers only."""
    b, t = BaseCheckpoint.open(base), BaseCheckpoint.open(tuned)
    return sum(i.nbytes for i in b.tensors.values()) + sum(i.nbytes for i in t.tensors.values())


def save(result: Extraction, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the extracted adapter as a PEFT directory (atomically; modes follow the umask); returns its path.

    Raises:
        OutputPathError: ``out`` is, contains or lies inside an input checkpoint (or the registry, or the
            current directory).
        FormatError: ``out`` exists and is not empty (unless ``overwrite``).
        StorageError: the disk is full or the place not writable (nothing is left at ``out``).
    """
    from adapterhub.formats import write_adapter
    from adapterhub.paths import reading

    with reading(result.base_path, result.tuned_path, role="an input checkpoint"):
        return write_adapter(result.adapter, out, format="peft", overwrite=overwrite)


def push(result: Extraction, registry: Registry, target: str, *, tags: Sequence[str] = (),
         description: str | None = None) -> PushResult:
    """Push the extracted adapter as ``NAME[@VERSION]`` with its lineage (base and fine-tune fingerprints,
    method, options, per-module rank, error and change) as the manifest's ``recipe``."""
    desc = description if description is not None else (
        f"LoRA extracted from {result.tuned_path.name} against {result.base_path.name}: {len(result.modules)} "
        f"modules, max error {result.max_error:.3g}")
    return registry.push(result.adapter, target, tags=tags, description=desc, recipe=result.lineage())


@dataclass
class ExtractOutcome:
    """What :func:`extract_to` did: the extraction, and where it went."""

    result: Extraction
    path: Path | None = None
    pushed: PushResult | None = None


def extract_to(base: str | Path, tuned: str | Path, *, output: str | Path | None = None, push_to: str | None = None,
               registry: Registry | Callable[[], Registry] | None = None, tags: Sequence[str] = (),
               description: str | None = None, overwrite: bool = False, **options: Any) -> ExtractOutcome:
    """:func:`extract`, then write the adapter to ``output`` and/or push it as ``push_to`` with its lineage.

    Every output is checked before anything is read: a refused ``output`` (an input checkpoint, the
    registry, a read-only place) or a malformed name or tag costs nothing. ``registry`` is a Registry
    or a function returning one (called only when pushing). ``options`` go to :func:`extract`.

    Raises:
        ExtractError: neither ``output`` nor ``push_to``; and everything :func:`extract` raises.
        OutputPathError, FormatError, StorageError, InvalidReferenceError: an output cannot be written.
    """
    from adapterhub.formats._files import check_directory_target
    from adapterhub.paths import probe_directory, reading

    if output is None and push_to is None:
        raise ExtractError("an extraction needs somewhere to go: an output directory or a registry name.")
    if push_to is not None:
        from adapterhub.registry.refs import check_label, check_target

        check_target(push_to)
        for t in tags:
            check_label(t, "tag")
    with reading(base, tuned, role="an input checkpoint"):
        if output is not None:
            check_directory_target(output, overwrite=overwrite)
            probe_directory(output)
        reg = None
        if push_to is not None:
            reg = registry() if callable(registry) else registry
            if reg is None:
                raise ExtractError(f"pushing {push_to} needs a registry.")
        outcome = ExtractOutcome(extract(base, tuned, **options))
        if output is not None:
            outcome.path = save(outcome.result, output, overwrite=overwrite)
        if reg is not None:
            outcome.pushed = push(outcome.result, reg, push_to, tags=tags, description=description)
    return outcome


__all__ = ["extract", "extract_to", "save", "push", "input_bytes", "Extraction", "ExtractOutcome", "ModuleReport",
           "lineage_of", "MAX_CHANGE"]
