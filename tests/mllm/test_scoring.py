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
