"""A prompt past the model's context is refused by name (PromptTooLongError, a ValueError), never scored: a tiny
LLaVA whose config says it reads a few dozen tokens stands in for a 4,096-token model given 23,101."""

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genret.data.images import load_image
from genret.mllm import MLLM, PromptTooLongError, context_size
from genret.mllm.scoring import generative_scores, listwise_scores, pointwise_scores, render, user_message
from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline
from genret.prompts import load_prompt
from genret.types import Query

POINTWISE = load_prompt("rerank_pointwise").section("t2i")["user"]


def _prompt_length(mllm, text, image):
    prompt = render(mllm, user_message(POINTWISE, text=text))
    return int(mllm.processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"].shape[1])


@pytest.fixture(scope="module")
def image(world):
    return load_image(world.split("test").records[0].path)


@pytest.fixture(scope="module")
def short_dir(tmp_path_factory, mllm_dir, world):
    """The tiny LLaVA told it reads 8 tokens past a short pointwise prompt (its weights as they are)."""
    out = tmp_path_factory.mktemp("short") / "mllm"
    shutil.copytree(mllm_dir, out)
    mllm = MLLM.load(str(mllm_dir))
    limit = _prompt_length(mllm, "a red circle", load_image(world.split("test").records[0].path)) + 8
    config = json.loads((out / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = limit
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def short(short_dir):
    return MLLM.load(str(short_dir))


def test_the_context_is_the_text_configs_and_the_error_is_exported(short, mllm_dir):
    assert issubclass(PromptTooLongError, ValueError)
    assert context_size(short) == short.model.config.text_config.max_position_embeddings
    assert context_size(MLLM.load(str(mllm_dir))) == 4096  # the mini MLLM's, as pretrained


def test_the_tokenizers_length_stands_in_where_the_config_has_none(short, monkeypatch):
    monkeypatch.setattr(short.model.config.text_config, "max_position_embeddings", 0)  # none recorded
    monkeypatch.setattr(short.tokenizer, "model_max_length", 77)
    assert context_size(short) == 77
    monkeypatch.setattr(short.tokenizer, "model_max_length", int(1e30))  # transformers' "not recorded"
    assert context_size(short) is None


@pytest.mark.parametrize("score", ["pointwise", "generative"])
def test_a_pair_past_the_context_is_named_with_its_length_and_the_limit(short, image, score):
    limit = context_size(short)
    long_text = " ".join(["a red circle left of a blue square"] * 20)
    texts, labels = ["a red circle", long_text], ["query 'q1', candidate 'a'", "query 'q2', candidate 'b'"]
    with pytest.raises(PromptTooLongError) as err:
        if score == "pointwise":
            pointwise_scores(short, POINTWISE, texts, [image, image], labels=labels)
        else:
            generative_scores(short, "{image}\nDescribe the image.", texts, [image, image], labels=labels)
    assert err.value.label == "query 'q2', candidate 'b'" and err.value.length > limit and err.value.limit == limit
    assert str(err.value).startswith(f"query 'q2', candidate 'b': the prompt is {err.value.length:,} tokens, more "
                                     f"than the {limit:,}")


def test_a_listwise_prompt_past_the_context_says_which_k_fits(short, image):
    section = load_prompt("rerank_listwise").section("i2t")
    with pytest.raises(PromptTooLongError, match=r"query 'q': a listwise prompt of 6 candidates is .* at most k = \d+"):
        listwise_scores(short, section["user"], section["item"], {"image": image}, [f"text {i}" for i in range(6)],
                        "text", label="query 'q'")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.integers(1, 12))
def test_refused_exactly_when_the_prompt_does_not_fit(short, image, words):
    text = " ".join(["circle"] * words)
    fits = _prompt_length(short, text, image) <= context_size(short)
    try:
        pointwise_scores(short, POINTWISE, [text], [image])
    except PromptTooLongError as err:
        assert not fits and err.label == "pair 0"
    else:
        assert fits


def test_the_rerank_stage_names_the_query_and_candidate(encoder, world, short_dir):
    """Through a pipeline: the long query is refused naming the stage, the query and the candidate; a short one is
    scored."""
    stages = ({"type": "prefilter", "k": 2}, {"type": "rerank", "mode": "pointwise", "model": str(short_dir), "k": 2})
    pipe = RetrievalPipeline(PipelineConfig(encoder=EncoderConfig(model="x"), stages=stages), encoder=encoder)
    pipe.index(world.split("test"), modalities=("image",), progress=False)
    assert len(pipe.search(Query(id="short", text="a red circle"), k=2)[0].candidates) == 2
    with pytest.raises(PromptTooLongError, match=r"stage 'rerank': query 'long', candidate '\w+': the prompt is"):
        pipe.search(Query(id="long", text=" ".join(["a red circle left of a blue square"] * 30)), k=2)


def test_a_rewrite_past_the_context_is_named(short):
    from genret.mllm.rewriter import Rewriter

    rewriter = Rewriter(short, "cirevl", max_new_tokens=4)
    row = {"caption": "a red circle " * 40, "modification": "make it green"}
    with pytest.raises(PromptTooLongError, match=r"query 'c7': the prompt is [\d,]+ tokens and 4 new ones, more than"):
        rewriter.rewrite([row], ["fallback"], labels=["query 'c7'"])


def test_a_caption_past_the_context_is_named(short_dir, world, tmp_path):
    """An image whose tokens alone overflow: the captioner says so before generating."""
    from genret.mllm.captioner import Captioner

    out = tmp_path / "tiny"
    shutil.copytree(short_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 4
    (out / "config.json").write_text(json.dumps(config))
    path = world.split("test").records[0].path
    with pytest.raises(PromptTooLongError, match=rf"the caption of {path}: the prompt is"):
        Captioner(MLLM.load(str(out)), max_new_tokens=2).caption([str(path)])
