"""Qwen3-VL against the model's own forward: its chat template, its processor, its M-RoPE and DeepStack.

The reference side never goes through genret: ``processor.apply_chat_template`` renders and tokenizes the
messages (the image inside them), ``model(**inputs)`` runs on the processor's own outputs (the model computes
its positions with ``get_rope_index`` and its DeepStack features from the pixels), and the score is read from
its logits. genret's scores (PIL images, cached features, shared prefix) must equal it in float32 to 1e-4, on the
shrunk Qwen3-VL-2B-Instruct build (real tokenizer, template and processor settings, random weights).
"""

import pytest
import torch

from conftest import one_chat_round
from genret.mllm.scoring import generative_scores, image_features, pointwise_scores
from genret.prompts import load_prompt

NAME = "qwen3-vl-2b-instruct"


@pytest.fixture(scope="module")
def qwen3(real_mllms):
    return real_mllms[NAME]


def _user(template: str, image, **values) -> dict:
    """A user turn as the model card writes one: the image inside the message, text parts around it."""
    for key, value in values.items():
        template = template.replace("{" + key + "}", value)
    before, after = template.split("{image}")
    content = ([{"type": "text", "text": before}] if before else []) + [{"type": "image", "image": image}]
    return {"role": "user", "content": content + ([{"type": "text", "text": after}] if after else [])}


def _own(mllm, messages, **kwargs) -> dict:
    return mllm.processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt", **kwargs)


@torch.no_grad()
def _reference_generative(mllm, user: dict, text: str) -> float:
    """Mean log P(answer tokens) by the model's own forward: the assistant turn its template writes, through its
    end-of-turn token."""
    start = _own(mllm, [user], add_generation_prompt=True)["input_ids"].shape[1]
    full = _own(mllm, [user, {"role": "assistant", "content": [{"type": "text", "text": text}]}])
    ids = full["input_ids"][0]
    end = start + ids[start:].tolist().index(mllm.tokenizer.convert_tokens_to_ids("<|im_end|>")) + 1
    logp = mllm.model(**full).logits[0].float().log_softmax(-1)
    return float(sum(logp[p - 1, ids[p]] for p in range(start, end)) / (end - start))


@torch.no_grad()
def _reference_pointwise(mllm, user: dict) -> float:
    """log P(yes) − log P(no) at the answer position of the model's own forward, each answer word in the casings
    its tokenizer writes as one token (``Yes``/``yes``, ``No``/``no``)."""
    inputs = _own(mllm, [user], add_generation_prompt=True)
    logp = mllm.model(**inputs).logits[0, -1].float().log_softmax(-1)
    ids = mllm.tokenizer.convert_tokens_to_ids
    return float(logp[[ids("Yes"), ids("yes")]].logsumexp(0) - logp[[ids("No"), ids("no")]].logsumexp(0))


def test_the_reference_inputs_are_the_checkpoints_own(qwen3, images):
    """The reference really is the model's own path: the processor's M-RoPE inputs and 16 px patches merged 2×2,
    the real min_pixels (65,536: a 64 px image becomes 8×8 tokens), no genret positions."""
    inputs = _own(qwen3, [_user("{image}\nDescribe the image.", images[0])], add_generation_prompt=True)
    assert {"mm_token_type_ids", "image_grid_thw", "pixel_values"} <= set(inputs)
    assert inputs["image_grid_thw"].tolist() == [[1, 16, 16]]
    assert int((inputs["input_ids"] == qwen3.model.config.image_token_id).sum()) == 64


def test_generative_score_is_the_models_own_forward(qwen3, images):
    section = load_prompt("rerank_generative").section("t2i")
    texts = ["a red circle left of a blue square", "two green crosses", "nothing"]
    want = [_reference_generative(qwen3, _user(section["user"], images[i]), t) for i, t in enumerate(texts)]
    assert max(want) - min(want) > 1e-2  # the scores tell the pairs apart
    got = [generative_scores(qwen3, section["user"], [t], [images[i]])[0] for i, t in enumerate(texts)]
    assert got == pytest.approx(want, abs=1e-4)
    feats = image_features(qwen3, images[:3])
    assert generative_scores(qwen3, section["user"], texts, feats) == pytest.approx(want, abs=1e-4)
    # one image, several texts: the image's prompt runs once as a shared prefix, its DeepStack levels in it
    one = [_reference_generative(qwen3, _user(section["user"], images[3]), t) for t in texts]
    assert generative_scores(qwen3, section["user"], texts, [image_features(qwen3, images[3:])[0]] * 3,
                             min_prefix=1) == pytest.approx(one, abs=1e-4)


def test_pointwise_p_yes_is_the_models_own_forward(qwen3, images):
    section = load_prompt("rerank_pointwise").section("t2i")
    query = "a red circle left of a blue square"
    want = [_reference_pointwise(qwen3, _user(section["user"], im, text=query)) for im in images]
    assert max(want) - min(want) > 1e-3
    got = pointwise_scores(qwen3, section["user"], [query] * len(images), images)
    assert got == pytest.approx(want, abs=1e-4)
    # cached features after the shared query prefix: each suffix carries its image's features and DeepStack levels
    feats = image_features(qwen3, images)
    shared = pointwise_scores(qwen3, section["user"], [query] * len(images), feats, min_prefix=1, batch_size=3)
    assert shared == pytest.approx(want, abs=1e-4)
    p_yes = torch.tensor(shared).sigmoid()  # P(yes) renormalised over {yes, no}
    assert p_yes.tolist() == pytest.approx(torch.tensor(want).sigmoid().tolist(), abs=1e-5)


def test_cached_features_carry_the_deepstack_levels_and_they_count(qwen3, images):
    """A feature is (1 + DeepStack levels, rows, cols, hidden); with its DeepStack levels zeroed the scores change,
    so a cache without them could not give the PIL scores."""
    levels = 1 + len(qwen3.model.config.vision_config.deepstack_visual_indexes)
    feats = image_features(qwen3, images)
    assert [tuple(f.shape[:3]) for f in feats] == [(levels, 8, 8)] * 3 + [(levels, 6, 12)]  # the crop: 64×32 px
    section = load_prompt("rerank_pointwise").section("t2i")
    texts = ["a red circle"] * len(images)
    plain = pointwise_scores(qwen3, section["user"], texts, feats)
    flat = [torch.cat([f[:1], torch.zeros_like(f[1:])]) for f in feats]
    assert max(abs(a - b) for a, b in zip(plain, pointwise_scores(qwen3, section["user"], texts, flat))) > 1e-3


def test_a_feature_of_another_layout_is_refused_by_name(qwen3, images):
    section = load_prompt("rerank_pointwise").section("t2i")
    feats = image_features(qwen3, images[:1])
    with pytest.raises(ValueError, match=r"\(1 \+ DeepStack levels, rows, cols, hidden\).*recompute the feature cache"):
        pointwise_scores(qwen3, section["user"], ["a red circle"], [feats[0][0]])  # a Qwen2-VL layout
    with pytest.raises(ValueError, match=r"has 2 levels, this model takes 4"):
        pointwise_scores(qwen3, section["user"], ["a red circle"], [feats[0][:2]])


def test_positions_are_the_models_get_rope_index(qwen3, images):
    """Qwen2-VL's explicit M-RoPE positions equal Qwen3-VL's own get_rope_index: two images of different grids,
    text between and after, left in a batch with a shorter row (padding)."""
    messages = [{"role": "user", "content": [{"type": "image", "image": images[3]}, {"type": "text", "text": "and"},
                                             {"type": "image", "image": images[0]}, {"type": "text", "text": "?"}]}]
    text = qwen3.processor.apply_chat_template(messages, add_generation_prompt=True)
    short = qwen3.processor.apply_chat_template(messages[:1] and [{"role": "user", "content": "hi"}],
                                                add_generation_prompt=True)
    inputs = qwen3.processor(text=[text, short], images=[images[3], images[0]], padding=True, return_tensors="pt")
    want, _ = qwen3.model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                               image_grid_thw=inputs["image_grid_thw"],
                                               attention_mask=inputs["attention_mask"])
    got = qwen3.family.position_ids(qwen3.model, inputs)
    mask = inputs["attention_mask"].bool()
    assert torch.equal(got[:, mask], want[:, mask])


def _variant(tmp_path_factory, name: str, config: dict | None = None, shrink: dict | None = None):
    """The Qwen3-VL-2B-Instruct fixture built with ``config`` merged into its config.json and ``shrink`` into its
    shrink table (the tokenizer, template and processor stay the real ones)."""
    import copy

    from genret.mllm.tiny import _merge, build_from_fixture
    from real_checkpoints import fixture, npm_file

    fx = copy.deepcopy(fixture(NAME))
    fx["config"] = _merge(fx["config"], config or {})
    fx["shrink"] = _merge(fx["shrink"], shrink or {})
    return build_from_fixture(fx, tmp_path_factory.mktemp(name) / name, npm_file(fx["tokenizer"]["source"]))


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """Qwen3-VL MoE (``Qwen3VLMoeForConditionalGeneration``): the 2B fixture's files with the MoE classes and a
    sparse MLP of 4 experts, 2 a token (no 2B MoE checkpoint exists; the 30B-A3B has 128, 8 a token)."""
    from genret.mllm import MLLM

    path = _variant(tmp_path_factory, "moe", config={
        "architectures": ["Qwen3VLMoeForConditionalGeneration"], "model_type": "qwen3_vl_moe",
        "text_config": {"model_type": "qwen3_vl_moe_text", "num_experts": 4, "num_experts_per_tok": 2,
                        "moe_intermediate_size": 32, "decoder_sparse_step": 1, "mlp_only_layers": []},
        "vision_config": {"model_type": "qwen3_vl_moe"}})
    return MLLM.load(str(path))


@pytest.mark.slow
def test_the_moe_variant_is_the_same_family_and_scores_as_its_own_forward(moe, images):
    assert type(moe.model).__name__ == "Qwen3VLMoeForConditionalGeneration" and moe.family.name == "qwen3_vl"
    section = load_prompt("rerank_pointwise").section("i2t")
    texts = ["a red circle", "two green crosses", "a blue square left of a star"]
    want = [_reference_pointwise(moe, _user(section["user"], images[3], text=t)) for t in texts]
    assert max(want) - min(want) > 1e-3
    feats = image_features(moe, images[3:])
    assert pointwise_scores(moe, section["user"], texts, [images[3]] * 3) == pytest.approx(want, abs=1e-4)
    assert pointwise_scores(moe, section["user"], texts, feats * 3, min_prefix=1) == pytest.approx(want, abs=1e-4)


@pytest.fixture(scope="module")
def few(world):
    from dataclasses import replace

    train = world.split("train")
    return replace(train, records=train.records[:8])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pointwise", "listwise", "generative"])
def test_a_rerank_lora_trains_on_cached_features_in_every_mode(real_dirs, few, clip_dir, tmp_path, mode):
    """The trainer's forward goes through the family (cached features with their DeepStack levels); with gradient
    checkpointing too (no KV cache kept)."""
    import math

    from genret.training.rerank import RerankTrainConfig, train_rerank

    for checkpointing in (False, True):
        config = RerankTrainConfig(mode=mode, negatives=3, mine_k=4, batch_size=2, directions="both", max_steps=2,
                                   warmup=0.0, log_every=1, eval_every=0, save_every=0,
                                   gradient_checkpointing=checkpointing)
        out = tmp_path / f"{mode}-{checkpointing}"
        summary = train_rerank(str(real_dirs[NAME]), few, out, config, prefilter=str(clip_dir), progress=False)
        losses = [h["loss"] for h in summary["history"] if "loss" in h]
        assert summary["steps"] == 2 and losses and all(math.isfinite(x) for x in losses)
        assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_qlora_trains_in_4bit(tmp_path_factory, few, clip_dir, tmp_path):
    """4-bit NF4 on the CPU (the CUDA user's path); bitsandbytes' CPU kernels need layers 64 wide, so the vision
    tower is built 64 wide here."""
    pytest.importorskip("bitsandbytes")
    from genret.training.rerank import RerankTrainConfig, train_rerank

    path = _variant(tmp_path_factory, "wide", shrink={"vision_config": {"hidden_size": 64}})
    config = RerankTrainConfig(mode="pointwise", negatives=3, mine_k=4, batch_size=2, directions="both", max_steps=2,
                               warmup=0.0, log_every=1, eval_every=0, save_every=0, load_in_4bit=True, dtype="float32")
    summary = train_rerank(str(path), few, tmp_path / "q", config, prefilter=str(clip_dir), progress=False)
    assert summary["steps"] == 2 and (tmp_path / "q" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_grace_trains_atomic_identifiers_on_cached_features(real_dirs, world, clip_dir, tmp_path):
    from genret.identifiers import Identifiers
    from genret.training.grace import GraceTrainConfig, train_grace

    given = {r.id: r.captions[:1] for r in world.split("test").records}
    train_grace(str(real_dirs[NAME]), world, tmp_path / "g", GraceTrainConfig(scheme="atomic", max_steps=2, batch_size=4,
                eval_queries=2, num_beams=2), prefilter=str(clip_dir), queries=given, progress=False)
    assert len(Identifiers.load(tmp_path / "g").identifiers) == len(world.split("test").records)  # the gallery


@pytest.mark.slow
def test_the_chat_stage_asks_and_answers_with_qwen3_vl(real_dirs, world):
    """ChatIR with Qwen3-VL as questioner (text only) and answerer (sees the target image): one round runs."""
    one_chat_round(str(real_dirs[NAME]), world)


@pytest.mark.slow
def test_a_projector_adapter_trains_the_deepstack_mergers_too(real_dirs, images):
    """``vision = "projector"`` saves the main merger and each DeepStack merger whole with the adapter, so every level
    of a cached feature is the adapter's; ``"tower"`` puts no LoRA on them."""
    import re

    from peft import LoraConfig, get_peft_model

    from genret.mllm import MLLM
    from genret.mllm.adapters import lora_modules

    mllm = MLLM.load(str(real_dirs[NAME]))
    base = image_features(mllm, images[:1])[0]
    pattern, save = lora_modules(mllm.model, mllm.family, ("q_proj",), "projector")
    assert save == ["model.visual.merger", *(f"model.visual.deepstack_merger_list.{i}" for i in range(3))]
    tower, _ = lora_modules(mllm.model, mllm.family, ("q_proj",), "tower")
    assert not [n for n, _ in mllm.model.named_modules() if "merger" in n and re.fullmatch(tower, n)]
    mllm.model = get_peft_model(mllm.model, LoraConfig(r=4, target_modules=pattern, modules_to_save=save)).eval()
    with torch.no_grad():
        for n, p in mllm.model.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.05 * torch.randn_like(p))
    adapted = image_features(mllm, images[:1])[0]
    assert all(not torch.allclose(adapted[level], base[level], atol=1e-3) for level in range(len(base)))
