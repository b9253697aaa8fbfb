"""Index build in 1 process and in N (torchrun, gloo on CPU): seconds, and whether the two pipelines are the same.

    python scripts/bench_build.py PIPELINE --data DATA [--split test] [--processes 2] [--threads 1] [--json]

PIPELINE is a pipeline file or saved folder (the demo's: a prefilter and a rerank stage, so the MLLM features are
split between the processes too). Each build runs as ``genret index build`` with ``--threads`` torch threads per
process; then both pipelines are loaded and compared: ids in the same order, the largest difference between their
vectors and between their rerank features, and the rankings of 50 caption queries.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def build(pipeline: str, data: str, split: str, out: Path, processes: int, threads: int) -> float:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    launch = ([torchrun, "--standalone", "--nproc_per_node", str(processes), "-m", "genret.cli"] if processes > 1
              else [sys.executable, "-m", "genret.cli"])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run(launch + ["--quiet", "index", "build", pipeline, "--data", data, "--split", split, "--out", str(out)],
                   check=True, env=env)
    return time.perf_counter() - start


def compare(a: Path, b: Path) -> dict:
    from genret.pipeline import RetrievalPipeline
    from genret.types import Query

    one, two = RetrievalPipeline.load(a), RetrievalPipeline.load(b)
    out = {}
    for modality, ix in one.gallery.indexes.items():
        other = two.gallery.index(modality)
        out[f"{modality}_ids_equal"] = ix.ids == other.ids
        out[f"{modality}_max_vector_diff"] = float(np.abs(ix.reconstruct(ix.ids) - other.reconstruct(other.ids)).max())
    for s1, s2 in zip(one.stages, two.stages):
        if getattr(s1, "features", None):
            out[f"{s1.name}_features_equal_ids"] = sorted(s1.features) == sorted(s2.features)
            out[f"{s1.name}_max_feature_diff"] = max(float((s1.features[i].float() - s2.features[i].float()).abs().max())
                                                     for i in s1.features)
    texts = [it.text for it in list(one.gallery.items["text"].values())[:50]]
    queries = [Query(id=str(n), text=t) for n, t in enumerate(texts)]
    out["rankings_equal"] = [r.ids for r in one.search(queries, k=5)] == [r.ids for r in two.search(queries, k=5)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pipeline")
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = build(args.pipeline, args.data, args.split, Path(tmp) / "one", 1, args.threads)
        many = build(args.pipeline, args.data, args.split, Path(tmp) / "many", args.processes, args.threads)
        report = {"processes": args.processes, "threads_per_process": args.threads, "one_process_s": round(one, 1),
                  f"{args.processes}_processes_s": round(many, 1), "speedup": round(one / many, 2),
                  **compare(Path(tmp) / "one", Path(tmp) / "many")}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
