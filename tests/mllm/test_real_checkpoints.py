"""Every scoring path on shrunk copies of real checkpoints: their tokenizers, chat templates, processor settings.

The fixtures (``tests/fixtures/checkpoints``) hold the real files of Qwen2-VL-2B-Instruct, Qwen2.5-VL-3B-Instruct,
llava-1.5-7b-hf and SmolVLM-256M-Instruct; only layer sizes are shrunk and the weights are random. What a toy
tokenizer hides (sentencepiece's "▁", byte-level BPE's leading space, a template that moves images) shows here.
"""

import copy
import inspect

import json

import pytest
import torch

from genret.mllm import MLLM
from genret.mllm.scoring import generative_scores, image_features, listwise_scores
from genret.prompts import load_prompt
from conftest import score_query
from real_checkpoints import CHECKPOINTS, SLOW, fixture


def _marked(names):
    """``names`` as parameters, those of :data:`real_checkpoints.SLOW` marked slow."""
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


NAMES = _marked(CHECKPOINTS)
EXACT_VOCAB = _marked(n for n in CHECKPOINTS if fixture(n)["tokenizer"]["config_ids_match"])


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


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("mode", ["pointwise", "generative", "listwise"])
@pytest.mark.parametrize("name", NAMES)
def test_cached_features_and_shared_prefix_give_the_pil_scores(real_mllms, real_dirs, images, name, mode, direction,
                                                               monkeypatch):
    from genret.mllm import scoring

    mllm = real_mllms[name]
    if mllm.family.prepare_feature_cache(copy.deepcopy(mllm.processor)):  # SmolVLM: as the rerank stage sets it up
        mllm = MLLM.load(str(real_dirs[name]))
        mllm.family.prepare_feature_cache(mllm.processor)
    plain = score_query(mllm, mode, direction, images, query=LONG_QUERY)
    feats = image_features(mllm, images, several=mode == "listwise" and direction == "t2i")  # k images in one prompt
    runs = []  # the shared-prefix path, seen running: a prefix shorter than min_prefix (16) would skip it
    prefix_forward = scoring._prefix_forward
    monkeypatch.setattr(scoring, "_prefix_forward", lambda *a, **k: runs.append(a[2]) or prefix_forward(*a, **k))
    fast = score_query(mllm, mode, direction, feats, query=LONG_QUERY)
    assert fast == pytest.approx(plain, abs=1e-4)
    if mode == "pointwise" or (mode, direction) == ("generative", "i2t"):  # the query's text, or its image, shared
        assert runs and min(runs) >= 16, runs
    if mode != "listwise":
        assert score_query(mllm, mode, direction, feats, shared_prefix=False, query=LONG_QUERY) == \
            pytest.approx(plain, abs=1e-4)
    assert max(plain) - min(plain) > 1e-3


# A t2i query whose prompt part before the image is past the shared prefix's 16-token minimum in every tokenizer.
LONG_QUERY = "a small red circle to the left of a large blue square, both drawn on a plain white background"


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
    from genret.stages.rerank import RerankConfig

    with pytest.raises(ValueError, match="set cache_features = false to keep the tiles"):  # a setting: refused as read
        RerankConfig(model=str(real_dirs["smolvlm-256m-instruct"]), processor_options={"do_image_splitting": True})


# What each real template and tokenizer write right after the generation prompt.
ANSWER = {"qwen2-vl-2b-instruct": ("", "Yes", "<|im_end|>"), "qwen2.5-vl-3b-instruct": ("", "Yes", "<|im_end|>"),
          "llava-1.5-7b-hf": (" ", "▁Yes", "</s>"), "smolvlm-256m-instruct": (" ", "ĠYes", "<end_of_utterance>"),
          "llava-onevision-qwen2-0.5b-ov-hf": ("", "Yes", "<|im_end|>"), "qwen3-vl-2b-instruct": ("", "Yes", "<|im_end|>"),
          "gemma-3-4b-it": ("", "Yes", "<end_of_turn>"),
          "qwen3.5-0.8b": ("", "Yes", "<|im_end|>")}  # after the no-think form's closed <think></think> block


@pytest.mark.parametrize("name", NAMES)
def test_the_answer_format_is_read_from_the_template(real_mllms, name):
    from genret.mllm.answers import AnswerFormat, answer_format

    prefix, _, suffix = ANSWER[name]
    assert answer_format(real_mllms[name]) == AnswerFormat(prefix, suffix)


@pytest.mark.parametrize("name", NAMES)
def test_pointwise_yes_is_the_token_the_model_writes_after_its_prompt(real_mllms, name):
    """"Yes" as the assistant writes it: Qwen's bare ``Yes``, llava's ``▁Yes`` after ``ASSISTANT:``, SmolVLM's
    ``ĠYes`` after ``Assistant:``; ``yes`` alone (the old choice) is ``▁yes`` or a token never written there."""
    from genret.mllm.scoring import render, user_message, yes_no_ids

    mllm = real_mllms[name]
    prompt = render(mllm, user_message(load_prompt("rerank_pointwise").section("t2i")["user"], text="a red circle"))
    yes_ids, no_ids = yes_no_ids(mllm, prompt, "yes", "no")
    token = mllm.tokenizer.convert_tokens_to_ids(ANSWER[name][1])
    assert token in yes_ids and not set(yes_ids) & set(no_ids)
    assert set(mllm.tokenizer.convert_ids_to_tokens(yes_ids)) <= {ANSWER[name][1], ANSWER[name][1].replace("Yes", "yes")}


@pytest.mark.parametrize("name", NAMES)
def test_generative_scores_the_tokens_of_the_templates_own_assistant_turn(real_mllms, images, name):
    """log P(text | image) over the tokens the template writes for the assistant turn, by the model's own forward."""
    from genret.mllm.scoring import _inline_images, keeps_image_order, render, user_message

    mllm = real_mllms[name]
    user = "{image}\nDescribe the image."
    text = "a red circle left of a blue square"
    messages = [m if keeps_image_order(mllm) else _inline_images(mllm, m) for m in user_message(user)]
    # The template's own text, tokenized as transformers' apply_chat_template does (no second bos where it writes one).
    prompt = mllm.processor.apply_chat_template(messages, add_generation_prompt=True)
    turn = mllm.processor.apply_chat_template(
        [*messages, {"role": "assistant", "content": [{"type": "text", "text": text}]}])
    assert turn.startswith(prompt)
    written = turn[len(prompt):].rstrip()  # the template's answer: llava adds no end token, the model emits eos
    if written.endswith(text):  # no end-of-turn token written (Gemma 3 writes <end_of_turn>; its eos is <eos>)
        written += mllm.tokenizer.eos_token
    bos = mllm.tokenizer.bos_token
    special = {"add_special_tokens": False} if bos and prompt.startswith(bos) else {}
    full = mllm.processor(text=[prompt + written], images=[images[0]], return_tensors="pt", **special)
    start = mllm.processor(text=[prompt], images=[images[0]], return_tensors="pt", **special)["input_ids"].shape[1]
    takes = inspect.signature(mllm.model.forward).parameters  # Gemma 3's forward takes the processor's token_type_ids
    inputs = {k: v for k, v in full.items() if k != "token_type_ids" or k in takes}
    with torch.no_grad():
        logp = mllm.model(**inputs).logits[0, :-1].log_softmax(-1)
    ids = full["input_ids"][0, 1:]
    want = sum(logp[p, ids[p]].item() for p in range(start - 1, len(ids))) / (len(ids) - start + 1)
    got = generative_scores(mllm, user, [text], [images[0]])[0]
    assert got == pytest.approx(want, abs=1e-4)
    if name == "llava-1.5-7b-hf":  # the old join, prompt + text + eos, gave tokens the model never writes there
        old = mllm.tokenizer(prompt + text, add_special_tokens=False)["input_ids"]
        assert mllm.tokenizer.convert_ids_to_tokens(old)[-8:][:2] != mllm.tokenizer.convert_ids_to_tokens(
            mllm.tokenizer(prompt + " " + text, add_special_tokens=False)["input_ids"])[-8:][:2]


def test_llava_listwise_numbers_sit_next_to_their_images(real_mllms):
    """llava-1.5's template renders every image before the text; the numbered list must keep each image by its number."""
    from genret.mllm.scoring import listwise_prompt, render

    mllm = real_mllms["llava-1.5-7b-hf"]
    section = load_prompt("rerank_listwise").section("t2i")
    messages, _ = listwise_prompt(section["user"], section["item"], {"text": "a red circle"}, ["a", "b", "c"], "image")
    text = render(mllm, messages)
    assert "Text: a red circle\nImage 1: <image>\nImage 2: <image>\nImage 3: <image>\n" in text
    pointwise = render(mllm, [{"role": "user", "content": [{"type": "text", "text": "Text: q\n"}, {"type": "image"},
                                                           {"type": "text", "text": "\nDoes it match?"}]}])
    assert pointwise.index("Text: q") < pointwise.index("<image>")  # the query first: the shared prefix


@pytest.mark.parametrize("name, k, fits", [("llava-1.5-7b-hf", 20, 6)])
def test_a_listwise_prompt_past_the_context_says_which_k_fits(real_mllms, images, name, k, fits):
    """llava-1.5: 576 tokens an image, 4,096 of context: 20 images (~11.6k tokens) cannot be one prompt."""
    section = load_prompt("rerank_listwise").section("t2i")
    with pytest.raises(ValueError, match=rf"a listwise prompt of {k} candidates is 11,\d{{3}} tokens, more than .*"
                                         rf"context of 4,096 .* at most k = {fits} fit"):
        listwise_scores(real_mllms[name], section["user"], section["item"], {"text": "a red circle"},
                        [images[0]] * k, "image")
    scores = listwise_scores(real_mllms[name], section["user"], section["item"], {"text": "a red circle"},
                             [images[0]] * fits, "image")
    assert len(scores) == fits


@pytest.mark.parametrize("name", ["qwen2.5-vl-3b-instruct"])
def test_constrained_beam_scores_are_log_p_despite_the_checkpoints_generation_config(real_mllms, name):
    """Qwen2.5-VL ships repetition_penalty 1.05 (and sampling settings) in generation_config.json; GRACE's beam
    score must still be the identifier's log P under the model, to 1e-4."""
    from genret.identifiers import Trie, constrained_beam_search, make_identifiers
    from genret.mllm.scoring import render, user_message

    mllm = real_mllms[name]
    assert mllm.model.generation_config.repetition_penalty == 1.05
    ids = make_identifiers("numeric", [f"img{i:03d}" for i in range(40)], width=2)
    trie = Trie.from_identifiers(ids, mllm.tokenizer)
    prompt = render(mllm, user_message("{text}", text="a red circle a red circle 1 1 2 2"))
    inputs = mllm.processor(text=[prompt], return_tensors="pt")
    inputs = {k: v for k, v in inputs.items() if k != "token_type_ids"}
    [hits] = constrained_beam_search(mllm.model, inputs, trie, num_beams=5)
    assert hits
    for hit in hits[:3]:
        full = torch.cat([inputs["input_ids"][0], torch.tensor(hit.tokens)]).unsqueeze(0)
        with torch.no_grad():
            logp = mllm.model(input_ids=full).logits[0, :-1].float().log_softmax(-1)
        n = inputs["input_ids"].shape[1]
        want = sum(logp[n - 1 + j, t].item() for j, t in enumerate(hit.tokens))
        assert hit.score == pytest.approx(want, abs=1e-4)


def test_scoring_uses_the_current_cache_api(real_mllms, images, caplog, recwarn):
    """``past_key_values=`` is deprecated in transformers 5.24 (removed in 5.40): the KV-cache paths pass ``cache=``."""
    mllm = real_mllms["llava-1.5-7b-hf"]
    with caplog.at_level("WARNING"):
        for mode in ("pointwise", "generative", "listwise"):
            score_query(mllm, mode, "i2t", image_features(mllm, images[:1]) * 4)
    said = caplog.text + " ".join(str(w.message) for w in recwarn)
    assert "past_key_values" not in said and "deprecated" not in said


def test_gallery_features_are_saved_in_the_models_dtype_and_read_per_candidate(encoder, world, real_dirs, tmp_path):
    """llava-1.5's features are 576 × hidden per image: saved in bf16 when the model runs in bf16, memory-mapped on
    load, read for the candidates a query reranks, never all held in memory."""
    from safetensors import safe_open

    from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline
    from genret.types import Query

    stages = ({"type": "prefilter", "k": 3}, {"type": "rerank", "mode": "pointwise", "k": 3, "dtype": "bfloat16",
                                              "model": str(real_dirs["llava-1.5-7b-hf"])})
    pipe = RetrievalPipeline(PipelineConfig(name="f", encoder=EncoderConfig(model="x"), stages=stages), encoder=encoder)
    pipe.index(world.split("test"), progress=False)
    pipe.save(tmp_path / "p")
    (path,) = (tmp_path / "p").rglob("features.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        first = fh.get_tensor("0")
    assert first.dtype == torch.bfloat16 and tuple(first.shape) == (576, 32)
    loaded = RetrievalPipeline.load(tmp_path / "p", encoder=encoder)
    store = loaded.stages[1].features
    assert len(store) == len(world.split("test").records) and store.in_memory == 0
    query = Query(id="q", text=world.split("test").records[0].captions[0])
    want = [c.score for c in pipe.search(query, k=3)[0].candidates]
    got = [c.score for c in loaded.search(query, k=3)[0].candidates]
    assert got == pytest.approx(want, abs=1e-3) and store.in_memory == 0


def test_a_truncated_feature_file_is_refused_by_name(encoder, world, real_dirs, tmp_path):
    from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline

    stages = ({"type": "prefilter", "k": 3}, {"type": "rerank", "mode": "pointwise", "k": 3,
                                              "model": str(real_dirs["llava-1.5-7b-hf"])})
    pipe = RetrievalPipeline(PipelineConfig(name="f", encoder=EncoderConfig(model="x"), stages=stages), encoder=encoder)
    pipe.index(world.split("test"), progress=False)
    pipe.save(tmp_path / "p")
    (path,) = (tmp_path / "p").rglob("features.safetensors")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"features.safetensors: \d+ bytes, the manifest of this pipeline says"):
        RetrievalPipeline.load(tmp_path / "p", encoder=encoder)
    for manifest in (tmp_path / "p" / "manifest.json", path.parent / "manifest.json"):  # as saved before file lists
        table = json.loads(manifest.read_text())
        del table["files"], table["digest"], table["owner"]
        manifest.write_text(json.dumps(table))
    with pytest.raises(ValueError, match=r"features.safetensors: not a readable genret feature file"):
        RetrievalPipeline.load(tmp_path / "p", encoder=encoder)


@pytest.mark.parametrize("name", NAMES)
def test_lora_goes_on_the_language_model_and_leaves_the_vision_side(real_dirs, images, name):
    """The family's LoRA targets exist in the real architecture's language model, and only there: cached
    image features stay valid under a rerank adapter."""
    from peft import LoraConfig, get_peft_model

    from genret.mllm.adapters import language_model_targets

    mllm = MLLM.load(str(real_dirs[name]))
    if mllm.family.prepare_feature_cache(mllm.processor) is not None:
        pass  # SmolVLM: features of one tile
    before = image_features(mllm, images[:2])
    pattern = language_model_targets(mllm.model, mllm.family.lora_targets)
    torch.manual_seed(0)
    mllm.model = get_peft_model(mllm.model, LoraConfig(r=4, target_modules=pattern, init_lora_weights=False)).eval()
    wrapped = [n for n, _ in mllm.model.named_modules() if n.endswith("lora_A")]
    assert wrapped and not [n for n in wrapped if "vision" in n or "visual" in n]
    after = image_features(mllm, images[:2])
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("scheme", ["string", "atomic"])
@pytest.mark.parametrize("name", NAMES)
def test_grace_identifiers_are_the_tokens_the_template_writes(real_dirs, name, scheme):
    """Each identifier's trie sequence is how the assistant turn writes it (llava and SmolVLM put a space first),
    and constrained beam search after a real prompt returns only identifiers of the trie."""
    from genret.identifiers import Trie, add_tokens, constrained_beam_search, make_identifiers
    from genret.mllm.answers import answer_context
    from genret.mllm.scoring import render, user_message

    mllm = MLLM.load(str(real_dirs[name]))
    items = [f"img{i:03d}" for i in range(30)]
    ids = make_identifiers(scheme, items)
    add_tokens(ids, mllm.tokenizer, mllm.model)
    trie = Trie.from_identifiers(ids, mllm.tokenizer, *answer_context(mllm))
    prompt = render(mllm, user_message("{text}", text="a red circle"))
    ident = ids.identifier("img007")
    turn = mllm.processor.apply_chat_template(
        [*user_message("{text}", text="a red circle"), {"role": "assistant", "content": [{"type": "text", "text": ident}]}])
    own = mllm.processor.apply_chat_template(user_message("{text}", text="a red circle"), add_generation_prompt=True)
    written = turn[len(own):].rstrip()  # the template's own prompt: Gemma 3's starts with the <bos> genret's leaves out
    if written.endswith(ident):  # no end-of-turn token written (Gemma 3 writes <end_of_turn>; its eos is <eos>)
        written += mllm.tokenizer.eos_token
    want = mllm.tokenizer(prompt + written, add_special_tokens=False)["input_ids"][
        len(mllm.tokenizer(prompt, add_special_tokens=False)["input_ids"]):]
    assert trie.lookup(want) == "img007"
    inputs = {k: v for k, v in mllm.processor(text=[prompt], return_tensors="pt").items() if k != "token_type_ids"}
    [hits] = constrained_beam_search(mllm.model, inputs, trie, num_beams=4)
    # Decoding drops a beam that ends off the trie, so "every hit is an item" alone could not fail: all 4 beams come
    # back (30 identifiers for 4 beams), i.e. every raw beam, before any filtering, was an identifier of the trie.
    assert len(hits) == 4 and all(h.item_id in items and trie.lookup(h.tokens) == h.item_id for h in hits)


# Checkpoints whose processor resizes every image to one size (one image token count): captions never pad.
FIXED_IMAGE_TOKENS = {"llava-1.5-7b-hf", "smolvlm-256m-instruct", "gemma-3-4b-it"}


@pytest.mark.parametrize("name", NAMES)
def test_captions_and_rewrites_run_batched_as_one_by_one(real_dirs, world, name, tmp_path):
    """Left-padded batches (Qwen's rope positions included) give the captions and rewrites of single prompts.

    The images differ in size and aspect ratio, so that where a family's image token count follows the image (Qwen,
    LLaVA-OneVision) the batch's rows differ in length and are padded; where every image is resized to one size
    (llava-1.5, SmolVLM without splitting, Gemma 3) nothing pads in captioning, and only the rewrites pad.
    """
    from PIL import Image

    from genret.mllm.captioner import Captioner
    from genret.mllm.rewriter import Rewriter
    from genret.mllm.scoring import _inputs

    mllm = MLLM.load(str(real_dirs[name]))
    mllm.family.prepare_feature_cache(mllm.processor)  # SmolVLM: one tile, to keep this quick
    paths = []
    for n, (r, size) in enumerate(zip(world.split("test").records, ((64, 64), (112, 56), (40, 120)))):
        paths.append(str(tmp_path / f"{n}.png"))
        Image.open(r.path).convert("RGB").resize(size).save(paths[-1])
    captioner = Captioner(mllm, max_new_tokens=6, batch_size=3)
    lengths = {int(_inputs(mllm, [captioner.text], [[Image.open(p).convert("RGB")]])["input_ids"].shape[1])
               for p in paths}
    assert len(lengths) > 1 or name in FIXED_IMAGE_TOKENS, lengths  # the rows pad where image tokens vary
    batched = captioner.caption(paths)
    single = [Captioner(mllm, max_new_tokens=6, batch_size=1).caption([p])[0] for p in paths]
    assert batched == single and all(isinstance(c, str) for c in batched)
    rows = [{"caption": "a red circle", "modification": "make it blue"},
            {"caption": "a small green star above a square", "modification": "remove the star"}]
    rewriter = Rewriter(mllm, max_new_tokens=6, batch_size=2)
    together = [r.text for r in rewriter.rewrite(rows, ["x", "y"])]
    alone = [Rewriter(mllm, max_new_tokens=6, batch_size=1).rewrite([row], [f])[0].text for row, f in zip(rows, "xy")]
    assert together == alone


@pytest.mark.parametrize("name", NAMES)
def test_texts_over_shared_images_score_as_each_pair_alone(real_mllms, real_dirs, images, name):
    """Many text queries scored in one call share candidate images: each image's prompt runs once for all its
    texts (or, where the families' image token counts differ, the plain batches): the scores of each pair alone."""
    mllm = real_mllms[name]
    if mllm.family.prepare_feature_cache(copy.deepcopy(mllm.processor)):
        mllm = MLLM.load(str(real_dirs[name]))
        mllm.family.prepare_feature_cache(mllm.processor)
    template = load_prompt("rerank_generative").section("t2i")
    feats = image_features(mllm, images)
    which = [0, 1, 0, 2, 1, 0, 3, 2]
    texts = [template["assistant"].replace("{text}", t) for t in
             ["a red circle", "a blue square", "two shapes", "a small green triangle", "a large red square",
              "nothing at all", "a yellow star", "a circle left of a square"]]
    together = generative_scores(mllm, template["user"], texts, [feats[i] for i in which], batch_size=3)
    alone = [generative_scores(mllm, template["user"], [t], [images[i]])[0] for t, i in zip(texts, which)]
    assert together == pytest.approx(alone, abs=1e-4)
