import json
import shutil

import pytest
import torch
from PIL import Image

from genret._io import ManifestError, seal
from genret.mllm import MLLM
from genret.mllm.adapters import AdapterMismatchError, language_model_targets, save_adapter
from genret.mllm.scoring import image_features, pointwise_scores
from genret.prompts import load_prompt

from conftest import make_adapter as _make_adapter


@pytest.fixture(scope="module")
def pairs(world, mllm_dir):
    recs = world.split("test").records[:3]
    feats = image_features(MLLM.load(str(mllm_dir)), [Image.open(r.path).convert("RGB") for r in recs])
    return [r.captions[0] for r in recs], feats


def _scores(mllm, pairs):
    texts, feats = pairs
    return pointwise_scores(mllm, load_prompt("rerank_pointwise").section("t2i")["user"], texts, feats)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, mllm_dir, pairs):
    root = tmp_path_factory.mktemp("adapters")
    made = {name: _make_adapter(mllm_dir, root / name, seed) for name, seed in (("a", 0), ("b", 1))}
    return root, {name: _scores(m, pairs) for name, m in made.items()}


def test_lora_targets_the_language_model_only(mllm_dir):
    from peft import LoraConfig, get_peft_model

    mllm = MLLM.load(str(mllm_dir))
    model = get_peft_model(mllm.model, LoraConfig(target_modules=language_model_targets(mllm.model, ("q_proj", "v_proj"))))
    adapted = [n for n, p in model.named_parameters() if p.requires_grad]
    assert adapted and all("language_model" in n for n in adapted)  # the CLIP tower also has q_proj/v_proj
    with pytest.raises(ValueError, match="gate_projj.*not found"):
        language_model_targets(mllm.model, ("q_proj", "gate_projj"))


def test_reloaded_adapter_gives_the_scores_of_the_model_that_saved_it(mllm_dir, pairs, adapters):
    root, saved = adapters
    mllm = MLLM.load(str(mllm_dir))
    base = _scores(mllm, pairs)
    assert mllm.attach_adapter(root / "a", mode="pointwise", prompt=load_prompt("rerank_pointwise")) == "a"
    assert mllm.active_adapters == ["a"]
    assert _scores(mllm, pairs) == pytest.approx(saved["a"], abs=1e-5)
    assert max(abs(x - y) for x, y in zip(saved["a"], base)) > 1e-3  # the adapter does change the scores


def test_stack_switch_and_detach(mllm_dir, pairs, adapters):
    from peft import PeftModel

    root, saved = adapters
    mllm = MLLM.load(str(mllm_dir))
    base = _scores(mllm, pairs)
    mllm.attach_adapter(root / "a")
    mllm.attach_adapter(root / "b", activate=False)
    assert mllm.active_adapters == ["a"] and set(mllm.adapters) == {"a", "b"}
    mllm.use_adapter("b")
    assert _scores(mllm, pairs) == pytest.approx(saved["b"], abs=1e-5)
    mllm.use_adapter(["a", "b"])  # stacked: both LoRA updates apply
    stacked = _scores(mllm, pairs)
    assert sorted(mllm.active_adapters) == ["a", "b"]
    assert all(abs(s - x) > 1e-4 and abs(s - y) > 1e-4 for s, x, y in zip(stacked, saved["a"], saved["b"]))
    mllm.use_adapter(None)
    assert mllm.active_adapters == [] and _scores(mllm, pairs) == pytest.approx(base, abs=1e-5)
    with pytest.raises(KeyError, match="no adapter named 'c'.*attached: a, b"):
        mllm.use_adapter("c")
    with pytest.raises(ValueError, match="named 'a' is attached already"):
        mllm.attach_adapter(root / "a")
    mllm.use_adapter("a")
    mllm.detach_adapter("a")
    assert mllm.active_adapters == [] and _scores(mllm, pairs) == pytest.approx(base, abs=1e-5)
    mllm.use_adapter("b")
    assert _scores(mllm, pairs) == pytest.approx(saved["b"], abs=1e-5)
    mllm.detach_adapter("b")
    assert not isinstance(mllm.model, PeftModel) and _scores(mllm, pairs) == pytest.approx(base, abs=1e-5)


@pytest.fixture(scope="module")
def other_base(tmp_path_factory, mllm_dir):
    """The same architecture with other weights: another fingerprint."""
    from conftest import scaled_copy

    return scaled_copy(mllm_dir, tmp_path_factory.mktemp("other") / "mllm", 2)


@pytest.mark.parametrize("edit,checks,match", [
    ({}, {"mode": "listwise"}, "a 'pointwise' rerank adapter, used in 'listwise' mode"),
    ({}, {"task": "grace"}, "a 'rerank' adapter, loaded for the task 'grace'"),
    ({"family": "qwen2_vl"}, {}, "made for a 'qwen2_vl' model, but .* is a 'llava' model"),
    ({"prompt": {"name": "rerank_pointwise", "version": 7}}, {"prompt": "rerank_pointwise"},
     "trained with prompt rerank_pointwise@v7, used with rerank_pointwise@v1"),
    ({"format": "genret.index"}, {}, "not a genret adapter"),
    ({"version": 99}, {}, "adapter format version 99"),
])
def test_mismatched_adapters_are_refused_naming_both_sides(mllm_dir, adapters, tmp_path, edit, checks, match):
    root, _ = adapters
    shutil.copytree(root / "a", tmp_path / "x")
    manifest = json.loads((tmp_path / "x" / "genret.json").read_text())
    seal(tmp_path / "x", "genret.json", {**manifest, **edit})  # an adapter saved so
    if "prompt" in checks:
        checks = {**checks, "prompt": load_prompt(checks["prompt"])}
    mllm = MLLM.load(str(mllm_dir))
    with pytest.raises(ManifestError, match=match):
        mllm.attach_adapter(tmp_path / "x", **checks)
    assert mllm.adapters == {}


def test_adapter_of_another_base_is_refused(adapters, other_base, mllm_dir):
    root, _ = adapters
    mllm = MLLM.load(str(other_base))
    with pytest.raises(AdapterMismatchError) as err:
        mllm.attach_adapter(root / "a")
    msg = str(err.value)
    assert str(mllm_dir) in msg and str(other_base) in msg and mllm.revision in msg


def test_incomplete_adapter_directory(adapters, tmp_path, mllm_dir):
    root, _ = adapters
    shutil.copytree(root / "a", tmp_path / "x")
    (tmp_path / "x" / "adapter_model.safetensors").unlink()
    mllm = MLLM.load(str(mllm_dir))
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors missing"):
        mllm.attach_adapter(tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="adapter directory not found"):
        mllm.attach_adapter(tmp_path / "nope")
