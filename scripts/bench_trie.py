"""Identifier trie benchmark: build time, memory and ``allowed()`` latency at 1k, 10k and 100k identifiers.

    OMP_NUM_THREADS=1 python scripts/bench_trie.py [--sizes 1000,10000,100000] [--schemes atomic,structured,numeric]
                                                    [--calls 5000] [--json]

For each scheme and gallery size: assign identifiers (structured: recursive k-means, k=16, leaf 16,
over random 64-d embeddings), add the scheme's tokens to a byte-level BPE tokenizer like the tiny
models' (:func:`genret.training.mini_mllm.train_chat_tokenizer`), tokenize, and build the
:class:`~genret.identifiers.Trie`. Reported: seconds for each step, the trie's numpy bytes, the
process's peak RSS so far (``resource.getrusage``: it only grows, so read it along the rows), the
mean ``allowed()`` time over random prefixes of the identifiers (every length from empty to one
short of the whole), and, for comparison, a GRACE-style nested-dict trie over the same sequences:
its build time and the Python heap it takes (``tracemalloc``).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import time
import tracemalloc

import numpy as np
from _bench import best_of

from genret.identifiers import Trie, add_tokens, make_identifiers, tokenize
from genret.bpe import train_chat_tokenizer

TEXTS = ["a red circle left of a blue square", "which image shows this? 0123456789"]


def dict_trie(sequences: list[list[int]]) -> dict:
    """The nested-dict trie GRACE pickles: token -> subtrie."""
    root: dict = {}
    for seq in sequences:
        node = root
        for t in seq:
            node = node.setdefault(t, {})
    return root


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_one(scheme: str, n: int, base_tokenizer, calls: int, seed: int) -> dict:
    items = [f"img{i:06d}" for i in range(n)]
    kwargs = {"embeddings": np.random.default_rng(seed).normal(size=(n, 64)).astype(np.float32),
              "k": 16, "leaf_size": 16, "seed": seed} if scheme == "structured" else {}
    start = time.perf_counter()
    ids = make_identifiers(scheme, items, **kwargs)
    assign = time.perf_counter() - start
    tokenizer = copy.deepcopy(base_tokenizer)
    start = time.perf_counter()
    add_tokens(ids, tokenizer)
    add = time.perf_counter() - start
    start = time.perf_counter()
    sequences = tokenize(ids, tokenizer)
    tok = time.perf_counter() - start
    build = best_of(lambda: Trie(sequences, ids.item_ids))
    trie = Trie(sequences, ids.item_ids)

    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, calls)
    prefixes = [sequences[i][: rng.integers(0, len(sequences[i]))] for i in picks]
    per_call = best_of(lambda: [trie.allowed(p) for p in prefixes]) / calls

    dict_build = best_of(lambda: dict_trie(sequences))
    tracemalloc.start()  # apart from the timing: tracing slows allocation down
    reference = dict_trie(sequences)
    dict_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del reference
    return {"scheme": scheme, "n": n, "tokens_per_id": round(float(np.mean([len(s) for s in sequences])), 2),
            "new_tokens": len(ids.new_tokens), "assign_s": round(assign, 3), "add_tokens_s": round(add, 3),
            "tokenize_s": round(tok, 3), "build_ms": round(1000 * build, 2), "trie_kb": round(trie.nbytes / 1024, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1), "allowed_us": round(1e6 * per_call, 2),
            "dict_build_ms": round(1000 * dict_build, 1), "dict_kb": round(dict_bytes / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--schemes", default="atomic,structured,numeric")
    parser.add_argument("--calls", type=int, default=5000, help="allowed() calls timed per row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    base = train_chat_tokenizer(TEXTS, 300)
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        for scheme in args.schemes.split(","):
            print(f"[{n}] {scheme}", file=sys.stderr)
            rows.append(run_one(scheme, n, base, args.calls, args.seed))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| scheme | n | tokens/id | new tokens | assign s | add_tokens s | tokenize s | trie build ms | trie KB "
          "| allowed() µs | peak RSS MB | dict trie build ms | dict trie KB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scheme']} | {r['n']:,} | {r['tokens_per_id']} | {r['new_tokens']:,} | {r['assign_s']:.2f} | "
              f"{r['add_tokens_s']:.2f} | {r['tokenize_s']:.2f} | {r['build_ms']:.1f} | {r['trie_kb']:,.0f} | "
              f"{r['allowed_us']:.1f} | {r['peak_rss_mb']:.0f} | {r['dict_build_ms']:.0f} | {r['dict_kb']:,.0f} |")


if __name__ == "__main__":
    main()
