"""Every scoring path on shrunk copies of real checkpoints: their tokenizers, chat templates, processor settings.

The fixtures (``tests/fixtures/checkpoints``) hold the real files of Qwen2-VL-2B-Instruct, Qwen2.5-VL-3B-Instruct,
llava-1.5-7b-hf and SmolVLM-256M-Instruct; only layer sizes are shrunk and the weights are random. What a toy
tokenizer hides (sentencepiece's "▁", byte-level BPE's leading space, a template that moves images) shows here.
"""

import copy

import pytest
import torch
from PIL import Image

from genret.mllm import MLLM
from genret.mllm.scoring import generative_scores, image_features, listwise_scores, pointwise_scores
from genret.prompts import load_prompt
from real_checkpoints import CHECKPOINTS, fixture

NAMES = list(CHECKPOINTS)
EXACT_VOCAB = [n for n in NAMES if fixture(n)["tokenizer"]["config_ids_match"]]


@pytest.fixture(scope="module")
def images(world):
    ims = [Image.open(r.path).convert("RGB") for r in world.split("test").records[:3]]
    return ims + [ims[0].crop((0, 0, 64, 32))]


@pytest.mark.parametrize("name", NAMES)
def test_loads_as_its_family_with_the_real_processor(real_mllms, name):
    mllm = real_mllms[name]
    fx = fixture(name)
    assert mllm.family.name == CHECKPOINTS[name]
    assert type(mllm.processor).__name__ == fx["processor_config"]["processor_class"]
    assert mllm.processor.chat_template == fx["chat_template"]


@pytest.mark.parametrize("name", EXACT_VOCAB)
def test_the_real_vocabulary_holds_the_configs_token_ids(real_dirs, name):
    """Image and vision token ids of the real config.json are the real tokenizer's ids of those tokens."""
    import json

    real, built = fixture(name)["config"], json.loads((real_dirs[name] / "config.json").read_text())
    keys = [k for k in ("image_token_id", "image_token_index", "video_token_id", "vision_start_token_id",
                        "vision_end_token_id") if k in real]
    assert keys and all(built[k] == real[k] for k in keys)


def _score(mllm, mode, direction, images, **kwargs):
    prompt = load_prompt(f"rerank_{mode}").section(direction)
    texts = ["a red circle left of a blue square", "a small green star", "two crosses", "a blue square"]
    if direction == "t2i":
        texts, ims = [texts[0]] * len(images), list(images)
    else:
        ims = [images[-1]] * len(texts)
    if mode == "pointwise":
        return pointwise_scores(mllm, prompt["user"], texts, ims, batch_size=3, **kwargs)
    if mode == "generative":
        return generative_scores(mllm, prompt["user"], [prompt["assistant"].replace("{text}", t) for t in texts], ims,
                                 batch_size=3, **kwargs)
    if direction == "t2i":
        return listwise_scores(mllm, prompt["user"], prompt["item"], {"text": texts[0]}, ims, "image")
    return listwise_scores(mllm, prompt["user"], prompt["item"], {"image": ims[0]}, texts, "text")


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("mode", ["pointwise", "generative", "listwise"])
@pytest.mark.parametrize("name", NAMES)
def test_cached_features_and_shared_prefix_give_the_pil_scores(real_mllms, real_dirs, images, name, mode, direction):
    mllm = real_mllms[name]
    if mllm.family.prepare_feature_cache(copy.deepcopy(mllm.processor)):  # SmolVLM: as the rerank stage sets it up
        mllm = MLLM.load(str(real_dirs[name]))
        mllm.family.prepare_feature_cache(mllm.processor)
    plain = _score(mllm, mode, direction, images)
    feats = image_features(mllm, images)
    fast = _score(mllm, mode, direction, feats)
    assert fast == pytest.approx(plain, abs=1e-4)
    if mode != "listwise":
        assert _score(mllm, mode, direction, feats, shared_prefix=False) == pytest.approx(plain, abs=1e-4)
    assert max(plain) - min(plain) > 1e-3


def test_smolvlm_rerank_caches_unsplit_features_and_says_so(encoder, world, real_dirs, caplog):
    """SmolVLM ships with do_image_splitting on (a 64 px image: 17 tiles of 64 tokens); cached features need one
    tile, so the stage turns splitting off and warns; without the cache the checkpoint's tiles are kept."""
    from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline
    from genret.types import Query

    path = str(real_dirs["smolvlm-256m-instruct"])
    stages = ({"type": "prefilter", "k": 3},
              {"type": "rerank", "name": "cached", "mode": "pointwise", "model": path, "k": 3, "device_map": "cpu"},
              {"type": "rerank", "name": "tiles", "mode": "pointwise", "model": path, "k": 3, "cache_features": False})
    pipe = RetrievalPipeline(PipelineConfig(name="s", encoder=EncoderConfig(model="x"), stages=stages), encoder=encoder)
    with caplog.at_level("WARNING"):
        pipe.index(world.split("test"), progress=False)
    assert "do_image_splitting turned off for cached image features" in caplog.text
    cached, tiles = pipe.stages[1], pipe.stages[2]
    assert not cached.mllm.processor.image_processor.do_image_splitting
    assert tiles.mllm.processor.image_processor.do_image_splitting
    assert all(tuple(f.shape) == (64, 64) for f in cached.features.values())  # one 512 px tile: 64 tokens of 64
    outputs = dict(pipe.run([Query(id="t", text=world.split("test").records[0].captions[0])]))
    scores = [{c.item_id: c.scores[n] for c in outputs[n][0].candidates} for n in ("cached", "tiles")]
    assert set(scores[0]) == set(scores[1]) and scores[0] != pytest.approx(scores[1], abs=1e-4)


def test_smolvlm_splitting_with_cached_features_is_refused_before_loading(real_dirs):
    from genret.stages.rerank import RerankConfig, RerankStage

    stage = RerankStage(RerankConfig(model=str(real_dirs["smolvlm-256m-instruct"]),
                                     processor_options={"do_image_splitting": True}), "rerank")
    with pytest.raises(ValueError, match="set cache_features = false to keep the tiles"):
        stage.mllm
