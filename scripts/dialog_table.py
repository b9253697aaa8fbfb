"""Interactive retrieval round by round (ChatIR chat, EIIRwQR feedback rewriting), and what each part costs.

    python scripts/dialog_table.py --clip CLIP --mllm MLLM --data DATA [--questioner ADAPTER] \
        [--feedback-rewriter ADAPTER] [--dialog-clip CLIP] [--oracle-only] [--rounds 5] [--limit N] [--cache-dir DIR]
        [--json]

Every variant is the pipeline ``round stage → prefilter`` evaluated with
``genret.eval.interactive.evaluate_dialog``, exactly as ``genret eval --task dialog`` does (every image of
the split is a target; round 0 retrieves with a partial description naming one of its objects):

- ``chat oracle``: the scripted questions, the facts answerer (the ceiling of this answerer and encoder);
- ``chat zero-shot`` / ``chat + LoRA``: the MLLM asks (``--questioner``: a ``genret train rewriter --task chat``
  adapter), the facts answerer replies (questions only);
- ``eiirwqr zero-shot`` / ``eiirwqr + LoRA``: each round 5 unseen results are shown, the simulated user marks
  those sharing 3 of the target's 5 scene facts, the MLLM captions and rewrites (``--feedback-rewriter``: a
  ``genret train rewriter --task eiirwqr`` adapter).

``--dialog-clip`` (a ``genret train clip-dialog`` checkpoint) adds each chat variant again with that encoder as the
prefilter (same images, same dialogs: only the text side differs); ``--oracle-only`` skips the MLLM variants.

Queries use the dialog's answers (``query_format = "answers"``): the mini CLIP reads 32 tokens. Each MLLM
variant runs twice over one fresh cache folder, cold then warm, and reports milliseconds per query and
round of each part.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

from genret.data import load_dataset
from genret.eval.interactive import evaluate_dialog
from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline


def _pipe(clip: str, stage: dict) -> RetrievalPipeline:
    return RetrievalPipeline(PipelineConfig(name=stage["type"], encoder=EncoderConfig(model=clip),
                                            stages=(stage, {"type": "prefilter", "k": 100})))


def _costs(report: dict) -> dict:
    return {k: v["ms_per_query_round"] for k, v in report["timings"]["parts"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", required=True)
    parser.add_argument("--mllm", default="", help="the MLLM of the zero-shot and LoRA variants")
    parser.add_argument("--data", required=True)
    parser.add_argument("--questioner", default="", help="a chat questioner adapter (adds 'chat + LoRA')")
    parser.add_argument("--feedback-rewriter", default="", help="an eiirwqr rewriter adapter (adds 'eiirwqr + LoRA')")
    parser.add_argument("--dialog-clip", default="", help="a dialog-trained CLIP: the chat variants again with it")
    parser.add_argument("--oracle-only", action="store_true", help="only the oracle chat (no MLLM variants)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--cache-dir", default="")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.data)
    tmp = tempfile.TemporaryDirectory()
    cache = args.cache_dir or tmp.name
    chat = {"type": "chat", "answerer": "facts", "query_format": "answers", "rounds": args.rounds}
    mllm_chat = {**chat, "questioner": "mllm", "model": args.mllm}
    eiir = {"type": "eiirwqr", "model": args.mllm, "rounds": min(args.rounds, 3), "shown": 5, "relevance": "facts",
            "min_facts": 3}
    if not args.oracle_only and not args.mllm:
        parser.error("--mllm is needed for the MLLM variants (or pass --oracle-only)")
    chats = [("chat oracle", {**chat, "questioner": "scripted"})]
    if not args.oracle_only:
        chats.append(("chat zero-shot", {**mllm_chat, "cache_dir": f"{cache}/chat"}))
        if args.questioner:
            chats.append(("chat + LoRA", {**mllm_chat, "adapter": args.questioner, "cache_dir": f"{cache}/chat-lora"}))
    variants = [(name, stage, args.clip) for name, stage in chats]
    if args.dialog_clip:
        variants += [(f"{name}, dialog-trained encoder", stage, args.dialog_clip) for name, stage in chats]
    if not args.oracle_only:
        variants.append(("eiirwqr zero-shot", {**eiir, "cache_dir": f"{cache}/eiirwqr"}, args.clip))
        if args.feedback_rewriter:
            variants.append(("eiirwqr + LoRA", {**eiir, "adapter": args.feedback_rewriter,
                                                "cache_dir": f"{cache}/eiirwqr-lora"}, args.clip))
    rows = []
    for name, stage, clip in variants:
        report = evaluate_dialog(_pipe(clip, stage), data, split=args.split, limit=args.limit, progress=False)
        m = report["stages"]["prefilter"]
        row = {"variant": name, "R@10": [r["R@10"] for r in m["rounds"]], "R@1": [r["R@1"] for r in m["rounds"]],
               "hits@10": m["hits@10"], "fallbacks": report["fallbacks"], "cold_ms": _costs(report)}
        if stage.get("cache_dir"):
            warm = evaluate_dialog(_pipe(clip, stage), data, split=args.split, limit=args.limit, progress=False)
            assert warm["stages"] == report["stages"], "a warm run must reproduce the cold one"
            row["warm_ms"] = _costs(warm)
        rows.append(row)
        print(f"{name}: {row}", flush=True)
    out = {"data": args.data, "split": args.split, "queries": report["dataset"]["queries"]["dialog"], "rows": rows}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    fmt = lambda xs: " → ".join(f"{x:.1f}" for x in xs)  # noqa: E731
    print(f"\n{out['queries']} queries ({args.split}), percent, round 0 → last round:\n")
    print("| variant | R@1 | R@10 | Hits@10 (cumulative) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {fmt(r['R@1'])} | {fmt(r['R@10'])} | {fmt(r['hits@10'])} |")
    print("\nms per query and round, cold cache -> warm cache:\n")
    for r in rows:
        parts = ", ".join(f"{p} {c:.2f}" + (f" -> {r['warm_ms'][p]:.2f}" if "warm_ms" in r else "")
                          for p, c in r["cold_ms"].items())
        print(f"- {r['variant']}: {parts}")


if __name__ == "__main__":
    main()
