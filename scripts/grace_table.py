"""Text→image quality of GRACE adapters (one per identifier scheme) next to the prefilter's, on one data set.

    python scripts/grace_table.py --clip CLIP --data DATA --adapter NAME:ADAPTER [--adapter ...] \
        [--split test] [--upstream-k 20] [--beams 10] [--queries N] [--json]

For every adapter (a ``genret train grace`` folder) two pipelines are evaluated with
``genret.eval.evaluate`` on text→image queries, exactly as ``genret eval`` does:

- ``alone``: prefilter → generate, decoding over the trie of the whole evaluation gallery (GRACE's own
  protocol: its trie holds the test images);
- ``within top-K``: the same, decoding only within each query's prefilter top ``--upstream-k`` (a hybrid
  stage: one subset trie per query);
- with ``--fusion-weight w``, also ``within top-K`` ranked by ``prefilter score + w · log P(identifier)``.

``--queries N`` keeps only the first N images of the split (and their captions); say so when quoting it.
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


def _adapter(text: str) -> tuple[str, str]:
    name, sep, path = text.partition(":")
    if not sep or not name or not path:
        raise SystemExit(f"--adapter {text!r}: expected NAME:ADAPTER_FOLDER")
    return name, path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--adapter", action="append", type=_adapter, default=[])
    parser.add_argument("--split", default="test")
    parser.add_argument("--upstream-k", type=int, default=20)
    parser.add_argument("--beams", type=int, default=10)
    parser.add_argument("--fusion-weight", type=float, default=None,
                        help="also evaluate 'within top K' ranked by prefilter + w * log P(id)")
    parser.add_argument("--queries", type=int, default=0, help="evaluate on the first N images of the split (0: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dataset = first_images(load_dataset(args.data), args.split, args.queries)
    kinds = [("alone", "none", None), (f"within top {args.upstream_k}", "upstream", None)]
    if args.fusion_weight is not None:
        kinds.append((f"top {args.upstream_k} + fusion {args.fusion_weight}", "upstream", args.fusion_weight))
    variants = [("prefilter", "", "", None)] + [(f"{name} {label}", path, restrict, w) for name, path in args.adapter
                                                for label, restrict, w in kinds]
    rows = []
    for label, adapter, restrict, weight in variants:
        stages = [{"type": "prefilter", "k": 100}]
        if adapter:
            stages.append({"type": "generate", "name": "generate", "adapter": adapter, "restrict": restrict,
                           "upstream_k": args.upstream_k, "num_beams": args.beams, "k": args.beams, "fusion_weight": weight})
        pipe = RetrievalPipeline.from_config(PipelineConfig(name="grace", encoder=EncoderConfig(model=args.clip),
                                                            stages=stages))
        start = time.perf_counter()
        report = evaluate(pipe, dataset, split=args.split, directions=("t2i",), progress=False)
        stage = "generate" if adapter else "prefilter"
        rows.append({"variant": label, "adapter": adapter or "-", "restrict": restrict or "-",
                     "t2i": report["stages"][stage]["t2i"], "twins": report.get("twins", {}).get(stage, {}),
                     "stage_seconds": report["timings"]["stages"][stage]["seconds"],
                     "queries": report["dataset"]["queries"], "wall_seconds": round(time.perf_counter() - start, 1)})
        print(f"done {label} in {rows[-1]['wall_seconds']} s", flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    head = "| variant | t2i R@1 / 5 / 10 | twins t2i | stage s |"
    print(head + "\n|" + "---|" * (head.count("|") - 1))
    for r in rows:
        t = r["t2i"]
        print(f"| {r['variant']} | {t['R@1']} / {t['R@5']} / {t['R@10']} | {r['twins'].get('t2i', '-')} | "
              f"{r['stage_seconds']} |")


if __name__ == "__main__":
    main()
