"""A stage's settings are checked as it is built, before any gallery is encoded: every model, adapter and prompt
file it names is there and fits (a wrong adapter path once failed after the whole encode)."""

import json
import shutil

import pytest

from conftest import make_adapter
from genret.cli import main
from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline


def _build(encoder, *stages):
    return RetrievalPipeline(PipelineConfig(encoder=EncoderConfig(model="x"), stages=({"type": "prefilter"}, *stages)),
                             encoder=encoder)


@pytest.fixture(scope="module")
def pointwise_adapter(tmp_path_factory, mllm_dir):
    out = tmp_path_factory.mktemp("adapter") / "pointwise"
    make_adapter(mllm_dir, out, seed=3, mode="pointwise")
    return out


@pytest.mark.parametrize("stage,match", [
    ({"type": "rerank", "model": "{tmp}/no-mllm"}, r"stages\[1\]\.model directory not found: .*no-mllm"),
    ({"type": "rerank", "model": "{mllm}", "adapter": "{tmp}/no-lora"},
     r"stages\[1\]\.adapter: adapter directory not found: .*no-lora"),
    ({"type": "rerank", "model": "{mllm}", "adapter": "{tmp}"}, r"stages\[1\]\.adapter: adapter manifest not found"),
    ({"type": "rerank", "model": "{mllm}", "processor_options": {"max_pixels": 10}},
     r"processor option\(s\) 'max_pixels' are not llava settings"),
    ({"type": "rerank", "model": "{mllm}", "processor_options": {"do_image_splitting": True}},
     r"stages\[1\]: do_image_splitting = true cannot be scored from cached features"),
    ({"type": "rerank", "model": "llava-hf/llava-1.5-7b-hf"},
     r"stages\[1\]\.model 'llava-hf/llava-1\.5-7b-hf' is not a local directory .* hub downloads are off"),
    ({"type": "rerank", "model": "{clip}"},  # a CLIP is not an MLLM
     r"stages\[1\]\.model: .*clip: no genret model family for model_type 'clip'"),
    ({"type": "cirevl", "model": "{tmp}/no-mllm", "mode": "text"}, r"stages\[1\]\.model directory not found"),
    ({"type": "cirevl", "model": "{mllm}", "rewriter_adapter": "{tmp}/no-lora"}, r"stages\[1\]\.rewriter_adapter: "),
    ({"type": "chat", "model": "{mllm}", "prompt": "{tmp}/gone.toml"}, r"stages\[1\]\.prompt: prompt file not found"),
    ({"type": "eiirwqr", "model": "{mllm}", "relevance": "target", "caption_prompt": "nope"},
     r"stages\[1\]\.caption_prompt: prompt file not found"),
])
def test_what_a_stage_names_is_checked_as_it_is_built(encoder, mllm_dir, clip_dir, tmp_path, stage, match):
    fill = {"tmp": str(tmp_path), "mllm": str(mllm_dir), "clip": str(clip_dir)}
    stage = json.loads(json.dumps(stage).replace("{tmp}", fill["tmp"]).replace("{mllm}", fill["mllm"])
                       .replace("{clip}", fill["clip"]))
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        _build(encoder, stage)


@pytest.mark.parametrize("stage,match", [
    ({"mode": "generative"}, r"stages\[1\]\.adapter: .*a 'pointwise' rerank adapter, used in 'generative' mode"),
    ({"mode": "pointwise", "prompt": "{v2}"}, r"stages\[1\]\.adapter: .*trained with prompt rerank_pointwise@v1, used "
                                              r"with rerank_pointwise@v2"),
    ({"mode": "pointwise", "model": "{other}"}, r"stages\[1\]\.adapter: .*adapter trained on base .* fingerprint"),
])
def test_an_adapter_that_does_not_fit_its_stage_is_refused_before_encoding(encoder, mllm_dir, pointwise_adapter,
                                                                           tmp_path, stage, match):
    other = tmp_path / "other"
    if stage.get("model") == "{other}":
        from conftest import scaled_copy

        scaled_copy(mllm_dir, other, 2.0)
    if stage.get("prompt") == "{v2}":  # the same prompt, a new version
        from genret.prompts import load_prompt

        text = open(load_prompt("rerank_pointwise").path).read().replace("version = 1", "version = 2")
        (tmp_path / "rerank_pointwise.toml").write_text(text)
        stage = {**stage, "prompt": str(tmp_path / "rerank_pointwise.toml")}
    table = {"type": "rerank", "model": str(mllm_dir), "adapter": str(pointwise_adapter), **stage}
    table["model"] = table["model"].replace("{other}", str(other))
    with pytest.raises(ValueError, match=match):
        _build(encoder, table)


def test_a_fitting_adapter_passes(encoder, mllm_dir, pointwise_adapter):
    pipe = _build(encoder, {"type": "rerank", "mode": "pointwise", "model": str(mllm_dir),
                            "adapter": str(pointwise_adapter)})
    assert pipe.stages[1]._mllm is None  # checked, not loaded


def test_index_build_names_a_wrong_adapter_before_encoding_anything(tmp_path, world_dir, clip_dir, mllm_dir, capsys):
    """The whole command stops at the stage table, naming file and key: no embedding cached, no output written."""
    configs = tmp_path / "configs"
    configs.mkdir()
    shutil.copytree(clip_dir, configs / "clip")
    (configs / "p.toml").write_text(
        f'[encoder]\nmodel = "clip"\ncache_dir = "cache"\n[[stages]]\ntype = "prefilter"\n[[stages]]\ntype = "rerank"\n'
        f'mode = "pointwise"\nmodel = "{mllm_dir}"\nadapter = "runs/typo"\n')
    code = main(["index", "build", str(configs / "p.toml"), "--data", str(world_dir), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"{configs / 'p.toml'}: stages[1].adapter: adapter directory not found: {configs / 'runs' / 'typo'}" in err
    assert not (configs / "cache").exists() and not (tmp_path / "out").exists()
