"""HNSW at a million vectors: recall@10 against efSearch, and the value `genret index tune` chooses.

    python scripts/bench_tune.py [--n 1000000] [--dim 512] [--factory HNSW32] [--build-params efConstruction=N] [--queries 1000] [--target 0.95] [--json]

Data: bench_index.py's (clustered unit vectors, queries shifted by a common offset: a stand-in for the modality gap
between text queries and image embeddings). The index is built through genret's VectorIndex in chunks of 100,000,
then :func:`genret.index.tune.tune` measures recall@10 against exact search (the graph's own flat storage) for a
ladder of efSearch values and bisects to the smallest that reaches the target. Tuning queries and test queries are
drawn apart: the chosen value is then checked on queries it was not chosen on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import faiss
import numpy as np
from bench_index import make_data

from genret.index import VectorIndex
from genret.index.tune import exact_search, recall_at, tune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--factory", default="HNSW32")
    parser.add_argument("--build-params", default="", help="e.g. efConstruction=128 (faiss's default is 40)")
    parser.add_argument("--queries", type=int, default=1000, help="tuning queries; as many again are held out")
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--confidence", type=float, default=0.95, help="genret index tune's --confidence")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    x, q = make_data(args.n, args.dim, 2 * args.queries, seed=0)
    tune_q, test_q = q[:args.queries], q[args.queries:]
    index = VectorIndex(args.dim, args.factory, build_params=args.build_params)
    start = time.perf_counter()
    for s in range(0, args.n, 100_000):
        index.add([str(i) for i in range(s, min(s + 100_000, args.n))], x[s:s + 100_000])
        print(f"added {min(s + 100_000, args.n):,}", file=sys.stderr, flush=True)
    build = time.perf_counter() - start
    del x
    before = {}
    index.search_params = "efSearch=128"  # the value of the earlier benchmark
    truth_test = exact_search(index, test_q, 10)
    before["recall"], before["ms"] = recall_at(index, test_q, truth_test, 10)
    start = time.perf_counter()
    result = tune(index, tune_q, k=10, target=args.target, confidence=args.confidence,
                  progress=lambda p, v, r, ms: print(f"{p}={v}: recall@10 {r:.3f}, {ms:.2f} ms/query", file=sys.stderr))
    tuning = time.perf_counter() - start
    held_recall, held_ms = recall_at(index, test_q, truth_test, 10)
    report = {"n": args.n, "dim": args.dim, "factory": args.factory, "build_params": args.build_params, "build_s": round(build, 1),
              "tune_s": round(tuning, 1), "target": args.target, "chosen": result.search_params,
              "confidence": args.confidence,
              "tuning_recall": round(result.recall, 4), "tuning_lower_bound": round(result.lower, 4), "held_out_recall": round(held_recall, 4),
              "held_out_ms_per_query": round(held_ms, 3), "efSearch_128_recall": round(before["recall"], 4),
              "efSearch_128_ms_per_query": round(before["ms"], 3), "tried": result.rows}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{args.factory} {args.build_params}, {args.n:,} x {args.dim} (build {build:.0f} s; tuning {tuning:.0f} s on {args.queries} queries)")
    print(f"| efSearch | recall@10 (tuning queries) | lower bound ({args.confidence}) | ms/query (batched) |")
    print("|---|---|---|---|")
    for r in result.rows:
        mark = " **chosen**" if r["value"] == result.value else ""
        print(f"| {r['value']}{mark} | {r['recall']:.3f} | {r['lower']:.3f} | {r['ms_per_query']:.2f} |")
    print(f"held-out queries: efSearch=128 recall@10 {before['recall']:.3f} ({before['ms']:.2f} ms/query); "
          f"{result.search_params} recall@10 {held_recall:.3f} ({held_ms:.2f} ms/query)")


if __name__ == "__main__":
    main()
