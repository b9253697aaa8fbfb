"""Qwen3.5 on a shrunk copy of Qwen/Qwen3.5-0.8B: its real config, processor settings, chat template and 248K tokenizer.

What is Qwen3.5's own, beside what ``test_real_checkpoints`` checks for every fixture: the chat template thinks (the
4B and larger unless told ``enable_thinking=False``), and the language model is a hybrid of Gated-DeltaNet layers,
whose cache holds a convolution window and a recurrent state instead of keys and values.
"""

import pytest
import torch

from conftest import one_chat_round, score_query
from genret.mllm.scoring import (generative_scores, image_features, listwise_prompt, listwise_scores, pointwise_scores,
                                 render, user_message)
from genret.prompts import load_prompt
from real_checkpoints import fixture

NAME = "qwen3.5-0.8b"
NO_THINK = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
# The generation prompt's tail of the 0.8B and 2B templates (thinking only when asked) and of the 4B and larger
# (thinking unless told not to); the rest of the template is the same (see the fixture's sources).
OPEN, CLOSED = "{{- '<think>\\n' }}", "{{- '<think>\\n\\n</think>\\n\\n' }}"
SMALL_TAIL = ("{%- if enable_thinking is defined and enable_thinking is true %}\n        " + OPEN
              + "\n    {%- else %}\n        " + CLOSED + "\n    {%- endif %}")
LARGE_TAIL = ("{%- if enable_thinking is defined and enable_thinking is false %}\n        " + CLOSED
              + "\n    {%- else %}\n        " + OPEN + "\n    {%- endif %}")
TEMPLATES = {"0.8B": fixture(NAME)["chat_template"],
             "4B+": fixture(NAME)["chat_template"].replace(SMALL_TAIL, LARGE_TAIL)}
assert TEMPLATES["4B+"] != TEMPLATES["0.8B"]


@pytest.fixture
def qwen(real_mllms, request):
    """The shrunk Qwen3.5 with the chat template ``request.param`` names (the checkpoint's own by default)."""
    mllm = real_mllms[NAME]
    kept = mllm.processor.chat_template
    mllm.processor.chat_template = TEMPLATES[getattr(request, "param", "0.8B")]
    for memo in ("_answer_format", "_keeps_image_order"):
        mllm.__dict__.pop(memo, None)
    yield mllm
    mllm.processor.chat_template = kept
    for memo in ("_answer_format", "_keeps_image_order"):
        mllm.__dict__.pop(memo, None)


def test_the_tokenizer_is_qwen3_5s_248k_vocabulary(qwen):
    """The converted tokenizer encodes as the package's own tiktoken encoder (its README's example, ids as printed
    there) and puts the special tokens where Qwen3.5's config and chat template expect them."""
    tok = qwen.tokenizer
    assert len(tok) == 248_044 + 33 and qwen.model.config.text_config.vocab_size == 248_320
    assert tok("Hello! 毕老师！1 + 1 = 2 ĠÑĤÐ²ÑĬÑĢ", add_special_tokens=False)["input_ids"] == [
        9419, 0, 220, 97169, 97621, 6115, 16, 478, 220, 16, 283, 220, 17, 9551, 254, 68933, 128, 97, 91914, 28495,
        68933, 128, 105, 68933, 128, 95]
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|image_pad|>", "<think>", "</think>"]) == [
        248045, 248046, qwen.model.config.image_token_id, 248068, 248069]


@pytest.mark.parametrize("qwen", ["0.8B", "4B+"], indirect=True)
def test_scores_are_the_models_own_forward_over_its_no_think_template(qwen, images):
    """Parity: generative log P(text | image) and pointwise log P(yes) − log P(no) equal (fp32, 1e-4) the model's
    own forward over the checkpoint's own chat template rendered with ``enable_thinking=False``, for the 0.8B's
    template and for the 4B+ one, which opens a ``<think>`` block unless told not to."""
    processor, model, tok = qwen.processor, qwen.model, qwen.tokenizer
    user = "{image}\nDescribe the image."
    text = "a red circle left of a blue square"
    messages = user_message(user)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)
    assert render(qwen, messages) == prompt and prompt.endswith(NO_THINK)
    turn = processor.apply_chat_template(
        [*messages, {"role": "assistant", "content": [{"type": "text", "text": text}]}], enable_thinking=False)
    assert turn.startswith(prompt) and turn[len(prompt):] == text + "<|im_end|>\n"
    full = processor(text=[prompt + text + "<|im_end|>"], images=[images[0]], return_tensors="pt")
    start = processor(text=[prompt], images=[images[0]], return_tensors="pt")["input_ids"].shape[1]
    with torch.no_grad():
        logp = model(**full).logits[0, :-1].float().log_softmax(-1)
    ids = full["input_ids"][0, 1:]
    want = sum(logp[p, ids[p]].item() for p in range(start - 1, len(ids))) / (len(ids) - start + 1)
    assert generative_scores(qwen, user, [text], [images[0]])[0] == pytest.approx(want, abs=1e-4)

    section = load_prompt("rerank_pointwise").section("t2i")
    prompt = processor.apply_chat_template(user_message(section["user"], text=text), add_generation_prompt=True,
                                           enable_thinking=False)
    with torch.no_grad():
        last = model(**processor(text=[prompt], images=[images[1]], return_tensors="pt")).logits[0, -1]
    last = last.float().log_softmax(-1)
    yes, no = tok.convert_tokens_to_ids(["Yes", "yes"]), tok.convert_tokens_to_ids(["No", "no"])
    want = (last[yes].logsumexp(-1) - last[no].logsumexp(-1)).item()
    got = pointwise_scores(qwen, section["user"], [text], [images[1]])[0]
    assert got == pytest.approx(want, abs=1e-4)
    assert torch.sigmoid(torch.tensor(got)).item() == pytest.approx(  # P(yes) over {yes, no}
        (last[yes].exp().sum() / (last[yes].exp().sum() + last[no].exp().sum())).item(), abs=1e-4)


def test_the_hybrid_cache_serves_shared_prefixes_and_listwise_answers(qwen, images):
    """Gated-DeltaNet layers keep conv and recurrent states: a shared prefix's cache selected for each row, and a
    listwise prompt's cache repeated for its k answers, score as the whole prompts do, and a row scores the same
    in a right-padded batch with longer rows (image grids of 8×8 and 6×12 tokens) as alone."""
    plain = score_query(qwen, "pointwise", "i2t", images)  # plain batches, right-padded
    feats = image_features(qwen, images)
    assert score_query(qwen, "pointwise", "i2t", feats) == pytest.approx(plain, abs=1e-4)  # image in a shared prefix
    assert max(plain) - min(plain) > 1e-3
    section = load_prompt("rerank_pointwise").section("t2i")
    batched = pointwise_scores(qwen, section["user"], ["a red circle"] * 4, images, batch_size=4)
    alone = [pointwise_scores(qwen, section["user"], ["a red circle"], [im])[0] for im in images]
    assert batched == pytest.approx(alone, abs=1e-4)

    section = load_prompt("rerank_listwise").section("t2i")
    query = {"text": "a red circle left of a blue square"}
    got = listwise_scores(qwen, section["user"], section["item"], query, images[1:], "image")
    messages, ims = listwise_prompt(section["user"], section["item"], query, images[1:], "image")
    prompt = render(qwen, messages)
    want = []
    for n in range(1, len(ims) + 1):  # each number's log P after the whole prompt, no cache
        full = qwen.processor(text=[prompt + f"{n}<|im_end|>"], images=ims, return_tensors="pt")
        start = qwen.processor(text=[prompt], images=ims, return_tensors="pt")["input_ids"].shape[1]
        with torch.no_grad():
            logp = qwen.model(**full).logits[0, :-1].float().log_softmax(-1)
        ids = full["input_ids"][0, 1:]
        want.append(sum(logp[p, ids[p]].item() for p in range(start - 1, len(ids))))
    assert got == pytest.approx(want, abs=1e-4)


def test_lora_targets_the_gated_deltanet_and_attention_projections(qwen):
    from genret.mllm.adapters import language_model_targets

    pattern = language_model_targets(qwen.model, qwen.family.lora_targets)
    import re

    hit = {n for n, m in qwen.model.named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(pattern, n)}
    kinds = {n.rsplit(".", 1)[-1] for n in hit}
    assert kinds == set(qwen.family.lora_targets)
    assert any(".linear_attn." in n for n in hit) and any(".self_attn." in n for n in hit)
    assert not any("visual" in n or n.endswith(("in_proj_a", "in_proj_b")) for n in hit)


@pytest.mark.slow
def test_captions_of_images_of_several_sizes_batched_are_those_made_one_by_one(qwen, images, tmp_path):
    """Generation left-pads a batch: a shorter prompt's padding must not reach a Gated-DeltaNet layer's state
    (with transformers' padding mask turned off, the second and third captions here change)."""
    from genret.mllm.captioner import Captioner

    paths = []
    for i, im in enumerate([images[0], images[3], images[1].resize((96, 64))]):  # 64, 32 and 96 tokens
        paths.append(str(tmp_path / f"{i}.png"))
        im.save(paths[-1])
    batched = Captioner(qwen, max_new_tokens=6, batch_size=3).caption(paths)
    assert batched == [Captioner(qwen, max_new_tokens=6, batch_size=1).caption([p])[0] for p in paths]


@pytest.mark.slow
def test_the_moe_variant_is_the_same_family(real_dirs, images, tmp_path):
    """``qwen3_5_moe`` (Qwen3.5-35B-A3B and the like): the dense fixture with transformers' MoE fields at toy sizes
    (no MoE checkpoint's own files here), loaded as a hub checkpoint is: same family, shared prefixes and listwise
    answers over its hybrid cache as the whole prompts give, LoRA on the attention and Gated-DeltaNet projections."""
    import json
    import shutil

    from transformers import AutoConfig, AutoModelForImageTextToText

    from genret.mllm import MLLM
    from genret.mllm.adapters import language_model_targets

    out = tmp_path / "moe"
    shutil.copytree(real_dirs[NAME], out, ignore=shutil.ignore_patterns("model*.safetensors", "genret.json"))
    config = json.loads((out / "config.json").read_text())
    config.update(model_type="qwen3_5_moe", architectures=["Qwen3_5MoeForConditionalGeneration"])
    config["vision_config"]["model_type"] = "qwen3_5_moe"
    text = config["text_config"]
    for key in ("intermediate_size", "mlp_only_layers"):
        text.pop(key, None)
    text.update(model_type="qwen3_5_moe_text", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                shared_expert_intermediate_size=16)
    (out / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(out)).save_pretrained(out)
    mllm = MLLM.load(str(out))
    assert type(mllm.model).__name__ == "Qwen3_5MoeForConditionalGeneration" and mllm.family.name == "qwen3_5"
    feats = image_features(mllm, images)
    for mode in ("pointwise", "listwise"):
        assert score_query(mllm, mode, "i2t", feats) == pytest.approx(score_query(mllm, mode, "i2t", images), abs=1e-4)
    assert language_model_targets(mllm.model, mllm.family.lora_targets)


@pytest.fixture(scope="module")
def few(world):
    from dataclasses import replace

    train = world.split("train")
    return replace(train, records=train.records[:8])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pointwise", "listwise", "generative"])
def test_a_rerank_lora_trains_through_the_gated_deltanet_in_every_mode(real_dirs, few, clip_dir, tmp_path, mode):
    """LoRA on the attention and Gated-DeltaNet projections trains on cached features, with and without gradient
    checkpointing (listwise scores each answer after its whole prompt: the hybrid cache is written in place)."""
    import math

    from genret.training.rerank import RerankTrainConfig, train_rerank

    for checkpointing in (False, True):
        config = RerankTrainConfig(mode=mode, negatives=3, mine_k=4, batch_size=2, directions="both", max_steps=2,
                                   warmup=0.0, log_every=1, eval_every=0, save_every=0,
                                   gradient_checkpointing=checkpointing)
        summary = train_rerank(str(real_dirs[NAME]), few, tmp_path / f"{mode}-{checkpointing}", config,
                               prefilter=str(clip_dir), progress=False)
        losses = [h["loss"] for h in summary["history"] if "loss" in h]
        assert summary["steps"] == 2 and losses and all(math.isfinite(v) for v in losses)


@pytest.mark.slow
def test_qlora_trains_in_4bit(tmp_path_factory, few, clip_dir, tmp_path):
    """4-bit NF4 on the CPU (the CUDA user's path); bitsandbytes' CPU kernels need layers 64 wide, so the language
    model and the vision tower are built 64 wide here (the Gated-DeltaNet projections quantised too)."""
    import copy

    pytest.importorskip("bitsandbytes")
    from genret.mllm.tiny import _merge, build_from_fixture
    from genret.training.rerank import RerankTrainConfig, train_rerank
    from real_checkpoints import tiktoken_tokenizer

    fx = copy.deepcopy(fixture(NAME))
    fx["shrink"] = _merge(fx["shrink"], {"text_config": {"hidden_size": 64, "linear_key_head_dim": 32,
                                                         "linear_value_head_dim": 32},
                                         "vision_config": {"hidden_size": 64, "out_hidden_size": 64}})
    path = build_from_fixture(fx, tmp_path_factory.mktemp("wide") / "wide",
                              tiktoken_tokenizer(fx["tokenizer"]["source"]))
    config = RerankTrainConfig(mode="pointwise", negatives=3, mine_k=4, batch_size=2, directions="both", max_steps=2,
                               warmup=0.0, log_every=1, eval_every=0, save_every=0, load_in_4bit=True, dtype="float32")
    summary = train_rerank(str(path), few, tmp_path / "q", config, prefilter=str(clip_dir), progress=False)
    assert summary["steps"] == 2 and (tmp_path / "q" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_the_chat_stage_asks_and_answers_with_qwen3_5(real_dirs, world):
    """ChatIR with Qwen3.5 as questioner (text only) and answerer (sees the target image): one round runs."""
    one_chat_round(str(real_dirs[NAME]), world)


@pytest.mark.slow
def test_a_rerank_pipeline_caches_gallery_features_and_reloads(encoder, world, real_dirs, tmp_path):
    """The rerank stage on Qwen3.5: gallery features cached at index time ((1, 8, 8, hidden) a 64 px image), the
    pipeline saved and loaded, the same ranking scores from the loaded features as from the images."""
    from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline
    from genret.types import Query

    path = str(real_dirs[NAME])
    stages = ({"type": "prefilter", "k": 3}, {"type": "rerank", "name": "cached", "mode": "pointwise", "model": path,
                                              "k": 3},
              {"type": "rerank", "name": "pixels", "mode": "pointwise", "model": path, "k": 3,
               "cache_features": False})
    pipe = RetrievalPipeline(PipelineConfig(name="q", encoder=EncoderConfig(model="x"), stages=stages), encoder=encoder)
    pipe.index(world.split("test"), progress=False)
    assert all(tuple(f.shape) == (1, 8, 8, 32) for f in pipe.stages[1].features.values())
    pipe.save(tmp_path / "p")
    loaded = RetrievalPipeline.load(tmp_path / "p", encoder=encoder)
    query = Query(id="q", text=world.split("test").records[0].captions[0])
    outputs = dict(loaded.run([query]))
    cached, pixels = ({c.item_id: c.scores[n] for c in outputs[n][0].candidates} for n in ("cached", "pixels"))
    assert set(cached) == set(pixels) and cached == pytest.approx(pixels, abs=1e-4)
