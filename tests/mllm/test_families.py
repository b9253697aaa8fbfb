"""Every model family, each as a tiny checkpoint of its real architecture, through every scoring path.

The tiny models are random but sensitive (initializer_range 0.2): a wrong position, grid or image
feature moves their scores by far more than the tolerances here.
"""

import json
import shutil

import pytest
import torch

from genret.mllm import MLLM
from genret.mllm.answers import answer_format
from genret.mllm.families import family_of
from genret.mllm.scoring import (_inputs, image_features, listwise_scores, pointwise_scores, render,
                                 user_message)
from genret.mllm.tiny import build_tiny
from conftest import score_query
from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline
from genret.prompts import load_prompt
from genret.types import Query

# family -> (genret family, processor class, model class)
EXPECTED = {
    "llava": ("llava", "LlavaProcessor", "LlavaForConditionalGeneration"),
    "qwen2_vl": ("qwen2_vl", "Qwen2VLProcessor", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("qwen2_vl", "Qwen2_5_VLProcessor", "Qwen2_5_VLForConditionalGeneration"),
    "idefics3": ("idefics3", "Idefics3Processor", "Idefics3ForConditionalGeneration"),
}
FAMILIES = list(EXPECTED)
SPECIAL = {"qwen2_vl": ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>"),
           "idefics3": ("<fake_token_around_image>", "<global-img>", "<row_2_col_3>", "<image>", "<end_of_utterance>"),
           "llava": ("<image>",)}
SPECIAL["qwen2_5_vl"] = SPECIAL["qwen2_vl"]


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, world):
    """One tiny checkpoint per family, its tokenizer trained on the world's captions and the prompts."""
    prompts = [t for name in ("rerank_pointwise", "rerank_generative", "rerank_listwise")
               for d in ("t2i", "i2t") for t in load_prompt(name).section(d).values()]
    texts = [c for r in world.records for c in r.captions] + prompts
    root = tmp_path_factory.mktemp("tiny")
    return {f: build_tiny(f, root / f, texts) for f in FAMILIES}


@pytest.fixture(scope="session")
def tiny_mllms(tiny_dirs):
    return {f: MLLM.load(str(d)) for f, d in tiny_dirs.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_through_auto_classes_as_its_family(tiny_mllms, family):
    mllm = tiny_mllms[family]
    name, processor, model = EXPECTED[family]
    assert family_of(mllm.model).name == mllm.family.name == name
    assert type(mllm.processor).__name__ == processor and type(mllm.model).__name__ == model
    assert sum(p.numel() for p in mllm.model.parameters()) < 200_000
    for token in SPECIAL[family]:  # the family's real special tokens, each one token
        assert len(mllm.tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, token


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("mode", ["pointwise", "generative", "listwise"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_features_give_the_pil_scores(tiny_mllms, images, family, mode, direction):
    mllm = tiny_mllms[family]
    feats = image_features(mllm, images)
    plain = score_query(mllm, mode, direction, images)
    fast = score_query(mllm, mode, direction, feats)
    assert fast == pytest.approx(plain, abs=1e-4)
    assert max(plain) - min(plain) > 1e-2  # the candidates are told apart: the check above can fail


@pytest.mark.parametrize("family", FAMILIES)
def test_listwise_continuation_equals_full_forwards(tiny_mllms, images, family):
    """Two-digit answers run on the prompt's KV cache; the model's own forward of prompt + answer agrees."""
    mllm = tiny_mllms[family]
    section = load_prompt("rerank_listwise").section("i2t")
    texts = [f"caption number {i}" for i in range(12)]
    got = listwise_scores(mllm, section["user"], section["item"], {"image": images[-1]}, texts, "text")
    lines = "".join(section["item"].replace("{number}", str(n)).replace("{text}", t) for n, t in enumerate(texts, 1))
    prompt = render(mllm, user_message(section["user"], candidates=lines))
    fmt = answer_format(mllm)  # the answer as the template writes it (Idefics3: "Assistant: 12<end_of_utterance>")
    for n in (1, 12):
        full = mllm.processor(text=[prompt + fmt.text(str(n))], images=[images[-1]], return_tensors="pt")
        start = mllm.processor(text=[prompt], images=[images[-1]], return_tensors="pt")["input_ids"].shape[1]
        with torch.no_grad():  # no genret code: the model places the image tokens itself
            logp = mllm.model(**full).logits[0, :-1].log_softmax(-1)
        ids = full["input_ids"][0, 1:]
        want = sum(logp[p, ids[p]].item() for p in range(start - 1, len(ids)))
        assert got[n - 1] == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_positions_from_cached_features_equal_the_models_rope_index(tiny_mllms, images, family):
    mllm = tiny_mllms[family]
    prompts = [render(mllm, user_message("{image}{text}", text=t)) for t in ("a red circle", "two crosses on top")]
    pil = _inputs(mllm, prompts, [[images[0]], [images[-1]]])
    keys = ("input_ids", "mm_token_type_ids", "image_grid_thw", "attention_mask")
    want, _ = mllm.model.model.get_rope_index(**{k: pil[k] for k in keys})
    feats = image_features(mllm, [images[0], images[-1]])
    assert [tuple(f.shape[:2]) for f in feats] == [(3, 3), (2, 4)]  # (rows, cols) of merged tokens
    cached = _inputs(mllm, prompts, [[feats[0]], [feats[1]]])
    assert torch.equal(cached["image_grid_thw"], pil["image_grid_thw"])
    assert torch.equal(mllm.family.position_ids(mllm.model, cached), want)
    kwargs = mllm.family.forward_kwargs(mllm.model, cached["input_ids"], cached, cached["attention_mask"])
    assert torch.equal(kwargs["position_ids"], want)


def test_idefics3_split_images_score_from_pixels_and_refuse_caching(tiny_dirs, images):
    mllm = MLLM.load(str(tiny_dirs["idefics3"]))
    mllm.processor.image_processor.do_image_splitting = True  # 64 px images: 2×2 tiles of 32 px + the global view
    template = load_prompt("rerank_pointwise").section("t2i")["user"]
    scores = pointwise_scores(mllm, template, ["a red circle"] * 2, images[:2], batch_size=2)
    assert len(scores) == 2 and scores[0] != pytest.approx(scores[1], abs=1e-4)
    with pytest.raises(ValueError, match="do_image_splitting"):
        image_features(mllm, images[:1])


MODES = ("pointwise", "generative", "listwise")


@pytest.mark.parametrize("family", FAMILIES)
def test_rerank_stage_runs_every_mode_on_every_family(encoder, world, tiny_dirs, tmp_path, family):
    """prefilter → pointwise → generative → listwise rerank, both directions, features cached and saved."""
    stages = ({"type": "prefilter", "k": 5},
              *({"type": "rerank", "name": m, "mode": m, "model": str(tiny_dirs[family]), "k": 5, "fusion_weight": 0.5}
                for m in MODES))
    pipe = RetrievalPipeline(PipelineConfig(name="r", encoder=EncoderConfig(model="x"), stages=stages), encoder=encoder)
    pipe.index(world.split("test"), progress=False)
    assert [s.mllm.family.name for s in pipe.stages[1:]] == [EXPECTED[family][0]] * 3
    rec = world.split("test").records[1]
    queries = [Query(id="t", text=rec.captions[0]), Query(id="i", image=str(rec.path))]
    outputs = pipe.run(queries)
    assert [name for name, _ in outputs] == ["prefilter", *MODES]
    for (_, before), (mode, after) in zip(outputs, outputs[1:]):
        for b, a in zip(before, after):  # each query, t2i and i2t
            upstream = {c.item_id: c.score for c in b.candidates}
            assert sorted(a.ids) == sorted(upstream)  # the same candidates, rescored
            for c in a.candidates:
                assert c.score == pytest.approx(upstream[c.item_id] + 0.5 * c.scores[mode], abs=1e-5)
            assert len({round(c.scores[mode], 4) for c in a.candidates}) > 1, mode
    pipe.save(tmp_path / "p")
    loaded = RetrievalPipeline.load(tmp_path / "p", encoder=encoder)
    for stage, again in zip(pipe.stages[1:], loaded.stages[1:]):
        assert {k: v.shape for k, v in again.features.items()} == {k: v.shape for k, v in stage.features.items()}
    final = [r for name, r in loaded.run(queries) if name == "listwise"][0]
    for a, b in zip(final, outputs[-1][1]):
        assert a.ids == b.ids
        assert [c.score for c in a.candidates] == pytest.approx([c.score for c in b.candidates], abs=1e-4)


def test_unknown_model_type_says_no_family(tiny_dirs, tmp_path):
    """A SmolVLM2-style checkpoint (model_type smolvlm): it loads, then genret says it has no family for it."""
    path = tmp_path / "smolvlm"
    shutil.copytree(tiny_dirs["idefics3"], path)
    (path / "genret.json").unlink()  # a checkpoint as the hub has it: no genret manifest
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "smolvlm"}))
    with pytest.raises(ValueError, match="no genret model family for model_type 'smolvlm'; supported: .*qwen2_vl"):
        MLLM.load(str(path))


def test_build_tiny_names_the_families_it_knows(tmp_path):
    with pytest.raises(ValueError, match="llava, qwen2_vl, qwen2_5_vl, idefics3"):
        build_tiny("gpt5", tmp_path, ["x"])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen2_5_vl"])
def test_dense_pixels_turn_back_into_the_processors_inputs(tiny_mllms, images, family):
    """Training augments (rotates) images as (batch, channels, height, width) pixels; what the forward then gets of
    them is exactly what the processor gives for the same images."""
    mllm = tiny_mllms[family]
    shown = images[:3]  # same-size images (the fourth is not)
    dense = mllm.family.dense_pixels(mllm.processor, shown)
    assert dense.dim() == 4 and dense.shape[:2] == (3, 3)
    if family != "llava":  # Qwen's patches put back are the picture itself, normalised (no resize at this size)
        import numpy as np

        ip = mllm.processor.image_processor
        mean, std = (torch.tensor(v)[:, None, None] for v in (ip.image_mean, ip.image_std))
        direct = torch.tensor(np.asarray(shown[0].resize(dense.shape[-1:-3:-1])), dtype=torch.float32)
        assert torch.allclose(dense[0], (direct.permute(2, 0, 1) / 255 - mean) / std, atol=1e-5)
    expected = mllm.family.image_inputs(mllm.processor, shown)
    got = mllm.family.pixel_inputs(mllm.model, dense)
    assert set(got) == {k for k in expected if k in ("pixel_values", "image_grid_thw")}
    for key, value in got.items():
        assert torch.equal(value, expected[key]), key
    n = mllm.family.tokens_per_image(mllm.model, *dense.shape[-2:])
    assert sum(f.reshape(-1, f.shape[-1]).shape[0] for f in image_features(mllm, shown)) == 3 * n
