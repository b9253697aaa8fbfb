"""The dialog-trained retriever: oracle dialogs as queries, a longer text context, the vision side untouched."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor, CLIPModel

from genret.stages.dialog import initial_query
from genret.training.dialog_clip import DialogCLIPConfig, dialog_rows, extend_context, train_dialog_clip


def test_dialog_rows_are_every_round_of_the_oracle_dialog(world):
    records = world.split("train").records[:6]
    rows = dialog_rows(records, rounds=3, query_format="answers")
    first = rows[:6]
    assert [t for t, _ in first] == [initial_query(r.meta, r.captions, r.id) for r in records]
    assert [i for _, i in first] == list(range(6)) and len(rows) == 6 * 4
    by_image = {i: [t for t, j in rows if j == i] for i in range(6)}
    for texts in by_image.values():  # each round adds an answer to what the user said before
        assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(texts, texts[1:]))


def test_a_longer_context_keeps_the_trained_positions(clip_dir):
    model, processor = CLIPModel.from_pretrained(clip_dir), AutoProcessor.from_pretrained(clip_dir)
    before = model.text_model.embeddings.position_embedding.weight.detach().clone()
    extend_context(model, processor.tokenizer, 40)
    after = model.text_model.embeddings.position_embedding.weight
    assert after.shape[0] == 40 and torch.equal(after[:before.shape[0]], before)
    assert torch.equal(after[-1], before[-1]) and processor.tokenizer.model_max_length == 40
    tokens = processor.tokenizer(["a " * 60], truncation=True, max_length=40, return_tensors="pt")
    assert tokens["input_ids"].shape[1] == 40 and model.get_text_features(**tokens).pooler_output.shape[0] == 1
    with pytest.raises(ValueError, match="shorter than the model's 40"):
        extend_context(model, processor.tokenizer, 30)


def test_training_moves_the_text_tower_only_and_finds_dialog_targets(clip_dir, world, tmp_path):
    config = DialogCLIPConfig(rounds=3, context_length=48, epochs=6, batch_size=32, lr=2e-3, threads=1)
    summary = train_dialog_clip(clip_dir, world.split("train"), tmp_path / "d", config, val=world.split("val"),
                                progress=False)
    before, after = summary["metrics"]["val_before"]["val_dialog_R@1"], summary["metrics"]["val"]["val_dialog_R@1"]
    assert after > before + 5, (before, after)  # it learnt to read dialogs
    assert summary["data"]["dialog_rows"] > 0 and summary["data"]["caption_rows"] > 0
    base, tuned = load_file(str(clip_dir / "model.safetensors")), load_file(str(tmp_path / "d" / "model.safetensors"))
    vision = [k for k in base if k.startswith(("vision_model.", "visual_projection."))]
    assert vision and all(torch.equal(base[k], tuned[k]) for k in vision)  # the image index stays valid
    assert not torch.equal(base["text_projection.weight"], tuned["text_projection.weight"])
    assert CLIPModel.from_pretrained(tmp_path / "d").config.text_config.max_position_embeddings == 48
    with pytest.raises(ValueError, match="query_format must be one of"):
        dataclasses.replace(config, query_format="summary")


def test_the_cli_trains_it_and_prints_the_dialog_recall(clip_dir, world_dir, tmp_path, capsys):
    from genret.cli import main

    out = tmp_path / "cli"
    assert main(["-q", "train", "clip-dialog", "--clip", str(clip_dir), "--data", str(world_dir), "--out", str(out),
                 "--rounds", "2", "--context-length", "40", "--max-steps", "3", "--batch-size", "16"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"saved {out}: clip-dialog, 3 steps") and "val_before: val_dialog_R@1" in text
