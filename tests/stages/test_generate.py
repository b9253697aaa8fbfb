"""The generate stage: a GRACE adapter retrieves its memorised images, alone or within the prefilter's top-k."""

import json
import shutil

import pytest

from genret._io import ArtefactError, seal

from genret.eval.evaluator import evaluate
from genret.mllm.adapters import AdapterMismatchError
from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline
from genret.training.grace import GraceTrainConfig, train_grace
from genret.types import Query


@pytest.fixture(scope="module")
def grace_dir(tmp_path_factory, world, mllm_dir, clip_dir):
    """An atomic adapter over the test images; each image's first caption is its (given) retrieve query."""
    out = tmp_path_factory.mktemp("grace") / "atomic"
    given = {r.id: r.captions[:1] for r in world.split("test").records}
    config = GraceTrainConfig(scheme="atomic", max_steps=400, batch_size=16, lr=3e-3, token_lr=1e-2, warmup=0.0,
                              caption_tokens=4, eval_queries=4, log_every=40, threads=1)
    train_grace(mllm_dir, world, out, config, prefilter=clip_dir, queries=given, progress=False)
    return out


def _pipe(encoder, *stages):
    return RetrievalPipeline(PipelineConfig(name="g", encoder=EncoderConfig(model="x"), stages=stages), encoder=encoder)


def _queries(world, n=None):
    recs = world.split("test").records[:n]
    return [Query(id=r.id, text=r.captions[0]) for r in recs], [r.id for r in recs]


def test_generate_retrieves_memorised_images_and_reloads_the_same(encoder, world, grace_dir):
    pipe = _pipe(encoder, {"type": "generate", "name": "grace", "adapter": str(grace_dir), "num_beams": 5, "k": 5})
    pipe.index(world.split("test"), modalities=("image",), progress=False)
    queries, truth = _queries(world)
    [(name, rankings)] = pipe.run(queries)
    assert name == "grace"
    top1 = sum(r.ids[0] == t for r, t in zip(rankings, truth)) / len(truth)
    assert top1 >= 0.5, top1  # chance is 1/24
    for r in rankings:
        assert len(r.ids) == 5 and len(set(r.ids)) == 5
        assert all(c.scores["grace"] == c.score <= 0 for c in r.candidates)
        assert [c.score for c in r.candidates] == sorted((c.score for c in r.candidates), reverse=True)
    # A second pipeline loads the base afresh, adds the tokens, attaches the saved adapter: the same rankings.
    again = _pipe(encoder, {"type": "generate", "name": "grace", "adapter": str(grace_dir), "num_beams": 5, "k": 5})
    again.index(world.split("test"), modalities=("image",), progress=False)
    [(_, reloaded)] = again.run(queries)
    assert [r.ids for r in reloaded] == [r.ids for r in rankings]
    for a, b in zip(reloaded, rankings):
        assert [c.score for c in a.candidates] == pytest.approx([c.score for c in b.candidates], abs=1e-4)


def test_restrict_upstream_returns_only_upstream_candidates_and_fuses(encoder, world, grace_dir):
    pipe = _pipe(encoder, {"type": "prefilter", "k": 6},
                 {"type": "generate", "adapter": str(grace_dir), "restrict": "upstream", "upstream_k": 3,
                  "num_beams": 5, "k": 5, "fusion_weight": 0.5})
    pipe.index(world.split("test"), modalities=("image",), progress=False)
    queries, _ = _queries(world, 8)
    outputs = dict(pipe.run(queries))
    for before, after in zip(outputs["prefilter"], outputs["generate"]):
        assert set(after.ids) == set(before.ids[:3])  # 3 identifiers < 5 beams: each of the 3 once, nothing else
        for c in after.candidates:
            assert c.score == pytest.approx(c.scores["prefilter"] + 0.5 * c.scores["generate"], abs=1e-5)


@pytest.mark.parametrize("restrict", ["none", "upstream"])
def test_eval_reports_the_generate_stage(encoder, world, grace_dir, restrict):
    pipe = _pipe(encoder, {"type": "prefilter", "k": 10},
                 {"type": "generate", "adapter": str(grace_dir), "restrict": restrict, "upstream_k": 10})
    report = evaluate(pipe, world, split="test", directions=("t2i",), progress=False)
    assert set(report["stages"]) == {"prefilter", "generate"}
    assert 0 <= report["stages"]["generate"]["t2i"]["R@10"] <= 100
    # The twin check hands each stage an image and its twin: only a stage that scores what it is handed can
    # answer it; over the whole gallery (restrict = none) the pair may not even be among its beams.
    assert report["twins"]["prefilter"]["pairs"] > 0
    assert ("generate" in report["twins"]) == (restrict == "upstream")


def test_image_queries_are_refused_or_passed_on(encoder, world, grace_dir):
    rec = world.split("test").records[0]
    pipe = _pipe(encoder, {"type": "prefilter", "k": 4}, {"type": "generate", "adapter": str(grace_dir)})
    pipe.index(world.split("test"), progress=False)
    with pytest.raises(ValueError, match="--directions t2i"):
        pipe.run([Query(id="i", image=str(rec.path))])
    passing = _pipe(encoder, {"type": "prefilter", "k": 4},
                    {"type": "generate", "adapter": str(grace_dir), "image_queries": "pass"})
    passing.index(world.split("test"), progress=False)
    out = dict(passing.run([Query(id="i", image=str(rec.path))]))
    assert out["generate"][0].ids == out["prefilter"][0].ids


def test_a_gallery_the_adapter_did_not_memorise_is_refused(encoder, world, grace_dir):
    pipe = _pipe(encoder, {"type": "generate", "adapter": str(grace_dir)})
    with pytest.raises(ValueError, match=r"8 of the gallery's 8 images .* genret train grace --gallery-splits"):
        pipe.index(world.split("val"), modalities=("image",), progress=False)


def test_an_adapter_of_another_task_is_refused(encoder, world, grace_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(grace_dir, other)
    manifest = json.loads((other / "genret.json").read_text())
    seal(other, "genret.json", {**manifest, "task": "rerank"})  # saved so: another task's adapter
    with pytest.raises(AdapterMismatchError, match=r"stages\[0\]\.adapter: .*'rerank' adapter, loaded for the task "
                                                   "'grace'"):  # as the stage is built, before any encoding
        _pipe(encoder, {"type": "generate", "adapter": str(other)})


def test_a_vocabulary_mismatch_is_refused(encoder, world, grace_dir, tmp_path):
    """identifiers.json that no longer matches the tokens the adapter's rows were trained for."""
    other = tmp_path / "other"
    shutil.copytree(grace_dir, other)
    data = json.loads((other / "identifiers.json").read_text())
    data["new_tokens"] = data["new_tokens"][1:] + ["<id_extra>"]
    data["items"] = dict(zip(data["items"], data["new_tokens"]))
    (other / "identifiers.json").write_text(json.dumps(data))
    with pytest.raises(ArtefactError, match="other/identifiers.json: "):  # not the file the adapter was saved with
        _pipe(encoder, {"type": "generate", "adapter": str(other)}).index(world.split("test"), modalities=("image",),
                                                                          progress=False)
    seal(other, "genret.json")  # the manifest edited to match: the identifiers still do not fit the vocabulary
    pipe = _pipe(encoder, {"type": "generate", "adapter": str(other)})
    with pytest.raises(ValueError, match="scheme and model vocabulary do not match"):
        pipe.index(world.split("test"), modalities=("image",), progress=False)


@pytest.mark.parametrize("table,match", [
    ({"type": "generate"}, "adapter is required"),
    ({"type": "generate", "adapter": "A", "restrict": "both"}, "restrict must be one of"),
    ({"type": "generate", "adapter": "A", "k": 20, "num_beams": 10}, "must not exceed num_beams"),
])
def test_bad_generate_tables(encoder, table, match):
    with pytest.raises(ValueError, match=match):
        _pipe(encoder, table)


def test_restrict_upstream_keeps_what_the_beams_missed_after_what_they_decoded(encoder, world, grace_dir):
    pipe = _pipe(encoder, {"type": "prefilter", "k": 10},
                 {"type": "generate", "adapter": str(grace_dir), "restrict": "upstream", "upstream_k": 8,
                  "num_beams": 3, "k": 10})
    pipe.index(world.split("test"), modalities=("image",), progress=False)
    queries, _ = _queries(world, 6)
    outputs = dict(pipe.run(queries))
    for before, after in zip(outputs["prefilter"], outputs["generate"]):
        decoded = [c for c in after.candidates if "generate" in c.scores]
        assert 1 <= len(decoded) <= 3 and after.candidates[:len(decoded)] == tuple(decoded)  # decoded ones first
        tail = [c.item_id for c in after.candidates[len(decoded):]]
        assert tail == [i for i in before.ids[:8] if i not in {c.item_id for c in decoded}]  # the upstream's order
        assert set(after.ids) == set(before.ids[:8])  # nothing of the decodable upstream lost
        scores = [c.score for c in after.candidates]
        assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)
