"""Query latency of generative retrieval against exact prefilter search, at 1k, 10k and 100k gallery items.

    OMP_NUM_THREADS=1 python scripts/bench_generate.py --mllm adapters/mini-world/mllm \
        [--sizes 1000,10000,100000] [--schemes atomic,structured] [--beams 10] [--queries 20] [--json]

For each scheme and gallery size: identifiers for ``n`` items (structured: recursive k-means, k=16,
leaf 16, over random 64-d embeddings), their new tokens added to a copy of the MLLM (resized embedding
and output layers), the trie built, then per text query (batch 1) the time of beam search with
``--beams`` beams constrained by the trie, and of the same beam search unconstrained (same model, same
maximum length: what constraining costs). Beside it, exact inner-product search (faiss ``IndexFlatIP``)
over ``n`` random unit vectors of the prefilter's width, per query: the cost a prefilter's exact search
grows with. The model is untrained on these identifiers: latency does not depend on what it learned.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch
from _bench import best_of

from genret.identifiers import Trie, add_tokens, constrained_beam_search, make_identifiers
from genret.mllm import MLLM, scoring

CAPTIONS = ["a large yellow diamond above a large white square", "there is a red circle left of a small blue star",
            "a small green triangle below a purple square", "a white star to the right of a large red diamond"]


def _prompts(mllm: MLLM, n: int) -> list[dict]:
    out = []
    for i in range(n):
        text = scoring._render(mllm, scoring.user_message(f"Text: {CAPTIONS[i % len(CAPTIONS)]}\nWhich image?"))
        out.append(dict(mllm.processor.tokenizer([text], return_tensors="pt")))
    return out


def _search_seconds(model, prompts, trie, beams, constrain, max_new) -> tuple[float, float]:
    """Mean seconds per query and the fraction of returned top-1 sequences that are identifiers."""
    valid = 0
    start = time.perf_counter()
    for inputs in prompts:
        [hits] = constrained_beam_search(model, inputs, trie, num_beams=beams, constrain=constrain,
                                         max_new_tokens=max_new)
        valid += bool(hits) and hits[0].item_id is not None
    return (time.perf_counter() - start) / len(prompts), valid / len(prompts)


def exact_search_ms(n: int, dim: int, queries: int, seed: int = 0) -> float:
    import faiss

    rng = np.random.default_rng(seed)
    gallery = rng.standard_normal((n, dim)).astype("float32")
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(dim)
    index.add(gallery)
    q = gallery[:queries] + 0.1
    return 1000 * best_of(lambda: [index.search(q[i:i + 1], 10) for i in range(queries)]) / queries


def run_one(mllm: MLLM, scheme: str, n: int, beams: int, queries: int, seed: int) -> dict:
    items = [f"img{i:06d}" for i in range(n)]
    kwargs = {}
    if scheme == "structured":
        kwargs = {"embeddings": np.random.default_rng(seed).standard_normal((n, 64)).astype("float32"),
                  "k": 16, "leaf_size": 16}
    ids = make_identifiers(scheme, items, **kwargs)
    tokenizer = copy.deepcopy(mllm.processor.tokenizer)
    model = copy.deepcopy(mllm.model)
    add_tokens(ids, tokenizer, model)
    model.eval()
    tick = time.perf_counter()
    trie = Trie.from_identifiers(ids, tokenizer)
    build = time.perf_counter() - tick
    view = copy.copy(mllm)
    view.processor = copy.copy(mllm.processor)
    view.processor.tokenizer = tokenizer
    prompts = _prompts(view, queries)
    for constrain in (True, False):  # warm-up
        _search_seconds(model, prompts[:2], trie, beams, constrain, trie.max_length)
    constrained, valid_c = _search_seconds(model, prompts, trie, beams, True, trie.max_length)
    free, valid_f = _search_seconds(model, prompts, trie, beams, False, trie.max_length)
    return {"scheme": scheme, "n": n, "max_tokens_per_id": trie.max_length, "vocab": model.get_input_embeddings().weight.shape[0], "trie_build_ms": round(1000 * build, 1),
            "constrained_ms": round(1000 * constrained, 1), "unconstrained_ms": round(1000 * free, 1),
            "constraint_cost": round(constrained / free, 2), "valid_top1_unconstrained": round(valid_f, 2),
            "valid_top1_constrained": round(valid_c, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mllm", default="adapters/mini-world/mllm")
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--schemes", default="atomic,structured")
    parser.add_argument("--beams", type=int, default=10)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--dim", type=int, default=0, help="prefilter embedding width (default: the MLLM's hidden size)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mllm = MLLM.load(args.mllm)
    dim = args.dim or mllm.model.config.get_text_config().hidden_size
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = [run_one(mllm, scheme, n, args.beams, args.queries, seed=0)
            for scheme in args.schemes.split(",") for n in sizes]
    exact = {n: round(exact_search_ms(n, dim, args.queries), 3) for n in sizes}
    for row in rows:
        row["exact_search_ms"] = exact[row["n"]]
    if args.json:
        print(json.dumps({"beams": args.beams, "queries": args.queries, "threads": args.threads, "dim": dim,
                          "rows": rows}, indent=2))
        return
    print(f"| scheme | n | embedding rows | tokens per id (max) | trie build ms | constrained ms/query | unconstrained ms/query | constrained/unconstrained "
          f"| unconstrained top-1 is an id | exact search ({dim}-d Flat) ms/query |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scheme']} | {r['n']:,} | {r['vocab']:,} | {r['max_tokens_per_id']} | {r['trie_build_ms']} | {r['constrained_ms']} | "
              f"{r['unconstrained_ms']} | {r['constraint_cost']}x | {100 * r['valid_top1_unconstrained']:.0f}% | "
              f"{r['exact_search_ms']} |")


if __name__ == "__main__":
    main()
