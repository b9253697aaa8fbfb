from dataclasses import asdict

import pytest

from genret._io import ManifestError, read_json
from genret.world.synth import VERSION
from genret.world.shipped import ship, shipped_models


@pytest.fixture
def shipped(tmp_path, world_dir, clip_dir, mllm_dir):
    run = tmp_path / "run"
    run.mkdir()
    for name, src in (("world", world_dir), ("clip", clip_dir), ("mllm", mllm_dir)):
        (run / name).symlink_to(src, target_is_directory=True)
    return ship(run, tmp_path / "mini-world")


def _world_config(world_dir):
    made = read_json(world_dir / "dataset_synth.json")["genret"]
    return made["version"], made["config"]


def test_shipped_models_are_found_for_their_world(shipped, world_dir):
    version, config = _world_config(world_dir)
    assert version == VERSION
    parts = shipped_models(version, config, shipped)
    assert (parts["clip"] / "model.safetensors").is_file() and (parts["mllm"] / "config.json").is_file()


def test_another_world_is_refused(shipped, world_dir):
    version, config = _world_config(world_dir)
    with pytest.raises(ManifestError, match="trained on world"):
        shipped_models(version, {**config, "seed": config["seed"] + 1}, shipped)
    with pytest.raises(ManifestError, match="trained on world"):
        shipped_models(version + 1, config, shipped)


def test_a_changed_weight_file_is_refused(shipped, world_dir):
    weights = shipped / "mllm" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ManifestError, match="mllm/model.safetensors: its content is not what the manifest of this mini-world models lists"):
        shipped_models(*_world_config(world_dir), shipped)


def test_no_manifest_is_a_clear_error(tmp_path, world_dir):
    with pytest.raises(ManifestError, match="no shipped mini-world models"):
        shipped_models(*_world_config(world_dir), tmp_path)


def test_models_of_a_world_v2_serve_v3_which_only_added_triplets(shipped, world_dir):
    """v3 added cirr/ and its cir_* counts; the images and captions the models learnt from are v2's."""
    import json

    from genret._io import seal

    version, config = _world_config(world_dir)
    manifest = json.loads((shipped / "manifest.json").read_text())
    manifest["world"] = {"generator_version": 2, "config": {k: v for k, v in config.items() if not k.startswith("cir_")}}
    seal(shipped, "manifest.json", manifest)  # as ship() would have written it for a v2 world
    assert shipped_models(3, {**config, "cir_test": 7}, shipped)
    with pytest.raises(ManifestError, match="trained on world"):
        shipped_models(3, {**config, "n_test": config["n_test"] + 1}, shipped)


@pytest.fixture
def rewriter(tmp_path, world_dir, mllm_dir):
    from genret.data.cir import load_cir
    from genret.training.rewriter import RewriterTrainConfig, train_rewriter

    config = RewriterTrainConfig(max_steps=2, batch_size=8, caption_tokens=4, eval_triplets=0, threads=1)
    train_rewriter(mllm_dir, load_cir(world_dir, "train"), tmp_path / "rw", config, progress=False)
    return tmp_path / "rw"


def test_a_shipped_rewriter_is_found_and_checked(tmp_path, world_dir, clip_dir, mllm_dir, rewriter, shipped):
    assert "rewriter" not in shipped_models(*_world_config(world_dir), shipped)  # optional: shipped without it
    run = tmp_path / "run2"
    run.mkdir()
    for name, src in (("world", world_dir), ("clip", clip_dir), ("mllm", mllm_dir), ("rewriter", rewriter)):
        (run / name).symlink_to(src, target_is_directory=True)
    dest = ship(run, tmp_path / "with-rewriter")
    parts = shipped_models(*_world_config(world_dir), dest)
    assert (parts["rewriter"] / "adapter_model.safetensors").is_file()
    assert read_json(dest / "manifest.json")["parts"]["rewriter"]["weights"]
    weights = dest / "rewriter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ManifestError, match="rewriter/adapter_model.safetensors: its content is not what the manifest"):
        shipped_models(*_world_config(world_dir), dest)
