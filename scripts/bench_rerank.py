"""Rerank cost: the plain path (vision tower per candidate) against cached gallery features.

    python scripts/bench_rerank.py --clip CLIP_DIR --mllm MLLM_DIR --data WORLD [--queries 100] [--k 50]
        [--mode pointwise] [--json]

Thin: it builds two pipelines (prefilter + rerank, ``cache_features`` off and on) through genret,
indexes the test split, and times the rerank stage on the same text queries. It reports seconds per
query, the largest score difference between the paths, and an estimate of the language model's
FLOPs per candidate (2 × non-embedding parameters × prompt tokens) against the machine's
matrix-multiply rate measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _bench import best_of

from genret.data import load_dataset
from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline
from genret.types import Query


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", required=True)
    parser.add_argument("--mllm", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--mode", default="pointwise")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    test = load_dataset(args.data).split("test")
    queries = [Query(id=f"q{i}", text=r.captions[0]) for i, r in enumerate(test.records[: args.queries])]
    results, rankings = {}, {}
    for name, cached in (("plain", False), ("cached_features", True)):
        stages = ({"type": "prefilter", "k": args.k},
                  {"type": "rerank", "model": args.mllm, "mode": args.mode, "k": args.k,
                   "batch_size": args.batch_size, "cache_features": cached})
        pipe = RetrievalPipeline.from_config(
            PipelineConfig(name=name, encoder=EncoderConfig(model=args.clip), stages=stages))
        start = time.perf_counter()
        pipe.index(test, modalities=("image",), progress=False)
        index_s = time.perf_counter() - start
        upstream = pipe.stages[0].rank(queries, None, pipe.context)
        rerank = pipe.stages[1]
        seconds = best_of(lambda: rerank.rank(queries, upstream, pipe.context), repeats=2)
        rankings[name] = rerank.rank(queries, upstream, pipe.context)
        results[name] = {"s_per_query": round(seconds / len(queries), 4), "index_s": round(index_s, 2)}
        mllm = rerank.mllm
    diff = max(abs(a.score - b.score) for ra, rb in zip(rankings["plain"], rankings["cached_features"])
               for a, b in zip(sorted(ra.candidates, key=lambda c: c.item_id), sorted(rb.candidates, key=lambda c: c.item_id)))
    lm = mllm.model.model.language_model
    params = sum(p.numel() for n, p in lm.named_parameters() if "embed" not in n)
    tokens = mllm.model.config.image_seq_length + 40
    flops = 2 * params * tokens
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    peak = 2 * 2048**3 / best_of(lambda: a @ b) / 1e9
    per_candidate_s = results["cached_features"]["s_per_query"] / args.k
    out = {"mode": args.mode, "k": args.k, "queries": len(queries), **results,
           "speedup": round(results["plain"]["s_per_query"] / results["cached_features"]["s_per_query"], 2),
           "max_score_diff": diff, "lm_flops_per_candidate": flops,
           "achieved_gflops": round(flops / per_candidate_s / 1e9, 2), "matmul_gflops": round(peak, 1)}
    print(json.dumps(out, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items()))


if __name__ == "__main__":
    main()
