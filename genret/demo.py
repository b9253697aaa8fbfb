"""``genret demo``: the miniature world end to end, each step through the same library calls as the CLI.

1. generate the world (Karpathy format), 2. train the mini CLIP on its training split,
3. index the test split, 4. evaluate both directions (with the twin check) and write the report.
Steps whose output already exists are reused unless ``fresh``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

from genret._io import read_json
from genret.config import write_config_file
from genret.data import load_dataset
from genret.data.synth import VERSION as WORLD_VERSION
from genret.data.synth import SynthConfig, generate_world
from genret.eval.evaluator import evaluate
from genret.eval.report import write_report
from genret.pipeline import RetrievalPipeline
from genret.training.clip import CLIPTrainConfig, train_clip

logger = logging.getLogger(__name__)

# Sized so that the whole demo, install included, stays under 10 minutes on 2 CPU cores.
DEMO_WORLD = SynthConfig()
DEMO_CLIP = CLIPTrainConfig(epochs=16)


def _stale(folder: Path, marker: str, expected: dict, fresh: bool) -> bool:
    """Whether ``folder`` must be (re)made: missing, asked fresh, or made with other settings."""
    path = folder / marker
    if fresh or not path.is_file():
        return True
    try:
        return read_json(path)["config"] != expected
    except (ValueError, KeyError):
        return True


def run_demo(out: Path, fresh: bool = False, progress: bool = True) -> dict:
    """Run the demo under ``out`` and return the evaluation report."""
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    t0 = time.perf_counter()
    world = out / "world"
    if fresh or not _world_matches(world):
        logger.info("1/4 generating the miniature world in %s", world)
        generate_world(world, DEMO_WORLD, progress=progress)
    timings["data"] = time.perf_counter() - t0
    dataset = load_dataset(world)

    t0 = time.perf_counter()
    clip_dir = out / "clip"
    if _stale(clip_dir, "genret.json", asdict(DEMO_CLIP), fresh):
        logger.info("2/4 training the mini CLIP (%d epochs)", DEMO_CLIP.epochs)
        train_clip(dataset.split("train"), clip_dir, DEMO_CLIP, val=dataset.split("val"), progress=progress)
    timings["train_clip"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    config_path = out / "pipeline.toml"
    write_config_file(config_path, {"name": "mini-clip", "encoder": {"model": "clip"}, "index": {"factory": "Flat"},
                                    "stages": [{"type": "prefilter", "k": 100}]})
    pipe = RetrievalPipeline.from_config(config_path)
    logger.info("3/4 indexing the test split")
    pipe.index(dataset.split("test"), progress=progress)
    pipe.save(out / "pipeline")
    timings["index"] = time.perf_counter() - t0

    logger.info("4/4 evaluating")
    report = evaluate(pipe, dataset, split="test", progress=progress)
    report["demo_seconds"] = {k: round(v, 1) for k, v in timings.items()}
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
