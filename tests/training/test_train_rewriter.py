"""The rewriter recipes for chat (questions) and EIIRwQR (feedback rewrites): their data and a short run."""

import pytest

from genret.stages.chat import SCRIPT
from genret.stages.eiirwqr import shared_facts
from genret.training.rewriter import RewriterTrainConfig, chat_pairs, feedback_pairs, train_rewriter


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
