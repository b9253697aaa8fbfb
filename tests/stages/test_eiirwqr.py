"""EIIRwQR on the tiny world: show unseen results, mark the relevant ones, caption, rewrite, stop when found."""

import pytest

from genret.eval.interactive import dialog_queries, evaluate_dialog
from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline
from genret.stages.eiirwqr import EIIRwQRConfig
from genret.world.judges import shared_facts


def _pipe(clip_dir, talker_dir, **stage) -> RetrievalPipeline:
    stages = ({"type": "eiirwqr", "model": str(talker_dir), "caption_tokens": 4, "max_new_tokens": 4, **stage},
              {"type": "prefilter", "k": 96})
    return RetrievalPipeline(PipelineConfig(name="eiirwqr", encoder=EncoderConfig(model=str(clip_dir)), stages=stages))


@pytest.fixture(scope="module")
def run(world, clip_dir, talker_dir, tmp_path_factory):
    pipe = _pipe(clip_dir, talker_dir, rounds=2, shown=3, min_facts=2,
                 cache_dir=str(tmp_path_factory.mktemp("eiirwqr-cache")))
    return pipe, evaluate_dialog(pipe, world, split="train", limit=24, progress=False)


def test_each_round_shows_unseen_results_and_marks_by_the_target(run, world):
    pipe, report = run
    scenes = {r.id: r.meta["scene"] for r in world.split("train").records}
    stage = pipe.stages[0]
    assert stage.metadata and len(report["dialogs"]) == 24
    for d in report["dialogs"]:
        seen = []
        for record in d["rounds"]:
            assert len(record["shown"]) == 3 and not set(record["shown"]) & set(seen)  # never shown twice
            seen += record["shown"]
            want = [x for x in record["shown"] if shared_facts(scenes[d["target"]], scenes[x]) >= 2]
            assert record["marked"] == want
            assert len(record["captions"]) == 3 and all(record["captions"])  # the talker always says something
            # The tiny talker never ends a rewrite within 4 tokens: the original query stands, said so.
            assert record["fallback"] == "runaway" and record["rewrite"]
        assert d["query"] == d["initial"] or d["stopped"] == "found"
        if d["stopped"] == "found":
            assert d["ranks"][-1] is not None


def test_a_found_target_stops_the_query(run):
    _, report = run
    found = [d for d in report["dialogs"] if d["stopped"] == "found"]
    for d in found:  # it was among the results shown on the round it stopped
        assert len(d["rounds"]) <= report["rounds"]
    hits = report["stages"]["prefilter"]["hits@10"]
    assert len(hits) == 3 and hits == sorted(hits)
    parts = report["timings"]["parts"]
    assert "eiirwqr.caption" in parts and "eiirwqr.rewrite" in parts
    assert report["fallbacks"]["rewrite"] == sum(len(d["rounds"]) for d in report["dialogs"])


def test_without_feedback_nothing_is_marked(world, clip_dir, talker_dir):
    pipe = _pipe(clip_dir, talker_dir, rounds=1, shown=2, feedback="none")
    report = evaluate_dialog(pipe, world, split="train", limit=6, progress=False)
    assert all(r["marked"] == [] for d in report["dialogs"] for r in d["rounds"])
    assert report["round_stage"]["feedback"] == "none"


def test_the_round_needs_its_state_and_rankings(world, clip_dir, talker_dir):
    pipe = _pipe(clip_dir, talker_dir)
    pipe.index(world.split("train"), modalities=("image",), progress=False)
    stage = pipe.stages[0]
    queries, truth = dialog_queries(world.split("train").records[:2])
    with pytest.raises(ValueError, match="rankings"):
        stage.next_round(stage.start(queries, truth), None)
    with pytest.raises(ValueError, match="no EIIRwQR state"):
        stage.next_round(queries, pipe.run(queries)[-1][1])
    with pytest.raises(ValueError, match="feedback must be"):
        EIIRwQRConfig(model="m", feedback="some")
    with pytest.raises(ValueError, match="min_facts"):
        EIIRwQRConfig(model="m", min_facts=6)
