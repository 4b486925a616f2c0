"""A quick look at a composition: one prompt through a base model, without and with the adapters attached.

What ``adapterhub run`` prints. Causal LMs decode greedily; encoders report how far the attached
model's mean-pooled output moved from the base's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterhub.errors import BaseCheckpointError, CompositionError


@dataclass(frozen=True)
class PromptResult:
    """``kind`` is ``"generate"`` (``base``/``attached`` are texts, or token ids without a tokenizer) or
    ``"encode"`` (``cosine`` and ``max_abs_diff`` compare the mean-pooled outputs)."""

    kind: str
    base: Any = None
    attached: Any = None
    cosine: float | None = None
    max_abs_diff: float | None = None
    summary: str = ""


def run_prompt(base_dir: str | Path, composition: Any, *, prompt: str | None = None,
               token_ids: list[int] | None = None, max_new_tokens: int = 20,
               resolve: Callable[[Any], Any] | None = None) -> PromptResult:
    """Run ``prompt`` (or ``token_ids``) through the base at ``base_dir``, then with ``composition`` attached.

    Raises:
        BaseCheckpointError: the base cannot be loaded with transformers, or has no tokenizer for a prompt.
        CompositionError, AttachError: as :func:`adapterhub.runtime.attach`.
    """
    import torch

    from adapterhub.base import BaseCheckpoint
    from adapterhub.runtime.attached import attach

    if (prompt is None) == (token_ids is None):
        raise CompositionError("give either a prompt or token ids.\n  fix: pass --prompt TEXT or --ids 1,2,3 "
                               "(Python: prompt= or token_ids=), not both.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise CompositionError(f"max_new_tokens must be a positive integer, not {max_new_tokens!r}.\n"
                               "  fix: pass --max-new-tokens 1 or more.")
    if token_ids is not None and not token_ids:
        raise CompositionError("no token ids were given.\n  fix: pass --ids with at least one id, e.g. --ids 1,2,3.")
    base = BaseCheckpoint.open(base_dir)
    try:
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        causal = any(a.endswith("ForCausalLM") for a in base.config.get("architectures") or [])
        model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(str(base_dir)).eval()
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds (config validation, size mismatches)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BaseCheckpointError(f"transformers cannot load {base_dir} ({type(e).__name__}: {first})\n"
                                  "  fix: pass a transformers model directory whose config.json matches its weights.",
                                  path=base_dir) from e
    tokenizer = None
    if prompt is not None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
        except (OSError, ValueError) as e:
            raise BaseCheckpointError(f"{base_dir} has no tokenizer for a text prompt ({e}).\n"
                                      "  fix: pass --ids with token ids instead.", path=base_dir) from e
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    else:
        vocab = model.get_input_embeddings().num_embeddings
        bad = [t for t in token_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise CompositionError(f"token id(s) {', '.join(map(repr, bad[:5]))} are outside the vocabulary of "
                                   f"{base_dir} (ids 0..{vocab - 1}).\n  fix: pass ids from 0 to {vocab - 1}.")
        ids = torch.tensor([token_ids], dtype=torch.long)
    mask = torch.ones_like(ids)

    def once() -> Any:
        with torch.no_grad():
            if causal:
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=getattr(model.config, "eos_token_id", None))
                new = out[0, ids.shape[1]:].tolist()
                return tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else new
            return model(input_ids=ids, attention_mask=mask).last_hidden_state.mean(dim=1)[0]

    plain = once()
    with attach(model, composition, resolve=resolve) as attached:
        adapted = once()
        summary = attached.summary()
    if causal:
        return PromptResult("generate", base=plain, attached=adapted, summary=summary)
    cos = float(torch.nn.functional.cosine_similarity(plain, adapted, dim=0))
    return PromptResult("encode", cosine=cos, max_abs_diff=float((plain - adapted).abs().max()), summary=summary)
