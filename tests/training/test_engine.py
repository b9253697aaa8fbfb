"""The training engine every trainer runs on: accumulation, parameter groups, mixed precision, trackers, resume.

The first tests drive the engine with a small torch model (each property on its own, in a second); the
last ones run the trainers themselves on the tiny fixtures.
"""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from genret.training.engine import Engine, flat_metrics, lr_factor
from genret.training.options import TrainOptions

DIM = 6


def _data(n: int = 64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=gen)
    return x, x @ torch.arange(1.0, DIM + 1) + 0.1 * torch.randn(n, generator=gen)


def _fit(out, options: TrainOptions, *, steps: int = 6, resume: bool = False, on_step=None, hook=None):
    """A small regression trained by the engine; each step takes the next ``batch_size x chunks`` rows."""
    x, y = _data()
    engine = Engine("toy", options, out, resume=resume, progress=False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(DIM, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    if hook is not None:
        model[0].register_forward_hook(hook)
    wrapped = engine.prepare(model, [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.05}])
    per = options.batch_size

    def draw(step):
        rows = [(step * engine.rows_per_step + i) % len(x) for i in range(engine.rows_per_step)]
        return [rows[c * per:(c + 1) * per] for c in range(engine.chunks)]

    def loss(rows):
        return ((wrapped(x[rows]).squeeze(1) - y[rows]) ** 2).mean()

    def evaluate():
        with torch.no_grad():
            return {"val": {"mse": float(loss(list(range(8))))}}

    run = engine.fit(steps, draw, loss, on_step=on_step, evaluate=evaluate,
                     identity={"config": {"lr": options.lr}})
    engine.save(lambda folder: (folder / "genret.json").write_text(json.dumps({"format": "toy", **run.summary(options)})),
                ("toy",))
    return engine, run, {n: p.detach().clone() for n, p in engine.unwrapped.named_parameters()}


def _options(**overrides) -> TrainOptions:
    return TrainOptions(**{"batch_size": 8, "lr": 0.02, "warmup": 0.0, "log_every": 1, "save_every": 0, **overrides})


def test_four_accumulated_micro_batches_of_two_train_what_one_batch_of_eight_does(tmp_path):
    _, whole, a = _fit(tmp_path / "a", _options())
    engine, accumulated, b = _fit(tmp_path / "b", _options(batch_size=2, gradient_accumulation_steps=4))
    assert engine.chunks == 4 and engine.rows_per_step == 8
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)
    assert accumulated.losses == pytest.approx(whole.losses, rel=1e-5)  # the history rounds to 4 decimals
    _, _, c = _fit(tmp_path / "c", _options(batch_size=2))  # the check can fail: a batch of 2 trains otherwise
    assert not all(torch.allclose(a[n], c[n], atol=1e-4) for n in a)


def test_each_parameter_group_keeps_its_own_rate_under_the_schedule(tmp_path, monkeypatch):
    seen, made = [], []
    prepare = Engine.prepare
    monkeypatch.setattr(Engine, "prepare", lambda self, *a, **k: (made.append(self), prepare(self, *a, **k))[1])

    def record(info):
        groups = made[0].optimizer.param_groups
        seen.append((info["step"], groups[0]["lr"], groups[1]["lr"]))

    _fit(tmp_path / "a", _options(warmup=0.25, lr=0.02), steps=8, on_step=record)
    for step, lr0, lr1 in seen:
        factor = lr_factor(step - 1, 8, 0.25)
        assert lr0 == pytest.approx(0.02 * factor) and lr1 == pytest.approx(0.05 * factor)
    assert seen[0][1] == pytest.approx(0.01) and seen[1][1] == pytest.approx(0.02)  # warm-up, then the peak


def test_bf16_mixed_precision_runs_the_forward_in_bf16_and_keeps_float32_weights(tmp_path):
    if not torch.amp.autocast_mode.is_autocast_available("cpu"):
        pytest.skip("no CPU autocast in this torch")
    dtypes = []
    engine, run, weights = _fit(tmp_path / "a", _options(mixed_precision="bf16"),
                                hook=lambda module, inputs, output: dtypes.append(output.dtype))
    assert engine.mixed_precision == "bf16" and run.speed()["mixed_precision"] == "bf16"
    assert set(dtypes) == {torch.bfloat16}  # the layers ran under autocast
    assert all(w.dtype == torch.float32 for w in weights.values()) and all(map(torch.isfinite, map(torch.tensor, run.losses)))
    _, plain, _ = _fit(tmp_path / "b", _options(mixed_precision="no"), hook=lambda m, i, o: dtypes.append(o.dtype))
    assert dtypes[-1] == torch.float32 and plain.speed()["mixed_precision"] == "no"
    assert run.losses != plain.losses  # bf16 rounding shows


def test_auto_mixed_precision_is_off_on_the_cpu_and_bf16_on_a_gpu_that_has_it(monkeypatch):
    from genret.training import options

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert options.resolve_mixed_precision("auto") == "no"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert options.resolve_mixed_precision("auto") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert options.resolve_mixed_precision("auto") == "fp16" and options.resolve_mixed_precision("no") == "no"


def test_tensorboard_gets_the_history_and_its_logs_end_in_the_result(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run, _ = _fit(tmp_path / "a", _options(report_to="tensorboard", eval_every=3))
    assert run.logs == "logs/toy"
    events = list((tmp_path / "a" / "logs" / "toy").glob("events.out.tfevents.*"))
    assert events, sorted(p.name for p in (tmp_path / "a").rglob("*"))
    acc = EventAccumulator(str(events[0].parent)).Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert loss == [(h["step"], pytest.approx(h["loss"], abs=1e-4)) for h in run.history if "loss" in h]
    assert [e.step for e in acc.Scalars("eval/val/mse")] == [3, 6]
    assert [e.value for e in acc.Scalars("train/lr")][0] == pytest.approx(0.02)


def test_a_tracker_that_is_not_installed_is_named(tmp_path, monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "filter_trackers", lambda *a, **k: [])
    with pytest.raises(ImportError, match="report_to 'wandb': the wandb package is not installed"):
        Engine("toy", _options(report_to="wandb"), tmp_path / "a", progress=False)


def test_an_interrupted_run_resumes_on_the_same_loss_curve(tmp_path):
    _, whole, a = _fit(tmp_path / "whole", _options(save_every=2), steps=7)

    def crash(info):
        if info["step"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "cut", _options(save_every=2), steps=7, on_step=crash)
    with pytest.raises(ValueError, match="made with lr = 0.02, this run has 0.03"):
        _fit(tmp_path / "cut", _options(save_every=2, lr=0.03), steps=7, resume=True)
    _, resumed, b = _fit(tmp_path / "cut", _options(save_every=2), steps=7, resume=True)
    assert resumed.first_step == 4 and resumed.history == whole.history
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not (tmp_path / "cut" / "checkpoints").exists()  # the result replaced the run's folder


def test_flat_metrics_are_the_numeric_leaves():
    assert flat_metrics({"t2i": {"R@1": 3, "name": "x"}, "n": 2.5, "ok": True}) == {"t2i/R@1": 3.0, "n": 2.5}


# --- the trainers themselves, on the tiny fixtures ---------------------------------------------------------


@pytest.fixture(scope="module")
def small(world):
    train = world.split("train")
    return replace(train, records=train.records[:8])


def _rerank(mllm_dir, small, clip_dir, out, **overrides):
    from genret.training.rerank import RerankTrainConfig, train_rerank

    settings = dict(negatives=3, mine_k=4, batch_size=8, directions="both", lr=1e-2, max_steps=3, warmup=0.0,
                    log_every=1, eval_every=0, save_every=0, mode="pointwise")
    config = RerankTrainConfig(**{**settings, **overrides})
    losses = []
    summary = train_rerank(str(mllm_dir), small, out, config, prefilter=str(clip_dir), progress=False,
                           on_step=lambda info: losses.append(info["loss"]))
    return {**summary, "losses": losses}


def _same(a, b, atol=1e-5):
    w1, w2 = (load_file(str(d / "adapter_model.safetensors")) for d in (a, b))
    return w1.keys() == w2.keys() and all(torch.allclose(w1[k], w2[k], atol=atol, rtol=1e-4) for k in w1)


@pytest.mark.parametrize("mode", ["pointwise", "generative"])
def test_rerank_accumulating_four_batches_of_two_equals_a_batch_of_eight(mllm_dir, small, clip_dir, tmp_path, mode):
    one = _rerank(mllm_dir, small, clip_dir, tmp_path / "one", mode=mode)
    acc = _rerank(mllm_dir, small, clip_dir, tmp_path / "acc", mode=mode, batch_size=2, gradient_accumulation_steps=4)
    assert acc["speed"]["rows_per_step"] == one["speed"]["rows_per_step"] == 8
    assert acc["losses"] == pytest.approx(one["losses"], abs=1e-5)
    assert _same(tmp_path / "one", tmp_path / "acc")


def test_grace_accumulating_two_batches_of_eight_equals_a_batch_of_sixteen(world, mllm_dir, clip_dir, tmp_path):
    from genret.training.grace import GraceTrainConfig, train_grace

    given = {r.id: r.captions[:1] for r in world.split("test").records}
    base = GraceTrainConfig(scheme="atomic", max_steps=3, batch_size=16, caption_tokens=2, eval_queries=2, num_beams=2,
                            save_every=0, warmup=0.0, log_every=1, lr=3e-3)
    losses = {"one": [], "acc": []}
    train_grace(mllm_dir, world, tmp_path / "one", base, prefilter=clip_dir, queries=given, progress=False,
                on_step=lambda info: losses["one"].append(info["loss"]))
    train_grace(mllm_dir, world, tmp_path / "acc", replace(base, batch_size=8, gradient_accumulation_steps=2),
                prefilter=clip_dir, queries=given, progress=False, on_step=lambda info: losses["acc"].append(info["loss"]))
    assert losses["acc"] == pytest.approx(losses["one"], abs=1e-5)
    assert _same(tmp_path / "one", tmp_path / "acc")


def test_rerank_in_bf16_autocast_trains_a_float32_adapter(mllm_dir, small, clip_dir, tmp_path):
    summary = _rerank(mllm_dir, small, clip_dir, tmp_path / "bf16", mixed_precision="bf16", max_steps=2)
    assert summary["speed"]["mixed_precision"] == "bf16" and summary["config"]["mixed_precision"] == "bf16"
    weights = load_file(str(tmp_path / "bf16" / "adapter_model.safetensors"))
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())
    plain = _rerank(mllm_dir, small, clip_dir, tmp_path / "plain", max_steps=2)
    assert plain["speed"]["mixed_precision"] == "no"  # auto on the CPU
    assert summary["history"][0]["loss"] == pytest.approx(plain["history"][0]["loss"], abs=0.05)
    assert summary["history"][0]["loss"] != plain["history"][0]["loss"]


def test_the_cli_logs_any_trainer_to_tensorboard(world_dir, mllm_dir, clip_dir, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from genret.cli import main

    out = tmp_path / "rw"
    assert main(["-q", "train", "rewriter", "--task", "chat", "--data", str(world_dir), "--base", str(mllm_dir),
                 "--out", str(out), "--max-steps", "3", "--batch-size", "4", "--rounds", "1", "--eval-triplets", "0",
                 "--log-every", "1", "--report-to", "tensorboard", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["logs"] == "logs/rewriter-chat" and summary["config"]["report_to"] == "tensorboard"
    assert list((out / "logs" / "rewriter-chat").glob("events.out.tfevents.*"))
    assert (out / "adapter_model.safetensors").is_file()


def test_clip_resumes_a_whole_model_run_on_the_same_curve(world, tmp_path):
    from conftest import TINY_CLIP
    from genret.training.clip import train_clip

    config = replace(TINY_CLIP, epochs=2, save_every=2, batch_size=16)
    whole = train_clip(world.split("train"), tmp_path / "whole", config, progress=False)

    def crash(info):
        if info["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_clip(world.split("train"), tmp_path / "cut", config, progress=False, on_step=crash)
    resumed = train_clip(world.split("train"), tmp_path / "cut", config, progress=False, resume=True)
    assert resumed["history"] == whole["history"] and resumed["steps"] == whole["steps"]
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("whole", "cut"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_rewriter_resumes_on_the_same_curve(world, mllm_dir, tmp_path):
    from genret.training.rewriter import RewriterTrainConfig, train_rewriter

    config = RewriterTrainConfig(task="chat", rounds=1, max_steps=5, batch_size=4, save_every=2, log_every=1,
                                 eval_triplets=0)
    whole = train_rewriter(mllm_dir, world, tmp_path / "whole", config, progress=False)

    def crash(info):
        if info["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_rewriter(mllm_dir, world, tmp_path / "cut", config, progress=False, on_step=crash)
    resumed = train_rewriter(mllm_dir, world, tmp_path / "cut", config, progress=False, resume=True)
    assert resumed["history"] == whole["history"]
    assert _same(tmp_path / "whole", tmp_path / "cut", atol=1e-6)


def test_auto_mixed_precision_never_gives_fp16_to_a_family_that_overflows_it(monkeypatch, caplog):
    """A T4 or V100 (no bf16): fp16 autocast for LLaVA, float32 for Qwen2-VL's and Gemma 3's families (their
    activations overflow fp16, transformers#33294), as the model's own dtype choice does; bf16 where the GPU has it."""
    from genret.mllm.families import FAMILIES
    from genret.training import options

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    got = {t: options.resolve_mixed_precision("auto", FAMILIES.get(t).fp16_safe) for t in FAMILIES.names()}
    assert got["llava"] == "fp16" and got["idefics3"] == "fp16"
    assert got["qwen2_vl"] == got["qwen2_5_vl"] == got["qwen3_vl"] == got["qwen3_5"] == got["gemma3"] == "no"
    assert "overflow float16" in caplog.text
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert {options.resolve_mixed_precision("auto", False), options.resolve_mixed_precision("auto", True)} == {"bf16"}


def test_a_trainer_resolves_mixed_precision_by_its_base_models_family(mllm_dir, real_dirs):
    """The engine asks the base model's family, read from its config before any weights load."""
    from genret.training import engine as engine_mod
    from genret.training.options import TrainOptions

    fp16 = TrainOptions(mixed_precision="fp16")
    assert engine_mod._fp16_safe(None, fp16) == (True, "the model")
    assert engine_mod._fp16_safe(mllm_dir, fp16) == (True, str(mllm_dir))  # the mini LLaVA
    assert engine_mod._fp16_safe(real_dirs["qwen2-vl-2b-instruct"], fp16)[0] is False
    # on the CPU auto needs no answer: the base is not even read (a trainer's own argument checks come first)
    assert engine_mod._fp16_safe("no/such-model", TrainOptions()) == (True, "no/such-model")


def test_a_checkpoint_from_before_a_setting_existed_resumes_at_its_default_only(tmp_path):
    from genret.training.engine import check_resume

    saved = {"config": {"lr": 0.001}, "arch": {"layers": 4}, "processes": 1}  # made before the new settings
    defaults = {"config": {"lr": 5e-4, "twin_negatives": 0.0}, "arch": {"layers": 4, "vision_layer": -1}}
    check_resume(saved, {"config": {"lr": 0.001, "twin_negatives": 0.0}, "arch": {"layers": 4, "vision_layer": -1},
                         "processes": 1}, tmp_path, defaults)
    with pytest.raises(ValueError, match="predates the setting twin_negatives \\(it ran as the default, 0.0\\); this "
                       "run has 0.5: resume with twin_negatives = 0.0"):
        check_resume(saved, {"config": {"lr": 0.001, "twin_negatives": 0.5}, "processes": 1}, tmp_path, defaults)
    with pytest.raises(ValueError, match="predates the setting vision_layer"):
        check_resume(saved, {"config": {"lr": 0.001}, "arch": {"layers": 4, "vision_layer": -2}, "processes": 1},
                     tmp_path, defaults)
    with pytest.raises(ValueError, match="made with lr = 0.001, this run has 0.0005"):
        check_resume(saved, {"config": {"lr": 5e-4, "twin_negatives": 0.0}, "processes": 1}, tmp_path, defaults)
    with pytest.raises(ValueError, match="twin_negatives = None"):  # without the defaults, any new setting refuses
        check_resume(saved, {"config": {"lr": 0.001, "twin_negatives": 0.0}, "processes": 1}, tmp_path)
    with pytest.raises(ValueError, match="made with vision_layer = None"):  # each key's own defaults only
        check_resume(saved, {"config": {"lr": 0.001}, "arch": {"layers": 4, "vision_layer": -1}, "processes": 1},
                     tmp_path, {"config": {"vision_layer": -1}})
