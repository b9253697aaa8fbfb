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
