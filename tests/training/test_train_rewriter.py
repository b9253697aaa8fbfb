"""The rewriter recipes: CIReVL's training rows, chat (questions) and EIIRwQR (feedback rewrites), a short run."""

import dataclasses

import pytest

from genret.data.cir import load_cir
from genret.world.scene import Scene
from genret.world.answerers import SCRIPT
from genret.world.annotation import full_captions
from genret.world.judges import shared_facts
from genret.training.rewriter import (RewriterTrainConfig, chat_pairs, closest_text, dataset_captions, feedback_pairs,
                                      rewrite_pairs, scene_edit_pairs, train_rewriter)


def test_closest_text_picks_the_smallest_word_edit():
    options = ["a red circle left of a blue star", "a blue star right of a red circle", "a red circle and a blue star"]
    assert closest_text("the blue star is right of the green circle", options) == options[1]
    assert closest_text("a green circle left of a blue star", options) == options[0]


def test_cirevl_rows_from_the_worlds_descriptions_are_minimal_edits(world_dir):
    cir = load_cir(world_dir, "train")
    captions = dataset_captions(cir, seed=0)
    assert captions == dataset_captions(cir, seed=0) and captions != dataset_captions(cir, seed=1)
    pairs = rewrite_pairs(cir, captions)
    assert len(pairs) == len(cir.triplets)
    for t, (row, target) in zip(cir.triplets, pairs):
        reference, wanted = (Scene.from_dict(cir.scenes[i]) for i in (t.reference, t.meta["target_hard"]))
        assert row == {"caption": captions[t.reference], "modification": t.modification}
        assert row["caption"] in full_captions(reference) and target in full_captions(wanted)
        if t.meta["edit_kind"] in ("colour", "shape", "size"):
            # One attribute of one object changed, phrased as the reference was: one word differs.
            a, b = row["caption"].split(), target.split()
            assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1, (row, target)
    # Without the world's scenes the target stays the annotation's, and the reference text must come from elsewhere.
    bare = dataclasses.replace(cir, scenes={})
    assert [t for _, t in rewrite_pairs(bare, captions)] == [t.meta["target_caption"] for t in cir.triplets]
    with pytest.raises(ValueError, match="scenes.json.*captioner"):
        dataset_captions(bare)
    with pytest.raises(ValueError, match="reference_text"):
        RewriterTrainConfig(reference_text="gold")


def test_scene_edits_are_text_rows_whose_target_satisfies_the_edit(world_dir):
    import random

    from genret.world.scene import edits

    cir = load_cir(world_dir, "train")
    none = frozenset()
    pairs = scene_edit_pairs(cir, per_image=2, seed=3, avoid=none)
    assert len(pairs) == 2 * len(cir.images) and pairs == scene_edit_pairs(cir, per_image=2, seed=3, avoid=none)
    assert pairs != scene_edit_pairs(cir, per_image=2, seed=4, avoid=none)
    scenes = {c: Scene.from_dict(cir.scenes[i]) for i in cir.images for c in full_captions(Scene.from_dict(cir.scenes[i]))}
    one_word = 0
    for row, target in pairs:
        scene = scenes[row["caption"]]  # the caption is a full caption of a gallery image's scene
        # The target describes a scene one of the world's edits of that scene leads to (targets do not depend on
        # the wording's random draw), never the scene itself.
        reachable = {c for e in edits(scene, random.Random(0)) for t in e.targets for c in full_captions(t)}
        assert target in reachable and target not in full_captions(scene), (row, target)
        a, b = row["caption"].split(), target.split()
        one_word += len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1
    assert one_word > len(pairs) / 2  # colour, shape and size edits, phrased as the caption was
    with pytest.raises(ValueError, match="scene_edits"):
        scene_edit_pairs(dataclasses.replace(cir, scenes={}), 1, avoid=none)


def test_scene_edits_never_give_a_held_out_scene_as_the_target(world_dir):
    from genret.training.rewriter import cir_scene_signatures

    cir = load_cir(world_dir, "train")
    held = [load_cir(world_dir, "val"), load_cir(world_dir, "test")]
    avoid = cir_scene_signatures(held)
    assert len(avoid) > 100
    by_caption = {c: s for cs in (held[0], held[1]) for s in cs.scenes.values()
                  for c in full_captions(Scene.from_dict(s))}
    plain = scene_edit_pairs(cir, per_image=3, seed=0, avoid=frozenset())
    assert any(t in by_caption for _, t in plain)  # without the held-out scenes avoided, some targets are theirs
    kept = scene_edit_pairs(cir, per_image=3, seed=0, avoid=avoid)
    assert len(kept) == len(plain) and not [t for _, t in kept if t in by_caption]


def test_chat_pairs_are_the_oracle_dialogs_next_questions(world):
    records = world.split("train").records[:5]
    pairs = chat_pairs(records, rounds=3)
    assert len(pairs) == 15
    for r in range(3):
        rows = pairs[5 * r: 5 * (r + 1)]
        assert all(target == SCRIPT[r] for _, target in rows)
        # The dialog so far grows by one question and answer per turn.
        assert all(row["dialog"].count("\n") == 2 * r for row, _ in rows), rows[0]


def test_feedback_pairs_mark_by_shared_facts_and_target_the_caption(world, clip_dir, mllm_dir):
    records = world.split("train").records[:40]
    seen = []

    def caption(paths):
        seen.extend(paths)
        return [f"c{len(seen) - len(paths) + i}" for i in range(len(paths))]

    config = RewriterTrainConfig(task="eiirwqr", shown=4, min_facts=2)
    pairs = feedback_pairs(records, mllm_dir, clip_dir, caption, config)
    assert 0 < len(pairs) <= 40 and len(set(seen)) == len(seen)  # every shown image captioned once
    for row, target in pairs:
        assert set(row) == {"query", "relevant", "irrelevant"}
        assert target in {r.captions[0] for r in records}
        assert row["relevant"] == "none" or row["relevant"].startswith("c")
    with pytest.raises(ValueError, match="prefilter"):
        train_rewriter("unused", world, "unused", RewriterTrainConfig(task="eiirwqr"))
    assert shared_facts(records[0].meta["scene"], records[0].meta["scene"]) == 5


def test_a_chat_questioner_trains_and_saves_its_mode(world, mllm_dir, tmp_path):
    config = RewriterTrainConfig(task="chat", rounds=2, max_steps=4, batch_size=8, eval_triplets=4, max_new_tokens=6,
                                 threads=1)
    manifest = train_rewriter(mllm_dir, world, tmp_path / "q", config, val=world, progress=False)
    assert manifest["mode"] == "question" and manifest["prompt"]["name"] == "chat"
    assert manifest["data"]["pairs"] == 2 * len(world.split("train")) and manifest["steps"] == 4
    assert (tmp_path / "q" / "adapter_model.safetensors").is_file()


def test_cirevl_auto_adds_the_worlds_descriptions_and_says_so(world_dir, mllm_dir, tmp_path):
    train = load_cir(world_dir, "train")
    config = RewriterTrainConfig(max_steps=2, batch_size=8, caption_tokens=4, eval_triplets=0, threads=1)
    manifest = train_rewriter(mllm_dir, train, tmp_path / "auto", config, progress=False)
    assert manifest["data"]["reference_text"] == "both" and manifest["data"]["pairs"] == 2 * len(train.triplets)
    bare = dataclasses.replace(train, scenes={})  # as CIRR: no descriptions of its own, the captioner's only
    manifest = train_rewriter(mllm_dir, bare, tmp_path / "bare", config, progress=False)
    assert manifest["data"]["reference_text"] == "captioner" and manifest["data"]["pairs"] == len(train.triplets)
