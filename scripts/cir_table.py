"""Composed retrieval (CIReVL) next to its single-modality baselines, and what each part costs per query.

    python scripts/cir_table.py --clip CLIP --mllm MLLM --data DATA [--rewriter ADAPTER] [--split test] \
        [--limit N] [--cache-dir DIR] [--json]

Every variant is the pipeline ``cirevl (mode) → prefilter`` evaluated with
``genret.eval.composed.evaluate_composed``, exactly as ``genret eval --task cir`` does:

- ``text``: the modification text alone; ``image``: the reference image alone (image → image);
  ``caption``: the MLLM's caption of the reference alone; ``image + text``: both embeddings added
  (the prefilter's late fusion, the usual "image + text" baseline);
- ``compose``: CIReVL zero-shot (the MLLM rewrites caption + modification, prompt ``cirevl``);
- ``compose + LoRA``: the same with ``--rewriter`` (a ``genret train rewriter`` adapter);
- ``compose + LoRA + reference``: its description fused with the reference image (``keep_reference``).

Timings: each compose variant runs twice over one fresh cache folder — cold (every caption and rewrite
generated) then warm (served from the cache) — and reports seconds per query of caption, rewrite and
retrieve (the prefilter). ``--cache-dir`` keeps that folder (default: a temporary one).
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


def _pipe(clip: str, stage: dict) -> RetrievalPipeline:
    return RetrievalPipeline(PipelineConfig(name=stage.get("mode", "?"), encoder=EncoderConfig(model=clip),
                                            stages=({"type": "cirevl", **stage}, {"type": "prefilter", "k": 100})))


def _costs(report: dict) -> dict:
    parts = {k.split(".", 1)[1]: v["ms_per_query"] / 1000 for k, v in report["timings"]["parts"].items()}
    parts["retrieve"] = report["timings"]["stages"]["prefilter"]["ms_per_query"] / 1000
    return {k: round(v, 4) for k, v in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", required=True)
    parser.add_argument("--mllm", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--rewriter", default="", help="a genret train rewriter adapter (adds 'compose + LoRA')")
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
    variants = [("text", {"mode": "text"}), ("image", {"mode": "image"}), ("image + text", {"mode": "sum"}),
                ("caption", {"mode": "caption", "model": args.mllm, "cache_dir": f"{cache}/caption"}),
                ("compose", {"mode": "compose", "model": args.mllm, "cache_dir": f"{cache}/zero-shot"})]
    if args.rewriter:
        lora = {"mode": "compose", "model": args.mllm, "rewriter_adapter": args.rewriter, "cache_dir": f"{cache}/lora"}
        variants += [("compose + LoRA", lora), ("compose + LoRA + reference", {**lora, "keep_reference": True})]
    rows = []
    for name, stage in variants:
        report = evaluate_composed(_pipe(args.clip, stage), cir, progress=False, limit=args.limit)
        row = {"variant": name, **{k: report["stages"]["prefilter"]["cir"].get(k) for k in KEYS},
               "fallbacks": report["fallbacks"], "cold_s_per_query": _costs(report)}
        if stage.get("cache_dir"):
            warm = evaluate_composed(_pipe(args.clip, stage), cir, progress=False, limit=args.limit)
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
        print(f"| {r['variant']} | " + " | ".join(f"{r[k]:.1f}" for k in KEYS) + f" | {r['fallbacks']} |")
    print("\nseconds per query, cold cache -> warm cache:\n")
    print("| variant | caption | rewrite | retrieve |")
    print("|---|---|---|---|")
    for r in rows:
        cold, warm = r["cold_s_per_query"], r.get("warm_s_per_query", {})
        cell = lambda p: f"{cold[p]:.4f} -> {warm[p]:.4f}" if p in cold and p in warm else (  # noqa: E731
            f"{cold[p]:.4f}" if p in cold else "-")
        print(f"| {r['variant']} | {cell('caption')} | {cell('rewrite')} | {cell('retrieve')} |")


if __name__ == "__main__":
    main()
