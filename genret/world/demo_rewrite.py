"""The demo's query-rewriting part: composed retrieval (CIReVL) and interactive retrieval (chat, EIIRwQR).

On the world the demo made, with its CLIP and MLLM, each through the same library calls as
``genret eval --task cir`` / ``--task dialog``:

- composed retrieval over the ``cirr/`` test triplets: the modification text alone, the reference image
  alone, CIReVL zero-shot, CIReVL with a LoRA rewriter (the shipped one, made by the recipe of
  docs/benchmarks.md; where none is shipped, a short one trained here with ``genret train rewriter``), and
  that with the MLLM reranking the prefilter's top 20 (generative scoring, zero-shot);
- interactive retrieval over the test images: chat with the oracle (scripted) questioner and with the MLLM
  asking, both answered by the simulated user; EIIRwQR with the MLLM rewriting from the user's marks. The
  MLLM uses the shipped questioner and feedback LoRAs where they are shipped, and runs zero-shot otherwise.

Sized to add a few minutes to the demo: the first :data:`TRIPLETS` triplets and :data:`DIALOG_QUERIES`
targets (the galleries stay whole). Reports go to ``out/report-cir`` and ``out/report-dialog-<variant>``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

from genret._io import read_json
from genret.data.cir import load_cir
from genret.eval.composed import evaluate_composed
from genret.eval.interactive import evaluate_dialog
from genret.eval.report import CIR_DEMO_KEYS as CIR_KEYS
from genret.eval.report import write_report
from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline

logger = logging.getLogger(__name__)

TRIPLETS = 200
DIALOG_QUERIES = 100
DIALOG_ROUNDS = 3


def demo_rewriter_config():
    """The CIReVL rewriter LoRA the demo trains where none is shipped (about a minute here, captions included).

    The recipe of docs/benchmarks.md (rank 64 on every projection of the language model; the world's own
    descriptions of the references join the captioner's, ``reference_text`` auto), for fewer steps.
    """
    from genret.training.rewriter import RewriterTrainConfig

    return RewriterTrainConfig(max_steps=400, batch_size=16, eval_triplets=0, lora_r=64, lora_alpha=128,
                               lora_targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")


def _pipelines(clip_dir: Path, variants: list[tuple]) -> list[tuple[str, RetrievalPipeline]]:
    """One pipeline per ``(name, stage[, later stage])``: ``stage → prefilter [→ later]``, sharing the first
    one's encoder (each indexes the gallery)."""
    out, first = [], None
    for name, stage, *later in variants:
        config = PipelineConfig(name=name, encoder=EncoderConfig(model=str(clip_dir)),
                                stages=(stage, {"type": "prefilter", "k": 100}, *later))
        pipe = RetrievalPipeline(config, encoder=first.encoder if first else None)
        out.append((name, pipe))
        first = first or pipe
    return out


def run_rewrite_demo(out: Path, world: Path, clip_dir: Path, mllm_dir: Path, fresh: bool = False,
                     progress: bool = True, adapters: dict[str, Path] | None = None) -> dict:
    """Evaluate every variant and write the reports; returns the tables.

    ``adapters``: the shipped LoRAs of the rewrite stages, by part (``rewriter``: CIReVL's; ``questioner``:
    chat's; ``feedback``: EIIRwQR's). Without a ``rewriter`` a short one is trained under ``out`` (unless one
    made with the same settings is there); without the others, those stages run zero-shot.
    """
    from genret.data import load_dataset
    from genret.training.rewriter import train_rewriter

    timings = {}
    t0 = time.perf_counter()
    adapters = adapters or {}
    rewriter = adapters.get("rewriter")
    adapter = rewriter or out / "rewriter-lora"
    if rewriter is not None:
        logger.info("rewriting 1/3: using the shipped CIReVL rewriter LoRA in %s", rewriter)
    else:
        config = demo_rewriter_config()
        made = read_json(adapter / "genret.json") if (adapter / "genret.json").is_file() else {}
        if fresh or made.get("config") != asdict(config) or made.get("base_model") != str(mllm_dir):
            logger.info("rewriting 1/3: training the CIReVL rewriter LoRA (%d steps)", config.max_steps)
            train_rewriter(str(mllm_dir), load_cir(world, "train"), adapter, config, progress=progress)
    timings["train_rewriter"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    logger.info("rewriting 2/3: composed retrieval, %d test triplets", TRIPLETS)
    cir = load_cir(world, "test")
    cache = str(out / "cache")
    compose = {"type": "cirevl", "mode": "compose", "model": str(mllm_dir), "cache_dir": cache}
    variants = [("text alone", {"type": "cirevl", "mode": "text"}), ("image alone", {"type": "cirevl", "mode": "image"}),
                ("CIReVL zero-shot", compose), ("CIReVL + LoRA", {**compose, "rewriter_adapter": str(adapter)}),
                ("CIReVL + LoRA → MLLM rerank", {**compose, "rewriter_adapter": str(adapter)},
                 {"type": "rerank", "model": str(mllm_dir), "mode": "generative", "k": 20})]
    cir_rows, reports = [], {}
    for name, pipe in _pipelines(clip_dir, variants):
        report = evaluate_composed(pipe, cir, progress=progress, limit=TRIPLETS)
        reports[name] = report
        m = report["stages"][list(report["stages"])[-1]]["cir"]
        cir_rows.append({"variant": name, **{k: m.get(k) for k in CIR_KEYS}, "fallbacks": report["fallbacks"]})
    write_report(reports["CIReVL + LoRA"], out / "report-cir")
    timings["composed"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    logger.info("rewriting 3/3: interactive retrieval, %d test images, %d rounds", DIALOG_QUERIES, DIALOG_ROUNDS)
    dataset = load_dataset(world)
    chat = {"type": "chat", "answerer": "facts", "query_format": "answers", "rounds": DIALOG_ROUNDS}
    asker = {**chat, "questioner": "mllm", "model": str(mllm_dir), "cache_dir": cache}
    feedback = {"type": "eiirwqr", "model": str(mllm_dir), "rounds": DIALOG_ROUNDS, "relevance": "facts",
                "cache_dir": cache}
    lora = lambda part: " + shipped LoRA" if part in adapters else " (zero-shot)"  # noqa: E731
    variants = [("chat, oracle questioner", {**chat, "questioner": "scripted"}),
                ("chat, MLLM questioner" + lora("questioner"),
                 {**asker, "adapter": str(adapters["questioner"])} if "questioner" in adapters else asker),
                ("EIIRwQR, MLLM rewriter" + lora("feedback"),
                 {**feedback, "adapter": str(adapters["feedback"])} if "feedback" in adapters else feedback)]
    dialog_rows = []
    for name, pipe in _pipelines(clip_dir, variants):
        report = evaluate_dialog(pipe, dataset, split="test", limit=DIALOG_QUERIES, progress=progress)
        m = report["stages"]["prefilter"]
        dialog_rows.append({"variant": name, "R@10": [r["R@10"] for r in m["rounds"]], "hits@10": m["hits@10"],
                            "fallbacks": report["fallbacks"]})
        write_report(report, out / f"report-dialog-{report['round_stage']['type']}-{len(dialog_rows)}")
    timings["interactive"] = time.perf_counter() - t0
    return {"composed": {"triplets": min(TRIPLETS, len(cir.triplets)), "gallery": len(cir.images), "rows": cir_rows,
                         "rewriter": {"adapter": str(adapter), "shipped": rewriter is not None,
                                      "steps": read_json(Path(adapter) / "genret.json").get("steps")}},
            "interactive": {"queries": DIALOG_QUERIES, "rounds": DIALOG_ROUNDS, "rows": dialog_rows},
            "seconds": {k: round(v, 1) for k, v in timings.items()}}
