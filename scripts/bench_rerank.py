"""Rerank cost: the plain path vs cached gallery features vs cached features + shared-prefix KV cache.

    python scripts/bench_rerank.py --clip CLIP_DIR --mllm MLLM_DIR --data WORLD [--queries 100] [--k 50]
        [--mode pointwise] [--direction t2i] [--json]

Thin: it builds prefilter + rerank pipelines through genret (``cache_features`` and ``shared_prefix``
off/on), indexes the test split, and times the rerank stage on the same queries (text queries for
``t2i``, test images for ``i2t``). It reports seconds per query, the speed-up of each path over the
plain one, the largest score difference from the plain path, and the language model's FLOPs per
candidate (2 × non-embedding parameters × prompt tokens, plus attention) against the machine's
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

PATHS = {"plain": (False, False), "cached_features": (True, False), "cached_features+shared_prefix": (True, True)}


def _max_diff(a, b) -> float:
    return max(abs(x.score - y.score) for ra, rb in zip(a, b)
               for x, y in zip(sorted(ra.candidates, key=lambda c: c.item_id), sorted(rb.candidates, key=lambda c: c.item_id)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", required=True)
    parser.add_argument("--mllm", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--mode", default="pointwise", choices=("pointwise", "generative"))
    parser.add_argument("--direction", default="t2i", choices=("t2i", "i2t"))
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    test = load_dataset(args.data).split("test")
    recs = test.records[: args.queries]
    queries = ([Query(id=f"q{i}", text=r.captions[0]) for i, r in enumerate(recs)] if args.direction == "t2i"
               else [Query(id=f"q{i}", image=r.path) for i, r in enumerate(recs)])
    modality = "image" if args.direction == "t2i" else "text"
    results, rankings = {}, {}
    for name, (cached, shared) in PATHS.items():
        stages = ({"type": "prefilter", "k": args.k},
                  {"type": "rerank", "model": args.mllm, "mode": args.mode, "k": args.k,
                   "batch_size": args.batch_size, "cache_features": cached, "shared_prefix": shared})
        pipe = RetrievalPipeline.from_config(
            PipelineConfig(name=name, encoder=EncoderConfig(model=args.clip), stages=stages))
        start = time.perf_counter()
        pipe.index(test, modalities=(modality,), progress=False)
        index_s = time.perf_counter() - start
        upstream = pipe.stages[0].rank(queries, None, pipe.context)
        rerank = pipe.stages[1]
        rankings[name] = rerank.rank(queries, upstream, pipe.context)  # also warms up
        seconds = best_of(lambda: rerank.rank(queries, upstream, pipe.context), repeats=args.repeats)
        results[name] = {"s_per_query": round(seconds / len(queries), 4), "index_s": round(index_s, 2)}
        mllm = rerank.mllm
    plain = results["plain"]["s_per_query"]
    for name in PATHS:
        results[name]["speedup"] = round(plain / results[name]["s_per_query"], 2)
        results[name]["max_score_diff_vs_plain"] = _max_diff(rankings["plain"], rankings[name])

    cfg = mllm.model.config.text_config
    lm = mllm.model.model.language_model
    params = sum(p.numel() for n, p in lm.named_parameters() if "embed" not in n)
    tokens = mllm.model.config.image_seq_length + 40  # image tokens + the prompt's text, roughly
    flops = 2 * params * tokens + 4 * cfg.num_hidden_layers * cfg.hidden_size * tokens * tokens / 2
    flops += 2 * cfg.hidden_size * cfg.vocab_size * tokens  # the LM head over every position
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    peak = 2 * 2048**3 / best_of(lambda: a @ b) / 1e9
    per_candidate_s = results["cached_features"]["s_per_query"] / args.k
    out = {"mode": args.mode, "direction": args.direction, "k": args.k, "queries": len(queries), "paths": results,
           "lm_gflop_per_candidate": round(flops / 1e9, 4),
           "cached_features_achieved_gflops": round(flops / per_candidate_s / 1e9, 2),
           "matmul_gflops": round(peak, 1)}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{args.mode} {args.direction}, top-{args.k}, {len(queries)} queries")
    print(f"{'path':<32}{'s/query':>10}{'speed-up':>10}{'max |Δscore|':>14}")
    for name, r in results.items():
        print(f"{name:<32}{r['s_per_query']:>10.4f}{r['speedup']:>9.2f}×{r['max_score_diff_vs_plain']:>14.2e}")
    print(f"LM FLOPs per candidate {out['lm_gflop_per_candidate']} GFLOP; cached path achieves "
          f"{out['cached_features_achieved_gflops']} GFLOP/s of a {out['matmul_gflops']} GFLOP/s matmul")


if __name__ == "__main__":
    main()
