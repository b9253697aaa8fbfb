"""Reranker checkpoints as shipped: genret's rerank scores equal those of each checkpoint's own reference code.

Each checkpoint is a shrunk build of its real architecture with the real tokenizer, chat template and processor
settings and random weights; the reference is the checkpoint authors' code (vendored or re-implemented from the
card in ``tests/reference``), run on the same model files and inputs, in float32. genret's side is the rerank
stage as a user configures it, in every path that computes a pointwise score (image features cached or not, the
shared prefix on or off).
"""

from __future__ import annotations

import json
import shutil

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
def monoqwen(real_dirs, tmp_path_factory):
    """A shrunk MonoQwen2-VL: a peft LoRA adapter (random, non-zero B) on the shrunk Qwen2-VL-2B-Instruct, saved by
    peft as the checkpoint ships (adapter_config.json + adapter_model.safetensors, no config.json)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    root = tmp_path_factory.mktemp("monoqwen")
    base = real_dirs["qwen2-vl-2b-instruct"]
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
        assert max(want) - min(want) > 1e-3  # 10x the tolerance: a wrong image or answer token would show


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


@pytest.fixture
def monoqwen_hub(monoqwen, tmp_path, monkeypatch):
    """MonoQwen2-VL as a Hugging Face cache holds it after a download by its hub id (the adapter's files only, no
    config.json: its base is the local shrunk Qwen2-VL that its adapter_config.json names), downloads off.
    Returns the snapshot folder."""
    import huggingface_hub.constants as constants
    from test_hub import hub_cache

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    for name, value in (("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _, adapter = monoqwen
    return hub_cache(cache, "lightonai/MonoQwen2-VL-v0.1", adapter, "d" * 40, readme="# MonoQwen2-VL")


def test_monoqwen2_vl_loads_by_its_hub_id_from_the_cache(monoqwen, monoqwen_hub, monoqwen_card, pictures):
    """A cached adapter snapshot (adapter_config.json, no config.json) is an adapter checkpoint, not a whole model:
    its base loads and the adapter merges in, scoring as the local folder and the card do, keyed by the same files."""
    from genret.mllm.backend import BaseModel, MLLMConfig

    _, adapter = monoqwen
    assert not (monoqwen_hub / "config.json").exists() and (monoqwen_hub / "adapter_config.json").is_file()
    hub_id = "lightonai/MonoQwen2-VL-v0.1"
    query = Query(id="q", text=QUERIES[0])
    by_id = stage_scores(hub_id, "", query, pictures)
    assert by_id == stage_scores(str(adapter), hub_id, query, pictures)
    assert by_id == pytest.approx(monoqwen_card[QUERIES[0]], abs=1e-4)
    assert BaseModel.of(MLLMConfig(model=hub_id)).revision == BaseModel.of(MLLMConfig(model=str(adapter))).revision


def test_a_monoqwen2_vl_snapshot_without_its_weights_names_them_offline(monoqwen_hub):
    """Fetched in part (its adapter_config.json, read to find the base, but not its weights): the early check waits
    for the weights, and the load, downloads off, names the missing file before the base loads."""
    from genret.mllm.backend import MLLM, BaseModel, MLLMConfig

    (monoqwen_hub / "adapter_model.safetensors").unlink()
    hub_id = "lightonai/MonoQwen2-VL-v0.1"
    assert BaseModel.of(MLLMConfig(model=hub_id)).revision == ""
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors not in its snapshot .*HF_HUB_OFFLINE=1"):
        MLLM.load(hub_id)


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


# ---- Qwen3-VL-Reranker: yes/no at the last position, its own system and user turn, its image bounds ---------------

# Images within 65,536..1,843,200 pixels: the checkpoint's own processor bounds (preprocessor_config.json,
# shortest_edge 65,536) and the authors' (4,096..1,843,200) give them the same size, so sentence-transformers
# (which calls the processor as configured) and the authors' code see the same pixels there.
ST_SIZES = [(320, 240), (256, 288)]


@pytest.fixture(scope="module")
def qwen3_reranker(real_dirs, tmp_path_factory):
    """A shrunk Qwen3-VL-Reranker-2B: the Qwen3-VL-2B fixture (real tokenizer, template, processor) saved by
    sentence-transformers as a CrossEncoder (Transformer any-to-any + LogitScore on yes/no), with the pair
    template (tests/fixtures/checkpoints/qwen3-vl-reranker-2b.json says what is verified of each file)."""
    from sentence_transformers import CrossEncoder
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.cross_encoder.modules import LogitScore

    from genret.encoders.mllm import _processor_without_torchvision
    from real_checkpoints import fixture

    fx = fixture("qwen3-vl-reranker-2b")
    folder = tmp_path_factory.mktemp("qwen3vl") / "Qwen3-VL-Reranker-2B"
    shutil.copytree(real_dirs[fx["base_fixture"]], folder)
    (folder / "genret.json").unlink()  # a hub checkpoint has no genret manifest
    (folder / "additional_chat_templates").mkdir()
    for name, text in fx["additional_chat_templates"].items():
        (folder / "additional_chat_templates" / f"{name}.jinja").write_text(text)
    with _processor_without_torchvision():  # this machine has no torchvision (see genret.encoders.mllm)
        module = Transformer(str(folder), transformer_task="any-to-any", model_kwargs={"dtype": torch.float32},
                             processing_kwargs=fx["processing_kwargs"])
        vocab = module.tokenizer.get_vocab()
        head = LogitScore(true_token_id=vocab[fx["logit_score"]["true_token"]],
                          false_token_id=vocab[fx["logit_score"]["false_token"]])
        CrossEncoder(modules=[module, head], prompts=fx["prompts"],
                     default_prompt_name=fx["default_prompt_name"]).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def qwen3_authors(qwen3_reranker):
    """The authors' model and processor on the shrunk checkpoint (their loading: float32 here, left padding)."""
    from transformers import Qwen3VLForConditionalGeneration

    from genret.mllm.backend import load_processor

    processor = load_processor(str(qwen3_reranker))
    processor.tokenizer.padding_side = "left"
    return Qwen3VLForConditionalGeneration.from_pretrained(qwen3_reranker, dtype=torch.float32).eval(), processor


def _pil(item):
    return Image.open(item.image).convert("RGB")


@pytest.mark.parametrize("cache_features", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_qwen3_vl_reranker_scores_equal_the_authors_code(qwen3_reranker, qwen3_authors, pictures, cache_features):
    """Both directions, the default instruction and a request's own, images below the processor's own lower bound
    too (the authors' 4,096-pixel bound is the checkpoint's row in genret's table)."""
    from reference.qwen3_vl_reranker import scores

    lm, processor = qwen3_authors
    stage = RerankStage(RerankConfig(model=str(qwen3_reranker), mode="pointwise", cache_features=cache_features,
                                     conventions="Qwen/Qwen3-VL-Reranker-2B"), "rerank")
    want = scores(lm, processor, {"text": QUERIES[0]}, [{"image": _pil(it)} for it in pictures])
    got = stage.score(Query(id="q", text=QUERIES[0]), pictures, cache=False)
    assert got == pytest.approx(want, abs=1e-4)
    assert max(want) - min(want) > 1e-2
    captions = [Item(id=f"c{i}", modality="text", text=t) for i, t in enumerate([*QUERIES, "a blue square"])]
    instruction = "Retrieve the caption that describes the image."
    want = scores(lm, processor, {"image": _pil(pictures[3])}, [{"text": c.text} for c in captions], instruction)
    got = stage.score(Query(id="q", image=pictures[3].image, instruction=instruction), captions, cache=False)
    assert got == pytest.approx(want, abs=1e-4)


def test_qwen3_vl_reranker_scores_equal_sentence_transformers(qwen3_reranker, tmp_path):
    """CrossEncoder.predict on the checkpoint's sentence-transformers files (LogitScore, sigmoid, the pair template)
    gives genret's scores; the stage finds the answer ids and the score in those files too."""
    from sentence_transformers import CrossEncoder

    from genret.encoders.mllm import _processor_without_torchvision

    items = []
    for i, (w, h) in enumerate(ST_SIZES):
        path = tmp_path / f"st{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        items.append(Item(id=f"st{i}", modality="image", image=str(path)))
    with _processor_without_torchvision():
        model = CrossEncoder(str(qwen3_reranker), device="cpu", model_kwargs={"dtype": torch.float32})
    want = model.predict([(text, _pil(it)) for text in QUERIES for it in items]).tolist()
    stage = RerankStage(RerankConfig(model=str(qwen3_reranker), mode="pointwise",
                                     conventions="Qwen/Qwen3-VL-Reranker-2B"), "rerank")
    got = [s for text in QUERIES for s in stage.score(Query(id="q", text=text), items, cache=False)]
    assert got == pytest.approx(want, abs=1e-4)
    conv = stage.conventions
    assert (conv.yes_id, conv.no_id, conv.score) == (9693, 2152, "sigmoid")  # Qwen3's "yes"/"no", as on the hub


@pytest.mark.slow
def test_qwen3_vl_reranker_instruction_and_captions_equal_sentence_transformers(qwen3_reranker, tmp_path):
    """A request's instruction is sentence-transformers' prompt (its system message); an image query ranks captions."""
    from sentence_transformers import CrossEncoder

    from genret.encoders.mllm import _processor_without_torchvision

    path = tmp_path / "st.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(path)
    items = [Item(id="st", modality="image", image=str(path))]
    with _processor_without_torchvision():
        model = CrossEncoder(str(qwen3_reranker), device="cpu", model_kwargs={"dtype": torch.float32})
    stage = RerankStage(RerankConfig(model=str(qwen3_reranker), mode="pointwise",
                                     conventions="Qwen/Qwen3-VL-Reranker-2B"), "rerank")
    instruction = "Find the photo the text describes."
    want = model.predict([(text, _pil(items[0])) for text in QUERIES], prompt=instruction).tolist()
    got = [stage.score(Query(id="q", text=text, instruction=instruction), items, cache=False)[0] for text in QUERIES]
    assert got == pytest.approx(want, abs=1e-4)
    captions = [Item(id=f"c{i}", modality="text", text=t) for i, t in enumerate(QUERIES)]
    want = model.predict([(_pil(items[0]), c.text) for c in captions]).tolist()
    assert stage.score(Query(id="q", image=str(path)), captions, cache=False) == pytest.approx(want, abs=1e-4)


@pytest.mark.slow
def test_qwen3_vl_reranker_takes_the_stages_instruction(qwen3_reranker, qwen3_authors, pictures):
    """The stage's instruction stands for every query without one; a query's own still wins."""
    from reference.qwen3_vl_reranker import scores

    lm, processor = qwen3_authors
    stage = RerankStage(RerankConfig(model=str(qwen3_reranker), mode="pointwise", instruction="Find the photo.",
                                     conventions="Qwen/Qwen3-VL-Reranker-2B"), "rerank")
    docs = [{"image": _pil(it)} for it in pictures]
    assert stage.score(Query(id="q", text=QUERIES[1]), pictures, cache=False) == pytest.approx(
        scores(lm, processor, {"text": QUERIES[1]}, docs, "Find the photo."), abs=1e-4)
    assert stage.score(Query(id="q", text=QUERIES[1], instruction="Other."), pictures, cache=False) == pytest.approx(
        scores(lm, processor, {"text": QUERIES[1]}, docs, "Other."), abs=1e-4)


@pytest.mark.slow
def test_qwen3_vl_reranker_needs_its_image_bounds(qwen3_reranker, qwen3_authors, pictures):
    """Without the table's pixel bounds the processor's own (65,536 pixels at least) enlarges a small image, and
    the scores leave the authors'."""
    from reference.qwen3_vl_reranker import scores

    lm, processor = qwen3_authors
    small = pictures[:1]  # 64×64: 4,096 pixels
    want = scores(lm, processor, {"text": QUERIES[0]}, [{"image": _pil(it)} for it in small])
    stage = RerankStage(RerankConfig(model=str(qwen3_reranker), mode="pointwise", prompt="rerank_qwen3_vl_reranker",
                                     conventions="none"), "rerank")
    assert abs(stage.score(Query(id="q", text=QUERIES[0]), small, cache=False)[0] - want[0]) > 1e-3


@pytest.mark.slow
def test_a_searchs_instruction_reaches_the_reranker(qwen3_reranker, _encoder, world, clip_dir):
    """``pipeline.search(..., instruction=...)``: the rerank stage scores the candidates with it (as the stage does
    for a query that carries it), and without it with the checkpoint's default."""
    import copy

    from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline

    stages = ({"type": "prefilter", "k": 4},
              {"type": "rerank", "name": "rerank", "model": str(qwen3_reranker), "mode": "pointwise", "k": 4,
               "conventions": "Qwen/Qwen3-VL-Reranker-2B"})
    pipe = RetrievalPipeline(PipelineConfig(name="qwen3", encoder=EncoderConfig(model=str(clip_dir)), stages=stages),
                             encoder=copy.copy(_encoder))
    test = world.split("test")
    pipe.index(test, progress=False)
    text, instruction = test.records[0].captions[0], "Find the photo the text describes."
    found = pipe.search(Query(id="q", text=text), k=4, instruction=instruction)[0].candidates
    items = [pipe.gallery.item("image", c.item_id) for c in found]
    want = pipe.stages[1].score(Query(id="q", text=text, instruction=instruction), items, cache=False)
    assert [c.scores["rerank"] for c in found] == pytest.approx(want, abs=1e-4)
    plain = {c.item_id: c.scores["rerank"] for c in pipe.search(Query(id="q", text=text), k=4)[0].candidates}
    assert max(abs(plain[c.item_id] - c.scores["rerank"]) for c in found) > 1e-4


def test_the_served_text_limit_counts_the_checkpoints_system_turn_and_instruction(qwen3_reranker, pictures):
    """``genret serve``'s token limit (and usage) measures the stage's prompt as scoring writes it: Qwen3-VL-Reranker's
    system turn and default instruction are part of it (they were left out, the instruction as a literal)."""
    from genret.data.images import load_image
    from genret.mllm import scoring
    from genret.serve.limits import rerank_limit

    stage = RerankStage(RerankConfig(model=str(qwen3_reranker), mode="pointwise",
                                     conventions="Qwen/Qwen3-VL-Reranker-2B"), "rerank")
    image = load_image(pictures[0].image)
    limit = rerank_limit(stage, image)
    section = stage.prompt.section("t2i")
    fill = {"instruction": stage.default_instruction}
    text = scoring.render(stage.mllm, scoring.pointwise_messages(section["user"], "", section["system"], fill))
    assert "Judge whether the Document" in text and stage.default_instruction in text and "{instruction}" not in text
    want = stage.mllm.processor(text=[text], images=[image], return_tensors="pt")["input_ids"].shape[1]
    assert limit.prompt["t2i"] == want


def test_a_folder_that_declares_its_scoring_but_no_prompt_is_refused_not_guessed(qwen3_reranker):
    """A local copy of a reranker with sentence-transformers files (LogitScore, sigmoid) but no table row or
    genret_reranker.json: genret's own prompt would score it unlike its card, so the stage says what to set."""
    with pytest.raises(ValueError, match="conventions = '<hub id>'"):
        RerankStage(RerankConfig(model=str(qwen3_reranker), mode="pointwise"), "rerank")
    named = RerankStage(RerankConfig(model=str(qwen3_reranker), mode="pointwise",
                                     conventions="Qwen/Qwen3-VL-Reranker-2B"), "rerank")
    assert named.prompt.key.startswith("rerank_qwen3_vl_reranker")
    chosen = RerankStage(RerankConfig(model=str(qwen3_reranker), mode="pointwise", prompt="rerank_pointwise"), "rerank")
    assert chosen.prompt.key.startswith("rerank_pointwise")
