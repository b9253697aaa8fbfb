import numpy as np
import pytest
from PIL import Image

from genret.data import ImageLoadError
from genret.encoders import EmbeddingCache, load_encoder


def test_unit_float32_and_batch_invariant(encoder, world):
    paths = [r.path for r in world.records[:10]]
    a = encoder.encode_images(paths, batch_size=1)
    b = encoder.encode_images(paths, batch_size=32)
    assert a.dtype == np.float32 and a.shape == (10, encoder.dim)
    assert np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    assert np.allclose(a, b, atol=1e-5)
    pil = encoder.encode_images([Image.open(paths[0])])
    assert np.allclose(pil[0], a[0], atol=1e-5)
    texts = [c for r in world.records[:4] for c in r.captions]
    t1, t2 = encoder.encode_texts(texts, batch_size=1), encoder.encode_texts(texts, batch_size=64)
    assert np.allclose(t1, t2, atol=1e-5) and np.allclose(np.linalg.norm(t1, axis=1), 1, atol=1e-5)


def test_sentence_transformers_backend_agrees_with_transformers(encoder, clip_dir, world):
    st = load_encoder("sentence-transformers", str(clip_dir), device="cpu")
    paths = [r.path for r in world.records[:4]]
    texts = list(world.records[0].captions)
    assert st.dim == encoder.dim
    assert np.allclose(st.encode_images(paths), encoder.encode_images(paths), atol=1e-4)
    assert np.allclose(st.encode_texts(texts), encoder.encode_texts(texts), atol=1e-4)


def test_cache_skips_work_and_persists(encoder, world, tmp_path, monkeypatch):
    paths = [r.path for r in world.records[:6]]
    encoder.cache = EmbeddingCache(tmp_path / "cache")
    first = encoder.encode_images(paths[:4])
    calls = []
    real = type(encoder)._embed_images
    monkeypatch.setattr(type(encoder), "_embed_images", lambda self, imgs: calls.append(len(imgs)) or real(self, imgs))
    second = encoder.encode_images(paths)  # 4 cached, 2 new
    assert calls == [2]
    assert np.allclose(second[:4], first)
    encoder.cache = EmbeddingCache(tmp_path / "cache")  # a new process sees the same shards
    calls.clear()
    third = encoder.encode_images(paths)
    assert calls == [] and np.allclose(third, second)
    assert len(encoder.cache) == 6


def test_cache_keys_on_model_revision(encoder, world, tmp_path):
    encoder.cache = EmbeddingCache(tmp_path / "cache")
    encoder.encode_texts(["a red circle"])
    other = encoder.cache_namespace
    encoder.revision = "different-weights"
    assert encoder.cache_namespace != other
    assert encoder.cache.get(encoder.cache_namespace, ["x"]) == {}


def test_failed_encode_writes_no_cache_shard(encoder, world, tmp_path):
    encoder.cache = EmbeddingCache(tmp_path / "cache")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ImageLoadError, match="bad.png: not a readable image"):
        encoder.encode_images([world.records[0].path, bad], batch_size=1)
    assert not list((tmp_path / "cache").rglob("*.safetensors"))
    assert not list((tmp_path / "cache").rglob("*.tmp"))


@pytest.mark.parametrize("texts,match", [([""], "text 0 is empty"), (["ok", None], "text 1 is NoneType")])
def test_bad_texts(encoder, texts, match):
    with pytest.raises(ValueError, match=match):
        encoder.encode_texts(texts)


def test_missing_model_and_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="encoder model directory not found"):
        load_encoder("hf", str(tmp_path / "nope"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="hub downloads are off"):
        load_encoder("hf", "openai/clip-vit-base-patch32")
    with pytest.raises(KeyError, match="unknown encoder backend 'open_clip'"):
        load_encoder("open_clip", "x")


def test_siglip_checkpoint_pads_to_max_length(tmp_path):
    """A SigLIP checkpoint loads through the same backend; its texts are padded as it was trained."""
    import torch
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    from genret.bpe import train_clip_tokenizer

    tok = train_clip_tokenizer(["a red circle left of a blue square"] * 4, 300, model_max_length=64)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = SiglipConfig(text_config=dict(vocab_size=len(tok), max_position_embeddings=64, **small),
                          vision_config=dict(image_size=32, patch_size=8, **small))
    torch.manual_seed(0)
    SiglipModel(config).save_pretrained(tmp_path)
    SiglipProcessor(image_processor=SiglipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(tmp_path)
    enc = load_encoder("hf", str(tmp_path), device="cpu")
    assert enc.model_type == "siglip" and enc.dim == 32
    got = enc.encode_texts(["a red circle"])[0]
    ids = tok(["a red circle"], padding="max_length", max_length=64, return_tensors="pt")
    with torch.no_grad():
        ref = enc.model.get_text_features(input_ids=ids["input_ids"]).pooler_output[0].numpy()
    assert np.allclose(got, ref / np.linalg.norm(ref), atol=1e-5)
    assert enc.encode_images([Image.new("RGB", (50, 40), (255, 0, 0))]).shape == (1, 32)


def test_texts_past_the_context_are_cut_and_said_so(encoder, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="genret.encoders.hf"):
        encoder.encode_texts(["a red circle"])
    assert "were cut" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="genret.encoders.hf"):
        encoder.encode_texts(["a red circle", "a red circle left of a blue square, " * 10])
    assert "1 of 2 texts are longer than the text encoder's" in caplog.text
