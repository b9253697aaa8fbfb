"""Peak memory of MLLM scoring at a real vocabulary: logits over every position against the positions scored.

On a shrunk Qwen2-VL-2B-Instruct (its real tokenizer and 151,936-token head; layers shrunk, see
``tests/fixtures/checkpoints``), pointwise and generative scoring of a batch of candidates, each way in a
fresh process so that its peak resident memory is its own:

- ``full``: the forward computes logits at every position, as genret did before issue 11
  (``(batch, tokens, 151936)`` in float32, then a log-softmax over all of it);
- ``kept``: genret's scoring (``logits_to_keep``: the answer position, or the text's positions).

    python scripts/bench_scoring_memory.py [--batch 16] [--pixels 200704] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(model_dir: str, mode: str, way: str, batch: int, pixels: int) -> dict:
    """One measurement, in this process: the peak's growth over what loading the model and inputs took."""
    import torch
    from PIL import Image

    from genret.mllm import MLLM
    from genret.mllm import scoring
    from genret.prompts import load_prompt

    torch.set_num_threads(2)
    mllm = MLLM.load(model_dir, processor_options={"max_pixels": pixels, "min_pixels": pixels})
    image = Image.new("RGB", (448, 448), "white")
    text = "a small red circle to the left of a large blue square"
    section = load_prompt(f"rerank_{mode}").section("t2i")
    if mode == "pointwise":
        prompts = [scoring.render(mllm, scoring.user_message(section["user"], text=text))] * batch
    else:
        fmt = scoring.answer_format(mllm)
        prompts = [scoring.render(mllm, scoring.user_message(section["user"])) + fmt.text(text)] * batch
    inputs = scoring._inputs(mllm, prompts, [[image]] * batch)
    tokens = int(inputs["input_ids"].shape[1])
    base = _peak_mib()
    with torch.inference_mode():
        if way == "full":
            logits = scoring._forward(mllm, inputs).logits
            logits.float().log_softmax(-1)
        elif mode == "pointwise":
            scoring.pointwise_scores(mllm, section["user"], [text] * batch, [image] * batch, batch_size=batch,
                                     shared_prefix=False)
        else:
            scoring.generative_scores(mllm, section["user"], [text] * batch, [image] * batch, batch_size=batch,
                                      shared_prefix=False)
    return {"mode": mode, "way": way, "batch": batch, "tokens": tokens, "vocab": mllm.model.get_output_embeddings().weight.shape[0],
            "peak_growth_mib": round(_peak_mib() - base, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--pixels", type=int, default=448 * 448, help="min_pixels = max_pixels: the image's size")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "MODE", "WAY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one, args.batch, args.pixels)))
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from real_checkpoints import build

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = str(build("qwen2-vl-2b-instruct", Path(tmp) / "qwen"))
        for mode in ("pointwise", "generative"):
            for way in ("full", "kept"):
                out = subprocess.run([sys.executable, __file__, "--one", model, mode, way, "--batch", str(args.batch),
                                      "--pixels", str(args.pixels)], capture_output=True, text=True, check=True)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'mode':<11}{'logits':<7}{'batch':>6}{'tokens':>8}{'vocab':>8}{'peak growth MiB':>17}")
    for r in rows:
        print(f"{r['mode']:<11}{r['way']:<7}{r['batch']:>6}{r['tokens']:>8}{r['vocab']:>8}{r['peak_growth_mib']:>17,.1f}")
    for mode in ("pointwise", "generative"):
        full, kept = (next(r for r in rows if r["mode"] == mode and r["way"] == w) for w in ("full", "kept"))
        print(f"{mode}: kept / full = {kept['peak_growth_mib'] / max(full['peak_growth_mib'], 1e-9):.3f}")


if __name__ == "__main__":
    main()
