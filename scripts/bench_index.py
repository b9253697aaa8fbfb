"""Index search benchmark: Flat, HNSW and IVF-PQ at 100k and 1M vectors through genret's VectorIndex.

    python scripts/bench_index.py [--sizes 100000,1000000] [--dim 512] [--queries 100] [--k 100] [--json]

Data: unit vectors drawn around 256 cluster centres with noise mostly in a 64-dimensional subspace
(embeddings of real encoders have a low intrinsic dimension; isotropic noise in 512 dimensions would
make every neighbour equally far), and queries from the same mixture shifted by one common offset
and renormalised: a stand-in for the modality gap between image and
text embeddings, where product quantisation is known to lose recall. For each index it reports
build time, memory (serialised size), latency per query with the 100 queries batched and one at a
time (best of 3), and recall@10 against exact search. For Flat it also reports the achieved
GFLOP/s (2·n·d per query-vector pair) against the machine's matrix-multiply rate (a square
2048³ torch matmul) timed in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import faiss
import numpy as np
import torch
from _bench import best_of

from genret.index import VectorIndex


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_data(n: int, dim: int, queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((256, dim)))
    basis = np.linalg.qr(rng.standard_normal((dim, 64)))[0].T.astype(np.float32)  # (64, dim), orthonormal rows

    def sample(m: int) -> np.ndarray:
        low = rng.standard_normal((m, 64)).astype(np.float32) @ basis * (0.6 / 8)
        full = rng.standard_normal((m, dim)).astype(np.float32) * (0.15 / np.sqrt(dim))
        return centres[rng.integers(0, 256, m)] + low + full

    gallery = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # in chunks: 1M x 512 floats is 2 GB
        m = min(100_000, n - start)
        gallery[start:start + m] = unit(sample(m))
    gap = unit(rng.standard_normal((1, dim)))[0] * 0.3
    return gallery, unit(sample(queries) + gap)




def matmul_gflops(size: int = 2048) -> float:
    """The machine's fp32 matrix-multiply rate now: a square torch matmul, GFLOP/s."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size**3 / best_of(lambda: a @ b) / 1e9


def factories_for(n: int, names: list[str]) -> list[tuple[str, str]]:
    out = []
    for name in names:
        if name == "IVF-PQ":
            nlist = 1024 if n <= 200_000 else 4096
            out.append((f"IVF{nlist},PQ64", "nprobe=32"))
        elif name.startswith("HNSW"):
            out.append((name, "efSearch=128"))
        else:
            out.append((name, ""))
    return out


def run(args: argparse.Namespace) -> list[dict]:
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        print(f"[{n}] generating data", file=sys.stderr)
        x, q = make_data(n, args.dim, args.queries, args.seed)
        ids = [str(i) for i in range(n)]
        exact_top = None
        peak = matmul_gflops()
        for factory, params in factories_for(n, args.factories.split(",")):
            print(f"[{n}] {factory}: building", file=sys.stderr)
            start = time.perf_counter()
            index = VectorIndex(args.dim, factory, search_params=params)
            if not index.index.is_trained:
                train = x[np.random.default_rng(0).choice(n, min(n, 100_000), replace=False)]
                index.index.train(train)
            for s in range(0, n, 100_000):
                index.add(ids[s:s + 100_000], x[s:s + 100_000])
            build = time.perf_counter() - start
            print(f"[{n}] {factory}: searching", file=sys.stderr)
            batched = best_of(lambda: index.search(q, args.k))
            single = best_of(lambda: [index.search(q[i:i + 1], args.k) for i in range(len(q))])
            _, got = index.search(q, args.k)
            top10 = [set(r[:10]) for r in got]
            if factory == "Flat":
                exact_top = top10
            recall = float(np.mean([len(a & b) / 10 for a, b in zip(top10, exact_top)])) if exact_top else None
            row = {"n": n, "factory": factory, "params": params, "build_s": round(build, 2),
                   "memory_mb": round(index.memory_bytes() / 2**20, 1),
                   "batched_ms_per_query": round(1000 * batched / len(q), 3),
                   "single_ms_per_query": round(1000 * single / len(q), 3), "recall@10": recall}
            if factory == "Flat":
                achieved = 2 * len(q) * n * args.dim / batched / 1e9
                row.update(gflops=round(achieved, 1), matmul_gflops=round(peak, 1),
                           fraction_of_matmul=round(achieved / peak, 2))
            rows.append(row)
            del index
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--factories", default="Flat,HNSW32,IVF-PQ", help="Flat first: it is the exact reference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = run(args)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| n | index | params | build s | memory MB | batched ms/q | single ms/q | recall@10 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        rec = "exact" if r["factory"] == "Flat" else f"{r['recall@10']:.3f}"
        print(f"| {r['n']:,} | {r['factory']} | {r['params'] or '-'} | {r['build_s']:.1f} | {r['memory_mb']:.0f} | "
              f"{r['batched_ms_per_query']:.2f} | {r['single_ms_per_query']:.2f} | {rec} |")
    for r in rows:
        if "gflops" in r:
            print(f"Flat at {r['n']:,}: {r['gflops']:.0f} GFLOP/s batched = {r['fraction_of_matmul']:.0%} of the "
                  f"{r['matmul_gflops']:.0f} GFLOP/s of a square torch matmul (same run)")


if __name__ == "__main__":
    main()
