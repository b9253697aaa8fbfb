from pathlib import Path

import numpy as np
import pytest

from genret.config import ConfigError
from genret.index import IndexMismatchError
from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline
from genret.types import Query


@pytest.fixture
def pipe(encoder, world):
    config = PipelineConfig(name="t", encoder=EncoderConfig(model="unused"), stages=({"type": "prefilter", "k": 20},))
    p = RetrievalPipeline(config, encoder=encoder)
    p.index(world.split("test"), progress=False)
    return p


def test_text_and_image_queries_match_brute_force(pipe, encoder, world):
    test = world.split("test")
    rec = test.records[0]
    text_q, image_q = Query(id="t", text=rec.captions[0]), Query(id="i", image=str(rec.path))
    by_text, by_image = pipe.search([text_q, image_q], k=5)
    assert by_text.query.target == "image" and by_image.query.target == "text"
    imgs = encoder.encode_images([r.path for r in test.records])
    sims = imgs @ encoder.encode_texts([rec.captions[0]])[0]
    assert by_text.ids == [test.records[i].id for i in np.argsort(-sims)[:5]]
    caps = [c for r in test.records for c in r.caption_ids()]
    assert set(by_image.ids) <= set(caps) and len(by_image.ids) == 5
    c = by_text.candidates[0]
    assert c.scores["prefilter"] == pytest.approx(c.score) and c.score == pytest.approx(sims.max(), abs=1e-5)


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_config_files_save_and_load(tmp_path, clip_dir, world, suffix):
    from genret.config import write_config_file

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "clip").symlink_to(clip_dir, target_is_directory=True)
    path = tmp_path / f"pipe{suffix}"
    write_config_file(path, {"name": "p", "encoder": {"model": "models/clip"},
                             "stages": [{"type": "prefilter", "k": 7}]})
    pipe = RetrievalPipeline.from_config(path)  # the relative model path is read beside the file
    assert pipe.stages[0].config.k == 7
    pipe.index(world.split("test"), progress=False)
    q = [Query(id="q", text=world.split("test").records[3].captions[1])]
    before = pipe.search(q, k=3)
    pipe.save(tmp_path / "saved")
    loaded = RetrievalPipeline.load(tmp_path / "saved")
    after = loaded.search(q, k=3)
    assert before[0].ids == after[0].ids
    assert np.allclose([c.score for c in before[0].candidates], [c.score for c in after[0].candidates], atol=1e-6)


def test_loading_with_another_encoder_is_refused(pipe, tmp_path, encoder):
    pipe.save(tmp_path / "saved")
    encoder.revision = "retrained"
    with pytest.raises(IndexMismatchError, match="rebuild the index"):
        RetrievalPipeline.load(tmp_path / "saved", encoder=encoder)


def test_k_larger_than_gallery(pipe, world):
    with pytest.raises(ValueError, match="k=1000 is larger than the image gallery \\(24 items\\)"):
        pipe.search(Query(id="q", text="a red circle"), k=1000)


@pytest.mark.parametrize("stages,match", [
    (({"type": "teleport"},), "stages\\[0\\]: unknown stage type 'teleport'"),
    (({"k": 5},), "stages\\[0\\]: missing 'type'"),
    (({"type": "prefilter", "kk": 5},), "stages\\[0\\]: unknown key 'kk'"),
    (({"type": "prefilter", "k": 0},), r"stages\[0\]\.k: must be at least 1, got 0"),
    (({"type": "prefilter"}, {"type": "prefilter"}), "used twice"),
])
def test_bad_stage_tables(encoder, stages, match):
    with pytest.raises(ConfigError, match=match):
        RetrievalPipeline(PipelineConfig(encoder=EncoderConfig(model="x"), stages=stages), encoder=encoder)


def test_index_skips_unreadable_images_when_asked(encoder, world, tmp_path, caplog):
    from dataclasses import replace

    test = world.split("test")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"garbage")
    records = (replace(test.records[0], path=broken),) + test.records[1:]
    data = replace(test, records=records)
    config = PipelineConfig(encoder=EncoderConfig(model="x"))
    pipe = RetrievalPipeline(config, encoder=encoder)
    from genret.data import ImageLoadError

    with pytest.raises(ImageLoadError, match="broken.png"):
        pipe.index(data, progress=False)
    pipe.index(data, on_error="skip", progress=False)
    assert len(pipe.gallery.index("image")) == len(records) - 1
    assert "skipped 1 unreadable images" in caplog.text


def test_a_saved_pipeline_works_from_any_working_folder(tmp_path, monkeypatch, world_dir, clip_dir, mllm_dir, caplog):
    """Built with paths relative to one folder, loaded and searched from another: model, adapter-free rerank stage,
    features and images are all found, and results name images by absolute paths."""
    import shutil

    from genret.data import load_dataset

    project = tmp_path / "project"
    (project / "models").mkdir(parents=True)
    shutil.copytree(clip_dir, project / "models" / "clip")
    shutil.copytree(mllm_dir, project / "models" / "mllm")
    shutil.copytree(world_dir, project / "data")
    monkeypatch.chdir(project)
    stages = ({"type": "prefilter", "k": 3}, {"type": "rerank", "mode": "pointwise", "model": "models/mllm", "k": 3})
    pipe = RetrievalPipeline(PipelineConfig(name="rel", encoder=EncoderConfig(model="models/clip", cache_dir="cache"),
                                            stages=stages))
    pipe.index(load_dataset("data").split("test"), progress=False)
    pipe.save("runs/pipe")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with caplog.at_level("WARNING"):
        loaded = RetrievalPipeline.load(project / "runs" / "pipe")
        ranking = loaded.search(Query(id="q", text="a red circle"), k=3)[0]
    assert "computing features on the fly" not in caplog.text and len(loaded.stages[1].features) > 0
    item = loaded.gallery.item("image", ranking.candidates[0].item_id)
    assert Path(item.image).is_absolute() and Path(item.image).is_file()
    assert loaded.config.encoder.model == str(project / "models" / "clip")


def test_answer_is_a_typed_result_with_this_search_s_own_timings(encoder, world):
    from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline
    from genret.types import Query

    pipe = RetrievalPipeline(PipelineConfig(name="p", encoder=EncoderConfig(model="unused")), encoder=encoder)
    pipe.index(world.split("test"), progress=False)
    before = dict(pipe.timings)
    result = pipe.answer(Query(id="q", text="a red circle"), k=3)
    assert [h.rank for h in result.hits] == [1, 2, 3] and result.rewritten is None and result.note is None
    assert set(result.seconds) == {"prefilter"} and pipe.timings == before  # the shared running timings untouched
    ranking = pipe.search(Query(id="q", text="a red circle"), k=3)[0]
    assert [h.id for h in result.hits] == ranking.ids
    assert all(h.image and set(h.scores) == {"prefilter"} for h in result.hits)
    data = result.to_dict()
    assert data["target"] == "image" and data["results"][0]["image"] == result.hits[0].image
    for k in (0, -1, True, 2.5):  # a slice once took -1 as "all but the last"
        with pytest.raises(ValueError, match=f"k must be a whole number from 1, got {k!r}"):
            pipe.answer(Query(id="q", text="x"), k=k)
        with pytest.raises(ValueError, match="k must be a whole number from 1"):
            pipe.search(Query(id="q", text="x"), k=k)
