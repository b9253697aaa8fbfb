"""Gemma 3 (google/gemma-3-4b-it shrunk: real tokenizer, chat template, processor and config values, random weights).

genret's generative and pointwise scores equal the model's own forward over the checkpoint's own chat template
(``processor.apply_chat_template(..., tokenize=True)`` + ``model(**inputs)``, fp32, 1e-4), on every path: PIL
images, cached image features, and the shared-prefix KV cache in both directions. Gemma 3 attends both ways within
an image's 256 tokens (``token_type_ids``) and 5 of its 6 layers see a sliding window (shrunk to 128 tokens here, so
that every prompt crosses it inside and after the image): each test also shows the scores move when what carries
those is left out, so that it can fail.
"""

import pytest
import torch
from PIL import Image, ImageDraw

from genret.mllm.families.gemma3 import Gemma3Family
from genret.mllm.scoring import generative_scores, image_features, pointwise_scores
from genret.prompts import load_prompt

NAME = "gemma-3-4b-it"
TEXTS = ["a red circle left of a blue square", "a small green star"]


@pytest.fixture(scope="module")
def gemma(real_mllms):
    return real_mllms[NAME]


@pytest.fixture(scope="module")
def pictures():
    """Two different pictures and a non-square one (Gemma 3 resizes every image to 896×896: 256 tokens each)."""
    out = []
    for colour, box in (("red", (8, 8, 40, 40)), ("blue", (20, 4, 60, 30)), ("green", (2, 10, 30, 28))):
        im = Image.new("RGB", (64, 64 if colour != "green" else 40), "white")
        ImageDraw.Draw(im).ellipse(box, fill=colour)
        out.append(im)
    return out


def _messages(template: str, image, text: str = "") -> list[dict]:
    """A user turn as the model card writes one: the PIL image inline, text parts around it."""
    content = []
    for i, part in enumerate(template.replace("{text}", text).split("{image}")):
        if i:
            content.append({"type": "image", "image": image})
        if part:
            content.append({"type": "text", "text": part})
    return [{"role": "user", "content": content}]


def _own(mllm, messages, **kwargs) -> dict:
    return mllm.processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt", **kwargs)


@torch.no_grad()
def reference_pointwise(mllm, template: str, image, text: str, drop_token_types: bool = False) -> float:
    """log P(yes) − log P(no) (each summed over ``yes``/``Yes``) at the model's own generation prompt."""
    inputs = _own(mllm, _messages(template, image, text), add_generation_prompt=True)
    if drop_token_types:
        inputs.pop("token_type_ids")
    logp = mllm.model(**inputs, logits_to_keep=1).logits[0, -1].float().log_softmax(-1)  # the last position's
    tok = mllm.tokenizer

    def word(w):
        ids = [tok(v, add_special_tokens=False)["input_ids"] for v in (w, w.capitalize())]
        assert all(len(i) == 1 for i in ids)
        return logp[[i[0] for i in ids]].logsumexp(-1)

    return float(word("yes") - word("no"))


@torch.no_grad()
def reference_generative(mllm, template: str, image, answer: str) -> float:
    """Mean log P over the assistant turn's tokens up to and with ``<end_of_turn>``, by the model's own forward."""
    messages = _messages(template, image)
    prompt = _own(mllm, messages, add_generation_prompt=True)["input_ids"][0]
    full = _own(mllm, [*messages, {"role": "assistant", "content": [{"type": "text", "text": answer}]}])
    ids = full["input_ids"][0]
    assert torch.equal(ids[:len(prompt)], prompt)
    end = (ids == mllm.tokenizer.convert_tokens_to_ids("<end_of_turn>")).nonzero()[-1].item()
    keep = torch.arange(len(prompt) - 1, end)  # the answer's positions (262K logits at every position: 300 MB)
    logp = mllm.model(**full, logits_to_keep=keep).logits[0].float().log_softmax(-1)
    return float(logp.gather(-1, ids[len(prompt):end + 1].unsqueeze(-1)).mean())


class _NoTokenTypes(Gemma3Family):
    """Gemma 3 as a family that forgot its images' token_type_ids: every path then attends causally."""

    def forward_kwargs(self, model, input_ids, image_inputs, attention_mask=None):
        return {}

    def prefix_kwargs(self, model, input_ids):
        return {}


@pytest.mark.parametrize("direction", ["t2i", pytest.param("i2t", marks=pytest.mark.slow)])
def test_pointwise_equals_the_models_own_forward_over_its_template(gemma, pictures, direction, monkeypatch):
    """PIL images, cached features and the shared prefix (forced to run: the t2i query is 12 tokens) all give the
    reference's log-odds per pair; the template writes <bos>, the prompt carries it once."""
    template = load_prompt("rerank_pointwise").section(direction)["user"]
    if direction == "t2i":  # one text, the images are the candidates
        pairs = [(im, TEXTS[0]) for im in pictures]
    else:  # one image, the texts are the candidates
        pairs = [(pictures[0], t) for t in [*TEXTS, "two crosses"]]
    want = [reference_pointwise(gemma, template, im, t) for im, t in pairs]
    texts, ims = [t for _, t in pairs], [im for im, _ in pairs]
    assert pointwise_scores(gemma, template, texts, ims) == pytest.approx(want, abs=1e-4)
    feats = image_features(gemma, pictures)
    cached = [feats[pictures.index(im)] for im in ims]
    assert pointwise_scores(gemma, template, texts, cached, min_prefix=1) == pytest.approx(want, abs=1e-4)
    assert max(want) - min(want) > 1e-3
    # What the test sees: without token_type_ids the model's scores move, and genret's would too.
    causal = reference_pointwise(gemma, template, *pairs[0], drop_token_types=True)
    assert abs(causal - want[0]) > 1e-3
    monkeypatch.setattr(gemma, "family", _NoTokenTypes())
    assert pointwise_scores(gemma, template, texts, cached, min_prefix=1) != pytest.approx(want, abs=1e-4)


def test_generative_equals_the_models_own_forward_over_its_template(gemma, pictures):
    """log P(text | image) over the assistant turn's own tokens, ``<end_of_turn>`` included, per text and image:
    plain, with cached features and with each image's prompt as a shared prefix for its texts."""
    section = load_prompt("rerank_generative").section("t2i")
    pairs = [(0, TEXTS[0]), (1, TEXTS[0]), (0, TEXTS[1]), (2, TEXTS[1])]
    want = [reference_generative(gemma, section["user"], pictures[i], t) for i, t in pairs]
    texts = [t for _, t in pairs]
    assert generative_scores(gemma, section["user"], texts, [pictures[i] for i, _ in pairs]) == \
        pytest.approx(want, abs=1e-4)
    feats = image_features(gemma, pictures)
    assert generative_scores(gemma, section["user"], texts, [feats[i] for i, _ in pairs], batch_size=2) == \
        pytest.approx(want, abs=1e-4)
    assert max(want) - min(want) > 1e-3


def test_pan_and_scan_crops_are_not_cached_silently(gemma):
    """A checkpoint shipping pan-and-scan on: features of a wide image would be several views, so they are refused,
    and a stage that caches features turns the crops off and says so."""
    import copy

    processor = copy.deepcopy(gemma.processor)
    processor.image_processor.do_pan_and_scan = True
    wide = Image.new("RGB", (1200, 400), "white")
    with pytest.raises(ValueError, match="pan-and-scan crops cannot be cached"):
        gemma.family.image_inputs(processor, [wide])
    assert "do_pan_and_scan turned off" in gemma.family.prepare_feature_cache(processor)
    assert gemma.family.image_inputs(processor, [wide])["pixel_values"].shape == (1, 3, 896, 896)
    assert gemma.family.prepare_feature_cache(processor) is None


def test_the_real_vocabulary_holds_the_configs_image_token_ids(real_dirs):
    """<start_of_image>, <end_of_image> and <image_soft_token> of the real tokenizer are the real config's indices."""
    import json

    from real_checkpoints import fixture

    built = json.loads((real_dirs[NAME] / "config.json").read_text())
    real = fixture(NAME)["config"]
    assert [built[k] for k in ("boi_token_index", "eoi_token_index", "image_token_index")] == \
        [real["boi_token_index"], real["eoi_token_index"], real["image_token_index"]] == [255999, 256000, 262144]
    assert built["mm_tokens_per_image"] == 256 and built["vision_config"]["image_size"] == 896


@pytest.mark.slow
@pytest.mark.parametrize("mode, qlora", [("pointwise", True), ("listwise", False), ("generative", False)])
def test_rerank_lora_and_qlora_train_on_gemma(real_dirs, world, clip_dir, tmp_path, mode, qlora):
    """A LoRA (QLoRA: NF4 base, gradient checkpointing) trains a step in each mode and the stage scores with it."""
    import math
    from dataclasses import replace

    from genret.mllm import MLLM
    from genret.training.rerank import RerankTrainConfig, train_rerank

    if qlora:
        pytest.importorskip("bitsandbytes")
    train = world.split("train")
    small = replace(train, records=train.records[:4])
    config = RerankTrainConfig(mode=mode, negatives=2, mine_k=3, batch_size=2, max_steps=1, eval_every=0,
                               save_every=0, log_every=1, load_in_4bit=qlora, gradient_checkpointing=qlora)
    summary = train_rerank(str(real_dirs[NAME]), small, tmp_path / "a", config, prefilter=str(clip_dir), progress=False)
    assert summary["steps"] == 1 and all(math.isfinite(h["loss"]) for h in summary["history"] if "loss" in h)
    mllm = MLLM.load(str(real_dirs[NAME]))
    mllm.attach_adapter(tmp_path / "a", mode=mode)
    image = Image.open(train.records[0].path).convert("RGB")
    scores = pointwise_scores(mllm, load_prompt("rerank_pointwise").section("t2i")["user"], TEXTS, [image] * 2)
    assert all(math.isfinite(s) for s in scores)


@pytest.mark.slow
def test_captions_are_the_models_own_greedy_generate(gemma, pictures, tmp_path):
    """The captioner's batched, left-padded generate (token_type_ids kept) writes what the model's own generate
    writes over its own template for each image alone."""
    from genret.mllm.captioner import Captioner

    captioner = Captioner(gemma, max_new_tokens=8, batch_size=3)
    paths = []
    for n, im in enumerate(pictures):
        paths.append(str(tmp_path / f"{n}.png"))
        im.save(paths[-1])
    got = captioner.caption(paths)
    want = []
    for im in pictures:
        inputs = _own(gemma, _messages(captioner.template, im), add_generation_prompt=True)
        with torch.no_grad():
            out = gemma.model.generate(**inputs, do_sample=False, max_new_tokens=8)
        want.append(gemma.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    assert got == want
