"""Quality and cost of MLLM rerank variants on one data set: prefilter alone, then each variant reranking it.

    python scripts/rerank_table.py --clip CLIP --mllm MLLM --data DATA \
        [--variant NAME:MODE:K[:ADAPTER] ...] [--split test] [--queries N] [--json]

Each variant is a pipeline ``prefilter (k=100) → rerank (mode, k, adapter)`` evaluated with
``genret.eval.evaluate`` in both directions, exactly as ``genret eval`` does; the table gives R@1/5/10,
RSUM, the twin check and the rerank stage's seconds per query. ``--queries N`` evaluates only the
first N test images (and their captions), for the expensive variants; say so when you quote it.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _bench import first_images

from genret.data import load_dataset
from genret.eval.evaluator import evaluate
from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline


def _variant(text: str) -> dict:
    parts = text.split(":", 3)
    if len(parts) < 3:
        raise SystemExit(f"--variant {text!r}: expected NAME:MODE:K[:ADAPTER]")
    return {"name": parts[0], "mode": parts[1], "k": int(parts[2]), "adapter": parts[3] if len(parts) == 4 else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", required=True)
    parser.add_argument("--mllm", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--variant", action="append", type=_variant, default=[])
    parser.add_argument("--queries", type=int, default=0, help="evaluate on the first N images of the split (0: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dataset = first_images(load_dataset(args.data), args.split, args.queries)
    rows = []
    variants = [{"name": "prefilter", "mode": "", "k": 0, "adapter": ""}] + args.variant
    for v in variants:
        stages = [{"type": "prefilter", "k": 100}]
        if v["mode"]:
            stages.append({"type": "rerank", "name": v["name"], "model": args.mllm, "mode": v["mode"], "k": v["k"],
                           "adapter": v["adapter"]})
        pipe = RetrievalPipeline.from_config(PipelineConfig(name=v["name"], encoder=EncoderConfig(model=args.clip),
                                                            stages=stages))
        start = time.perf_counter()
        report = evaluate(pipe, dataset, split=args.split, progress=False)
        stage = stages[-1].get("name", "prefilter")
        m = report["stages"][stage]
        twins = report.get("twins", {}).get(stage, {})
        n_queries = report["dataset"]["queries"]
        seconds = report["timings"]["stages"][stage]["seconds"]
        rows.append({"variant": v["name"], "mode": v["mode"] or "-", "k": v["k"] or "-", "adapter": v["adapter"] or "-",
                     "t2i": m["t2i"], "i2t": m["i2t"], "RSUM": m["RSUM"], "twins": twins,
                     "stage_seconds": seconds, "queries": n_queries, "wall_seconds": round(time.perf_counter() - start, 1)})
        print(f"done {v['name']} in {rows[-1]['wall_seconds']} s", flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    head = "| variant | mode | k | t2i R@1/5/10 | i2t R@1/5/10 | RSUM | twins t2i/i2t | stage s | wall s |"
    print(head + "\n|" + "---|" * (head.count("|") - 1))
    for r in rows:
        t, i, tw = r["t2i"], r["i2t"], r["twins"]
        twins = f"{tw.get('t2i', '-')} / {tw.get('i2t', '-')}" if tw else "-"
        print(f"| {r['variant']} | {r['mode']} | {r['k']} | {t['R@1']} / {t['R@5']} / {t['R@10']} | "
              f"{i['R@1']} / {i['R@5']} / {i['R@10']} | {r['RSUM']} | {twins} | {r['stage_seconds']} | {r['wall_seconds']} |")


if __name__ == "__main__":
    main()
