"""GRACE training on the tiny world: the loss falls, the new rows are saved, the adapter reloads exactly."""

import json

import pytest
import torch

from genret.identifiers import Identifiers
from genret.training.grace import GraceTrainConfig, init_token_rows, train_grace

STEPS = 400


@pytest.fixture(scope="module")
def grace_dir(tmp_path_factory, world, mllm_dir, clip_dir):
    out = tmp_path_factory.mktemp("grace") / "atomic"
    config = GraceTrainConfig(scheme="atomic", max_steps=STEPS, batch_size=16, lr=3e-3, token_lr=1e-2, warmup=0.0,
                              caption_tokens=4, eval_queries=24, log_every=40, threads=1)
    # The tiny base is no captioner (its pseudo-queries are empty): each image's first caption stands in for one.
    given = {r.id: r.captions[:1] for r in world.split("test").records}
    manifest = train_grace(mllm_dir, world, out, config, prefilter=clip_dir, queries=given, progress=False)
    return out, manifest


def test_training_lowers_the_loss_and_memorises(grace_dir, world):
    out, manifest = grace_dir
    losses = [h["loss"] for h in manifest["history"] if "loss" in h]
    # The tiny random LM's logits stay flat (hence a high loss), but its top identifiers are right.
    assert losses[-1] < losses[0] - 1.0, losses
    val = manifest["metrics"]["val"]
    assert val["image_to_id_top1"] >= 50.0 and val["text_to_id_R@1"] >= 50.0, val  # chance: 1/24
    assert manifest["task"] == "grace" and manifest["mode"] == "atomic"
    assert manifest["gallery"]["images"] == len(world.split("test"))
    assert manifest["tokens"]["init"] == "prefilter"


def test_adapter_folder_holds_identifiers_tokenizer_and_pseudo_queries(grace_dir, world):
    out, manifest = grace_dir
    ids = Identifiers.load(out)
    assert list(ids.item_ids) == [r.id for r in world.split("test").records]
    tok = json.loads((out / "tokenizer.json").read_text())
    assert ids.new_tokens[0] in {t["content"] for t in tok["added_tokens"]}
    pseudo = json.loads((out / "pseudo_queries.json").read_text())
    assert len(pseudo["queries"]) == len(ids)
    # made from images: keyed by how the processor turns an image into tokens (a lowered max_pixels recaptions)
    from genret.mllm import MLLM
    from genret.mllm.textcache import image_key

    assert pseudo["key"]["images"] == image_key(MLLM.load(manifest["base_model"]))
    # No gallery image is a training one: no dataset caption becomes a query, only the given ones.
    assert manifest["data"]["captions"] == 0 and manifest["data"]["retrieve_queries"] == len(ids)
    weights = (out / "adapter_model.safetensors")
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as fh:
        names = list(fh.keys())
    assert any("trainable_tokens" in n for n in names), names


def test_prefilter_init_gives_similar_images_similar_rows(mllm_dir, world, encoder):
    """Rows from the prefilter's image embeddings keep their similarity; the mean init makes all rows equal."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from genret.identifiers import add_tokens, make_identifiers

    test = world.split("test")
    emb = encoder.encode_images([str(r.path) for r in test.records])
    for how in ("prefilter", "mean"):
        model = AutoModelForImageTextToText.from_pretrained(mllm_dir)
        tok = AutoProcessor.from_pretrained(mllm_dir).tokenizer
        ids = make_identifiers("atomic", [r.id for r in test.records])
        add_tokens(ids, tok, model)
        assert init_token_rows(ids, tok, model, emb if how == "prefilter" else None) == how
        rows = model.get_input_embeddings().weight[tok.convert_tokens_to_ids(list(ids.new_tokens))].detach()
        old = model.get_input_embeddings().weight[: rows.shape[0]].detach()
        if how == "mean":
            assert torch.allclose(rows, rows[:1].expand_as(rows))
            continue
        assert rows.std(0).mean() == pytest.approx(old.std(0).mean().item(), rel=0.5)
        sim_rows = torch.nn.functional.normalize(rows, dim=1) @ torch.nn.functional.normalize(rows, dim=1).T
        sim_img = torch.as_tensor(emb) @ torch.as_tensor(emb).T
        upper = torch.triu_indices(len(rows), len(rows), 1)
        corr = torch.corrcoef(torch.stack([sim_rows[upper[0], upper[1]], sim_img[upper[0], upper[1]].float()]))[0, 1]
        assert corr > 0.5, corr


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="scheme must be one of"):
        GraceTrainConfig(scheme="nope")
    with pytest.raises(ValueError, match="retrieve_ratio"):
        GraceTrainConfig(retrieve_ratio=1.5)


def test_structured_needs_the_prefilter(world, mllm_dir, tmp_path):
    with pytest.raises(ValueError, match="prefilter"):
        train_grace(mllm_dir, world, tmp_path / "s", GraceTrainConfig(scheme="structured", max_steps=1), progress=False)


@pytest.mark.parametrize("scheme,new_rows", [("structured", True), ("numeric", False)])
def test_other_schemes_train_and_save(scheme, new_rows, world, mllm_dir, clip_dir, tmp_path):
    """Structured ids (new cluster/position tokens, prefilter-initialised) and numeric ids (no new token) train."""
    given = {r.id: r.captions[:1] for r in world.split("test").records}
    config = GraceTrainConfig(scheme=scheme, max_steps=3, batch_size=8, k=4, leaf_size=4, caption_tokens=2,
                              eval_queries=4, num_beams=3)
    manifest = train_grace(mllm_dir, world, tmp_path / "g", config, prefilter=clip_dir, queries=given, progress=False)
    ids = Identifiers.load(tmp_path / "g")
    assert ids.scheme == manifest["mode"] == scheme
    assert manifest["tokens"]["new_tokens"] == len(ids.new_tokens) and bool(ids.new_tokens) == new_rows
    assert manifest["tokens"]["init"] == ("prefilter" if new_rows else "none")


def test_semantic_ids_never_come_from_evaluation_captions(world, mllm_dir, tmp_path):
    """The tiny base captions nothing: the test images get no pseudo-query, and their own captions do not stand in."""
    config = GraceTrainConfig(scheme="semantic", max_steps=1, caption_tokens=2, retrieve_ratio=0.0)
    with pytest.raises(ValueError, match="24 items have no candidate text"):
        train_grace(mllm_dir, world, tmp_path / "s", config, progress=False)


def test_an_interrupted_run_resumes_to_the_same_adapter(world, mllm_dir, clip_dir, tmp_path):
    from safetensors.torch import load_file

    given = {r.id: r.captions[:1] for r in world.split("test").records}
    config = GraceTrainConfig(scheme="atomic", max_steps=6, save_every=2, batch_size=8, caption_tokens=2,
                              eval_queries=2, num_beams=2)

    def stop(info):
        if info["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_grace(mllm_dir, world, tmp_path / "a", config, prefilter=clip_dir, queries=given, progress=False,
                    on_step=stop)
    with pytest.raises(ValueError, match="pass --resume"):
        train_grace(mllm_dir, world, tmp_path / "a", config, prefilter=clip_dir, queries=given, progress=False)
    resumed = train_grace(mllm_dir, world, tmp_path / "a", config, prefilter=clip_dir, queries=given, resume=True,
                          progress=False)
    whole = train_grace(mllm_dir, world, tmp_path / "b", config, prefilter=clip_dir, queries=given, progress=False)
    a, b = load_file(str(tmp_path / "a" / "adapter_model.safetensors")), load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert [h["loss"] for h in resumed["history"] if "loss" in h] == [h["loss"] for h in whole["history"] if "loss" in h]
    with pytest.raises(ValueError, match="nothing to resume"):
        train_grace(mllm_dir, world, tmp_path / "a", config, prefilter=clip_dir, queries=given, resume=True,
                    progress=False)
