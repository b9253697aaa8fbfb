"""Processor options belong to one model, and everything made from images is keyed by them.

On shrunk real checkpoints (real processors): a Qwen2-VL captioner bounded by ``max_pixels`` beside a rewriter of
another family (its options are the captioner's, never the rewriter's); gallery features, captions and the text
caches' key change with the image processor's settings, so lowering ``max_pixels`` never serves what the old
setting made.
"""

import pytest

from genret.mllm import MLLM
from genret.types import Query

QWEN, LLAVA = "qwen2-vl-2b-instruct", "llava-1.5-7b-hf"
BIG = {"min_pixels": 112 * 112, "max_pixels": 112 * 112}  # a 64 px world image becomes 4 x 4 merged tokens
SMALL = {"max_pixels": 56 * 56}  # ... and 2 x 2 here: "max_pixels lowered"


def _cirevl(real_dirs, tmp_path, **more):
    from genret.stages.cirevl import CIReVLConfig, CIReVLStage

    return CIReVLStage(CIReVLConfig(model=str(real_dirs[QWEN]), rewriter_model=str(real_dirs[LLAVA]),
                                    processor_options=SMALL, caption_tokens=4, max_new_tokens=4,
                                    cache_dir=str(tmp_path / "cache"), **more), "cirevl")


def test_cirevl_options_are_the_captioners_and_the_rewriter_has_its_own(real_dirs, tmp_path):
    """Checked as the pipeline is read (config.json files, no weights): the Qwen captioner's max_pixels is not
    asked of the LLaVA rewriter; the rewriter's own options are checked against its own family."""
    _cirevl(real_dirs, tmp_path).check()
    with pytest.raises(ValueError, match="rewriter_model.*'max_pixels' are not llava settings"):
        _cirevl(real_dirs, tmp_path, rewriter_processor_options={"max_pixels": 1}).check()
    from genret.stages.cirevl import CIReVLConfig

    with pytest.raises(ValueError, match="rewriter_processor_options are the settings of rewriter_model"):
        CIReVLConfig(model=str(real_dirs[QWEN]), rewriter_processor_options={"max_pixels": 1})


@pytest.mark.slow
def test_cirevl_qwen_captioner_with_max_pixels_and_a_llava_rewriter_runs(real_dirs, world, tmp_path):
    stage = _cirevl(real_dirs, tmp_path)
    reference = str(world.split("test").records[0].path)
    [out] = stage.rewrite([Query(id="q", text="make it blue", image=reference)], None)
    assert out.meta["caption"] is not None and out.text
    captioner, rewriter = stage._captioner.mllm, stage._rewriter_mllm
    assert (captioner.family.name, rewriter.family.name) == ("qwen2_vl", "llava")
    assert captioner.processor.image_processor.size["longest_edge"] == 56 * 56


@pytest.fixture(scope="module")
def qwen(real_dirs):
    """The Qwen2-VL checkpoint loaded with each setting, shared by the tests (each load reads the real tokenizer)."""
    return {"big": MLLM.load(str(real_dirs[QWEN]), processor_options=BIG),
            "small": MLLM.load(str(real_dirs[QWEN]), processor_options=SMALL)}


def _gallery_stage(real_dirs, mllm, options):
    from genret.stages.rerank import RerankConfig, RerankStage

    stage = RerankStage(RerankConfig(model=str(real_dirs[QWEN]), mode="pointwise", processor_options=options), "rerank")
    stage._mllm = mllm  # the stage's model as it loads it with these options (loaded once for the module)
    return stage


def test_gallery_features_of_other_processor_settings_are_recomputed(real_dirs, qwen, world, tmp_path, caplog):
    items = world.split("test").image_items()[:3]
    old = _gallery_stage(real_dirs, qwen["big"], BIG)
    old.features.update(zip((it.id for it in items), old._image_features_of(items)))
    old.save_state(tmp_path / "rerank")
    new = _gallery_stage(real_dirs, qwen["small"], SMALL)
    with caplog.at_level("WARNING"):
        new.load_state(tmp_path / "rerank")
    query = Query(id="q", text=world.split("test").records[0].captions[0])
    gallery = new.score(query, items)  # the gallery's features: computed now, with SMALL
    request = new.score(query, items, cache=False)  # the same images sent in a request
    assert gallery == pytest.approx(request, abs=1e-5)
    assert "other image processor settings" in caplog.text
    assert tuple(new.features[items[0].id].shape[:2]) == (2, 2)
    assert old.score(query, items) != pytest.approx(gallery, abs=1e-3)  # the settings do change the scores
    # Saved again, they load for the same settings.
    new.save_state(tmp_path / "again")
    same = _gallery_stage(real_dirs, qwen["small"], SMALL)
    same.load_state(tmp_path / "again")
    assert len(same.features) == len(items)


def test_captions_and_text_caches_are_keyed_by_the_processor_settings(real_dirs, qwen, world, tmp_path):
    from genret.mllm.captioner import Captioner
    from genret.mllm.textcache import model_key

    paths = [str(r.path) for r in world.split("test").records[:2]]
    big, small = qwen["big"], qwen["small"]
    first = Captioner(big, max_new_tokens=4, cache_dir=tmp_path)
    first.caption(paths)
    again = Captioner(MLLM.load(str(real_dirs[QWEN]), processor_options=BIG), max_new_tokens=4, cache_dir=tmp_path)
    again.caption(paths)
    assert again.stats.hits == 2  # the same settings: served
    lowered = Captioner(small, max_new_tokens=4, cache_dir=tmp_path)
    lowered.caption(paths)
    assert (lowered.stats.hits, lowered.stats.misses) == (0, 2)  # lowered max_pixels: described again
    assert model_key(big) != model_key(small)  # rewrites and answers (TextCache) are keyed by model_key
    assert model_key(big) == model_key(again.mllm)
