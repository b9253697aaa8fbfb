"""Composed retrieval (CIReVL) next to its single-modality baselines, and what each part costs per query.

    python scripts/cir_table.py --clip CLIP --mllm MLLM --data DATA [--rewriter ADAPTER] [--rerank K] \
        [--split test] [--limit N] [--cache-dir DIR] [--json]

Every variant is the pipeline ``cirevl (mode) → prefilter`` evaluated with
``genret.eval.composed.evaluate_composed``, exactly as ``genret eval --task cir`` does:

- ``text``: the modification text alone; ``image``: the reference image alone (image → image);
  ``caption``: the MLLM's caption of the reference alone; ``image + text``: both embeddings added
  (the prefilter's late fusion, the usual "image + text" baseline);
- ``compose``: CIReVL zero-shot (the MLLM rewrites caption + modification, prompt ``cirevl``);
- ``compose + LoRA``: the same with ``--rewriter`` (a ``genret train rewriter`` adapter);
- ``compose + LoRA + reference``: its description fused with the reference image (``keep_reference``);
- with ``--rerank K``: ``caption → rerank`` and ``compose + LoRA → rerank``, the same queries with the
  MLLM reranking the prefilter's top K by generative scoring, log P(query text | image), zero-shot
  (a later stage reranking the rewritten query, as CIReVL's pipeline allows). The reference image
  alone cannot be reranked so: it is not text.

Timings: each compose variant runs twice over one fresh cache folder — cold (every caption and rewrite
generated) then warm (served from the cache) — and reports seconds per query of caption, rewrite and
retrieve (the prefilter), and rerank. The ``+ reference`` and ``→ rerank`` rows reuse the caches of the rows
they extend (their caption and rewrite costs are the warm ones). ``--cache-dir`` keeps that folder
(default: a temporary one).
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

from genret.data.cir import load_cir
from genret.eval.composed import evaluate_composed
from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline

KEYS = ("R@1", "R@5", "R@10", "R@50", "R_subset@1", "R_subset@2", "mAP@5", "MRR")


def _pipe(clip: str, stage: dict, rerank: dict | None = None) -> RetrievalPipeline:
    stages = ({"type": "cirevl", **stage}, {"type": "prefilter", "k": 100}) + ((rerank,) if rerank else ())
    return RetrievalPipeline(PipelineConfig(name=stage.get("mode", "?"), encoder=EncoderConfig(model=clip),
                                            stages=stages))


def _costs(report: dict) -> dict:
    parts = {k.split(".", 1)[1]: v["ms_per_query"] / 1000 for k, v in report["timings"]["parts"].items()}
    parts["retrieve"] = report["timings"]["stages"]["prefilter"]["ms_per_query"] / 1000
    if "rerank" in report["timings"]["stages"]:
        parts["rerank"] = report["timings"]["stages"]["rerank"]["ms_per_query"] / 1000
    return {k: round(v, 4) for k, v in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", required=True)
    parser.add_argument("--mllm", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--rewriter", default="", help="a genret train rewriter adapter (adds 'compose + LoRA')")
    parser.add_argument("--rerank", type=int, default=0, help="K: add the rows whose MLLM reranks the top K (0: none)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None, help="the first N triplets only (the gallery stays whole)")
    parser.add_argument("--cache-dir", default="", help="keep the caches here (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cir = load_cir(args.data, args.split)
    tmp = tempfile.TemporaryDirectory()
    cache = args.cache_dir or tmp.name
    caption = {"mode": "caption", "model": args.mllm, "cache_dir": f"{cache}/caption"}
    lora = {"mode": "compose", "model": args.mllm, "rewriter_adapter": args.rewriter, "cache_dir": f"{cache}/lora"}
    variants = [("text", {"mode": "text"}), ("image", {"mode": "image"}), ("image + text", {"mode": "sum"}),
                ("caption", caption), ("compose", {"mode": "compose", "model": args.mllm, "cache_dir": f"{cache}/zero-shot"})]
    if args.rewriter:
        variants += [("compose + LoRA", lora), ("compose + LoRA + reference", {**lora, "keep_reference": True})]
    rerank = {"type": "rerank", "model": args.mllm, "mode": "generative", "k": args.rerank} if args.rerank else None
    if rerank:
        variants += [("caption → rerank", caption)] + ([("compose + LoRA → rerank", lora)] if args.rewriter else [])
    rows = []
    for name, stage in variants:
        later = rerank if name.endswith("→ rerank") else None
        report = evaluate_composed(_pipe(args.clip, stage, later), cir, progress=False, limit=args.limit)
        last = list(report["stages"])[-1]
        row = {"variant": name, **{k: report["stages"][last]["cir"].get(k) for k in KEYS},
               "fallbacks": report["fallbacks"], "cold_s_per_query": _costs(report),
               "R@5_by_kind": {k: v["R@5"] for k, v in report["stages"][last].get("by_kind", {}).items()}}
        if stage.get("cache_dir"):
            warm = evaluate_composed(_pipe(args.clip, stage, later), cir, progress=False, limit=args.limit)
            assert warm["stages"] == report["stages"], "a warm run must reproduce the cold one"
            row["warm_s_per_query"] = _costs(warm)
        rows.append(row)
        print(f"{name}: {row}", flush=True)
    out = {"data": args.data, "split": args.split, "triplets": len(cir.triplets[: args.limit or None]),
           "gallery": len(cir.images), "rows": rows}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"\n{out['triplets']} triplets, {out['gallery']}-image gallery ({args.split}), percent:\n")
    print("| variant | " + " | ".join(KEYS) + " | fallbacks |")
    print("|---|" + "---|" * (len(KEYS) + 1))
    for r in rows:
        print(f"| {r['variant']} | " + " | ".join("-" if r[k] is None else f"{r[k]:.1f}" for k in KEYS)
              + f" | {r['fallbacks']} |")
    kinds = sorted({k for r in rows for k in r["R@5_by_kind"]})
    if kinds:
        print("\nR@5 by edit kind (triplets per kind: " + ", ".join(
            f"{k} {sum(t.meta.get('edit_kind') == k for t in cir.triplets[: args.limit or None])}" for k in kinds) + "):\n")
        print("| variant | " + " | ".join(kinds) + " |")
        print("|---|" + "---|" * len(kinds))
        for r in rows:
            print(f"| {r['variant']} | " + " | ".join(f"{r['R@5_by_kind'].get(k, 0):.1f}" for k in kinds) + " |")
    print("\nseconds per query, cold cache -> warm cache:\n")
    print("| variant | caption | rewrite | retrieve | rerank |")
    print("|---|---|---|---|---|")
    for r in rows:
        cold, warm = r["cold_s_per_query"], r.get("warm_s_per_query", {})
        cell = lambda p: f"{cold[p]:.4f} -> {warm[p]:.4f}" if p in cold and p in warm else (  # noqa: E731
            f"{cold[p]:.4f}" if p in cold else "-")
        print(f"| {r['variant']} | {cell('caption')} | {cell('rewrite')} | {cell('retrieve')} | {cell('rerank')} |")


if __name__ == "__main__":
    main()
