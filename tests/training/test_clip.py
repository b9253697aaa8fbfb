import dataclasses
import json
import math

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
    images, texts = hard_negatives(records, 64, 3, avoid=frozenset())
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
    held = world.split("val", "test")
    with pytest.raises(ValueError, match="shape_negatives draws scenes anew: give held_out"):
        train_clip(world.split("train"), tmp_path / "c", config, progress=False)
    summary = train_clip(world.split("train"), tmp_path / "c", config, progress=False, held_out=held)
    assert summary["config"]["shape_negatives"] and summary["history"][0]["loss"] > 0
    plain = Dataset(name="x", source=world.source, records=tuple(dataclasses.replace(r, meta={})
                                                                  for r in world.split("train").records))
    with pytest.raises(ValueError, match="needs every training record's scene"):
        train_clip(plain, tmp_path / "d", config, progress=False, held_out=held)


def test_shape_swaps_never_draw_a_held_out_scene(world):
    from genret.data.annotations import annotation_of
    from genret.training.clip import _swaps

    records = world.split("train").records[:40]
    kind = annotation_of(records[0].meta)[1]
    values, _, _ = _swaps(records, 64, 1, 0, frozenset())
    # hold out every swap drawn without an avoid set: each is drawn again, as another scene
    held = frozenset(kind.signature(v) for v in values)
    again, _, _ = _swaps(records, 64, 1, 0, held)
    assert not {kind.signature(v) for v in again} & held


def test_fresh_rows_are_drawn_by_step_with_their_swaps_and_labels(world):
    from conftest import TINY_CLIP
    from genret.bpe import train_clip_tokenizer
    from genret.training.clip import attribute_classes, build_clip, fresh_rows
    from genret.world.annotation import scene_attributes
    from genret.world.scene import Scene

    train = world.split("train")
    config = dataclasses.replace(TINY_CLIP, fresh_images=True, shape_negatives=True, attribute_weight=1.0)
    tokenizer = train_clip_tokenizer([c for r in train.records for c in r.captions], 300, 24)
    _, processor = build_clip(config, tokenizer)
    tok = lambda t: tokenizer(t, padding="max_length", truncation=True, max_length=24, return_tensors="pt")  # noqa: E731
    kind, classes = attribute_classes(train.records)
    assert set(classes) == {"layout", "first shape", "first colour", "first size", "second shape", "second colour",
                            "second size"} and classes["first size"] == ["large", "small"]
    a, b, c = (fresh_rows(kind, s, 6, config, tok, processor, classes, avoid=frozenset()) for s in (3, 3, 4))
    assert a["pixel_values"].shape == (12, 3, 64, 64) and a["labels"].shape == (12, 7)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["pixel_values"], c["pixel_values"])
    shape = list(classes).index("first shape"), list(classes).index("second shape")
    # each swap (rows 6..11) keeps its row's layout, colours and sizes and changes one shape
    for i in range(6):
        same = [j for j in range(7) if a["labels"][i, j] == a["labels"][i + 6, j]]
        assert len(same) == 6 and set(range(7)) - set(same) <= set(shape)
    assert scene_attributes(Scene.from_dict(train.records[0].meta["scene"]))["layout"] in classes["layout"]


def test_fresh_rows_never_draw_a_held_out_scene(world):
    import random

    from conftest import TINY_CLIP
    from genret.bpe import train_clip_tokenizer
    from genret.data.annotations import draw_avoiding, signatures
    from genret.training.clip import attribute_classes, build_clip, fresh_rows, fresh_values

    train = world.split("train")
    config = dataclasses.replace(TINY_CLIP, fresh_images=True)
    tokenizer = train_clip_tokenizer([c for r in train.records for c in r.captions], 300, 24)
    _, processor = build_clip(config, tokenizer)
    tok = lambda t: tokenizer(t, padding="max_length", truncation=True, max_length=24, return_tensors="pt")  # noqa: E731
    kind, _ = attribute_classes(train.records)
    # the scene step 3 draws first, held out: that row is drawn again, the rest as before
    first = kind.sample(random.Random(f"genret.clip.fresh:{config.seed}:3"), config.image_size)
    plain = fresh_rows(kind, 3, 4, config, tok, processor, {}, avoid=frozenset())
    avoiding = fresh_rows(kind, 3, 4, config, tok, processor, {}, avoid=frozenset({kind.signature(first)}))
    assert not torch.equal(plain["pixel_values"][0], avoiding["pixel_values"][0])
    # the shape swaps too: the first swap step 3 draws, held out, is drawn again (the scenes before it as they were)
    swapping = dataclasses.replace(config, shape_negatives=True)
    plain, _ = fresh_values(kind, 3, 4, swapping, avoid=frozenset())
    swap = kind.signature(plain[4])
    avoiding, _ = fresh_values(kind, 3, 4, swapping, avoid=frozenset({swap}))
    assert avoiding[:4] == plain[:4] and kind.signature(avoiding[4]) != swap
    assert swap not in {kind.signature(v) for v in avoiding}
    held = signatures(world.split("val", "test").records)
    assert len(held) == len(world.split("val", "test").records) > 0
    rng = random.Random(0)
    drawn = [draw_avoiding(lambda: kind.sample(rng, 64), kind, held, "x") for _ in range(300)]
    assert not {kind.signature(v) for v in drawn} & held
    with pytest.raises(ValueError, match="fresh images at step 9: 1000 draws in a row showed a held-out scene"):
        draw_avoiding(lambda: first, kind, frozenset({kind.signature(first)}), "fresh images at step 9")


def test_fresh_images_with_attribute_heads_train_and_save_a_plain_clip(world, tmp_path):
    from conftest import TINY_CLIP
    from safetensors.torch import load_file
    from transformers import CLIPModel

    from genret.training.clip import train_clip

    config = dataclasses.replace(TINY_CLIP, fresh_images=True, shape_negatives=True, attribute_weight=1.0,
                                 max_steps=4, batch_size=8)
    with pytest.raises(ValueError, match="give held_out"):
        train_clip(world.split("train"), tmp_path / "c", config, progress=False)
    summary = train_clip(world.split("train"), tmp_path / "c", config, val=world.split("val"), progress=False,
                         held_out=world.split("val", "test"))
    assert summary["data"]["fresh_images"] and summary["data"]["images_seen"] == 32
    assert set(summary["data"]["attributes"]) >= {"first shape", "layout"} and summary["history"][-1]["loss"] > 0
    heads = summary["metrics"]["val"]["val_heads"]  # the heads' accuracy on the val images, each attribute
    assert set(heads) == set(summary["data"]["attributes"]) and all(0 <= v <= 100 for v in heads.values())
    assert not [k for k in load_file(str(tmp_path / "c" / "model.safetensors")) if "heads" in k]
    CLIPModel.from_pretrained(tmp_path / "c")  # a plain CLIP checkpoint
    with pytest.raises(ValueError, match="attribute_weight must not be negative"):
        dataclasses.replace(TINY_CLIP, attribute_weight=-1.0)


def test_a_fresh_image_run_resumes_on_the_same_curve(world, tmp_path):
    from conftest import TINY_CLIP
    from safetensors.torch import load_file

    from genret.training.clip import train_clip

    config = dataclasses.replace(TINY_CLIP, fresh_images=True, attribute_weight=0.5, max_steps=5, batch_size=8,
                                 save_every=2, log_every=1)
    held = world.split("val", "test")
    whole = train_clip(world.split("train"), tmp_path / "whole", config, progress=False, held_out=held)

    def crash(info):
        if info["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_clip(world.split("train"), tmp_path / "cut", config, progress=False, on_step=crash, held_out=held)
    resumed = train_clip(world.split("train"), tmp_path / "cut", config, progress=False, resume=True, held_out=held)
    assert resumed["history"] == whole["history"]
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("whole", "cut"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_init_goes_on_training_a_trained_clip_with_its_tokenizer(clip_dir, world, tmp_path):
    from conftest import TINY_CLIP
    from safetensors.torch import load_file

    from genret.training.clip import train_clip

    config = dataclasses.replace(TINY_CLIP, init=str(clip_dir), max_steps=2, batch_size=8, lr=1e-9, warmup=0.0)
    summary = train_clip(world.split("train"), tmp_path / "more", config, progress=False)
    assert summary["data"]["init"] == str(clip_dir) and summary["steps"] == 2
    before, after = (load_file(str(d / "model.safetensors")) for d in (clip_dir, tmp_path / "more"))
    assert before.keys() == after.keys() and all(torch.allclose(before[k], after[k], atol=1e-5) for k in before)
    assert (tmp_path / "more" / "tokenizer.json").read_text() == (clip_dir / "tokenizer.json").read_text()
    with pytest.raises(ValueError, match=r"--patch-size 4 \(the checkpoint has 8\)"):
        train_clip(world.split("train"), tmp_path / "bad", dataclasses.replace(config, patch_size=4), progress=False)
    with pytest.raises(FileNotFoundError, match="--init .*nowhere: no CLIP checkpoint there"):
        train_clip(world.split("train"), tmp_path / "bad", dataclasses.replace(config, init=str(tmp_path / "nowhere")),
                   progress=False)
    assert not (tmp_path / "bad").exists()


def test_rotation_augmentation_turns_images_by_seeded_angles():
    from genret.training.augment import rotate, rotate_by

    img = torch.zeros(1, 3, 16, 16)
    img[:, :, 7:9, 2:14] = 1.0  # a horizontal bar
    four = img.repeat(4, 1, 1, 1)
    turned = rotate(four, 30, seed=0, step=3)
    assert torch.equal(turned, rotate(four, 30, seed=0, step=3))  # the same step, the same angles
    assert not torch.equal(turned, rotate(four, 30, seed=0, step=4))
    assert not torch.equal(turned[0], turned[1])  # each image its own angle
    assert torch.allclose(rotate(img, 0.0, seed=0, step=0), img, atol=1e-5)
    upright = rotate_by(img, torch.tensor([math.pi / 2]))[0, 0]  # a quarter turn stands the bar up
    assert torch.allclose(upright, img[0, 0].T, atol=1e-4)
    with pytest.raises(ValueError, match="augment_rotation must be in \\[0, 180\\] degrees, got 200"):
        CLIPTrainConfig(augment_rotation=200)
