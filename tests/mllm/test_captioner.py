"""The captioner: batched captions equal single ones, and the cache serves exactly what the same key would make."""

import json
import shutil

import pytest
import torch
from PIL import Image

from genret.data.images import ImageLoadError
from genret.mllm import MLLM
from genret.mllm.captioner import CaptionCacheError, Captioner
from genret.prompts import PromptError, load_prompt
from genret.training.grace import pseudo_queries

TOKENS = 6


@pytest.fixture(scope="module")
def talker(talker_dir):
    return MLLM.load(str(talker_dir))


@pytest.fixture(scope="module")
def paths(world):
    return [str(r.path) for r in world.split("test").records[:10]]


@pytest.fixture(scope="module")
def reference(talker, paths):
    """Each image captioned alone, without a cache."""
    captioner = Captioner(talker, max_new_tokens=TOKENS, batch_size=1)
    return [captioner.caption([p])[0] for p in paths]


def _old_pseudo_queries(mllm, prompt, paths, max_new_tokens, batch_size):
    """``grace.pseudo_queries`` as it was before the captioner: a direct left-padded ``generate`` per batch."""
    from genret.data.images import load_image
    from genret.mllm.scoring import render, user_message

    text = render(mllm, user_message(prompt.section("caption")["user"]))
    tok, out = mllm.tokenizer, []
    side, tok.padding_side = tok.padding_side, "left"
    try:
        for s in range(0, len(paths), batch_size):
            chunk = [load_image(p) for p in paths[s:s + batch_size]]
            inputs = mllm.processor(text=[text] * len(chunk), images=chunk, padding=True, return_tensors="pt")
            inputs = {k: v for k, v in inputs.items() if k != "token_type_ids"}
            with torch.inference_mode():
                gen = mllm.model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                          pad_token_id=tok.pad_token_id)
            new = gen[:, inputs["input_ids"].shape[1]:]
            out += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    finally:
        tok.padding_side = side
    return out


def test_batched_captions_equal_one_by_one(talker, paths, reference):
    assert all(reference) and len(set(reference)) > 1, reference  # the captions say something, and differ by image
    assert Captioner(talker, max_new_tokens=TOKENS, batch_size=4).caption(paths) == reference


def test_pseudo_queries_unchanged(talker, paths):
    grace = load_prompt("grace")
    old = _old_pseudo_queries(talker, grace, paths, TOKENS, batch_size=4)
    assert pseudo_queries(talker, grace, paths, TOKENS, batch_size=4) == old


def test_beam_search_batched_equals_one_by_one(talker, paths):
    one = Captioner(talker, max_new_tokens=TOKENS, batch_size=1, num_beams=3)
    assert Captioner(talker, max_new_tokens=TOKENS, batch_size=4, num_beams=3).caption(paths[:5]) == \
        [one.caption([p])[0] for p in paths[:5]]


def test_second_call_and_a_new_captioner_are_served_from_the_cache(talker, paths, reference, tmp_path):
    captioner = Captioner(talker, max_new_tokens=TOKENS, batch_size=4, cache_dir=tmp_path)
    assert captioner.caption(paths) == reference
    assert (captioner.stats.hits, captioner.stats.misses) == (0, len(paths))
    assert captioner.caption(paths) == reference
    assert (captioner.stats.hits, captioner.stats.misses) == (len(paths), len(paths))

    # A new captioner reads the file back: an edited caption in it is what it serves.
    path = captioner.cache_file()
    data = json.loads(path.read_text())
    assert data["manifest"]["key"] == captioner.key and len(data["captions"]) == len(paths)
    digest = next(d for d, c in data["captions"].items() if c == reference[0])
    data["captions"][digest] = "read from the file"
    path.write_text(json.dumps(data))
    again = Captioner(talker, max_new_tokens=TOKENS, batch_size=4, cache_dir=tmp_path)
    assert again.caption(paths) == ["read from the file"] + reference[1:]
    assert again.stats.misses == 0


def test_without_a_cache_dir_every_call_generates(talker, paths, reference):
    captioner = Captioner(talker, max_new_tokens=TOKENS)
    captioner.caption(paths[:3])
    assert captioner.caption(paths[:3]) == reference[:3] and captioner.stats.misses == 6


def test_duplicates_in_one_call_are_generated_once(talker, paths, reference, tmp_path):
    captioner = Captioner(talker, max_new_tokens=TOKENS, cache_dir=tmp_path)
    assert captioner.caption([paths[0], paths[1], paths[0]]) == [reference[0], reference[1], reference[0]]
    assert (captioner.stats.hits, captioner.stats.misses) == (1, 2)


def test_the_cache_knows_images_by_content(talker, paths, reference, tmp_path):
    captioner = Captioner(talker, max_new_tokens=TOKENS, cache_dir=tmp_path / "cache")
    captioner.caption(paths[:2])
    copy = tmp_path / "renamed.png"
    shutil.copyfile(paths[0], copy)
    assert captioner.caption([copy]) == reference[:1] and captioner.stats.misses == 2  # a renamed copy hits
    image = Image.open(paths[0]).convert("RGB")
    image.putpixel((0, 0), tuple(255 - v for v in image.getpixel((0, 0))))
    image.save(copy)
    captioner.caption([copy])
    assert captioner.stats.misses == 3  # an edited file misses


@pytest.mark.parametrize("change", [{"max_new_tokens": TOKENS - 1}, {"num_beams": 2}, {"prompt_version": 2},
                                    {"prompt": "grace"}])
def test_other_settings_miss(talker, paths, tmp_path, change):
    Captioner(talker, max_new_tokens=TOKENS, cache_dir=tmp_path).caption(paths[:2])
    settings = {"max_new_tokens": TOKENS, **change}
    if "prompt_version" in settings:  # the same template under a new version
        file = tmp_path / "prompts" / "caption.toml"
        file.parent.mkdir()
        text = open(load_prompt("caption").path).read()
        file.write_text(text.replace("version = 1", f"version = {settings.pop('prompt_version')}"))
        settings["prompt"] = str(file)
    other = Captioner(talker, cache_dir=tmp_path, **settings)
    other.caption(paths[:2])
    assert other.stats.misses == 2
    assert len(list(tmp_path.glob("*.json"))) == 2  # each key has its own file


def test_an_adapter_is_part_of_the_key(talker_dir, paths, reference, tmp_path):
    from peft import LoraConfig, get_peft_model

    from genret.mllm.adapters import language_model_targets, save_adapter

    for seed in (0, 1):
        maker = MLLM.load(str(talker_dir))
        torch.manual_seed(seed)
        lora = LoraConfig(r=4, lora_alpha=64, init_lora_weights=False,
                          target_modules=language_model_targets(maker.model, maker.family.lora_targets))
        save_adapter(tmp_path / f"lora{seed}", get_peft_model(maker.model, lora), {
            "task": "caption", "mode": "greedy", "base_model": str(talker_dir), "base_revision": maker.revision,
            "family": maker.family.name, "prompt": {"name": "caption", "version": 1}})
    mllm = MLLM.load(str(talker_dir))
    captioner = Captioner(mllm, max_new_tokens=TOKENS, cache_dir=tmp_path / "cache")
    captioner.caption(paths)
    mllm.attach_adapter(tmp_path / "lora0", task="caption")
    adapted = captioner.caption(paths)
    assert captioner.stats.misses == 2 * len(paths) and adapted != reference  # the base's captions are not served
    assert adapted == Captioner(mllm, max_new_tokens=TOKENS).caption(paths)
    mllm.attach_adapter(tmp_path / "lora1", task="caption")
    captioner.caption(paths)
    assert captioner.stats.misses == 3 * len(paths)
    mllm.use_adapter(None)
    assert captioner.caption(paths) == reference and captioner.stats.misses == 3 * len(paths)
    mllm.use_adapter("lora0")
    assert captioner.caption(paths) == adapted and captioner.stats.misses == 3 * len(paths)


@pytest.mark.parametrize("how", ["peft", "trainable"])
def test_an_adapter_without_a_fixed_identity_cannot_be_cached(talker_dir, paths, tmp_path, how):
    from peft import LoraConfig, get_peft_model

    from genret.mllm.adapters import language_model_targets, save_adapter

    mllm = MLLM.load(str(talker_dir))
    lora = LoraConfig(r=4, target_modules=language_model_targets(mllm.model, mllm.family.lora_targets))
    if how == "peft":  # made in memory, never saved
        mllm.model = get_peft_model(mllm.model, lora)
        match = "'default' was not attached from a folder"
    else:  # attached to be trained further: its weights drift from its file
        save_adapter(tmp_path / "lora", get_peft_model(MLLM.load(str(talker_dir)).model, lora), {
            "task": "caption", "mode": "greedy", "base_model": str(talker_dir), "base_revision": mllm.revision,
            "family": mllm.family.name, "prompt": {"name": "caption", "version": 1}})
        mllm.attach_adapter(tmp_path / "lora", task="caption", trainable=True)
        match = "'lora' is trainable"
    with pytest.raises(CaptionCacheError, match=match):
        Captioner(mllm, max_new_tokens=TOKENS, cache_dir=tmp_path / "cache").caption(paths[:1])
    assert not (tmp_path / "cache").exists()
    assert len(Captioner(mllm, max_new_tokens=TOKENS).caption(paths[:1])) == 1  # without a cache it captions


@pytest.mark.parametrize("content, match", [
    ("{not json", "malformed JSON"),
    ('{"foo": 1}', "not a genret caption cache"),
    ("foreign", "another key than the file's name says.*decoding"),
    ("bad captions", "'captions' must map image sha256"),
])
def test_a_damaged_or_foreign_cache_file_is_refused_and_kept(talker, paths, tmp_path, content, match):
    captioner = Captioner(talker, max_new_tokens=TOKENS, cache_dir=tmp_path)
    path = captioner.cache_file()
    if content in ("foreign", "bad captions"):
        other = Captioner(talker, max_new_tokens=TOKENS - 1, cache_dir=tmp_path)
        other.caption(paths[:1])
        data = json.loads(other.cache_file().read_text())
        if content == "bad captions":
            data["manifest"]["key"], data["captions"] = captioner.key, {"abc": 3}
        content = json.dumps(data)
    path.write_text(content)
    with pytest.raises(CaptionCacheError, match=match) as err:
        captioner.caption(paths[:1])
    assert str(path) in str(err.value)
    assert path.read_text() == content


def test_an_interrupted_run_keeps_the_batches_it_finished(talker, paths, reference, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    captioner = Captioner(talker, max_new_tokens=TOKENS, batch_size=2, cache_dir=tmp_path / "cache")
    with pytest.raises(ImageLoadError, match="broken.png"):
        captioner.caption(paths[:4] + [broken])
    again = Captioner(talker, max_new_tokens=TOKENS, batch_size=2, cache_dir=tmp_path / "cache")
    assert again.caption(paths[:4]) == reference[:4] and again.stats.misses == 0


def test_bad_input_gives_clear_errors(talker, paths, tmp_path):
    captioner = Captioner(talker, max_new_tokens=TOKENS)
    with pytest.raises(TypeError, match="a list of image files"):
        captioner.caption(paths[0])
    with pytest.raises(TypeError, match="got a PngImageFile"):
        captioner.caption([Image.open(paths[0])])
    with pytest.raises(ImageLoadError, match="missing.png"):
        captioner.caption([tmp_path / "missing.png"])
    assert captioner.caption([]) == []
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        Captioner(talker, batch_size=0)
    with pytest.raises(PromptError, match=r"\[retrieve\].user must hold exactly one \{image\}, found 0"):
        Captioner(talker, "grace", section="retrieve")  # the table exists, its template is for texts
    with pytest.raises(PromptError, match="no \\[nope\\] table"):
        Captioner(talker, "caption", section="nope")
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\nversion = 1\n[caption]\nuser = "{image} and {text}"\n')
    with pytest.raises(PromptError, match=r"cannot fill: \{text\}"):
        Captioner(talker, str(bad))
