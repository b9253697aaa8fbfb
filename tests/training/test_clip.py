import json

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, CLIPModel

from genret.training.clip import CLIPTrainConfig


def test_checkpoint_loads_like_any_clip(clip_dir, world):
    model = CLIPModel.from_pretrained(clip_dir)
    processor = AutoProcessor.from_pretrained(clip_dir)
    assert type(processor).__name__ == "CLIPProcessor"
    from PIL import Image

    inputs = processor(text=list(world.records[0].captions), images=[Image.open(world.records[0].path)],
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits_per_image.shape == (1, len(world.records[0].captions))
    summary = json.loads((clip_dir / "genret.json").read_text())
    assert summary["task"] == "clip" and summary["config"]["epochs"] == 6
    assert len(summary["history"]) == 6 and "val_t2i_R@1" in summary["history"][0]["eval"]


def test_tokenizer_covers_every_character(clip_dir):
    processor = AutoProcessor.from_pretrained(clip_dir)
    ids = processor.tokenizer("a red circle, zebra! 42")["input_ids"]
    eos = processor.tokenizer.eos_token_id
    assert ids.count(eos) == 1 and ids[-1] == eos  # no unknown token stands in as EOS mid-text


def test_training_lowers_the_contrastive_loss(clip_dir):
    summary = json.loads((clip_dir / "genret.json").read_text())
    history = summary["history"]
    # The first epoch starts from random weights (loss above ln(16) = 2.77, chance for 16 pairs);
    # 36 steps later it is well below chance (measured: 2.29-2.50 over seeds and thread counts).
    chance = np.log(summary["config"]["batch_size"])
    assert history[0]["loss"] > chance
    assert history[-1]["loss"] < chance - 0.15
    assert history[-1]["loss"] < history[0]["loss"] - 0.5


@pytest.mark.parametrize("kwargs,match", [
    (dict(image_size=60, patch_size=8), "multiple of patch_size"),
    (dict(heads=3), "heads"),
    (dict(epochs=0), "epochs must be at least 1"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CLIPTrainConfig(**kwargs)


def test_shape_swaps_change_one_shape_only(world):
    from genret.world.scene import Scene
    from genret.training.clip import hard_negatives

    records = world.split("train").records[:12]
    images, texts = hard_negatives(records, 64, 3)
    assert len(images) == len(texts) == 12 and images[0].size == (64, 64)
    for r, captions in zip(records, texts):
        a, b = Scene.from_dict(r.meta["scene"]).objects
        # The captions name both colours of the original, and not its two shapes both.
        assert all(a.colour in c and b.colour in c for c in captions)
        assert not all(f"{a.colour} {a.shape}" in c and f"{b.colour} {b.shape}" in c for c in captions)


def test_shape_negatives_train_and_need_scenes(tmp_path, world):
    import dataclasses

    from conftest import TINY_CLIP
    from genret.data.dataset import Dataset
    from genret.training.clip import train_clip

    config = dataclasses.replace(TINY_CLIP, epochs=1, shape_negatives=True)
    summary = train_clip(world.split("train"), tmp_path / "c", config, progress=False)
    assert summary["config"]["shape_negatives"] and summary["history"][0]["loss"] > 0
    plain = Dataset(name="x", source=world.source, records=tuple(dataclasses.replace(r, meta={})
                                                                  for r in world.split("train").records))
    with pytest.raises(ValueError, match="needs every training record's scene"):
        train_clip(plain, tmp_path / "d", config, progress=False)
