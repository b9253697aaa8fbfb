import pytest

from genret.config import ConfigError
from genret.eval.evaluator import evaluate
from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline
from genret.types import Query


def _pipe(encoder, mllm_dir, **rerank):
    stages = ({"type": "prefilter", "k": 6}, {"type": "rerank", "model": str(mllm_dir), "k": 6, **rerank})
    return RetrievalPipeline(PipelineConfig(name="r", encoder=EncoderConfig(model="x"), stages=stages), encoder=encoder)


@pytest.mark.parametrize("mode", ["generative", "pointwise", "listwise"])
def test_rerank_reorders_the_prefilter_candidates_both_ways(encoder, world, mllm_dir, mode):
    pipe = _pipe(encoder, mllm_dir, mode=mode, fusion_weight=0.5)
    pipe.index(world.split("test"), progress=False)
    rec = world.split("test").records[0]
    outputs = dict(pipe.run([Query(id="t", text=rec.captions[0]), Query(id="i", image=str(rec.path))]))
    for before, after in zip(outputs["prefilter"], outputs["rerank"]):
        assert sorted(before.ids) == sorted(after.ids)  # same candidates, rescored
        for c in after.candidates:
            assert c.score == pytest.approx(c.scores["prefilter"] + 0.5 * c.scores["rerank"], abs=1e-5)
        assert [c.score for c in after.candidates] == sorted((c.score for c in after.candidates), reverse=True)


def test_report_has_every_stage(encoder, world, mllm_dir):
    pipe = _pipe(encoder, mllm_dir, mode="generative")
    report = evaluate(pipe, world, split="test", progress=False)
    assert set(report["stages"]) == {"prefilter", "rerank"}
    assert set(report["twins"]) == {"prefilter", "rerank"}
    # Reranking the prefilter's top 6 can only reorder them: its R@10 is the prefilter's R@6 <= R@10.
    for d in ("t2i", "i2t"):
        assert report["stages"]["rerank"][d]["R@10"] <= report["stages"]["prefilter"][d]["R@10"]


@pytest.mark.parametrize("table,match", [
    ({"type": "rerank", "model": "m", "mode": "sideways"}, "mode must be one of"),
    ({"type": "rerank"}, "model is required"),
    ({"type": "rerank", "model": "m", "prompt": "nope"}, "prompt file not found"),
])
def test_bad_rerank_tables(encoder, table, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        RetrievalPipeline(PipelineConfig(encoder=EncoderConfig(model="x"), stages=({"type": "prefilter"}, table)),
                          encoder=encoder)


def test_rerank_without_candidates_says_what_to_do(encoder, world, mllm_dir):
    config = PipelineConfig(encoder=EncoderConfig(model="x"), stages=({"type": "rerank", "model": str(mllm_dir)},))
    pipe = RetrievalPipeline(config, encoder=encoder)
    pipe.index(world.split("test"), modalities=("image",), progress=False)
    with pytest.raises(ValueError, match="put a prefilter stage before it"):
        pipe.search(Query(id="q", text="a red circle"), k=3)


def test_cached_features_match_plain_path_and_survive_save(encoder, world, mllm_dir, tmp_path, caplog):
    fast = _pipe(encoder, mllm_dir, mode="pointwise")
    plain = _pipe(encoder, mllm_dir, mode="pointwise", cache_features=False)
    for p in (fast, plain):
        p.index(world.split("test"), progress=False)
    stage = fast.stages[1]
    assert len(stage.features) == len(world.split("test"))
    q = [Query(id="t", text=world.split("test").records[2].captions[1])]
    a, b = fast.run(q)[-1][1][0], plain.run(q)[-1][1][0]
    assert a.ids == b.ids
    assert [c.score for c in a.candidates] == pytest.approx([c.score for c in b.candidates], abs=1e-4)
    fast.save(tmp_path / "p")
    assert (tmp_path / "p" / "stages" / "rerank" / "features.safetensors").is_file()
    loaded = RetrievalPipeline.load(tmp_path / "p", encoder=encoder)
    assert set(loaded.stages[1].features) == set(stage.features)
    loaded.stages[1].features.pop(a.ids[0])  # a candidate without cached features: computed, and said
    again = loaded.run(q)[-1][1][0]
    assert [c.score for c in again.candidates] == pytest.approx([c.score for c in a.candidates], abs=1e-4)
    assert "no cached features" in caplog.text


def test_features_of_different_shapes_survive_save(encoder, mllm_dir, tmp_path):
    """Native-resolution families (Qwen2-VL) give each image its own number of feature tokens."""
    import torch

    stage = _pipe(encoder, mllm_dir).stages[1]
    stage.features.update({"a": torch.randn(4, 8), "b": torch.randn(6, 8), "c": torch.randn(2, 3, 8)})
    stage.save_state(tmp_path / "s")
    again = _pipe(encoder, mllm_dir).stages[1]
    again.load_state(tmp_path / "s")
    assert set(again.features) == {"a", "b", "c"}
    assert all(torch.equal(again.features[k], v) for k, v in stage.features.items())


def test_rerank_stage_passes_4bit_to_the_backend(encoder, world, mllm_dir, monkeypatch):
    """``load_in_4bit`` in the pipeline table reaches the loader's checks: without bitsandbytes, its error, as the
    stage is built (before any gallery is encoded)."""
    import genret.mllm.backend as backend

    monkeypatch.setattr(backend, "bitsandbytes_available", lambda: False)
    with pytest.raises(ValueError, match=r"stages\[1\]\.model .*4-bit and 8-bit loading need bitsandbytes"):
        _pipe(encoder, mllm_dir, mode="generative", load_in_4bit=True)
    with pytest.raises((ConfigError, ValueError), match="choose one of"):
        _pipe(encoder, mllm_dir, load_in_4bit=True, load_in_8bit=True).index(world.split("test"), progress=False)
