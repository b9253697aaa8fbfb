"""The rerank stage's fusion weight (LamRA's ``upstream + w · rerank``), chosen on one split, reported on another.

    python scripts/fusion_sweep.py --clip CLIP --mllm MLLM --data DATA --mode generative [--adapter LORA]
        [--k 10] [--choose-on val] [--report-on test] [--weights 0.001,0.003,...] [--json]

The rerank scores are computed once per split (prefilter k=100 → rerank of the top ``k``, no fusion, as
``genret eval`` runs it, twins included); every weight then re-sorts the same candidates. The weight with the best
mean R@1 over both directions on ``--choose-on`` (the smaller one on a tie) is the one reported on ``--report-on``,
beside the prefilter alone and the rerank alone; the test split never picks the weight.
"""

from __future__ import annotations

import argparse
import json

import torch

from genret.data import load_dataset
from genret.eval.evaluator import twin_pairs, twin_queries
from genret.eval.metrics import recall_at_ks
from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline

WEIGHTS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


def scored(pipe: RetrievalPipeline, dataset, split: str) -> dict:
    """Per direction, the rerank stage's candidates (with both stages' scores) and the right ids; twins too."""
    data = dataset.split(split)
    pipe.index(data, modalities=["image", "text"], progress=False)
    out = {}
    for direction in ("t2i", "i2t"):
        queries, relevant = data.text_queries() if direction == "t2i" else data.image_queries()
        rankings = dict(pipe.run(queries))["rerank"]
        out[direction] = ([r.candidates for r in rankings], relevant)
    pairs = twin_pairs(data)
    for direction, (queries, upstream, correct) in twin_queries(data, pairs, ("t2i", "i2t")).items():
        k = max(len(r.candidates) for r in upstream)
        rankings = dict(pipe.run(queries, k=k, upstream=upstream))["rerank"]
        out[f"twins {direction}"] = ([r.candidates for r in rankings], correct)
    return out


def measure(scores: dict, weight: float | None) -> dict:
    """R@1/5/10 per direction and twin accuracy with candidates ranked by ``prefilter + weight · rerank``
    (``None``: the rerank score alone; 0: the prefilter's order)."""
    def key(c):
        return c.scores["rerank"] if weight is None else c.scores["prefilter"] + weight * c.scores["rerank"]

    out = {}
    for name, (candidates, relevant) in scores.items():
        ids = [[c.item_id for c in sorted(cands, key=lambda c: -key(c))] for cands in candidates]
        if name.startswith("twins"):
            out[name] = round(100.0 * sum(bool(i) and i[0] in ok for i, ok in zip(ids, relevant)) / max(1, len(ids)), 2)
        else:
            out[name] = {k: round(100.0 * v, 2) for k, v in recall_at_ks(ids, relevant, (1, 5, 10)).items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--clip", "--mllm", "--data", "--mode"):
        parser.add_argument(name, required=True)
    parser.add_argument("--adapter", default="")
    parser.add_argument("--k", type=int, default=10, help="prefilter candidates the rerank stage judges")
    parser.add_argument("--choose-on", default="val")
    parser.add_argument("--report-on", default="test")
    parser.add_argument("--weights", default=",".join(map(str, WEIGHTS)))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.choose_on == args.report_on:
        raise SystemExit("--choose-on and --report-on must differ: the split that reports a weight cannot choose it")
    torch.set_num_threads(args.threads)
    weights = [float(w) for w in args.weights.split(",")]
    dataset = load_dataset(args.data)
    stages = [{"type": "prefilter", "k": 100},
              {"type": "rerank", "name": "rerank", "model": args.mllm, "mode": args.mode, "k": args.k,
               "adapter": args.adapter}]
    pipe = RetrievalPipeline.from_config(PipelineConfig(name="fusion-sweep", encoder=EncoderConfig(model=args.clip),
                                                        stages=stages))
    choose = scored(pipe, dataset, args.choose_on)
    grid = {w: measure(choose, w) for w in weights}
    best = max(weights, key=lambda w: (grid[w]["t2i"]["R@1"] + grid[w]["i2t"]["R@1"], -w))
    report = scored(pipe, dataset, args.report_on)
    rows = [("prefilter", measure(report, 0.0)), ("rerank alone", measure(report, None)),
            (f"fused, w = {best}", measure(report, best))]
    result = {"mode": args.mode, "adapter": args.adapter, "k": args.k, "chosen_on": args.choose_on,
              "grid": {str(w): m for w, m in grid.items()}, "weight": best, "reported_on": args.report_on,
              "report": dict(rows)}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.choose_on} (chooses the weight): t2i / i2t R@1, twins t2i / i2t")
    for w, m in grid.items():
        print(f"  w = {w}: {m['t2i']['R@1']} / {m['i2t']['R@1']}, twins {m.get('twins t2i', '-')} / "
              f"{m.get('twins i2t', '-')}{'  <- chosen' if w == best else ''}")
    head = f"| {args.report_on} | t2i R@1 / 5 / 10 | i2t R@1 / 5 / 10 | twins t2i / i2t |"
    print(head + "\n|---|---|---|---|")
    for name, m in rows:
        t, i = m["t2i"], m["i2t"]
        print(f"| {name} | {t['R@1']} / {t['R@5']} / {t['R@10']} | {i['R@1']} / {i['R@5']} / {i['R@10']} | "
              f"{m.get('twins t2i', '-')} / {m.get('twins i2t', '-')} |")


if __name__ == "__main__":
    main()
