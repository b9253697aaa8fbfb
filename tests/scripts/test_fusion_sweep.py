"""scripts/fusion_sweep.py: one scoring pass, every weight re-sorting it, the weight chosen off the reported split."""

import json
import subprocess
import sys
from pathlib import Path

from genret.data import load_dataset
from genret.eval.evaluator import evaluate
from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fusion_sweep.py"


def test_the_sweep_agrees_with_genret_eval_at_its_ends_and_chooses_on_val(world_dir, clip_dir, mllm_dir):
    out = subprocess.run([sys.executable, str(SCRIPT), "--clip", str(clip_dir), "--mllm", str(mllm_dir), "--data",
                          str(world_dir), "--mode", "generative", "--k", "5", "--threads", "1", "--json"],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    stages = [{"type": "prefilter", "k": 100},
              {"type": "rerank", "name": "rerank", "model": str(mllm_dir), "mode": "generative", "k": 5}]
    pipe = RetrievalPipeline.from_config(PipelineConfig(name="x", encoder=EncoderConfig(model=str(clip_dir)),
                                                        stages=stages))
    report = evaluate(pipe, load_dataset(world_dir), split="test", progress=False)
    for row, stage in (("prefilter", "prefilter"), ("rerank alone", "rerank")):
        for direction in ("t2i", "i2t"):
            got, want = result["report"][row][direction], report["stages"][stage][direction]
            # The prefilter row ranks the rerank stage's top 5 by the prefilter score: R@1 and R@5 are the prefilter's.
            keys = ("R@1", "R@5") if row == "prefilter" else ("R@1", "R@5", "R@10")
            assert {k: got[k] for k in keys} == {k: want[k] for k in keys}, (row, direction)
        assert result["report"][row]["twins t2i"] == report["twins"][stage]["t2i"]
    grid = result["grid"]
    best = max(grid, key=lambda w: (grid[w]["t2i"]["R@1"] + grid[w]["i2t"]["R@1"], -float(w)))
    assert float(best) == result["weight"] and result["chosen_on"] == "val"
    refused = subprocess.run([sys.executable, str(SCRIPT), "--clip", "c", "--mllm", "m", "--data", "d", "--mode",
                              "generative", "--choose-on", "test"], capture_output=True, text=True)
    assert refused.returncode != 0 and "cannot choose it" in refused.stderr
