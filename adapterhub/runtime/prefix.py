"""Prefix tuning at run time: key/value prefixes in front of every attention layer, through the KV cache.

A forward pre-hook on the model's base (``model.base_model``: ``LlamaModel``, ``BertModel`` ...) puts
the prefix into a ``DynamicCache`` before the first token (each layer's keys/values are prepended,
after RoPE and before ``repeat_kv``, so a GQA prefix has one key/value per kv-head), prepends ``L``
ones to the 2-d attention mask and passes the cache on. A cache that comes back from the model
already holds the prefix and is recognised when passed in again (generation); the caller's masks
and position ids never count the prefix.

Positions: PEFT numbers the real tokens after the prefix (``L, L+1, ...``: they follow it in the
cache); the ``adapters`` library numbers them from 0. A prefix is run with the convention it was
trained with (``"peft"`` for PEFT-layout prefixes, ``"adapters"`` for the library's), so both
libraries' outputs are reproduced; stacked prefixes must agree.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any

import torch
from torch import nn

from adapterhub.errors import AttachedStateError
from adapterhub.runtime.arch import default_positions


def layer_kv(values: torch.Tensor, *, num_layers: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """PEFT-layout prefix values (L x layers*2*kv*hd) as ``[layers*2, kv_heads, L, head_dim]`` (key, value
    of each layer)."""
    length = values.shape[0]
    return values.view(length, num_layers * 2, num_kv_heads, head_dim).permute(1, 2, 0, 3)


class PrefixSite:
    """The pre-hook that feeds a prefix to every forward of one base model."""

    kind = "prefix"

    def __init__(self, base: nn.Module, path: str, model_type: str | None, config: Any) -> None:
        self.base = base
        self.path = path
        self.model_type = model_type
        self.config = config
        params = inspect.signature(type(base).forward).parameters
        self.names = [n for n, p in params.items() if n != "self" and p.kind in (p.POSITIONAL_ONLY,
                                                                                   p.POSITIONAL_OR_KEYWORD)]
        self.cache_name = "cache" if "cache" in params else "past_key_values"
        self.kv: torch.Tensor | None = None  # [layers*2, kv, L, hd]
        self.convention = "peft"
        self.version = 0  # changes with every payload: a cache filled under another payload is refused
        self.ours: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self.handle: Any = None
        self.installed = False

    @property
    def length(self) -> int:
        return 0 if self.kv is None else self.kv.shape[2]

    def set_payload(self, payload: dict[str, Any]) -> None:
        self.kv = payload.get("kv")
        self.convention = payload.get("convention", "peft")
        self.version += 1

    def _hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        if self.kv is None:
            return None
        kw = dict(kwargs)
        for name, value in zip(self.names, args, strict=False):
            kw[name] = value
        cache = kw.pop("cache", None)
        legacy = kw.pop("past_key_values", None)
        cache = cache if cache is not None else legacy
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            return None
        batch = ref.shape[0]
        length = self.length
        if cache is not None and cache in self.ours:
            if self.ours[cache] != self.version:
                raise AttachedStateError("this cache holds another prefix than the attached composition's.\n"
                                         "  fix: start generation again after swapping or reweighting a prefix.")
        elif cache is not None and cache.get_seq_length() > 0:
            raise AttachedStateError(
                "a cache that does not start with the attached prefix was passed to a model with a prefix attached.\n"
                "  fix: pass the cache returned by this model (or none).")
        else:
            cache = self._prefilled(cache, batch, ref.device)
        past = cache.get_seq_length() - length
        mask = kw.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise AttachedStateError("a prefix is attached and the attention mask is not 2-d (batch x tokens).\n"
                                         "  fix: pass a 2-d padding mask; the prefix columns are added to it.")
            ones = torch.ones(mask.shape[0], length, dtype=mask.dtype, device=mask.device)
            kw["attention_mask"] = torch.cat([ones, mask], dim=1)
        positions = kw.get("position_ids")
        if self.convention == "peft":
            if positions is not None:
                kw["position_ids"] = positions + length
        elif positions is None:
            kw["position_ids"] = default_positions(self.model_type, self.config, ids, embeds, past)
        if kw.get("cache_position") is not None:
            kw["cache_position"] = kw["cache_position"] + length
        kw[self.cache_name] = cache
        return (), kw

    def _prefilled(self, cache: Any, batch: int, device: torch.device) -> Any:
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache()
        kv = self.kv.to(device)
        for layer in range(kv.shape[0] // 2):
            k = kv[2 * layer].unsqueeze(0).expand(batch, -1, -1, -1)
            v = kv[2 * layer + 1].unsqueeze(0).expand(batch, -1, -1, -1)
            cache.update(k, v, layer)
        self.ours[cache] = self.version
        return cache

    def install(self) -> None:
        self.handle = self.base.register_forward_pre_hook(self._hook, with_kwargs=True)
        self.installed = True

    def uninstall(self) -> None:
        if self.handle is not None:
            self.handle.remove()
        self.handle = None
        self.installed = False

    @property
    def nbytes(self) -> int:
        return 0 if self.kv is None else self.kv.numel() * self.kv.element_size()
