import json
from dataclasses import replace

from transformers import AutoModelForImageTextToText, AutoProcessor

from genret.training.mini_mllm import MiniMLLMConfig
from genret.training.pretrain_mllm import PretrainConfig, pretrain_mllm

TINY = MiniMLLMConfig(hidden_size=32, layers=1, heads=2, intermediate_size=64, vocab_size=400)


def test_pretraining_saves_a_llava_that_loads_like_any_checkpoint(clip_dir, world, tmp_path):
    train = world.split("train")
    train = replace(train, records=train.records[:32])
    summary = pretrain_mllm(clip_dir, train, tmp_path / "m", PretrainConfig(epochs=2, batch_size=32), TINY,
                            val=world.split("val"), progress=False)
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    assert summary["history"][1]["loss"] < summary["history"][0]["loss"]  # it learns the captions' words
    assert set(summary["val_caption_loss"]) == {"with_image", "shuffled_image"}
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "m")
    processor = AutoProcessor.from_pretrained(tmp_path / "m")
    assert type(model).__name__ == "LlavaForConditionalGeneration" and type(processor).__name__ == "LlavaProcessor"
    assert json.loads((tmp_path / "m" / "genret.json").read_text())["task"] == "pretrain"
    from genret.training.summary import TrainSummary

    rendered = TrainSummary.from_manifest(summary).render("m")
    assert rendered.startswith("saved m: pretrain, ") and "val_caption_loss: with_image" in rendered


def test_max_steps_past_the_epochs_goes_round_them_again(clip_dir, world, tmp_path):
    train = world.split("train")
    train = replace(train, records=train.records[:16])
    steps = []
    summary = pretrain_mllm(clip_dir, train, tmp_path / "m", PretrainConfig(epochs=1, batch_size=16, max_steps=9,
                                                                          log_every=1, tasks="describe,answer"), TINY,
                            progress=False, on_step=lambda info: steps.append(info["step"]))
    assert steps == list(range(1, 10)) and summary["steps"] == 9
    epochs = [h["epoch"] for h in summary["history"]]
    assert epochs == sorted(epochs) and epochs[-1] > 1  # each pass over the examples is the next epoch


def test_rotation_augmentation_reaches_the_images_the_model_sees(clip_dir, world, tmp_path):
    import pytest

    train = world.split("train")
    train = replace(train, records=train.records[:16])
    config = PretrainConfig(epochs=1, batch_size=16, max_steps=2, log_every=1, tasks="describe")
    plain, turned = (pretrain_mllm(clip_dir, train, tmp_path / name, replace(config, augment_rotation=degrees), TINY,
                                   progress=False) for name, degrees in (("plain", 0.0), ("turned", 30.0)))
    assert [h["loss"] for h in plain["history"]][0] != [h["loss"] for h in turned["history"]][0]
    assert turned["config"]["augment_rotation"] == 30.0
    with pytest.raises(ValueError, match="augment_rotation must be in \\[0, 180\\] degrees, got -1"):
        PretrainConfig(augment_rotation=-1)


def test_full_image_features_give_the_language_model_the_class_token_too(clip_dir, world, tmp_path):
    import pytest
    import torch

    from genret.mllm import MLLM
    from genret.mllm.scoring import image_features
    from genret.data.images import load_image

    train = world.split("train")
    train = replace(train, records=train.records[:16])
    config = PretrainConfig(epochs=1, batch_size=16, max_steps=1, tasks="describe")
    pretrain_mllm(clip_dir, train, tmp_path / "m", config, replace(TINY, image_features="full"), progress=False)
    mllm = MLLM.load(str(tmp_path / "m"))
    feats = image_features(mllm, [load_image(train.records[0].path)])[0]
    patches = (64 // 8) ** 2
    assert feats.shape[0] == patches + 1 == mllm.model.config.image_seq_length
    prompt = mllm.processor(text=["<image> a"], images=[load_image(train.records[0].path)], return_tensors="pt")
    assert int((prompt["input_ids"] == mllm.model.config.image_token_id).sum()) == patches + 1
    with torch.no_grad():  # the processor's expansion and the model's features agree: the forward runs
        mllm.model(**prompt)
    with pytest.raises(ValueError, match="image_features must be default or full"):
        MiniMLLMConfig(image_features="cls")


def test_the_projector_reads_the_vision_layer_asked_for(clip_dir, world, tmp_path):
    import pytest
    import torch

    from genret.mllm import MLLM
    from genret.mllm.scoring import image_features
    from genret.data.images import load_image

    train = replace(world.split("train"), records=world.split("train").records[:16])
    config = PretrainConfig(epochs=1, batch_size=16, max_steps=1, tasks="describe")
    summary = pretrain_mllm(clip_dir, train, tmp_path / "m", config, replace(TINY, vision_layer=-2), progress=False)
    assert summary["arch"]["vision_layer"] == -2
    mllm = MLLM.load(str(tmp_path / "m"))
    assert mllm.model.config.vision_feature_layer == -2
    image = load_image(train.records[0].path)
    pixels = mllm.family.image_inputs(mllm.processor, [image])["pixel_values"]
    with torch.no_grad():
        states = mllm.model.model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        expected = mllm.model.model.multi_modal_projector(states[-2][:, 1:])[0]
    assert torch.allclose(image_features(mllm, [image])[0].float(), expected.float(), atol=1e-5)
    with pytest.raises(ValueError, match="vision_layer counts from the tower's last hidden state"):
        MiniMLLMConfig(vision_layer=0)
    with pytest.raises(ValueError, match="vision_layer -9: .*'s tower has 1 layers \\(hidden states -1 .. -2\\)"):
        pretrain_mllm(clip_dir, train, tmp_path / "n", config, replace(TINY, vision_layer=-9), progress=False)


def test_example_averaged_loss_weighs_each_example_alike():
    import torch

    from genret.training.pretrain_mllm import example_loss

    logits = torch.zeros(2, 5, 3)
    logits[0, :, 0] = 5.0  # row 0 predicts token 0 everywhere, with confidence
    labels = torch.tensor([[-100, 0, 0, 0, 0], [-100, -100, -100, -100, 1]])  # 4 right tokens, then 1 wrong-ish
    token = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 3), labels[:, 1:].reshape(-1),
                                              ignore_index=-100)
    per_row = [torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:]),
               torch.nn.functional.cross_entropy(logits[1, 3:4], labels[1, 4:5])]
    assert torch.isclose(example_loss(logits, labels), (per_row[0] + per_row[1]) / 2)
    assert example_loss(logits, labels) > token  # the one-token example is no longer drowned by the long one


def test_init_goes_on_training_a_saved_mllm_and_is_checked(clip_dir, world, tmp_path):
    import pytest
    import torch
    from safetensors.torch import load_file

    train = world.split("train")
    train = replace(train, records=train.records[:16])
    config = PretrainConfig(epochs=1, batch_size=16, max_steps=1, tasks="describe,judge")
    pretrain_mllm(clip_dir, train, tmp_path / "a", config, TINY, progress=False)
    summary = pretrain_mllm(clip_dir, train, tmp_path / "b", replace(config, init=str(tmp_path / "a"), lr=1e-9,
                                                                     loss_average="example"), TINY, progress=False)
    assert summary["init"] == str(tmp_path / "a") and summary["config"]["loss_average"] == "example"
    a, b = (load_file(tmp_path / n / "model.safetensors") for n in "ab")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # carried over
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
    with pytest.raises(ValueError, match="architecture options differ from the checkpoint's: hidden_size 64"):
        pretrain_mllm(clip_dir, train, tmp_path / "c", replace(config, init=str(tmp_path / "a")),
                      replace(TINY, hidden_size=64), progress=False)
    assert not (tmp_path / "c").exists()
    # Without architecture options, --init trains the checkpoint's own (not the defaults, which differ from TINY).
    summary = pretrain_mllm(clip_dir, train, tmp_path / "d", replace(config, init=str(tmp_path / "a")), None,
                            progress=False)
    assert summary["arch"] == summary["arch"] | {"hidden_size": TINY.hidden_size, "layers": TINY.layers}
    with pytest.raises(FileNotFoundError, match="no mini MLLM there"):
        pretrain_mllm(clip_dir, train, tmp_path / "c", replace(config, init=str(tmp_path)), TINY, progress=False)
    with pytest.raises(ValueError, match="loss_average must be token or example"):
        PretrainConfig(loss_average="sum")


def test_the_random_negatives_curriculum_reaches_each_epochs_examples(clip_dir, world, tmp_path, monkeypatch):
    from genret.training.instructions import Mixture

    shares, epoch = [], Mixture.epoch
    monkeypatch.setattr(Mixture, "epoch", lambda self, rng: shares.append(self.random_negatives) or epoch(self, rng))
    train = world.split("train")
    train = replace(train, records=train.records[:16])
    pretrain_mllm(clip_dir, train, tmp_path / "m", PretrainConfig(epochs=3, batch_size=16, tasks="describe,judge",
                                                                  random_negatives=1.0, random_negatives_last=0.0),
                  TINY, progress=False)
    assert shares[-3:] == [1.0, 0.5, 0.0]  # the three epochs drawn (after the tokenizer's look at one)
    shares.clear()  # max_steps ends the run in its second epoch (7 steps each): the curriculum spans those two
    pretrain_mllm(clip_dir, train, tmp_path / "s", PretrainConfig(epochs=3, batch_size=16, tasks="describe,judge",
                                                                  random_negatives=1.0, random_negatives_last=0.0,
                                                                  max_steps=10),
                  TINY, progress=False)
    assert shares[-3:] == [1.0, 0.0, 0.0]


def test_twin_negatives_are_drawn_shown_and_need_the_held_out_splits(clip_dir, world, tmp_path):
    import pytest

    train = world.split("train")
    train = replace(train, records=train.records[:16])
    config = PretrainConfig(epochs=1, batch_size=16, tasks="describe,judge,pick", twin_negatives=1.0)
    with pytest.raises(ValueError, match="twin_negatives draws scenes anew: give held_out"):
        pretrain_mllm(clip_dir, train, tmp_path / "x", config, TINY, progress=False)
    assert not (tmp_path / "x").exists()
    summary = pretrain_mllm(clip_dir, train, tmp_path / "m", config, TINY, progress=False,
                            held_out=world.split("val", "test"))
    assert summary["data"]["twins_drawn"] > 0 and summary["steps"] > 0


def test_drawn_twins_are_the_pixel_rows_after_the_records(clip_dir, world):
    import random

    import torch
    from transformers import AutoProcessor

    from genret.data import load_image
    from genret.mllm.families import FAMILIES
    from genret.training.pretrain_mllm import image_pixels, mixture

    train = world.split("train")
    train = replace(train, records=train.records[:16])
    mix = mixture(train, clip_dir, PretrainConfig(twin_negatives=1.0), held_out=world.split("val", "test"))
    examples = mix.epoch(random.Random(0))
    processor = AutoProcessor.from_pretrained(clip_dir)
    pixels = image_pixels(train, mix, processor, seed=3, family=FAMILIES.get("llava"))
    n = len(train.records)
    assert len(pixels) == n + len(mix.drawn) and len(mix.drawn) > 0
    assert torch.equal(pixels[:n], processor.image_processor(images=[load_image(r.path) for r in train.records],
                                                              return_tensors="pt")["pixel_values"])
    for k, (kind, value) in enumerate(mix.drawn):
        own = processor.image_processor(images=[kind.render(value, 64, 3 * 1_000_003 + k)],
                                        return_tensors="pt")["pixel_values"][0]
        assert torch.equal(pixels[n + k], own)
    shown = {i for e in examples for i in e.images}
    assert max(shown) < len(pixels) and any(i >= n for i in shown)


def test_the_command_takes_the_language_models_size_and_init_keeps_it(clip_dir, world_dir, tmp_path):
    from genret.cli import main

    common = ["--clip", str(clip_dir), "--data", str(world_dir), "--max-steps", "1", "--batch-size", "8",
              "--tasks", "describe", "--save-every", "0"]
    assert main(["-q", "train", "mllm", *common, "--out", str(tmp_path / "a"), "--hidden-size", "32", "--layers", "1",
                 "--heads", "2", "--intermediate-size", "64"]) == 0
    made = json.loads((tmp_path / "a" / "genret.json").read_text())["arch"]
    assert (made["hidden_size"], made["layers"], made["heads"], made["intermediate_size"]) == (32, 1, 2, 64)
    assert main(["-q", "train", "mllm", *common, "--out", str(tmp_path / "b"), "--init", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "b" / "genret.json").read_text())["arch"] == made
    assert main(["-q", "train", "mllm", *common, "--out", str(tmp_path / "c"), "--init", str(tmp_path / "a"),
                 "--layers", "3"]) != 0 and not (tmp_path / "c").exists()


def test_the_qwen2_vl_interface_gives_image_tokens_rows_and_columns(clip_dir, world, tmp_path):
    """--interface qwen2_vl: a real Qwen2-VL whose tower starts from the CLIP's blocks, trained with the multimodal RoPE
    positions the stages score with, and loaded as any Qwen2-VL checkpoint."""
    import pytest
    import torch
    from transformers import CLIPModel

    from genret.data.images import load_image
    from genret.mllm import MLLM
    from genret.mllm.scoring import image_features
    from genret.training.mini_mllm import mrope_section

    train = replace(world.split("train"), records=world.split("train").records[:16])
    arch = replace(TINY, interface="qwen2_vl")
    config = PretrainConfig(epochs=1, batch_size=8, max_steps=2, tasks="describe,judge", judge_per_image=1,
                            vision_lr_scale=0.0, lr=1e-3)
    summary = pretrain_mllm(clip_dir, train, tmp_path / "q", config, arch, val=world.split("val"), progress=False)
    assert summary["arch"]["interface"] == "qwen2_vl" and summary["steps"] == 2
    mllm = MLLM.load(str(tmp_path / "q"))
    assert type(mllm.model).__name__ == "Qwen2VLForConditionalGeneration" and mllm.family.name == "qwen2_vl"
    assert mllm.model.config.text_config.rope_parameters["mrope_section"] == mrope_section(32 // 2) == [2, 3, 3]
    # The tower kept the CLIP's blocks (its lr scale was 0): the patch embedding's two temporal copies sum to the
    # CLIP's, each block's fused qkv is the CLIP's q, k, v.
    clip = CLIPModel.from_pretrained(clip_dir).vision_model
    tower = mllm.model.model.visual
    assert torch.allclose(tower.patch_embed.proj.weight.sum(2), clip.embeddings.patch_embedding.weight, atol=1e-6)
    att = clip.encoder.layers[0].self_attn
    assert torch.equal(tower.blocks[0].attn.qkv.weight,
                       torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]))
    # Each image is a grid of merged tokens, and the stages score with it: the pixels training fed are the
    # processor's own.
    image = load_image(train.records[0].path)
    side = clip.config.image_size // clip.config.patch_size // 2
    assert image_features(mllm, [image])[0].shape[:2] == (side, side)
    dense = mllm.family.dense_pixels(mllm.processor, [image])
    assert torch.equal(mllm.family.pixel_inputs(mllm.model, dense)["pixel_values"],
                       mllm.family.image_inputs(mllm.processor, [image])["pixel_values"])
    assert summary["val_caption_loss"]["with_image"] > 0
    with pytest.raises(ValueError, match="image_features and vision_layer are LLaVA's settings"):
        MiniMLLMConfig(interface="qwen2_vl", vision_layer=-2)
    with pytest.raises(ValueError, match="interface must be llava or qwen2_vl"):
        MiniMLLMConfig(interface="idefics3")


def test_mrope_sections_split_a_head_as_qwen2_vl_does():
    from genret.training.mini_mllm import mrope_section

    assert mrope_section(128) == [16, 24, 24]  # Qwen2-VL-7B's own
    for head_dim in (16, 32, 64, 96):
        assert sum(mrope_section(head_dim)) == head_dim // 2


def test_the_tower_trains_at_its_own_rate_and_the_projectors_at_the_language_models(tmp_path):
    """is_tower on real parameter names: LLaVA's projector and Qwen2-VL's merger (inside its tower module) train with
    the language model; the towers' blocks at vision_lr_scale."""
    from genret.mllm import MLLM
    from genret.mllm.tiny import build_tiny
    from genret.training.pretrain_mllm import is_tower

    for family, tower, projector in (("llava", "vision_tower", "multi_modal_projector"),
                                     ("qwen2_vl", "visual.blocks", "visual.merger")):
        mllm = MLLM.load(str(build_tiny(family, tmp_path / family, ["a red circle left of a blue square"])))
        names = [n for n, _ in mllm.model.named_parameters()]
        towers = {n for n in names if is_tower(mllm.family, n)}
        assert towers and all(f".{tower}." in n or n.startswith(f"{tower}.") or f".{tower.split('.')[0]}." in n
                              for n in towers)
        assert not any(projector in n for n in towers) and any(projector in n for n in names)
        assert not any("language_model" in n or "lm_head" in n for n in towers)


def test_pixel_rows_take_any_sizes_the_processor_makes_one_and_refuse_the_rest(world, tmp_path):
    """LLaVA's processor crops every image to one size, so training images of several sizes are fine; Qwen2-VL's keeps
    each image's own size, and several sizes are refused with what to do."""
    from types import SimpleNamespace

    import pytest

    from genret.data import load_image
    from genret.mllm import MLLM
    from genret.mllm.tiny import build_tiny
    from genret.training.pretrain_mllm import image_pixels

    records = list(world.split("train").records[:4])
    bigger = tmp_path / "bigger.png"
    load_image(records[0].path).resize((96, 48)).save(bigger)  # another size and shape
    train = replace(world.split("train"), records=[replace(records[0], path=bigger), *records[1:]])
    no_twins = SimpleNamespace(drawn=[])
    for family in ("llava", "qwen2_vl"):
        mllm = MLLM.load(str(build_tiny(family, tmp_path / family, ["a red circle left of a blue square"])))
        if family == "llava":
            pixels = image_pixels(train, no_twins, mllm.processor, 0, mllm.family)
            assert pixels.shape[0] == 4 and pixels.shape[-2:] == (32, 32)
        else:
            with pytest.raises(ValueError, match="of one size"):
                image_pixels(train, no_twins, mllm.processor, 0, mllm.family)
