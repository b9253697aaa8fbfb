"""CIReVL on the tiny world's composed-retrieval triplets: baselines, composition, caches, the LoRA rewriter."""

import json

import pytest

from genret._io import seal

from genret.data.cir import load_cir
from genret.world.scene import Scene
from genret.eval.composed import evaluate_composed
from genret.eval.report import render_markdown
from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline
from genret.stages.cirevl import CIReVLConfig, check_composed
from genret.training.rewriter import closest_text
from genret.world.annotation import full_captions
from genret.types import Query


def _pipe(clip_dir, **cirevl) -> RetrievalPipeline:
    return RetrievalPipeline(PipelineConfig(name="cir", encoder=EncoderConfig(model=str(clip_dir)),
                                            stages=({"type": "cirevl", **cirevl}, {"type": "prefilter", "k": 40})))


@pytest.fixture(scope="module")
def cir(world_dir):
    return load_cir(world_dir, "test")


def test_the_baselines_search_with_one_modality_and_the_reference_is_left_out(cir, clip_dir):
    text = evaluate_composed(_pipe(clip_dir, mode="text"), cir, progress=False)
    assert [w["query"] for w in text["rewrites"]] == [t.modification for t in cir.triplets]
    image_pipe = _pipe(clip_dir, mode="image")
    image = evaluate_composed(image_pipe, cir, progress=False)
    # Image alone finds the reference itself first; the protocol removes it before measuring.
    raw = image_pipe.run(cir.queries()[0][:5])[-1][1]
    assert [r.ids[0] for r in raw] == [t.reference for t in cir.triplets[:5]]
    assert all(w["reference"] not in w["top5"] for w in image["rewrites"])
    for report in (text, image):
        m = report["stages"]["prefilter"]["cir"]
        assert {"R@1", "R@5", "R@10", "R_subset@1", "mAP@5", "MRR"} <= set(m)
        assert 0 <= m["R@1"] <= m["R@5"] <= m["R@10"] <= 100
        # Per edit kind: every triplet counted once, and the kinds' recalls average back to the whole.
        kinds = report["stages"]["prefilter"]["by_kind"]
        assert set(kinds) == {t.meta["edit_kind"] for t in cir.triplets}
        assert sum(k["queries"] for k in kinds.values()) == len(cir.triplets)
        for key in ("R@1", "R@5", "R@10"):
            whole = sum(k[key] * k["queries"] for k in kinds.values()) / len(cir.triplets)
            assert abs(whole - m[key]) < 0.05, (key, whole, m[key])
    # The two baselines find targets for different kinds of edit, and the report shows it.
    assert text["stages"]["prefilter"]["by_kind"] != image["stages"]["prefilter"]["by_kind"]
    md = render_markdown(image)
    assert "## Composed retrieval by edit kind" in md and "| relation" in md


def test_compose_captions_rewrites_and_records_what_it_did(cir, clip_dir, talker_dir, tmp_path):
    pipe = _pipe(clip_dir, model=str(talker_dir), cache_dir=str(tmp_path / "cache"), caption_tokens=6,
                 max_new_tokens=4)
    report = evaluate_composed(pipe, cir, progress=False, limit=6)
    rows = report["rewrites"]
    assert len(rows) == 6 and all(w["caption"] for w in rows)  # the talker says something for every image
    # The untrained talker never ends within 4 tokens: every rewrite is a runaway, and retrieval falls back
    # to the modification text, saying so.
    assert all(w["fallback"] == "runaway" and w["query"] == w["modification"] and w["rewrite"] for w in rows)
    assert report["fallbacks"] == 6 and {"cirevl.caption", "cirevl.rewrite"} <= set(report["timings"]["parts"])
    stage = pipe.stages[0]
    again = evaluate_composed(_pipe(clip_dir, model=str(talker_dir), cache_dir=str(tmp_path / "cache"), caption_tokens=6,
                                    max_new_tokens=4), cir, progress=False, limit=6)
    assert [w["caption"] for w in again["rewrites"]] == [w["caption"] for w in rows]
    assert stage._captioner.stats.misses == 6


def test_unusable_composed_queries_are_refused(world):
    path = str(world.split("test").records[0].path)
    with pytest.raises(FileNotFoundError, match="reference image not found"):
        check_composed(Query(id="q", text="make it blue", image="/nowhere/ref.png"))
    with pytest.raises(ValueError, match="modification text is empty"):
        check_composed(Query(id="q", text="  ", image=path))
    with pytest.raises(ValueError, match="mode must be one of"):
        CIReVLConfig(model="m", mode="both")
    with pytest.raises(ValueError, match="needs model"):
        CIReVLConfig(mode="compose")


def test_hidden_targets_are_refused(cir, clip_dir):
    from dataclasses import replace

    hidden = replace(cir, triplets=[replace(t, targets=()) for t in cir.triplets])
    with pytest.raises(ValueError, match="hidden"):
        evaluate_composed(_pipe(clip_dir, mode="text"), hidden, progress=False)


@pytest.fixture(scope="module")
def rewriter_dir(tmp_path_factory, world_dir, mllm_dir):
    from genret.training.rewriter import RewriterTrainConfig, train_rewriter

    train = load_cir(world_dir, "train")
    train.triplets = train.triplets[:8]  # few enough to memorise: the val check below rewrites these same 8
    out = tmp_path_factory.mktemp("rewriter") / "lora"
    config = RewriterTrainConfig(max_steps=300, batch_size=8, lr=1e-2, warmup=0.0, caption_tokens=4, log_every=60,
                                 lora_targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", lora_r=32,
                                 eval_triplets=8, max_new_tokens=24, threads=1, reference_text="captioner")
    manifest = train_rewriter(mllm_dir, train, out, config, val=train, progress=False)
    return out, manifest


def test_the_rewriter_lora_learns_its_triplets_and_the_stage_uses_it(rewriter_dir, world_dir, clip_dir, mllm_dir):
    out, manifest = rewriter_dir
    losses = [h["loss"] for h in manifest["history"]]
    # The tiny LM's tied, small output rows keep its distributions flat (a high loss), but its argmax learns.
    assert losses[-1] < losses[0] - 0.1, losses
    m = manifest["metrics"]
    assert m["val_before"]["exact_match"] == 0.0 and m["val"]["exact_match"] >= 50.0, m
    assert manifest["task"] == "rewriter" and manifest["data"]["target_text"] == "target_caption"
    train = load_cir(world_dir, "train")
    train.triplets = train.triplets[:8]
    report = evaluate_composed(_pipe(clip_dir, model=str(mllm_dir), rewriter_adapter=str(out), caption_tokens=4,
                                     max_new_tokens=24), train, progress=False)
    used = [w["query"] for w in report["rewrites"]]
    # What it was taught: the target's full description closest to the caption it was given.
    wanted = [closest_text(w["caption"], full_captions(Scene.from_dict(train.scenes[t.meta["target_hard"]])))
              for w, t in zip(report["rewrites"], train.triplets)]
    assert sum(u == w for u, w in zip(used, wanted)) >= 4, list(zip(used, wanted))


@pytest.mark.parametrize("key,value", [("task", "rerank"), ("mode", "question")])
def test_a_rewriter_adapter_is_checked_on_attach(rewriter_dir, clip_dir, tmp_path, world_dir, key, value):
    """Another task's adapter, or the chat questioner's (mode question), is refused by the CIReVL stage."""
    import shutil

    from genret.mllm.adapters import AdapterMismatchError

    out, manifest = rewriter_dir
    bad = tmp_path / "lora"
    shutil.copytree(out, bad)
    data = json.loads((bad / "genret.json").read_text())
    data[key] = value
    seal(bad, "genret.json", data)  # saved so: another task's (or mode's) adapter
    cir = load_cir(world_dir, "test")
    with pytest.raises(AdapterMismatchError, match=value):
        evaluate_composed(_pipe(clip_dir, model=manifest["base_model"], rewriter_adapter=str(bad)), cir,
                          progress=False, limit=2)


def test_sum_fuses_the_unit_embeddings_of_image_and_text(cir, clip_dir):
    import numpy as np

    pipe = _pipe(clip_dir, mode="sum")
    report = evaluate_composed(pipe, cir, progress=False, limit=4)
    queries, _ = cir.queries()
    enc = pipe.encoder
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    fused = unit(unit(enc.encode_texts([q.text for q in queries[:4]])) + unit(enc.encode_images([q.image for q in queries[:4]])))
    scores, ids = pipe.gallery.index("image").search(fused, 6)
    assert [w["top5"] for w in report["rewrites"]] == [[i for i in row if i != t.reference][:5]
                                                      for row, t in zip(ids, cir.triplets[:4])]
    text_only = evaluate_composed(_pipe(clip_dir, mode="text"), cir, progress=False, limit=4)
    assert [w["top5"] for w in text_only["rewrites"]] != [w["top5"] for w in report["rewrites"]]


def test_a_rerank_after_the_rewrite_is_measured_and_reported(cir, clip_dir, mllm_dir):
    pipe = RetrievalPipeline(PipelineConfig(name="cir+rerank", encoder=EncoderConfig(model=str(clip_dir)), stages=(
        {"type": "cirevl", "mode": "text"}, {"type": "prefilter", "k": 40},
        {"type": "rerank", "model": str(mllm_dir), "mode": "generative", "k": 5})))
    report = evaluate_composed(pipe, cir, progress=False, limit=4)
    pre, rerank = report["stages"]["prefilter"], report["stages"]["rerank"]
    assert "R@10" in pre["cir"] and "R@10" not in rerank["cir"] and rerank["cir"]["R@5"] >= 0
    assert set(rerank["by_kind"]) == set(pre["by_kind"])
    table = render_markdown(report).split("## Retrieval")[1].split("##")[0]
    rerank_row = next(line for line in table.splitlines() if line.startswith("| rerank"))
    assert " - " in rerank_row  # R@10 and R@50 of a 5-deep ranking are not measured, and the table says so
