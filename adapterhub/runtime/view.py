"""A live transformers model seen the way the compatibility checks see a checkpoint directory.

:class:`LiveModel` satisfies :class:`adapterhub.compose.checks.BaseView`, so ``check_adapter`` runs
unchanged against a model in memory: weight names and shapes come from ``named_parameters`` /
``named_buffers`` (tied weights under every name), sizes from ``model.config``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from adapterhub.dtypes import torch_to_st


@dataclass(frozen=True)
class LiveTensor:
    """One tensor of a live model: name, safetensors dtype name, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]


class LiveModel:
    """The check-facing view of a live model (nothing is copied; build it again after changing the model)."""

    def __init__(self, model: Any, modules: dict[str, Any] | None = None) -> None:
        self.model = model
        self._named = modules  # module path -> module (without the root), to avoid walking the model again
        self.config = getattr(model, "config", None)
        source = getattr(self.config, "_name_or_path", None) or getattr(self.config, "name_or_path", None)
        self.path = Path(source) if source else Path(f"<live {type(model).__name__}>")

    @property
    def modules_by_path(self) -> dict[str, Any] | None:
        """Module path -> module (without the root), when the view was built with it."""
        return self._named

    @cached_property
    def tensors(self) -> dict[str, LiveTensor]:
        out: dict[str, LiveTensor] = {}
        if self._named is None:
            named = [*self.model.named_parameters(remove_duplicate=False),
                     *self.model.named_buffers(remove_duplicate=False)]
        else:
            owners = [("", self.model), *((p + ".", m) for p, m in self._named.items())]
            named = [(prefix + n, t) for prefix, m in owners for table in (m._parameters, m._buffers)
                     for n, t in table.items() if t is not None]
        for name, t in named:
            try:
                dtype = torch_to_st(t.dtype)
            except KeyError:
                dtype = str(t.dtype)
            out[name] = LiveTensor(name, dtype, tuple(t.shape))
        return out

    @cached_property
    def modules(self) -> dict[str, str]:
        """Module path -> its weight's name (every parameter named ``<module>.weight``)."""
        return {n[: -len(".weight")]: n for n in self.tensors if n.endswith(".weight")}

    def fingerprint(self) -> None:
        """None: a live model's tensors may have been cast or tied since loading, so no fingerprint is claimed."""
        return None

    # --- what the config says --------------------------------------------------------------

    @cached_property
    def text_config(self) -> Any:
        c = self.config
        getter = getattr(c, "get_text_config", None)
        return getter() if callable(getter) else c

    def _get(self, *names: str) -> Any:
        for n in names:
            v = getattr(self.text_config, n, None)
            if v:
                return v
        return None

    @property
    def name_or_path(self) -> str | None:
        """The model's hub name; None when it was loaded from a local directory (then ``path`` names it, as
        for a checkpoint directory, whose config.json records no name)."""
        name = getattr(self.config, "_name_or_path", None) or None
        return None if name is None or Path(name).is_dir() else name

    @property
    def model_type(self) -> str | None:
        return getattr(self.config, "model_type", None)

    @property
    def architectures(self) -> list[str]:
        """The config's ``architectures``, else the model's own class."""
        return list(getattr(self.config, "architectures", None) or [type(self.model).__name__])

    @property
    def quantization(self) -> dict[str, Any] | None:
        """What ``config.quantization_config`` says (method, bits), or None for a full-precision model."""
        q = getattr(self.config, "quantization_config", None)
        if not q:
            return None
        q = q if isinstance(q, dict) else q.to_dict()
        bits = q.get("bits") or (4 if q.get("load_in_4bit") else 8 if q.get("load_in_8bit") else None)
        return {"method": q.get("quant_method"), "bits": bits, "evidence": "config.quantization_config"}

    @property
    def hidden_size(self) -> int | None:
        return self._get("hidden_size", "n_embd", "d_model")

    @property
    def num_layers(self) -> int | None:
        return self._get("num_hidden_layers", "n_layer", "num_layers")

    @property
    def num_attention_heads(self) -> int | None:
        return self._get("num_attention_heads", "n_head", "num_heads")

    @property
    def num_kv_heads(self) -> int | None:
        return self._get("num_key_value_heads") or self.num_attention_heads

    @property
    def head_dim(self) -> int | None:
        hd = self._get("head_dim")
        if hd:
            return int(hd)
        if self.hidden_size and self.num_attention_heads:
            return self.hidden_size // self.num_attention_heads
        return None
