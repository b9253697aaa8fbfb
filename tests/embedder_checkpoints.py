"""Shrunk MLLM-embedder checkpoints for the tests, laid out as published (see each fixture's ``sources``).

Qwen3-VL-Embedding: the shrunk Qwen3-VL-2B-Instruct build (real tokenizer, template, processor settings) with its
weights as the authors' ``Qwen3VLForEmbedding`` names them and the sentence-transformers files of the fixture
``qwen3-vl-embedding-2b``. GME: the shrunk Qwen2-VL-2B-Instruct build as it is (GME's weights are a stock
``qwen2_vl`` checkpoint; its inference code is what differs).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from real_checkpoints import build, fixture


def build_qwen3_vl_embedding(out_dir, seed: int = 0) -> Path:
    """Qwen3-VL-Embedding-2B, shrunk: loads in sentence-transformers from its own modules.json."""
    from safetensors.torch import load_file, save_file

    fx = fixture("qwen3-vl-embedding-2b")
    out = Path(out_dir)
    build(fx["base_fixture"], out, seed=seed)
    (out / "genret.json").unlink()  # a hub checkpoint carries no genret manifest
    weights = load_file(out / "model.safetensors")
    weights = {k: v for k, v in weights.items() if k.startswith("model.")}  # no lm_head in the embedder
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    hidden = config["text_config"]["hidden_size"]
    for name, content in fx["sentence_transformers"].items():
        if name == "1_Pooling/config.json":
            content = {**content, "embedding_dimension": hidden}  # the shrunk size
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=2))
    return out


def build_gme(out_dir, seed: int = 0) -> Path:
    """GME-Qwen2-VL-2B-Instruct, shrunk: a stock Qwen2-VL checkpoint."""
    out = Path(out_dir)
    build("qwen2-vl-2b-instruct", out, seed=seed)
    (out / "genret.json").unlink()
    return out


def copy_checkpoint(src, dst) -> Path:
    """A copy of a built checkpoint (for a test that edits one)."""
    return Path(shutil.copytree(src, dst))
