"""Dual encoders of real architectures with their real tokenizer classes and processor settings."""

import numpy as np

from genret.encoders.hf import HFDualEncoder
from real_checkpoints import build_siglip


def test_siglip_loads_with_its_sentencepiece_tokenizer_and_pads_to_64(world, tmp_path):
    """SiglipTokenizer is a sentencepiece tokenizer: without the sentencepiece package it cannot even be built."""
    texts = [c for r in world.records for c in r.captions]
    path = build_siglip(tmp_path / "siglip", texts)
    encoder = HFDualEncoder(str(path), device="cpu")
    assert type(encoder.processor.tokenizer).__name__ == "SiglipTokenizer"
    short = encoder.encode_texts(["a red circle"])
    padded = encoder.encode_texts(["a red circle", "a red circle left of a small blue square above a star"])
    # SigLIP was trained on texts padded to 64 tokens: the same text embeds the same in any batch
    np.testing.assert_allclose(short[0], padded[0], atol=1e-5)
    ims = encoder.encode_images([str(r.path) for r in world.split("test").records[:2]])
    assert ims.shape == (2, encoder.dim) and np.isfinite(ims).all()


def test_clip_with_openais_vocabulary_gives_openais_token_ids(world, tmp_path):
    """The ids OpenAI's CLIP gives "a photo of a cat" (as in transformers' own CLIP examples)."""
    from real_checkpoints import build_clip

    encoder = HFDualEncoder(str(build_clip(tmp_path / "clip")), device="cpu")
    tok = encoder.processor.tokenizer
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("A Photo of a CAT")["input_ids"] == tok("a photo of a cat")["input_ids"]  # lower-cased
    texts = encoder.encode_texts(["a red circle left of a blue square", "a photo of a cat"])
    ims = encoder.encode_images([str(r.path) for r in world.split("test").records[:2]])
    assert texts.shape == (2, 16) and ims.shape == (2, 16) and np.isfinite(texts).all()
