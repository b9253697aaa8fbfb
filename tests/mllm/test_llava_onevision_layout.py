"""LLaVA-OneVision lays an image out by how many images its prompt holds, as transformers does.

transformers' ``LlavaOnevisionProcessor`` (and the model's ``get_image_features`` with ``batch_num_images``) lays
an image that is alone in its prompt out as "anyres" (a base view plus up to 9 tiles, 1,500-7,300 tokens), but
each image of a prompt that holds several as one 384 px view padded to a square (729 tokens + a newline). A
listwise prompt of k candidate images is the second case: genret must build the same prompt, and cached features
must be those of that layout. Checked on the shrunk real checkpoint (real processor settings and template).
"""

import numpy as np
import pytest
import torch
from PIL import Image

from genret.mllm.scoring import _inputs, image_features, listwise_prompt, listwise_scores, number_answers, render
from genret.prompts import load_prompt

NAME = "llava-onevision-qwen2-0.5b-ov-hf"


@pytest.fixture(scope="module")
def ov(real_mllms):
    return real_mllms[NAME]


@pytest.fixture(scope="module")
def photos():
    """Three photo-sized images of different aspect ratios (random pixels, seeded)."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in ((640, 480), (480, 640),
                                                                                          (500, 500))]


def _listwise(ov, photos):
    section = load_prompt("rerank_listwise").section("t2i")
    messages, images = listwise_prompt(section["user"], section["item"], {"text": "a red circle"}, photos, "image")
    return section, render(ov, messages), images


def test_a_listwise_prompt_of_several_images_has_transformers_multi_image_token_count(ov, photos):
    _, prompt, images = _listwise(ov, photos)
    image_id = ov.family.image_token_id(ov.model)
    genret = int((_inputs(ov, [prompt], [images])["input_ids"] == image_id).sum())
    reference = int((ov.processor(text=[prompt], images=[images], return_tensors="pt")["input_ids"] == image_id).sum())
    assert reference == 3 * (ov.processor.num_image_tokens + 1) == 2190  # each image: 27 x 27 + one newline
    assert genret == reference
    # Cached features of that layout fill the same prompt.
    feats = image_features(ov, photos, several=True)
    assert [tuple(f.shape[:-1]) for f in feats] == [(730,)] * 3
    assert int((_inputs(ov, [prompt], [feats])["input_ids"] == image_id).sum()) == reference


def _reference_listwise(ov, prompt, images, k):
    """log P(answer n | prompt) from the model's own forward over the processor's multi-image inputs, answer by
    answer, no KV cache."""
    inputs = ov.processor(text=[prompt], images=[images], return_tensors="pt")
    assert inputs["batch_num_images"].tolist() == [len(images)]
    out = []
    for answer in number_answers(ov, prompt, k):
        ids = torch.cat([inputs["input_ids"], torch.tensor([answer])], dim=1)
        mask = torch.ones_like(ids)
        with torch.no_grad():
            logits = ov.model(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"],
                              image_sizes=inputs["image_sizes"], batch_num_images=inputs["batch_num_images"],
                              logits_to_keep=len(answer) + 1).logits
        logp = logits[0].float().log_softmax(-1)  # row j: the position before the answer's token j
        out.append(float(sum(logp[j, a] for j, a in enumerate(answer))))
    return out


def test_listwise_scores_equal_the_models_forward_over_the_multi_image_inputs(ov, photos):
    section, prompt, images = _listwise(ov, photos)
    reference = _reference_listwise(ov, prompt, images, len(photos))
    plain = listwise_scores(ov, section["user"], section["item"], {"text": "a red circle"}, photos, "image")
    cached = listwise_scores(ov, section["user"], section["item"], {"text": "a red circle"},
                             image_features(ov, photos, several=True), "image")
    assert plain == pytest.approx(reference, abs=1e-4)
    assert cached == pytest.approx(reference, abs=1e-4)
    assert max(reference) - min(reference) > 1e-3


def test_features_of_the_wrong_layout_are_refused(ov, photos):
    """A feature computed for an image alone (anyres) cannot fill a prompt of several images, nor the reverse."""
    section = load_prompt("rerank_listwise").section("t2i")
    with pytest.raises(ValueError, match="several=True"):
        listwise_scores(ov, section["user"], section["item"], {"text": "x"}, image_features(ov, photos), "image")
    pointwise = load_prompt("rerank_pointwise").section("t2i")["user"]
    from genret.mllm.scoring import pointwise_scores

    with pytest.raises(ValueError, match="alone"):
        pointwise_scores(ov, pointwise, ["x"], image_features(ov, photos[:1], several=True))


def test_the_trainer_scores_listwise_candidates_in_the_same_layout(ov, photos, tmp_path):
    """The rerank trainer's listwise log-probabilities (cached features, made per layout) equal the stage's."""
    from genret.training.rerank import Example, _Batch, listwise_logprobs

    paths = []
    for n, im in enumerate(photos):
        paths.append(str(tmp_path / f"{n}.png"))
        im.save(paths[-1])
    prompt = load_prompt("rerank_listwise")
    section = prompt.section("t2i")
    batch = _Batch(ov, ov.model, prompt, ["a red circle"], paths, feats={})
    with torch.no_grad():
        got = listwise_logprobs(batch, [Example("t2i", 0, (0, 1, 2), 0)])[0].tolist()
    want = listwise_scores(ov, section["user"], section["item"], {"text": "a red circle"},
                           [Image.open(p) for p in paths], "image")
    assert got == pytest.approx(want, abs=1e-4)


def test_a_listwise_prompt_past_the_context_names_the_k_that_fits_in_the_multi_image_layout(ov, photos):
    """50 candidate photos of 736 tokens each pass the 32,768 context; the k that fits is scripts/listwise_context.py's
    44 (from cached features: the one-candidate prompt it once measured from would hold a lone image)."""
    from genret.mllm.context import PromptTooLongError

    section = load_prompt("rerank_listwise").section("t2i")
    feats = image_features(ov, photos[:1], several=True) * 50
    with pytest.raises(PromptTooLongError, match=r"~73\d tokens per candidate\): at most k = 44 fit"):
        listwise_scores(ov, section["user"], section["item"], {"text": "a red circle left of a blue square"}, feats,
                        "image")


def test_a_listwise_rerank_stage_caches_its_gallery_in_the_multi_image_layout(ov, real_dirs, world):
    """The stage's gallery features are those of its prompts (several images), say so in their manifest, and score
    as the images of a request do; a lone candidate is laid out alone."""
    from genret.stages.rerank import RerankConfig, RerankStage
    from genret.types import Query

    stage = RerankStage(RerankConfig(model=str(real_dirs[NAME]), mode="listwise"), "rerank")
    stage._mllm = ov  # the stage's model as it loads it (loaded once for the session)
    items = world.split("test").image_items()[:3]
    query = Query(id="q", text="a red circle left of a blue square")
    gallery = stage.score(query, items)
    assert [tuple(stage.features[it.id].shape[:-1]) for it in items] == [(730,)] * 3
    assert stage._describe()["layout"] == "several"
    assert stage.score(query, items, cache=False) == pytest.approx(gallery, abs=1e-4)
    assert len(stage.score(query, items[:1])) == 1
