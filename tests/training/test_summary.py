"""The one renderer of trainer summaries reads what the trainers save, and refuses what is not a summary."""

import json

import pytest

from genret.training.summary import TrainSummary


def test_the_saved_manifest_of_a_clip_run_reads_and_renders(clip_dir):
    clip = TrainSummary.from_manifest(json.loads((clip_dir / "genret.json").read_text()))
    assert clip.task == "clip" and clip.parameters > 0 and clip.steps > 0
    assert clip.render("c").startswith(f"saved c: clip, {clip.steps} steps in ")
    assert "M parameters" in clip.render("c") and "val: val_t2i_R@1 " in clip.render("c")


def test_what_is_not_a_summary_is_refused():
    with pytest.raises(ValueError, match="not a training summary"):
        TrainSummary.from_manifest({"format": "genret.pipeline"})
