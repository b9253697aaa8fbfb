import pytest
import torch
from PIL import Image

from genret.mllm import MLLM
from genret.mllm.scoring import generative_scores, listwise_scores, pointwise_scores, user_message
from genret.prompts import PromptError, load_prompt


@pytest.fixture(scope="module")
def mllm(mllm_dir):
    return MLLM.load(str(mllm_dir))


@pytest.fixture(scope="module")
def images(world):
    return [Image.open(r.path).convert("RGB") for r in world.split("test").records[:4]]


def _full_logprob(mllm, prompt, answer, images):
    """Reference: one plain forward over prompt + answer, sum of the answer tokens' log-probs."""
    inputs = mllm.processor(text=[prompt + answer], images=images or None, return_tensors="pt")
    start = mllm.processor(text=[prompt], images=images or None, return_tensors="pt")["input_ids"].shape[1]
    with torch.no_grad():
        logp = mllm.model(**inputs).logits[0, :-1].log_softmax(-1)
    ids = inputs["input_ids"][0, 1:]
    return sum(logp[p, ids[p]].item() for p in range(start - 1, len(ids)))


def test_loaded_as_llava_with_its_processor(mllm):
    assert mllm.family.name == "llava" and type(mllm.processor).__name__ == "LlavaProcessor"


def test_pointwise_equals_yes_minus_no_of_a_plain_forward(mllm, images):
    template = load_prompt("rerank_pointwise").section("t2i")["user"]
    got = pointwise_scores(mllm, template, ["a red circle", "a blue star above a green cross"], images[:2], batch_size=2)
    for text, image, score in zip(["a red circle", "a blue star above a green cross"], images[:2], got):
        prompt = mllm.processor.apply_chat_template(user_message(template, text=text), add_generation_prompt=True)
        inputs = mllm.processor(text=[prompt], images=[image], return_tensors="pt")
        with torch.no_grad():
            logp = mllm.model(**inputs).logits[0, -1].log_softmax(-1)
        yes, no = (mllm.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("yes", "no"))
        assert score == pytest.approx((logp[yes] - logp[no]).item(), abs=1e-4)  # padding in the batch changes nothing


def test_generative_is_mean_caption_logprob(mllm, images):
    template = "{image}\nDescribe the image."
    text = "a small red circle left of a blue square"
    got = generative_scores(mllm, template, [text, "x"], images[:2], batch_size=2)[0]
    prompt = mllm.processor.apply_chat_template(user_message(template), add_generation_prompt=True)
    n = len(mllm.tokenizer(text + mllm.tokenizer.eos_token, add_special_tokens=False)["input_ids"])
    assert got == pytest.approx(_full_logprob(mllm, prompt, text + mllm.tokenizer.eos_token, [images[0]]) / n, abs=1e-4)


@pytest.mark.parametrize("k", [3, 12])  # 12: two-digit numbers need the cached continuation
def test_listwise_cached_answers_equal_full_forwards(mllm, images, k):
    prompt_file = load_prompt("rerank_listwise")
    section = prompt_file.section("i2t")
    texts = [f"caption number {i}" for i in range(k)]
    got = listwise_scores(mllm, section["user"], section["item"], {"image": images[0]}, texts, "text")
    lines = "".join(section["item"].replace("{number}", str(n)).replace("{text}", t) for n, t in enumerate(texts, 1))
    prompt = mllm.processor.apply_chat_template(user_message(section["user"], candidates=lines), add_generation_prompt=True)
    eos = mllm.tokenizer.eos_token
    for n in (1, k):
        assert got[n - 1] == pytest.approx(_full_logprob(mllm, prompt, f"{n}{eos}", [images[0]]), abs=1e-4)


@pytest.mark.parametrize("content,match", [
    ('name = "p"\nversion = 1\n[t2i]\nuser = "{image} no text here"\n[i2t]\nuser = "{image}{text}"', "placeholder\\(s\\) {text}"),
    ('version = 1\n[t2i]\nuser = "x"', "missing 'name'"),
    ('name = "p"\nversion = 1\n[i2t]\nuser = "{image}{text}"', "missing the \\[t2i\\] table"),
])
def test_prompt_files_missing_placeholders_are_refused(tmp_path, content, match):
    path = tmp_path / "p.toml"
    path.write_text(content)
    need = {"user": ("{text}", "{image}")}
    with pytest.raises(PromptError, match=match):
        load_prompt(str(path), required={"t2i": need, "i2t": need})


def test_unknown_prompt_name_lists_the_known_ones():
    with pytest.raises(PromptError, match="rerank_pointwise"):
        load_prompt("no_such_prompt")


@pytest.mark.parametrize("which", ["pointwise", "generative", "listwise"])
def test_cached_image_features_give_the_plain_path_scores(mllm, images, which):
    from genret.mllm.scoring import image_features

    feats = image_features(mllm, images[:3])
    assert len(feats) == 3 and feats[0].shape[0] == mllm.model.config.image_seq_length
    texts = ["a red circle", "a blue star above a green cross", "a square"]
    if which == "pointwise":
        template = load_prompt("rerank_pointwise").section("t2i")["user"]
        plain = pointwise_scores(mllm, template, texts, images[:3], batch_size=3)
        fast = pointwise_scores(mllm, template, texts, feats, batch_size=3)
    elif which == "generative":
        plain = generative_scores(mllm, "{image}\nDescribe the image.", texts, images[:3], batch_size=3)
        fast = generative_scores(mllm, "{image}\nDescribe the image.", texts, feats, batch_size=3)
    else:
        section = load_prompt("rerank_listwise").section("t2i")
        plain = listwise_scores(mllm, section["user"], section["item"], {"text": texts[0]}, images[:3], "image")
        fast = listwise_scores(mllm, section["user"], section["item"], {"text": texts[0]}, feats, "image")
    assert fast == pytest.approx(plain, abs=1e-4)


def test_shared_prefix_length_stops_at_the_first_difference_and_at_differing_images():
    from genret.mllm.scoring import shared_prefix_length

    ids = torch.tensor([[1, 2, 9, 9, 3, 4, 0], [1, 2, 9, 9, 3, 5, 6]])
    inputs = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    a, b = object(), object()
    assert shared_prefix_length(inputs, [[a], [a]], image_token_id=9) == 5
    assert shared_prefix_length(inputs, [[a], [b]], image_token_id=9) == 2  # same ids, different images
    assert shared_prefix_length(inputs, [[a], [a]], image_token_id=9, limit=3) == 3
    same = {"input_ids": ids[:1].repeat(2, 1), "attention_mask": inputs["attention_mask"][:1].repeat(2, 1)}
    assert shared_prefix_length(same, [[a], [a]], image_token_id=9) == 5  # each row keeps a token of its own


@pytest.mark.parametrize("which", ["pointwise_t2i", "pointwise_i2t", "generative_i2t"])
@pytest.mark.parametrize("batch_size", [2, 5])
def test_shared_prefix_path_gives_the_plain_scores(mllm, images, which, batch_size):
    from genret.mllm.scoring import _inputs, image_features, render, shared_prefix_length

    feats = image_features(mllm, images[:4])
    captions = ["a red circle", "a blue star above a green cross", "a square", "a big green triangle below it",
                "a red circle left of a blue square"]
    if which == "pointwise_t2i":  # one query text, the candidate images differ: the text is the prefix
        template = load_prompt("rerank_pointwise").section("t2i")["user"]
        texts, ims = ["a small red circle left of a blue square"] * 4, feats
        run = lambda **kw: pointwise_scores(mllm, template, texts, ims, batch_size=batch_size, min_prefix=1, **kw)  # noqa: E731
        prompts = [render(mllm, user_message(template, text=t)) for t in texts]
    elif which == "pointwise_i2t":  # one query image, the candidate captions differ: the image is the prefix
        template = load_prompt("rerank_pointwise").section("i2t")["user"]
        texts, ims = captions, [feats[0]] * 5
        run = lambda **kw: pointwise_scores(mllm, template, texts, ims, batch_size=batch_size, min_prefix=1, **kw)  # noqa: E731
        prompts = [render(mllm, user_message(template, text=t)) for t in texts]
    else:
        template = "{image}\nDescribe the image."
        texts, ims = captions, [feats[0]] * 5
        run = lambda **kw: generative_scores(mllm, template, texts, ims, batch_size=batch_size, min_prefix=1, **kw)  # noqa: E731
        prompts = [render(mllm, user_message(template)) + t + mllm.tokenizer.eos_token for t in texts]
    prefix = shared_prefix_length(_inputs(mllm, prompts, [[im] for im in ims]), [[im] for im in ims],
                                  mllm.family.image_token_id(mllm.model))
    assert prefix >= (5 if which == "pointwise_t2i" else mllm.model.config.image_seq_length)  # the fast path runs
    assert run(shared_prefix=True) == pytest.approx(run(shared_prefix=False), abs=1e-4)
    if which != "pointwise_t2i":  # and equals the PIL-image path too
        plain = (pointwise_scores(mllm, template, texts, [images[0]] * 5, batch_size=batch_size)
                 if which == "pointwise_i2t" else generative_scores(mllm, template, texts, [images[0]] * 5, batch_size=batch_size))
        assert run(shared_prefix=True) == pytest.approx(plain, abs=1e-4)
