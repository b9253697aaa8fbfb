"""SigLIP 2 (NaFlex, ``siglip2``) and MetaCLIP 2 (``metaclip_2``) as prefilter dual encoders: genret's embeddings are
transformers' own ``get_image_features`` / ``get_text_features`` on the processor's outputs, normalised.

Both checkpoints are shrunk from transformers' config classes and their tokenizers are stand-ins (see
``tests/embedder_checkpoints.py``): these tests check the loading and embedding path, not the real vocabularies.
Fixed-resolution SigLIP 2 checkpoints (``google/siglip2-base-patch16-224``...) are ``model_type siglip`` ("FixRes ...
backward compatible with SigLIP v1", transformers' siglip2 documentation) and run as SigLIP does.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from embedder_checkpoints import build_metaclip_2, build_siglip2_naflex
from genret.encoders.hf import HFDualEncoder

TEXTS = ["a red circle left of a blue square", "two cats on a sofa", "ein Hund im Schnee"]


def _images():
    rng = np.random.default_rng(1)
    # NaFlex keeps each aspect ratio: these become different patch grids, padded to one length in a batch
    sizes = [(48, 64), (120, 300), (64, 64)]
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _unit(x: torch.Tensor) -> np.ndarray:
    x = x.pooler_output if not isinstance(x, torch.Tensor) else x
    return torch.nn.functional.normalize(x.float(), dim=-1).detach().numpy()


def test_siglip2_naflex_embeds_as_transformers_does(tmp_path):
    encoder = HFDualEncoder(str(build_siglip2_naflex(tmp_path / "siglip2")), device="cpu")
    assert type(encoder.model).__name__ == "Siglip2Model" and encoder.model_type == "siglip2"
    tok = encoder.processor.tokenizer  # the stand-in: a Gemma sentencepiece vocabulary with Gemma's special ids
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    images = _images()
    inputs = encoder.processor.image_processor(images=images, return_tensors="pt")
    assert "spatial_shapes" in inputs  # NaFlex: without it (and the patch mask) get_image_features fails
    with torch.no_grad():
        want = _unit(encoder.model.get_image_features(**inputs))
    got = encoder.encode_images(images)
    assert np.abs(got - want).max() < 1e-5
    assert np.abs(encoder.encode_images(images[:1]) - got[:1]).max() < 1e-5  # the padding of a batch changes nothing
    tokens = encoder.processor.tokenizer(TEXTS, padding="max_length", max_length=64, return_attention_mask=False,
                                         return_tensors="pt")
    with torch.no_grad():
        want = _unit(encoder.model.get_text_features(input_ids=tokens["input_ids"]))
    assert np.abs(encoder.encode_texts(TEXTS) - want).max() < 1e-5


def test_metaclip_2_embeds_as_transformers_does(tmp_path):
    path = build_metaclip_2(tmp_path / "metaclip2", TEXTS * 10)
    encoder = HFDualEncoder(str(path), device="cpu")
    assert type(encoder.model).__name__ == "MetaClip2Model"
    assert type(encoder.processor.tokenizer).__name__ == "XLMRobertaTokenizer"
    images = _images()
    with torch.no_grad():
        want = _unit(encoder.model.get_image_features(**encoder.processor.image_processor(images=images,
                                                                                           return_tensors="pt")))
        tokens = encoder.processor.tokenizer(TEXTS, padding=True, return_tensors="pt")
        want_text = _unit(encoder.model.get_text_features(**tokens))
    assert np.abs(encoder.encode_images(images) - want).max() < 1e-5
    assert np.abs(encoder.encode_texts(TEXTS) - want_text).max() < 1e-5
    # MetaCLIP 2 pools the </s> position: the same text embeds the same beside a longer one
    assert np.abs(encoder.encode_texts(TEXTS[1:2]) - encoder.encode_texts(TEXTS)[1:2]).max() < 1e-5
