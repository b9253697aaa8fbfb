"""How many listwise candidates fit each real checkpoint's context, measured on its real processor and template.

For each fixture of ``tests/fixtures/checkpoints`` (real tokenizer, template, processor settings; shrunk layers),
the text→image listwise prompt of ``prompts/rerank_listwise.toml`` is built with 2 and with 3 candidate images of
a given size (several, as a listwise prompt holds them); the difference is one candidate's tokens, and the context (``max_position_embeddings``) gives the
largest k that fits. Both the checkpoint's processor settings and a bounded one are shown.

    python scripts/listwise_context.py [--size 640x480] [--checkpoint NAME] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Bounded settings a user would pick to rank many candidates at once.
BOUNDED = {"qwen2-vl-2b-instruct": {"max_pixels": 256 * 28 * 28}, "qwen2.5-vl-3b-instruct": {"max_pixels": 256 * 28 * 28},
           "smolvlm-256m-instruct": {"do_image_splitting": False}, "qwen3-vl-2b-instruct": {"max_pixels": 256 * 32 * 32},
           "qwen3.5-0.8b": {"max_pixels": 256 * 32 * 32}}


def measure(path: str, size: tuple[int, int], options: dict) -> dict:
    from PIL import Image

    from genret.mllm import MLLM
    from genret.mllm.scoring import _inputs, context_size, listwise_prompt, render
    from genret.prompts import load_prompt

    mllm = MLLM.load(path, processor_options=options)
    section = load_prompt("rerank_listwise").section("t2i")
    image = Image.new("RGB", size, "white")
    lengths = []
    for k in (2, 3):  # a listwise prompt holds several images (LLaVA-OneVision lays one alone out otherwise)
        messages, images = listwise_prompt(section["user"], section["item"], {"text": "a red circle left of a blue square"},
                                           [image] * k, "image")
        lengths.append(int(_inputs(mllm, [render(mllm, messages)], [images])["input_ids"].shape[1]))
    per = lengths[1] - lengths[0]
    fixed = lengths[0] - 2 * per
    limit = context_size(mllm)
    return {"per_candidate": per, "fixed": fixed, "context": limit, "k_fits": (limit - 8 - fixed) // per}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="640x480", help="candidate image size, WxH")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--checkpoint", action="append", default=None,
                        help="measure only this fixture (repeatable; default: every fixture)")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    sys.path.insert(0, str(ROOT / "tests"))
    from real_checkpoints import CHECKPOINTS, build

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.checkpoint or CHECKPOINTS:
            if name not in CHECKPOINTS:
                parser.error(f"--checkpoint {name!r}: no such fixture; known: {', '.join(CHECKPOINTS)}")
            path = str(build(name, Path(tmp) / name))
            for label, options in (("shipped", {}), ("bounded", BOUNDED.get(name))):
                if options is None:
                    continue
                rows.append({"checkpoint": name, "settings": label, "options": options, **measure(path, size, options)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"candidate images {args.size}")
    print(f"{'checkpoint':<34}{'settings':<34}{'tokens/cand':>12}{'context':>9}{'k fits':>8}")
    for r in rows:
        label = r["settings"] + (" " + json.dumps(r["options"]) if r["options"] else "")
        print(f"{r['checkpoint']:<34}{label:<34}{r['per_candidate']:>12,}{r['context']:>9,}{r['k_fits']:>8,}")


if __name__ == "__main__":
    main()
