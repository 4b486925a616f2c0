"""Where things go, per architecture: one small table row per model family.

LoRA and IA3 need no row: they attach to whatever Linear module their names resolve to. Bottleneck
adapters and prefixes do. A row says

- for each bottleneck location as the ``adapters`` library names it in its tensors (the part between
  the layer path and ``.adapters.``), how the model computes that sub-block's output and residual:
  :class:`PostLN` (``LN(dropout(dense(h)) + x)`` inside one module, BERT) or :class:`PreLN` (the
  decoder layer adds ``x + sublayer(norm(x))`` itself, Llama);
- whether attention is causal, and how the library numbers positions when a prefix is in front
  (``positions``: ``"arange"`` 0..T-1 after the past; ``"roberta"`` padding-aware from ``padding_idx``).

Adding an architecture is adding a row (and a test against the ``adapters`` library or PEFT).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PostLN:
    """A post-norm sub-block output module: ``forward(h, x) = norm(dropout(dense(h)) + x)`` (BERT family).

    The adapters run on ``dropout(dense(h))`` with residual ``x`` and the module's own ``norm``.
    """

    module: str  # path of the module inside the layer
    dense: str = "dense"
    dropout: str = "dropout"
    norm: str = "LayerNorm"


@dataclass(frozen=True)
class PreLN:
    """A pre-norm decoder layer: ``x + sublayer(norm(x))`` (Llama family).

    The adapters run on the ``sublayer`` output with residual ``x``, the input of ``residual_at``.
    """

    sublayer: str
    residual_at: str


@dataclass(frozen=True)
class Arch:
    """One row of the table."""

    name: str
    model_types: tuple[str, ...]
    #: library location name -> (the library's location key, placement)
    bottleneck: dict[str, tuple[str, PostLN | PreLN]] = field(default_factory=dict)
    causal: bool = False
    positions: str = "arange"


BERT = Arch(
    name="bert",
    model_types=("bert", "roberta", "xlm-roberta", "camembert"),
    bottleneck={
        "attention.output": ("mh_adapter", PostLN("attention.output")),
        "output": ("output_adapter", PostLN("output")),
    },
    causal=False,
)

LLAMA = Arch(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    bottleneck={
        "attention_adapters": ("mh_adapter", PreLN("self_attn", "input_layernorm")),
        "output_adapters": ("output_adapter", PreLN("mlp", "post_attention_layernorm")),
    },
    causal=True,
)

TABLE: tuple[Arch, ...] = (BERT, LLAMA)
#: model types whose position ids are offset by padding_idx (RoBERTa's convention)
ROBERTA_POSITIONS = ("roberta", "xlm-roberta", "camembert")


def arch_for(model_type: str | None) -> Arch | None:
    """The row for a ``config.model_type``, or None."""
    for row in TABLE:
        if model_type in row.model_types:
            return row
    return None


def known_model_types() -> list[str]:
    return sorted(t for row in TABLE for t in row.model_types)


def split_location(arch: Arch, location: str) -> tuple[str, str] | None:
    """``(layer path, library location name)`` of a bottleneck location such as
    ``encoder.layer.3.attention.output`` or ``model.layers.3.output_adapters``; None if the row has no such place."""
    for key in sorted(arch.bottleneck, key=len, reverse=True):
        if location.endswith("." + key):
            layer = location[: -len(key) - 1]
            if layer.rsplit(".", 1)[-1].isdigit():
                return layer, key
    return None


def default_positions(model_type: str | None, config: Any, input_ids: Any, inputs_embeds: Any, past: int) -> Any:
    """Position ids the model would use with ``past`` earlier tokens and no prefix in front."""
    import torch

    ref = input_ids if input_ids is not None else inputs_embeds
    batch, length = ref.shape[0], ref.shape[1]
    device = ref.device
    if model_type in ROBERTA_POSITIONS:
        pad = int(getattr(config, "pad_token_id", 1) or 1)
        if input_ids is not None:
            mask = input_ids.ne(pad).int()
            return ((torch.cumsum(mask, dim=1).type_as(mask) + past) * mask).long() + pad
        return (torch.arange(pad + 1 + past, pad + 1 + past + length, device=device)).expand(batch, length)
    return (torch.arange(past, past + length, device=device)).unsqueeze(0).expand(batch, length)
