"""Reranker checkpoints as shipped: genret's rerank scores equal those of each checkpoint's own reference code.

Each checkpoint is a shrunk build of its real architecture with the real tokenizer, chat template and processor
settings and random weights; the reference is the checkpoint authors' code (vendored or re-implemented from the
card in ``tests/reference``), run on the same model files and inputs, in float32. genret's side is the rerank
stage as a user configures it, in every path that computes a pointwise score (image features cached or not, the
shared prefix on or off).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from genret.mllm.checkpoints import ConventionsError, conventions_for, known_checkpoints
from genret.stages.rerank import RerankConfig, RerankStage
from genret.types import Item, Query

QUERIES = ["a red circle left of a blue square", "two small green stars"]
# sizes on and off the 28/32-pixel grid, one above the smallest bound, one aspect ratio far from square
SIZES = [(64, 64), (96, 64), (70, 45), (200, 150)]


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Image files of several sizes, drawn with structure (so features differ between them)."""
    root = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    items = []
    for i, (w, h) in enumerate(SIZES):
        base = rng.integers(0, 255, (1, 1, 3)) * np.ones((h, w, 3))
        base[h // 4: h // 2, w // 4: w // 2] = rng.integers(0, 255, 3)
        noise = rng.normal(0, 20, (h, w, 3))
        path = root / f"im{i}.png"
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path)
        items.append(Item(id=f"im{i}", modality="image", image=str(path)))
    return items


def stage_scores(model: str, conventions: str, query: Query, items, **settings) -> list[float]:
    stage = RerankStage(RerankConfig(model=model, mode="pointwise", conventions=conventions, **settings), "rerank")
    return stage.score(query, items, cache=False)


# ---- MonoQwen2-VL: a LoRA adapter on Qwen2-VL-2B-Instruct, True/False, as its card scores it -----------------------

@pytest.fixture(scope="module")
def monoqwen(tmp_path_factory):
    """A shrunk MonoQwen2-VL: a peft LoRA adapter (random, non-zero B) on the shrunk Qwen2-VL-2B-Instruct, saved by
    peft as the checkpoint ships (adapter_config.json + adapter_model.safetensors, no config.json)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from real_checkpoints import build

    root = tmp_path_factory.mktemp("monoqwen")
    base = build("qwen2-vl-2b-instruct", root / "Qwen2-VL-2B-Instruct")
    torch.manual_seed(1)
    model = AutoModelForImageTextToText.from_pretrained(base)
    lora = LoraConfig(r=8, lora_alpha=4, init_lora_weights=False,
                      target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)")
    get_peft_model(model, lora).save_pretrained(root / "MonoQwen2-VL-v0.1")
    return base, root / "MonoQwen2-VL-v0.1"


@pytest.fixture(scope="module")
def monoqwen_card(monoqwen, pictures):
    """The card's scores of every (query, picture) pair, its model loaded once."""
    from genret.mllm.backend import load_processor
    from reference.monoqwen2_vl_card import card_score, load_model

    base, adapter = monoqwen
    processor = load_processor(str(base))  # the card's processor: the base's files
    model = load_model(str(adapter))
    return {text: [card_score(model, processor, text, Image.open(it.image).convert("RGB")) for it in pictures]
            for text in QUERIES}


@pytest.mark.parametrize("cache_features", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_monoqwen2_vl_scores_equal_the_cards_code(monoqwen, monoqwen_card, pictures, cache_features):
    _, adapter = monoqwen
    stage = RerankStage(RerankConfig(model=str(adapter), mode="pointwise", conventions="lightonai/MonoQwen2-VL-v0.1",
                                     cache_features=cache_features), "rerank")
    for text, want in monoqwen_card.items():
        got = stage.score(Query(id="q", text=text), pictures, cache=False)
        assert got == pytest.approx(want, abs=1e-4)
        assert max(want) - min(want) > 1e-2  # the candidates are told apart: a wrong image or token would show


@pytest.mark.slow
def test_monoqwen2_vl_is_its_adapter_not_its_base(monoqwen, pictures):
    """The LoRA is applied: the base alone, with the same conventions, scores otherwise."""
    base, adapter = monoqwen
    query = Query(id="q", text=QUERIES[0])
    with_adapter = stage_scores(str(adapter), "lightonai/MonoQwen2-VL-v0.1", query, pictures)
    alone = stage_scores(str(base), "lightonai/MonoQwen2-VL-v0.1", query, pictures)
    assert max(abs(a - b) for a, b in zip(with_adapter, alone)) > 1e-3


def test_monoqwen2_vl_takes_no_instruction(monoqwen, pictures):
    _, adapter = monoqwen
    with pytest.raises(ValueError, match="no {instruction} placeholder"):
        RerankStage(RerankConfig(model=str(adapter), mode="pointwise", conventions="lightonai/MonoQwen2-VL-v0.1",
                                 instruction="Find the chart"), "rerank")
    with pytest.raises(ValueError, match="carries an instruction"):
        stage_scores(str(adapter), "lightonai/MonoQwen2-VL-v0.1", Query(id="q", text="x", instruction="Find it"),
                     pictures)


# ---- the conventions: a table, a file in the checkpoint's folder, its sentence-transformers files -----------------

def test_known_checkpoints_name_their_prompt_and_image_bounds():
    table = known_checkpoints()
    assert conventions_for("Qwen/Qwen3-VL-Reranker-2B").prompt == "rerank_qwen3_vl_reranker"
    assert dict(conventions_for("Qwen/Qwen3-VL-Reranker-8B").processor_options) == {"min_pixels": 4096,
                                                                                    "max_pixels": 1843200}
    assert conventions_for("lightonai/MonoQwen2-VL-v0.1").prompt == "rerank_monoqwen2_vl"
    assert not conventions_for("Qwen/Qwen2-VL-2B-Instruct").found  # a base model: genret's own prompt
    assert not conventions_for("Qwen/Qwen3-VL-Reranker-2B", "none").found
    for row in table.values():
        from genret.prompts import load_prompt
        from genret.stages.rerank import MODES

        load_prompt(row["prompt"], required=MODES["pointwise"], exact=True, optional=("{instruction}",))
    with pytest.raises(ConventionsError, match="not a known checkpoint"):
        conventions_for("x", "Qwen/Qwen3-VL-Reranker-4B")


def test_a_checkpoint_folder_adds_its_own_conventions(tmp_path):
    """genret_reranker.json names a prompt and image bounds; sentence-transformers files give the answer ids, the
    score and the default instruction; a malformed file is named."""
    (tmp_path / "genret_reranker.json").write_text(json.dumps(
        {"prompt": "rerank_qwen3_vl_reranker", "processor_options": {"max_pixels": 200704}}))
    conv = conventions_for(str(tmp_path))
    assert conv.prompt == "rerank_qwen3_vl_reranker" and dict(conv.processor_options) == {"max_pixels": 200704}
    assert conv.yes_id is None
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
        {"idx": 1, "name": "1", "path": "1_LogitScore",
         "type": "sentence_transformers.cross_encoder.modules.logit_score.LogitScore"}]))
    with pytest.raises(ConventionsError, match="1_LogitScore/config.json is missing"):
        conventions_for(str(tmp_path))
    (tmp_path / "1_LogitScore").mkdir()
    (tmp_path / "1_LogitScore" / "config.json").write_text(json.dumps({"true_token_id": 9693, "false_token_id": 2152}))
    (tmp_path / "config_sentence_transformers.json").write_text(json.dumps(
        {"activation_fn": "torch.nn.modules.linear.Identity", "default_prompt_name": "query",
         "prompts": {"query": "Retrieve images relevant to the user's query."}}))
    conv = conventions_for(str(tmp_path))
    assert (conv.yes_id, conv.no_id, conv.score) == (9693, 2152, "log_odds")
    assert conv.instruction == "Retrieve images relevant to the user's query."
    (tmp_path / "genret_reranker.json").write_text(json.dumps({"prompt": "x", "max_pixels": 3}))
    with pytest.raises(ConventionsError, match="unknown key"):
        conventions_for(str(tmp_path))
