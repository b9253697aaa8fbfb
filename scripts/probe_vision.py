"""What the vision side of the mini models can see: linear probes for shape and colour presence.

    python scripts/probe_vision.py --clip CLIP [--mllm MLLM] --data DATA [--train 2000] [--threads 2] [--json]

For every image of the miniature world the labels are, per shape and per colour, whether the scene
holds it (two objects: two shapes, two colours). A logistic probe per label is fitted on the features
of ``--train`` training images and scored on the test split, next to the majority-class rate:

- ``clip``: the dual encoder's image embedding (what the prefilter searches with);
- ``mllm layer L``: the MLLM's vision tower, mean of the patch states of layer L (what its projector reads).

A probe at the majority rate means the features hold no linearly readable trace of that attribute.

With ``--mllm``, the MLLM's greedy captions of the test images (prompt ``caption``) are also scored against
their scenes: how often a caption names both colours, both shapes, both "colour shape" pairs.
"""

from __future__ import annotations

import argparse
import json

import torch

from genret.data import load_dataset
from genret.data.images import load_image
from genret.world.scene import COLOURS, SHAPES, Scene


def _labels(records) -> torch.Tensor:
    rows = []
    for r in records:
        a, b = Scene.from_dict(r.meta["scene"]).objects
        rows.append([int(s in (a.shape, b.shape)) for s in SHAPES] + [int(c in (a.colour, b.colour)) for c in COLOURS])
    return torch.tensor(rows, dtype=torch.float32)


def _probe(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor, steps: int = 300):
    """Per-label test accuracy of a logistic probe, and the majority-class rate."""
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    torch.manual_seed(0)
    w = torch.zeros(xtr.shape[1], ytr.shape[1], requires_grad=True)
    b = torch.zeros(ytr.shape[1], requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xtr @ w + b, ytr) + 1e-3 * w.pow(2).sum()
        loss.backward()
        opt.step()
    acc = (((xte @ w + b) > 0).float() == yte).float().mean(0)
    base = torch.maximum(yte.mean(0), 1 - yte.mean(0))
    return acc, base


@torch.no_grad()
def _mllm_features(path: str, records, batch: int = 100) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    layers = model.config.vision_config.num_hidden_layers
    out: dict[str, list] = {}
    for s in range(0, len(records), batch):
        pixels = processor.image_processor([load_image(str(r.path)) for r in records[s:s + batch]],
                                           return_tensors="pt")["pixel_values"]
        states = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        for layer in range(1, layers + 1):
            out.setdefault(f"mllm layer {layer}", []).append(states[layer][:, 1:].mean(1))
    return {k: torch.cat(v) for k, v in out.items()}


def caption_accuracy(mllm_path: str, records) -> dict:
    """Percent of captions naming both colours, both shapes, and both colour-shape pairs of the scene."""
    from genret.mllm import MLLM
    from genret.mllm.captioner import Captioner

    captions = Captioner(MLLM.load(mllm_path), "caption", max_new_tokens=48).caption([str(r.path) for r in records])
    hits = {"colours": 0, "shapes": 0, "pairs": 0}
    for r, text in zip(records, captions):
        a, b = Scene.from_dict(r.meta["scene"]).objects
        text = f" {text.lower()} "
        hits["colours"] += a.colour in text and b.colour in text
        hits["shapes"] += a.shape in text and b.shape in text
        hits["pairs"] += f" {a.colour} {a.shape}" in text and f" {b.colour} {b.shape}" in text
    return {k: round(100.0 * v / len(records), 1) for k, v in hits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", required=True)
    parser.add_argument("--mllm", default="")
    parser.add_argument("--data", required=True)
    parser.add_argument("--train", type=int, default=2000, help="training images the probes are fitted on")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from genret.encoders.hf import HFDualEncoder

    data = load_dataset(args.data)
    train, test = data.split("train").records[: args.train], data.split("test").records
    ytr, yte = _labels(train), _labels(test)
    clip = HFDualEncoder(args.clip, device="cpu")
    feats = {"clip": tuple(torch.as_tensor(clip.encode_images([str(r.path) for r in recs])) for recs in (train, test))}
    if args.mllm:
        a, b = _mllm_features(args.mllm, train), _mllm_features(args.mllm, test)
        feats.update({k: (a[k], b[k]) for k in a})
    n = len(SHAPES)
    rows = []
    for name, (xtr, xte) in feats.items():
        acc, base = _probe(xtr, ytr, xte, yte)
        rows.append({"features": name, "dim": int(xtr.shape[1]),
                     "shape_acc": round(100 * acc[:n].mean().item(), 1), "shape_majority": round(100 * base[:n].mean().item(), 1),
                     "colour_acc": round(100 * acc[n:].mean().item(), 1), "colour_majority": round(100 * base[n:].mean().item(), 1)})
    captions = caption_accuracy(args.mllm, test) if args.mllm else None
    if args.json:
        print(json.dumps({"train": len(train), "test": len(test), "rows": rows, "captions": captions}, indent=2))
        return
    print(f"presence probes, {len(train)} training images -> {len(test)} test images, accuracy % (majority rate):")
    for r in rows:
        print(f"  {r['features']:14s} shape {r['shape_acc']:5.1f} ({r['shape_majority']:.1f})   "
              f"colour {r['colour_acc']:5.1f} ({r['colour_majority']:.1f})")
    if captions:
        print(f"MLLM captions of the test images naming both colours {captions['colours']}%, both shapes "
              f"{captions['shapes']}%, both colour-shape pairs {captions['pairs']}%")


if __name__ == "__main__":
    main()
