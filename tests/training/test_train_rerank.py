import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from genret.cli import main
from genret.config import ConfigError, from_dict
from genret.data.images import load_image
from genret.mllm import MLLM
from genret.mllm.scoring import (generative_scores, image_features, listwise_scores, pointwise_scores, render,
                                 user_message)
from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline
from genret.prompts import load_prompt
from genret.training.rerank import RerankTrainConfig, generative_loss, pointwise_loss, train_rerank
from genret.training.models import image_features as training_features
from genret.types import Query

STEPS = 40


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory, mllm_dir):
    """The tiny LLaVA with token embeddings at a trained model's scale.

    At the random initialisation's scale (std 0.02, hidden 32) no logit can move far from uniform,
    whatever the LoRA does; a pretrained base's embeddings span a usable range.
    """
    from conftest import scaled_copy

    return scaled_copy(mllm_dir, tmp_path_factory.mktemp("judge") / "mllm", 10)


@pytest.fixture(scope="module")
def small(world):
    """A handful of training images: a few dozen steps overfit them."""
    train = world.split("train")
    return replace(train, records=train.records[:8])


def _config(**overrides) -> RerankTrainConfig:
    settings = dict(negatives=3, mine_k=4, batch_size=8, directions="i2t", lr=1e-2, max_steps=STEPS, warmup=0.0,
                    lora_dropout=0.0, log_every=1, eval_every=20, eval_queries=4, eval_k=3, save_every=0)
    return RerankTrainConfig(**{**settings, **overrides})


def _train(base, data, out, config, **kwargs):
    losses = []
    summary = train_rerank(str(base), data, out, config, progress=False,
                           on_step=lambda s: losses.append(s["loss"]), **kwargs)
    return summary, losses


@pytest.fixture(scope="module")
def runs(tmp_path_factory, judge_dir, small, world, clip_dir):
    root = tmp_path_factory.mktemp("runs")
    return {mode: (root / mode, *_train(judge_dir, small, root / mode, _config(mode=mode), prefilter=str(clip_dir),
                                        val=world.split("val")))
            for mode in ("pointwise", "listwise", "generative")}


def _learned(mode: str, losses: list[float]) -> bool:
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    if mode == "pointwise":  # below what any constant score gets: ln 2 (balanced BCE) + ln 4 (softmax over 4)
        return last < math.log(2) + math.log(4) - 0.2
    if mode == "generative":  # softmax over 4 (ln 4 at chance) + the positive's caption NLL (~ln vocab at the start)
        return last < first - 1.0
    # listwise: softmax over the 4 candidates' whole answers. The random 1-layer judge starts peaked on wrong
    # numbers (~1.7) and learns to spread them (to ln 4); it does not learn to tell the candidates apart here.
    return last < first - 0.2


@pytest.mark.parametrize("mode", ["pointwise", "listwise", "generative"])
def test_training_lowers_the_loss(runs, mode):
    _, summary, losses = runs[mode]
    assert len(losses) == STEPS and summary["steps"] == STEPS
    assert _learned(mode, losses), losses


def test_without_a_learning_rate_the_same_check_fails(judge_dir, small, clip_dir, tmp_path):
    _, losses = _train(judge_dir, small, tmp_path / "a", _config(lr=1e-7, eval_every=0), prefilter=str(clip_dir))
    assert not _learned("pointwise", losses), losses


def test_adapter_manifest_history_and_speed(runs, judge_dir, clip_dir):
    out, summary, _ = runs["listwise"]
    manifest = json.loads((out / "genret.json").read_text())
    files = manifest.pop("files")
    assert len(manifest.pop("digest")) == 64
    assert manifest.pop("owner") == "genret" and manifest == json.loads(json.dumps(summary))
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors"}  # every file but the manifest
    assert {"adapter_config.json", "adapter_model.safetensors", "genret.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "checkpoints").exists()  # a finished run keeps only the adapter
    assert manifest["format"] == "genret.rerank_adapter" and manifest["task"] == "rerank"
    assert manifest["mode"] == "listwise" and manifest["family"] == "llava"
    assert manifest["base_model"] == str(judge_dir) and manifest["base_revision"] == MLLM.load(str(judge_dir)).revision
    assert manifest["prompt"] == {"name": "rerank_listwise", "version": 1}
    assert manifest["config"] == json.loads(json.dumps(_config(mode="listwise").__dict__))
    assert manifest["data"]["prefilter"] == str(clip_dir) and manifest["data"]["queries"] == 8
    evals = [h for h in manifest["history"] if "eval" in h]
    assert [h["step"] for h in evals] == [0, 20, STEPS]
    for h in evals:
        assert set(h["eval"]) == {"t2i", "i2t"} and h["eval"]["t2i"]["queries"] == 4
        assert h["eval"]["t2i"]["rerank_R@1"] <= h["eval"]["t2i"]["prefilter_R@3"]  # it only reorders the top 3
    assert manifest["metrics"]["val"] == evals[-1]["eval"]
    assert manifest["speed"]["steps_per_s"] > 0 and manifest["speed"]["queries_per_s"] > 0


def test_trained_adapter_reloads_onto_a_fresh_base_and_ranks_its_positives(runs, judge_dir, small, clip_dir):
    from PIL import Image

    from genret.encoders import load_encoder
    from genret.training.negatives import caption_table, mine_negatives

    out, _, _ = runs["pointwise"]
    section = load_prompt("rerank_pointwise").section("i2t")["user"]
    groups, _ = mine_negatives(load_encoder("hf", str(clip_dir)), small, 4, directions=("i2t",))
    texts, _ = caption_table(small)

    def judged(mllm):  # the training loss, on scores from the stage's scorer, and how often a caption wins a pair
        feats = image_features(mllm, [Image.open(r.path).convert("RGB") for r in small.records])
        losses, right, scores = [], [], []
        for g in groups:
            cands = list(g.positives) + list(g.negatives)
            row = pointwise_scores(mllm, section, [texts[c] for c in cands], [feats[g.query]] * len(cands))
            pos, neg = row[:len(g.positives)], row[len(g.positives):]
            for p in pos:
                losses.append(pointwise_loss(torch.tensor([[p] + neg]), torch.tensor([0]), 1.0).item())
                right += [p > n for n in neg]
            scores += row
        return sum(losses) / len(losses), sum(right) / len(right), scores

    base_loss, base_right, _ = judged(MLLM.load(str(judge_dir)))
    first, second = MLLM.load(str(judge_dir)), MLLM.load(str(judge_dir))
    for m in (first, second):
        m.attach_adapter(out, mode="pointwise")
    loss, right, scores = judged(first)
    assert judged(second)[2] == pytest.approx(scores, abs=1e-5)  # the same adapter, the same scores
    assert loss < base_loss - 0.5 and right > base_right, (loss, base_loss, right, base_right)


def test_generative_adapter_ranks_the_training_positives_higher(runs, judge_dir, small, clip_dir):
    """The generative adapter, loaded onto a fresh base, scored by the stage's scorer: lower group loss, more wins."""
    from PIL import Image

    from genret.encoders import load_encoder
    from genret.training.negatives import caption_table, mine_negatives

    out, _, _ = runs["generative"]
    section = load_prompt("rerank_generative").section("i2t")["user"]
    groups, _ = mine_negatives(load_encoder("hf", str(clip_dir)), small, 4, directions=("i2t",))
    texts, _ = caption_table(small)

    def judged(mllm):
        feats = image_features(mllm, [Image.open(r.path).convert("RGB") for r in small.records])
        losses, right = [], []
        for g in groups:
            cands = list(g.positives) + list(g.negatives)
            row = generative_scores(mllm, section, [texts[c] for c in cands], [feats[g.query]] * len(cands))
            losses.append(generative_loss(torch.tensor([row]), torch.tensor([0]), 0.1, 0.0).item())
            right += [row[0] > n for n in row[1:]]
        return sum(losses) / len(losses), sum(right) / len(right)

    base_loss, base_right = judged(MLLM.load(str(judge_dir)))
    tuned = MLLM.load(str(judge_dir))
    tuned.attach_adapter(out, mode="generative")
    loss, right = judged(tuned)
    assert loss < base_loss - 0.5 and right > base_right, (loss, base_loss, right, base_right)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, world):
    """One tiny checkpoint of every supported family (random weights: they check mechanics, not judgement)."""
    from genret.mllm.tiny import build_tiny

    prompts = [t for name in ("rerank_pointwise", "rerank_listwise", "rerank_generative") for d in ("t2i", "i2t")
               for t in load_prompt(name).section(d).values()]
    texts = [c for r in world.records for c in r.captions] + prompts
    root = tmp_path_factory.mktemp("tiny")
    return {f: build_tiny(f, root / f, texts) for f in ("llava", "qwen2_vl", "idefics3")}


def _one_example_each_way(mode, small, clip_dir):
    """The mode's prompt, a t2i and an i2t training example mined on ``small``, its caption table and image paths."""
    from genret.encoders import load_encoder
    from genret.training import rerank as tr
    from genret.training.negatives import caption_table, mine_negatives

    groups, _ = mine_negatives(load_encoder("hf", str(clip_dir)), small, 4)
    examples = tr.epoch_examples(groups, _config(mode=mode), 0)
    texts, _ = caption_table(small)
    return (load_prompt(f"rerank_{mode}"), [next(e for e in examples if e.direction == d) for d in ("t2i", "i2t")],
            texts, [str(r.path) for r in small.records])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
@pytest.mark.parametrize("mode", ["pointwise", "listwise", "generative"])
def test_training_scores_are_the_stage_scores(tiny_dirs, small, clip_dir, family, mode):
    """The loss is taken on exactly what the rerank stage reads at inference: same prompts, positions, answer."""
    from peft import LoraConfig, get_peft_model

    from genret.mllm.adapters import language_model_targets
    from genret.training import rerank as tr

    mllm = MLLM.load(str(tiny_dirs[family]))
    torch.manual_seed(0)
    lora = LoraConfig(r=4, init_lora_weights=False, target_modules=language_model_targets(mllm.model, ("q_proj", "o_proj")))
    mllm.model = get_peft_model(mllm.model, lora).eval()
    prompt, examples, texts, paths = _one_example_each_way(mode, small, clip_dir)
    feats = dict(enumerate(training_features(mllm, paths)))
    batch = tr._Batch(mllm, mllm.model, prompt, texts, paths, feats)
    with torch.no_grad():  # both examples in one batch: padding must change nothing
        if mode == "pointwise":
            got = tr.pointwise_scores(batch, examples, "yes", "no")
        elif mode == "generative":
            got = tr.generative_scores(batch, examples)
        else:
            got = tr.listwise_logprobs(batch, examples)
    for row, e in enumerate(examples):
        section = prompt.section(e.direction)
        t2i = e.direction == "t2i"
        cands = [feats[c] for c in e.candidates] if t2i else [texts[c] for c in e.candidates]
        if mode in ("pointwise", "generative"):
            scorer = pointwise_scores if mode == "pointwise" else generative_scores
            want = scorer(mllm, section["user"], [texts[e.query]] * 4 if t2i else cands,
                          cands if t2i else [feats[e.query]] * 4)
            assert got[row].tolist() == pytest.approx(want, abs=1e-4)
        else:
            query = {"text": texts[e.query]} if t2i else {"image": feats[e.query]}
            want = listwise_scores(mllm, section["user"], section["item"], query, cands, "image" if t2i else "text")
            assert got[row].tolist() == pytest.approx(want, abs=1e-4)  # every candidate, not only the right one


def test_resume_gives_the_adapter_of_an_uninterrupted_run(mllm_dir, small, clip_dir, tmp_path):
    config = _config(directions="both", batch_size=4, max_steps=6, save_every=2, lora_dropout=0.1, lr=5e-3,
                     warmup=0.2, eval_every=0, log_every=3)
    whole, _ = _train(mllm_dir, small, tmp_path / "whole", config, prefilter=str(clip_dir))

    def crash(state):
        if state["step"] == 5:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        train_rerank(str(mllm_dir), small, tmp_path / "cut", config, prefilter=str(clip_dir), progress=False, on_step=crash)
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step-0000004"]
    with pytest.raises(ValueError, match="holds checkpoints of an unfinished run.*--resume"):
        train_rerank(str(mllm_dir), small, tmp_path / "cut", config, prefilter=str(clip_dir), progress=False)
    with pytest.raises(ValueError, match="made with lr = 0.005, this run has 0.001"):
        train_rerank(str(mllm_dir), small, tmp_path / "cut", replace(config, lr=1e-3), prefilter=str(clip_dir),
                     progress=False, resume=True)
    resumed = train_rerank(str(mllm_dir), small, tmp_path / "cut", config, prefilter=str(clip_dir), progress=False,
                           resume=True)
    a = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["history"] == whole["history"] and resumed["steps"] == 6
    with pytest.raises(ValueError, match="nothing to resume: the run there has finished"):
        train_rerank(str(mllm_dir), small, tmp_path / "cut", config, prefilter=str(clip_dir), progress=False, resume=True)


def test_cli_trains_and_the_stage_uses_the_adapter(world_dir, world, mllm_dir, clip_dir, encoder, tmp_path, capsys):
    out = tmp_path / "lora"
    args = ["-q", "train", "rerank", "--data", str(world_dir), "--base", str(mllm_dir), "--clip", str(clip_dir),
            "--out", str(out), "--mode", "listwise", "--max-steps", "2", "--batch-size", "2", "--negatives", "2",
            "--mine-k", "4", "--eval-queries", "3", "--eval-k", "3", "--lora-targets", "q_proj,v_proj"]
    assert main(args + ["--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["mode"] == "listwise" and summary["config"]["lora_targets"] == "q_proj,v_proj"
    assert summary["data"]["queries"] == 96 * 6  # every caption (t2i) and every image (i2t) of the training split
    assert main(args + ["--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err

    stages = ({"type": "prefilter", "k": 4}, {"type": "rerank", "model": str(mllm_dir), "mode": "listwise", "k": 4,
                                               "adapter": str(out)})
    pipe = RetrievalPipeline(PipelineConfig(encoder=EncoderConfig(model="x"), stages=stages), encoder=encoder)
    pipe.index(world.split("test"), progress=False)
    assert pipe.stages[1].mllm.active_adapters == ["lora"]
    rec = world.split("test").records[0]
    results = pipe.search([Query(id="t", text=rec.captions[0]), Query(id="i", image=str(rec.path))], k=4)
    assert all(len(r.candidates) == 4 and "rerank" in r.candidates[0].scores for r in results)

    wrong = ({"type": "prefilter", "k": 4}, {"type": "rerank", "model": str(mllm_dir), "mode": "pointwise", "adapter": str(out)})
    with pytest.raises(ValueError, match="a 'listwise' rerank adapter, used in 'pointwise' mode"):  # as it is built
        RetrievalPipeline(PipelineConfig(encoder=EncoderConfig(model="x"), stages=wrong), encoder=encoder)


@pytest.mark.parametrize("table,match", [
    ({"mode": "sideways"}, "mode must be one of pointwise, listwise, generative"),
    ({"mode": "generative", "temperature": 0}, "temperature must be positive, got 0"),
    ({"lr": 0}, "lr must be positive, got 0"),
    ({"lm_weight": -1}, "lm_weight must not be negative"),
    ({"negatives": 9, "mine_k": 5}, "mine_k \\(5\\) must be at least negatives \\(9\\)"),
    ({"directions": "up"}, "directions must be one of"),
    ({"lora_dropout": 1.5}, "lora_dropout must be in \\[0, 1\\), got 1.5"),
    ({"warmup": 1}, "warmup must be in \\[0, 1\\), got 1"),
    ({"batch_size": 0}, "batch_size must be at least 1"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be at least 1"),
    ({"mixed_precision": "fp8"}, "mixed_precision must be one of auto, no, bf16, fp16, got 'fp8'"),
    ({"report_to": "tensorboard,nope"}, "report_to names 'nope'; choose from tensorboard"),
    ({"dtype": "int3"}, "dtype must be one of auto, float32"),
    ({"false_negatives": 1.5}, "false_negatives must be a cosine in \\[0, 1\\] \\(0: off\\), got 1.5"),
    ({"permutations": 0}, "permutations must be at least 1"),
    ({"permutations": 2, "mode": "pointwise"}, "above 1 only with mode listwise"),
    ({"permutations": 9, "mode": "listwise", "negatives": 3, "mine_k": 4}, "must not exceed the candidates per query"),
])
def test_bad_configs_are_refused(table, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(RerankTrainConfig, table)


@pytest.mark.parametrize("name", ["llava-1.5-7b-hf", "qwen2-vl-2b-instruct",
                                  pytest.param("qwen3.5-0.8b", marks=pytest.mark.slow)])  # Gated-DeltaNet LoRA
def test_listwise_trains_on_numbers_that_share_their_first_token(real_dirs, small, clip_dir, tmp_path, name):
    """Sentencepiece writes every number after ``ASSISTANT:`` as ``▁`` + digits, Qwen splits ``10`` into ``1`` ``0``:
    the old first-token loss refused both (llava-1.5 at any k >= 2); the loss is now on each whole number."""
    from genret.mllm.scoring import number_answers

    mllm = MLLM.load(str(real_dirs[name]))
    answers = number_answers(mllm, render(mllm, user_message("Which?")), 10)
    assert len({a[0] for a in answers}) < 10  # the first tokens clash: 1 and 10, or every number's "▁"
    summary = train_rerank(str(real_dirs[name]), small, tmp_path / "x",
                           _config(mode="listwise", negatives=9, mine_k=9, max_steps=2, batch_size=2, eval_every=0),
                           prefilter=str(clip_dir), progress=False)
    assert summary["steps"] == 2 and all(math.isfinite(h["loss"]) for h in summary["history"] if "loss" in h)


def test_qlora_without_bitsandbytes_says_what_to_install(mllm_dir, small, clip_dir, tmp_path, monkeypatch):
    import genret.mllm.backend as backend

    monkeypatch.setattr(backend, "bitsandbytes_available", lambda: False)  # it is installed here
    with pytest.raises(ImportError, match="pip install 'genret\\[quant\\]'"):
        train_rerank(str(mllm_dir), small, tmp_path / "x", _config(load_in_4bit=True), prefilter=str(clip_dir),
                     progress=False)


def test_qlora_trains_in_4bit_and_the_adapter_loads_on_the_full_base(tmp_path, small, clip_dir):
    """The code path a CUDA user runs (4-bit NF4 base, k-bit preparation, checkpointing), here on the CPU."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoProcessor, CLIPConfig, CLIPModel

    from genret.training.mini_mllm import MiniMLLMConfig, build_mini_mllm

    # bitsandbytes' CPU kernels need layers at least 64 wide; the session's tiny models are 32.
    processor = AutoProcessor.from_pretrained(clip_dir)
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(text_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                                             "num_attention_heads": 2, "vocab_size": len(processor.tokenizer)},
                                vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                                               "num_attention_heads": 2, "image_size": 64, "patch_size": 16}))
    clip.save_pretrained(tmp_path / "clip64")
    processor.save_pretrained(tmp_path / "clip64")
    texts = [c for r in small.records for c in r.captions] + ["Does the image match the text? Answer yes or no."]
    model, proc = build_mini_mllm(tmp_path / "clip64", texts, MiniMLLMConfig(hidden_size=64, layers=1, heads=2,
                                                                           intermediate_size=128, vocab_size=300))
    model.save_pretrained(tmp_path / "base")
    proc.save_pretrained(tmp_path / "base")
    config = _config(load_in_4bit=True, gradient_checkpointing=True, max_steps=2, eval_every=0)
    summary = train_rerank(str(tmp_path / "base"), small, tmp_path / "q", config, prefilter=str(clip_dir), progress=False)
    assert summary["config"]["load_in_4bit"] and summary["steps"] == 2
    full = MLLM.load(str(tmp_path / "base"))
    assert full.attach_adapter(tmp_path / "q", mode="pointwise") == "q"  # same base weights: same fingerprint
    quantized = MLLM.load(str(tmp_path / "base"), load_in_4bit=True)
    quantized.attach_adapter(tmp_path / "q", mode="pointwise")


def test_the_summary_record_reads_every_mode_and_renders_its_val_figures(runs):
    from genret.training.summary import TrainSummary

    for mode, (out, manifest, _) in runs.items():
        s = TrainSummary.from_manifest(manifest)
        assert (s.task, s.mode, s.steps) == ("rerank", mode, manifest["steps"])
        assert s.loss_first == manifest["metrics"]["loss_first"]
        for direction, m in manifest["metrics"]["val"].items():
            assert s.figures[f"val, {direction}"]["rerank_R@1"] == m["rerank_R@1"]
        text = s.render(str(out))
        assert text.startswith(f"saved {out}: rerank ({mode}), {s.steps} steps") and "val, t2i: " in text


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
def test_vision_adaptation_finds_each_familys_tower_and_projector(tiny_dirs, family):
    import re

    from genret.mllm.adapters import lora_modules, vision_side

    mllm = MLLM.load(str(tiny_dirs[family]))
    tower, projector = vision_side(mllm.model, mllm.family)
    names = {n: m for n, m in mllm.model.named_modules()}
    linear = [n for n, m in names.items() if isinstance(m, torch.nn.Linear)]
    for vision in ("none", "projector", "tower"):
        pattern, save = lora_modules(mllm.model, mllm.family, ("q_proj", "v_proj"), vision)
        hit = {n for n in linear if re.fullmatch(pattern, n)}
        in_tower = {n for n in hit if n.startswith(tower + ".")}
        assert any(n.endswith("q_proj") for n in hit - in_tower)  # the language model's targets, always
        assert bool(in_tower) == (vision == "tower") and not any(n.startswith(projector + ".") for n in hit)
        assert save == (None if vision == "none" else [projector])
    with pytest.raises(ValueError, match="vision adaptation 'eyes' is unknown; choose one of none, projector, tower"):
        lora_modules(mllm.model, mllm.family, ("q_proj",), "eyes")


@pytest.mark.parametrize("family,mode", [("llava", "pointwise"), ("llava", "listwise"), ("llava", "generative"),
                                         ("qwen2_vl", "pointwise"), ("idefics3", "listwise")])
def test_training_through_the_vision_side_scores_what_the_stage_scores(tiny_dirs, small, clip_dir, family, mode):
    """With the vision side trained, the loss runs the pixels through it; the stage scores the adapter's features."""
    from peft import LoraConfig, get_peft_model

    from genret.mllm.adapters import lora_modules
    from genret.training import rerank as tr

    mllm = MLLM.load(str(tiny_dirs[family]))
    base_feats = image_features(mllm, [str(small.records[0].path)])[0]
    pattern, save = lora_modules(mllm.model, mllm.family, ("q_proj",), "tower")
    torch.manual_seed(0)
    mllm.model = get_peft_model(mllm.model, LoraConfig(r=4, init_lora_weights=False, target_modules=pattern,
                                                       modules_to_save=save)).eval()
    with torch.no_grad():  # the projector's trained copy differs from the base's
        for n, p in mllm.model.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.05 * torch.randn_like(p))
    prompt, examples, texts, paths = _one_example_each_way(mode, small, clip_dir)
    feats = dict(enumerate(training_features(mllm, paths)))  # with the adapter: what the stage caches
    assert not torch.allclose(feats[0], base_feats.to(feats[0].dtype), atol=1e-3)
    batch = tr._Batch(mllm, mllm.model, prompt, texts, paths, None, vision="tower")
    with torch.no_grad():
        got = {"pointwise": lambda: tr.pointwise_scores(batch, examples, "yes", "no"),
               "generative": lambda: tr.generative_scores(batch, examples),
               "listwise": lambda: tr.listwise_logprobs(batch, examples)}[mode]()
    cached = tr._Batch(mllm, mllm.model, prompt, texts, paths, feats)
    with torch.no_grad():
        want = {"pointwise": lambda: tr.pointwise_scores(cached, examples, "yes", "no"),
                "generative": lambda: tr.generative_scores(cached, examples),
                "listwise": lambda: tr.listwise_logprobs(cached, examples)}[mode]()
    assert torch.allclose(got, want, atol=1e-4), (got, want)


@pytest.fixture(scope="module")
def projector_run(tmp_path_factory, judge_dir, small, world, clip_dir):
    out = tmp_path_factory.mktemp("vision") / "projector"
    return out, *_train(judge_dir, small, out, _config(mode="pointwise", vision="projector", max_steps=12,
                                                        eval_every=6), prefilter=str(clip_dir), val=world.split("val"))


def test_a_projector_adapter_trains_and_the_stage_keys_its_gallery_features_by_it(
        projector_run, runs, judge_dir, world, encoder, tmp_path, caplog):
    out, summary, losses = projector_run
    assert summary["vision"] == "projector" and len(losses) == 12 and all(math.isfinite(x) for x in losses)
    weights = load_file(str(out / "adapter_model.safetensors"))
    trained = [k for k in weights if "multi_modal_projector" in k]
    assert trained and any("lora_" in k for k in weights)
    base = load_file(str(judge_dir / "model.safetensors"))
    name = next(k for k in trained if k.endswith("linear_1.weight"))
    assert not torch.allclose(weights[name], base[next(k for k in base if k.endswith("multi_modal_projector.linear_1.weight"))])

    def pipe(adapter):
        stages = ({"type": "prefilter", "k": 4}, {"type": "rerank", "model": str(judge_dir), "mode": "pointwise",
                                                   "k": 4, **({"adapter": str(adapter)} if adapter else {})})
        return RetrievalPipeline(PipelineConfig(encoder=EncoderConfig(model="x"), stages=stages), encoder=encoder)

    test = world.split("test")
    adapted = pipe(out)
    adapted.index(test, progress=False)
    stage = adapted.stages[1]
    first = next(iter(stage.features))
    path = adapted.gallery.items["image"][first].image
    assert torch.allclose(stage.features[first], image_features(stage.mllm, [load_image(path)])[0], atol=1e-5)
    adapted.save(tmp_path / "adapted")
    plain = pipe(None)
    plain.index(test, progress=False)
    plain.save(tmp_path / "plain")
    assert not torch.allclose(plain.stages[1].features[first], stage.features[first], atol=1e-4)
    lang_only = pipe(runs["pointwise"][0])  # a language-only adapter: the base's cached features serve it
    lang_only.stages[1].load_state(tmp_path / "plain" / "stages" / "rerank")
    assert len(lang_only.stages[1].features) == len(test)

    caplog.clear()
    crossed = pipe(out)  # the base's cache is refused for the projector adapter, and the other way round
    crossed.stages[1].load_state(tmp_path / "plain" / "stages" / "rerank")
    assert not crossed.stages[1].features and "cached features were made with adapter none" in caplog.text
    base_stage = pipe(None).stages[1]
    base_stage.load_state(tmp_path / "adapted" / "stages" / "rerank")
    assert not base_stage.features
    again = pipe(out).stages[1]
    again.load_state(tmp_path / "adapted" / "stages" / "rerank")
    assert set(again.features) == set(stage.features)
    assert torch.equal(again.features[first], stage.features[first])


def _checkpointing_on(model) -> bool:
    """Whether a layer of ``model`` recomputes its activations in backward (transformers' own flag)."""
    return any(getattr(m, "gradient_checkpointing", False) and m.training for m in model.modules())


@pytest.mark.parametrize("family,mode", [("llava", "listwise"),
                                         pytest.param("qwen2_vl", "listwise", marks=pytest.mark.slow),
                                         pytest.param("idefics3", "listwise", marks=pytest.mark.slow),
                                         pytest.param("qwen2_vl", "pointwise", marks=pytest.mark.slow),
                                         pytest.param("llava", "generative", marks=pytest.mark.slow)])
def test_gradient_checkpointing_trains_on_the_same_scores_and_gradients(tiny_dirs, small, clip_dir, family, mode):
    """Under gradient checkpointing transformers keeps no KV cache in a training forward, and the listwise loss
    continued the prompt's cache with the answers (``'NoneType' object has no attribute 'batch_repeat_interleave'``
    on step 1). Every mode's training scores and LoRA gradients must equal those of the same model without it."""
    from peft import LoraConfig, get_peft_model

    from genret.mllm import scoring
    from genret.mllm.adapters import language_model_targets
    from genret.training import rerank as tr
    from genret.training.models import enable_checkpointing

    prompt, examples, texts, paths = _one_example_each_way(mode, small, clip_dir)
    got = []
    for checkpointing in (False, True):
        mllm = MLLM.load(str(tiny_dirs[family]))
        if checkpointing:
            enable_checkpointing(mllm.model)
        torch.manual_seed(0)
        lora = LoraConfig(r=4, init_lora_weights=False, lora_dropout=0.0,
                          target_modules=language_model_targets(mllm.model, ("q_proj", "v_proj", "o_proj")))
        mllm.model = get_peft_model(mllm.model, lora).train()
        assert _checkpointing_on(mllm.model) is checkpointing  # the path under test is the one that runs
        assert scoring.keeps_cache(mllm.model) is not checkpointing
        with torch.no_grad():  # no backward to replay the layers: transformers keeps the cache
            assert scoring.keeps_cache(mllm.model)
        feats = dict(enumerate(training_features(mllm, paths)))
        batch = tr._Batch(mllm, mllm.model, prompt, texts, paths, feats)
        scores = {"pointwise": lambda: tr.pointwise_scores(batch, examples, "yes", "no"),
                  "generative": lambda: tr.generative_scores(batch, examples),
                  "listwise": lambda: tr.listwise_logprobs(batch, examples)}[mode]()
        (scores * torch.arange(1.0, scores.numel() + 1).view_as(scores)).sum().backward()
        grads = {n: p.grad.clone() for n, p in mllm.model.named_parameters() if p.requires_grad}
        got.append((scores.detach(), grads))
    (plain, plain_grads), (checkpointed, checkpointed_grads) = got
    assert torch.allclose(checkpointed, plain, atol=1e-5), (checkpointed, plain)
    assert plain_grads.keys() == checkpointed_grads.keys() and any(g.abs().sum() > 0 for g in plain_grads.values())
    for name, grad in plain_grads.items():  # the same sums in another order: float rounding, relative to the size
        assert torch.allclose(checkpointed_grads[name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max())), name


def test_listwise_trains_under_gradient_checkpointing(mllm_dir, small, clip_dir, tmp_path):
    """``genret train rerank --mode listwise --gradient-checkpointing`` crashed on step 1; it trains (its scores
    and gradients equal those without checkpointing: the test above)."""
    config = _config(mode="listwise", max_steps=2, batch_size=2, eval_every=0, gradient_checkpointing=True)
    summary, losses = _train(mllm_dir, small, tmp_path / "out", config, prefilter=str(clip_dir))
    assert summary["steps"] == 2 and summary["config"]["gradient_checkpointing"]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    assert MLLM.load(str(mllm_dir)).attach_adapter(tmp_path / "out", mode="listwise") == "out"


def test_listwise_permutations_move_the_positive_and_keep_the_candidates():
    from genret.training.rerank import Example, permuted

    examples = [Example("t2i", 5, (10, 11, 12, 13, 14, 15, 16, 17), 2), Example("i2t", 1, (3, 4, 5, 6), 0)]
    out = permuted(examples, 3, seed=0)
    assert len(out) == 6 and out[0] == examples[0] and out[3] == examples[1]
    for e, copies in ((examples[0], out[:3]), (examples[1], out[3:])):
        positive = e.candidates[e.target]
        assert all(sorted(c.candidates) == sorted(e.candidates) and c.candidates[c.target] == positive
                   and (c.direction, c.query) == (e.direction, e.query) for c in copies)
        assert len({c.target for c in copies}) == 3  # the positive at three numbers
    assert permuted(examples, 3, seed=0) == out and permuted(examples, 3, seed=1) != out
    assert permuted(examples, 1, seed=0) == examples


def test_false_negative_filtering_drops_near_duplicates_of_the_positive(_encoder, world):
    import numpy as np

    from genret.training.negatives import embed_as, mine_negatives

    train = world.split("train")
    plain, stats = mine_negatives(_encoder, train, k=4)
    assert "dropped_as_duplicates" not in stats["t2i"]
    images = embed_as(_encoder, "image", [str(r.path) for r in train.records], ("document",))["document"]
    images = images / np.linalg.norm(images, axis=1, keepdims=True)
    cosines = [float(images[g.positives[0]] @ images[n]) for g in plain if g.direction == "t2i" for n in g.negatives]
    threshold = float(np.median(cosines))  # half the mined images are nearer the positive than this
    filtered, stats = mine_negatives(_encoder, train, k=4, duplicate_threshold=threshold)
    assert 0 < stats["t2i"]["dropped_as_duplicates"] < 100 and stats["t2i"]["duplicate_threshold"] == threshold
    for g in (g for g in filtered if g.direction == "t2i"):
        assert all(float(images[g.positives[0]] @ images[n]) < threshold for n in g.negatives)
    kept = [n for g in filtered if g.direction == "t2i" for n in g.negatives]
    assert kept and len(kept) <= sum(len(g.negatives) for g in plain if g.direction == "t2i")
    assert [g.positives for g in filtered] == [g.positives for g in plain]


def test_listwise_trains_on_several_orders_and_filtered_negatives(judge_dir, small, clip_dir, tmp_path):
    config = _config(mode="listwise", permutations=2, false_negatives=0.999, max_steps=3, eval_every=0)
    summary, losses = _train(judge_dir, small, tmp_path / "lw", config, prefilter=str(clip_dir))
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert summary["config"]["permutations"] == 2
    assert summary["data"]["mining"]["i2t"]["duplicate_threshold"] == 0.999


def test_twin_negatives_are_drawn_once_per_image_never_held_out_and_replace_a_negative(small, world):
    from genret.data.annotations import annotation_of, signatures
    from genret.training.negatives import QueryGroup, caption_table
    from genret.training.rerank import draw_twins, epoch_examples

    config = _config(twin_negatives=1.0, directions="both")
    texts, images = caption_table(small)[0], [str(r.path) for r in small.records]
    n_texts, n_images = len(texts), len(images)
    held = signatures(world.split("val", "test").records)
    twins = draw_twins(small, config, held, texts, images)
    assert set(twins) == {(d, i) for d in ("t2i", "i2t") for i in range(len(small))}  # every scene has a twin
    kind = annotation_of(small.records[0].meta)[1]
    for i, record in enumerate(small.records):
        value = annotation_of(record.meta)[2]
        assert twins["t2i", i] >= n_images and twins["i2t", i] >= n_texts
        caption = texts[twins["i2t", i]]  # a caption of one of the scene's twins (the same words, bound otherwise)
        assert caption not in record.captions
        assert any(caption in t.all_captions() for t in kind.twins(value) if kind.signature(t) not in held)
    texts2, images2 = caption_table(small)[0], [str(r.path) for r in small.records]
    assert draw_twins(small, config, held, texts2, images2) == twins  # seeded per image: a resumed run draws the same
    assert texts2[n_texts:] == texts[n_texts:]
    assert [im.tobytes() for im in images2[n_images:]] == [im.tobytes() for im in images[n_images:]]
    only_i2t = draw_twins(small, _config(twin_negatives=1.0), held, caption_table(small)[0], [])
    assert set(only_i2t) == {("i2t", i) for i in range(len(small))}  # nothing drawn that no query asks for
    # a held-out scene is never drawn: hold out every twin the first image has, and it gets none
    value = annotation_of(small.records[0].meta)[2]
    avoid = frozenset(kind.signature(t) for t in kind.twins(value))
    fewer = draw_twins(small, config, avoid, caption_table(small)[0], [str(r.path) for r in small.records])
    assert ("t2i", 0) not in fewer and ("t2i", 1) in fewer
    groups = [QueryGroup("t2i", 0, (0,), (1, 2, 3, 4)), QueryGroup("i2t", 1, (5, 6), (7, 8, 9, 10))]
    with_twins = epoch_examples(groups, config, 0, twins)
    plain = epoch_examples(groups, _config(), 0)
    by_query = {(g.direction, g.query): g for g in groups}
    for e in with_twins:
        g, image = by_query[e.direction, e.query], (e.query if e.direction == "i2t" else 0)
        rest = [c for k, c in enumerate(e.candidates) if k != e.target]
        assert e.candidates[e.target] in g.positives and len(e.candidates) == config.negatives + 1
        assert twins[e.direction, image] in rest  # one negative gave way to the twin, the others mined
        assert len(set(rest) & set(g.negatives)) == config.negatives - 1
    assert epoch_examples(groups, config, 0, twins) == with_twins  # a pure function of (seed, epoch)
    assert epoch_examples(groups, _config(twin_negatives=0.0), 0, twins) == plain
    with pytest.raises(ValueError, match="twin_negatives must be a share in \\[0, 1\\], got 2"):
        _config(twin_negatives=2)


def test_twin_negatives_train_and_need_the_held_out_splits(judge_dir, small, world, clip_dir, tmp_path):
    config = _config(mode="generative", twin_negatives=1.0, max_steps=2, eval_every=0, directions="both")
    with pytest.raises(ValueError, match="give held_out"):
        _train(judge_dir, small, tmp_path / "no", config, prefilter=str(clip_dir))
    bare = replace(small, records=tuple(replace(r, meta={}) for r in small.records))
    with pytest.raises(ValueError, match="these records carry none: set twin_negatives to 0"):
        _train(judge_dir, bare, tmp_path / "no", config, prefilter=str(clip_dir), held_out=world.split("val"))
    summary, losses = _train(judge_dir, small, tmp_path / "tw", config, prefilter=str(clip_dir),
                             held_out=world.split("val", "test"))
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert summary["data"]["twins_drawn"] == len(small) and summary["config"]["twin_negatives"] == 1.0
    assert summary["data"]["captions"] == sum(len(r.captions) for r in small.records)
