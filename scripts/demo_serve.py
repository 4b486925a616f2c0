"""The demo's last step: one resident MiniLM serves a mixed batch, a different adapter per row (one row none).

Usage: demo_serve.py REGISTRY BASE_DIR REF...   (one row per REF, then one row without adapter)
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging

import adapterhub

SENTENCES = ["the film was a delight from start to finish", "two hours of my life I will never get back",
             "a quiet story about a family and its farm", "the plot made no sense but the music was great"]


def main(registry: str, base_dir: str, refs: list[str]) -> None:
    logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModel.from_pretrained(base_dir).eval()
    rows: list[str | None] = [*refs, None]
    texts = [SENTENCES[i % len(SENTENCES)] for i in range(len(rows))]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        bare = model(**batch).last_hidden_state
    with adapterhub.Pool(model, registry=registry, slots=len(refs), max_rank=16) as pool:
        out = pool.forward(rows, **batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()

        def pooled(h: torch.Tensor) -> torch.Tensor:
            return (h * mask).sum(1) / mask.sum(1)

        cos = torch.nn.functional.cosine_similarity(pooled(out), pooled(bare), dim=-1)
        print(f"{'row':<4}{'adapter':<28}{'sentence':<50}cosine to the bare base")
        for i, (row, text) in enumerate(zip(rows, texts, strict=True)):
            extra = ""
            if row is None:
                extra = f"  (bit-identical to the bare base: {torch.equal(out[i], bare[i])})"
            print(f"{i:<4}{row or '(none)':<28}{text:<50}{cos[i].item():.4f}{extra}")
        stats = pool.stats()
    base, slots = stats["base_bytes"], stats["pool_bytes"]
    mib = 2**20
    print(f"\nresident: one base {base / mib:.1f} MiB + {stats['slots']} adapter slots {slots / mib:.1f} MiB = "
          f"{(base + slots) / mib:.1f} MiB; one merged copy per adapter instead: {len(refs)} x {base / mib:.1f} MiB = "
          f"{len(refs) * base / mib:.1f} MiB ({stats['loads']} adapters loaded from the registry on demand)")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
