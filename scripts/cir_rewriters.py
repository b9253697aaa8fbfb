"""Compare CIReVL rewriter LoRAs: retrieval with each, and how well each edits a correct description.

    python scripts/cir_rewriters.py --clip CLIP --mllm MLLM --data WORLD --rewriter A [--rewriter B ...] \
        [--split val] [--cache-dir DIR] [--json]

For every ``--rewriter`` (a ``genret train rewriter`` adapter of ``--mllm``), on the split's triplets:

- ``R@1``, ``R@5``, ``R@10``: the pipeline ``cirevl (compose, that LoRA) → prefilter``, evaluated as
  ``genret eval --task cir`` does (the MLLM captions the reference, as at inference);
- ``edit exact match``: the LoRA given the world's own full description of each reference instead of the
  caption, against the target's full description closest to it (``genret.training.rewriter.rewrite_pairs``):
  the rewriting skill alone, without the captioner's mistakes. Needs the world's ``scenes.json``.

Choose a recipe on ``val``; report ``test`` once.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

from genret.data.cir import load_cir
from genret.eval.composed import evaluate_composed
from genret.mllm import MLLM
from genret.mllm.rewriter import Rewriter
from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline
from genret.training.rewriter import dataset_captions, normalise_text, rewrite_pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", required=True)
    parser.add_argument("--mllm", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--rewriter", action="append", required=True, help="an adapter (repeat to compare)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--cache-dir", default="", help="keep the caches here (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cir = load_cir(args.data, args.split)
    tmp = tempfile.TemporaryDirectory()
    cache = args.cache_dir or tmp.name
    pairs = rewrite_pairs(cir, dataset_captions(cir, seed=1))
    rows = []
    for i, adapter in enumerate(args.rewriter):
        stage = {"type": "cirevl", "mode": "compose", "model": args.mllm, "rewriter_adapter": adapter,
                 "cache_dir": f"{cache}/{i}"}
        pipe = RetrievalPipeline(PipelineConfig(name=adapter, encoder=EncoderConfig(model=args.clip),
                                                stages=(stage, {"type": "prefilter", "k": 100})))
        m = evaluate_composed(pipe, cir, progress=False)["stages"]["prefilter"]["cir"]
        mllm = MLLM.load(args.mllm)
        mllm.attach_adapter(adapter, task="rewriter", mode="rewrite")
        done = Rewriter(mllm, "cirevl").rewrite([r for r, _ in pairs], ["" for _ in pairs])
        exact = sum(normalise_text(d.text) == normalise_text(t) for d, (_, t) in zip(done, pairs))
        rows.append({"rewriter": adapter, **{k: m[k] for k in ("R@1", "R@5", "R@10")},
                     "edit_exact_match": round(100.0 * exact / len(pairs), 1)})
        print(rows[-1], flush=True)
    if args.json:
        print(json.dumps({"split": args.split, "triplets": len(cir.triplets), "rows": rows}, indent=2))
        return
    print(f"\n{len(cir.triplets)} {args.split} triplets, {len(cir.images)}-image gallery, percent:\n")
    print("| rewriter | R@1 | R@5 | R@10 | edit exact match |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rewriter']} | {r['R@1']:.1f} | {r['R@5']:.1f} | {r['R@10']:.1f} | {r['edit_exact_match']:.1f} |")


if __name__ == "__main__":
    main()
