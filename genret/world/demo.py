"""``genret demo``: the miniature world end to end, each step through the same library calls as the CLI.

1. generate the world (Karpathy format);
2. the models: the shipped mini CLIP and mini MLLM (``adapters/mini-world/``, checked against the
   world by their manifest), or with ``train_clip`` a mini CLIP trained here;
3. the rerank LoRA: the shipped one, or a short pointwise one trained here on the training split (hard
   negatives from the CLIP) when none is shipped;
4. index the test split and evaluate prefilter → zero-shot rerank → LoRA rerank (the zero-shot stage in the
   LoRA's mode), each over the CLIP's top 10, both directions, with the twin check, and write the report;
5. query rewriting (:mod:`genret.world.demo_rewrite`): composed retrieval (CIReVL against its baselines, with the
   shipped rewriter LoRA, or one trained here when none is shipped) and interactive retrieval (chat,
   EIIRwQR), round by round.
Steps whose output already exists are reused unless ``fresh``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

from genret._io import ManifestError, read_json
from genret.config import write_config_file
from genret.data import load_dataset
from genret.world.synth import VERSION as WORLD_VERSION
from genret.world.synth import SynthConfig, generate_world
from genret.eval.evaluator import evaluate
from genret.eval.report import write_report
from genret.pipeline import RetrievalPipeline
from genret.training.clip import CLIPTrainConfig, train_clip

logger = logging.getLogger(__name__)

# Sized so that the whole demo, install included, stays under 10 minutes on 2 CPU cores.
DEMO_WORLD = SynthConfig()
DEMO_CLIP = CLIPTrainConfig(epochs=16)
RERANK_K = 10  # prefilter candidates each rerank stage judges


def demo_rerank_config():
    """The LoRA the demo trains: pointwise yes/no with prefilter-mined hard negatives, both directions."""
    from genret.training.rerank import RerankTrainConfig

    return RerankTrainConfig(mode="pointwise", max_steps=150, batch_size=8, negatives=7, mine_k=20,
                             eval_every=0, eval_queries=50, save_every=0)


def _stale(folder: Path, marker: str, expected: dict, fresh: bool) -> bool:
    """Whether ``folder`` must be (re)made: missing, asked fresh, or made with other settings."""
    path = folder / marker
    if fresh or not path.is_file():
        return True
    try:
        return read_json(path)["config"] != expected
    except (ValueError, KeyError):
        return True


def _models(out: Path, dataset, fresh: bool, train_clip_here: bool, progress: bool) -> tuple[Path, Path, dict]:
    """The CLIP, the MLLM and the shipped LoRAs of the rewrite stages (by part) the demo runs on (the CLIP
    shipped, or trained here on request)."""
    from genret.world.shipped import OPTIONAL_PARTS
    from genret.world.shipped import shipped_models

    try:
        shipped = shipped_models(WORLD_VERSION, asdict(DEMO_WORLD))
    except ManifestError as err:
        raise ManifestError(f"{err}\n(the demo needs the shipped mini MLLM; pretraining it takes 20-25 minutes: "
                           "scripts/make_mini_world_models.sh)") from None
    adapters = {part: shipped[part].resolve() for part in OPTIONAL_PARTS if part in shipped}
    if not train_clip_here:
        logger.info("2/5 using the shipped mini CLIP and mini MLLM in %s", shipped["clip"].parent)
        return shipped["clip"].resolve(), shipped["mllm"].resolve(), adapters
    clip_dir = out / "clip"
    if _stale(clip_dir, "genret.json", asdict(DEMO_CLIP), fresh):
        logger.info("2/5 training the mini CLIP (%d epochs)", DEMO_CLIP.epochs)
        train_clip(dataset.split("train"), clip_dir, DEMO_CLIP, val=dataset.split("val"), progress=progress)
    return clip_dir.resolve(), shipped["mllm"].resolve(), adapters


def _rerank_adapter(out: Path, adapters: dict, dataset, clip_dir: Path, mllm_dir: Path, fresh: bool,
                    progress: bool) -> tuple[Path, str]:
    """The rerank LoRA and its mode: the shipped one, else one trained here (reused while its settings hold)."""
    if "rerank" in adapters:
        mode = read_json(adapters["rerank"] / "genret.json")["mode"]
        logger.info("3/5 using the shipped %s rerank LoRA", mode)
        return adapters["rerank"], mode
    adapter, config = out / "rerank-lora", demo_rerank_config()
    if _stale(adapter, "genret.json", asdict(config), fresh) or \
            read_json(adapter / "genret.json").get("base_model") != str(mllm_dir):
        from genret.training.rerank import train_rerank

        logger.info("3/5 training the %s rerank LoRA (%d steps; none is shipped)", config.mode, config.max_steps)
        train_rerank(str(mllm_dir), dataset.split("train"), adapter, config, prefilter=str(clip_dir),
                     val=dataset.split("val"), progress=progress)
    return adapter, config.mode


DEMO_MARKER = ".genret-demo.json"


def _claim(out: Path) -> None:
    """Make ``out`` the demo's working folder, refusing a folder of other files (the demo writes loose files there)."""
    from genret._io import OutputError, write_json

    known = (out / DEMO_MARKER).is_file() or all((out / f).is_file() for f in (  # or a demo's, made before the marker
        "report/report.json", "world/dataset_synth.json", "pipeline.toml"))
    if out.is_dir() and any(out.iterdir()) and not known:
        raise OutputError(f"{out} exists and is not a folder genret demo made: name a new folder with --out "
                          "(nothing was written)")
    if not (out / DEMO_MARKER).is_file():
        write_json(out / DEMO_MARKER, {"format": "genret.demo", "owner": "genret"})


def run_demo(out: Path, fresh: bool = False, progress: bool = True, train_clip_here: bool = False,
             rerank: bool = True, rewrite: bool = True) -> dict:
    """Run the demo under ``out`` and return the evaluation report.

    Args:
        out: the working folder.
        fresh: redo every step.
        progress: progress bars.
        train_clip_here: train the mini CLIP (5 minutes) instead of using the shipped one.
        rerank: add the MLLM rerank stages (zero-shot and LoRA); off: the prefilter alone.
        rewrite: add the query-rewriting part (needs the MLLM, so only with ``rerank``).
    """
    _claim(out)
    timings = {}
    t0 = time.perf_counter()
    world = out / "world"
    if fresh or not _world_matches(world):
        logger.info("1/5 generating the miniature world in %s", world)
        generate_world(world, DEMO_WORLD, progress=progress)
    timings["data"] = time.perf_counter() - t0
    dataset = load_dataset(world)

    t0 = time.perf_counter()
    if rerank:
        clip_dir, mllm_dir, adapters = _models(out, dataset, fresh, train_clip_here, progress)
    else:
        clip_dir, mllm_dir, adapters = (out / "clip").resolve(), None, {}
        if _stale(clip_dir, "genret.json", asdict(DEMO_CLIP), fresh):
            logger.info("2/5 training the mini CLIP (%d epochs)", DEMO_CLIP.epochs)
            train_clip(dataset.split("train"), clip_dir, DEMO_CLIP, val=dataset.split("val"), progress=progress)
    timings["models"] = time.perf_counter() - t0

    stages: list[dict] = [{"type": "prefilter", "k": 100}]
    if rerank:
        t0 = time.perf_counter()
        adapter, mode = _rerank_adapter(out, adapters, dataset, clip_dir, mllm_dir, fresh, progress)
        timings["train_rerank"] = time.perf_counter() - t0
        # Each rerank stage judges the same top 10 (no fusion, so the order it receives does not matter).
        stages += [{"type": "rerank", "name": "zero-shot", "model": str(mllm_dir), "mode": mode, "k": RERANK_K},
                   {"type": "rerank", "name": "lora", "model": str(mllm_dir), "mode": mode, "k": RERANK_K,
                    "adapter": str(Path(adapter).resolve())}]  # the file's paths are read relative to it

    t0 = time.perf_counter()
    config_path = out / "pipeline.toml"
    write_config_file(config_path, {"name": "mini-world", "encoder": {"model": str(clip_dir)},
                                    "index": {"factory": "Flat"}, "stages": stages})
    pipe = RetrievalPipeline.from_config(config_path)
    logger.info("4/5 indexing the test split")
    pipe.index(dataset.split("test"), progress=progress)
    pipe.save(out / "pipeline")
    timings["index"] = time.perf_counter() - t0

    logger.info("5/5 evaluating")
    report = evaluate(pipe, dataset, split="test", progress=progress)
    report["demo_seconds"] = {k: round(v, 1) for k, v in timings.items()}
    if rerank and rewrite:
        from genret.world.demo_rewrite import run_rewrite_demo

        report["rewriting"] = run_rewrite_demo(out, world, clip_dir, mllm_dir, fresh=fresh, progress=progress,
                                               adapters=adapters)
        report["demo_seconds"].update(report["rewriting"]["seconds"])
    write_report(report, out / "report")
    return report


def _world_matches(world: Path) -> bool:
    path = world / "dataset_synth.json"
    if not path.is_file():
        return False
    try:
        made = read_json(path)["genret"]
        return made["config"] == asdict(DEMO_WORLD) and made.get("version") == WORLD_VERSION
    except (ValueError, KeyError):
        return False
