"""The rewriter: deterministic, cached, guarded (empty and runaway answers fall back and say so)."""

import pytest
import torch

from genret._io import ManifestError
from genret.mllm import MLLM
from genret.mllm.rewriter import Rewriter
from genret.mllm.textcache import TextCache

ROWS = [{"caption": "a small red circle left of a large blue square", "modification": "make the circle green"},
        {"caption": "a green star above a white cross", "modification": "make the star large"}]
FALLBACKS = [r["modification"] for r in ROWS]


@pytest.fixture(scope="module")
def mllm(mllm_dir):
    return MLLM.load(str(mllm_dir))


class _Says:
    """Bias the output layer so that the model always says ``token`` (real weights, one extra bias)."""

    def __init__(self, mllm: MLLM, token_id: int) -> None:
        self.head, self.token_id = mllm.model.get_output_embeddings(), token_id

    def __enter__(self):
        self.head.bias = torch.nn.Parameter(torch.zeros(self.head.out_features))
        self.head.bias.data[self.token_id] = 1e4

    def __exit__(self, *exc):
        self.head.bias = None


def test_a_runaway_answer_falls_back_to_the_original_query(mllm):
    with _Says(mllm, mllm.tokenizer.convert_tokens_to_ids("Ġred")):  # "red red red ...", never an end
        out = Rewriter(mllm, "cirevl", max_new_tokens=3).rewrite(ROWS, FALLBACKS)
    assert [r.fallback for r in out] == ["runaway", "runaway"]
    assert [r.text for r in out] == FALLBACKS and [r.raw.split() for r in out] == [["red"] * 3] * 2


def test_an_empty_answer_falls_back(mllm):
    with _Says(mllm, mllm.tokenizer.eos_token_id):
        out = Rewriter(mllm, "cirevl", max_new_tokens=8).rewrite(ROWS, FALLBACKS)
    assert [r.fallback for r in out] == ["empty", "empty"] and [r.text for r in out] == FALLBACKS


def test_rewrites_are_deterministic_batched_and_cached_on_disk(talker_dir, tmp_path):
    # The talker (untied random output layer) says something (the tied tiny model decodes empty), and the rows'
    # prompts differ in length, so the batch pads one: if padding leaked into its answer, the two runs would differ.
    talker = MLLM.load(str(talker_dir))
    first = Rewriter(talker, "cirevl", max_new_tokens=6, batch_size=2, cache_dir=tmp_path).rewrite(ROWS, FALLBACKS)
    assert all(r.raw for r in first)
    one_by_one = [Rewriter(talker, "cirevl", max_new_tokens=6, batch_size=1).rewrite([r], [f])[0]
                  for r, f in zip(ROWS, FALLBACKS)]
    assert [r.raw for r in first] == [r.raw for r in one_by_one]
    again = Rewriter(talker, "cirevl", max_new_tokens=6, cache_dir=tmp_path).rewrite(ROWS, FALLBACKS)
    assert all(r.cached for r in again) and [r.raw for r in again] == [r.raw for r in first]
    # Other decoding settings are another key: nothing is served from the first run's entries.
    other = Rewriter(talker, "cirevl", max_new_tokens=5, cache_dir=tmp_path).rewrite(ROWS, FALLBACKS)
    assert not any(r.cached for r in other)


def test_a_prompt_past_the_context_is_refused_naming_the_row(mllm):
    long = [ROWS[0], {"caption": "a red circle " * 2000, "modification": "make it blue"}]
    with pytest.raises(ValueError, match="rewrite row 1: the prompt is .* tokens"):
        Rewriter(mllm, "cirevl").rewrite(long, ["a", "b"])


def test_missing_placeholders_and_image_templates_are_refused(mllm, tmp_path):
    with pytest.raises(ValueError, match="needs modification"):
        Rewriter(mllm, "cirevl").rewrite([{"caption": "x"}], ["x"])
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\nversion = 1\n[rewrite]\nuser = "{image} {caption}"\n')
    with pytest.raises(ValueError, match="reads text only"):
        Rewriter(mllm, str(bad))


def test_text_cache_checks_its_manifest_and_survives_a_lost_shard(tmp_path):
    cache = TextCache(tmp_path, "rewrites", {"model": "m", "prompt": "p@v1"})
    cache.put({"a": {"text": "A"}})
    cache.put({"b": {"text": "B"}})
    assert TextCache(tmp_path, "rewrites", {"model": "m", "prompt": "p@v1"}).get("b") == {"text": "B"}
    assert TextCache(tmp_path, "rewrites", {"model": "m", "prompt": "p@v2"}).get("b") is None
    (cache.folder / "manifest.json").write_text('{"format": "genret.text_cache", "key": {"model": "other"}}')
    with pytest.raises(ManifestError, match="another model"):
        TextCache(tmp_path, "rewrites", {"model": "m", "prompt": "p@v1"})
