"""Can the mini CLIP's vision architecture learn shape at all? Train it from scratch on shape presence.

    python scripts/shape_supervised.py --data WORLD [--patch-size 8] [--steps 600] [--threads 2]

A ``CLIPVisionModel`` shaped like the shipped mini CLIP's (4 layers, width 128, 4 heads, 64 px) with a linear
head is trained with binary cross-entropy on "does the scene hold a <shape>" for every shape, on the world's
training images (batch 128, AdamW 1e-3), and scored on the test images every 100 steps, next to the
majority-class rate. This asks for shape directly, as the contrastive loss does not have to.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from genret.data import load_dataset
from genret.data.images import load_image
from genret.world.scene import SHAPES, Scene


def _shape_labels(records) -> torch.Tensor:
    rows = []
    for r in records:
        a, b = Scene.from_dict(r.meta["scene"]).objects
        rows.append([int(s in (a.shape, b.shape)) for s in SHAPES])
    return torch.tensor(rows, dtype=torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    data = load_dataset(args.data)
    train, test = data.split("train").records, data.split("test").records
    processor = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    pixels = processor([load_image(str(r.path)) for r in train], return_tensors="pt")["pixel_values"]
    test_pixels = processor([load_image(str(r.path)) for r in test], return_tensors="pt")["pixel_values"]
    y, y_test = _shape_labels(train), _shape_labels(test)
    majority = torch.maximum(y_test.mean(0), 1 - y_test.mean(0)).mean().item()
    model = CLIPVisionModel(CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                             num_attention_heads=4, image_size=64, patch_size=args.patch_size))
    head = torch.nn.Linear(128, len(SHAPES))
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=1e-3, weight_decay=0.1)
    start = time.perf_counter()
    print(f"shape presence on {len(test)} test images, majority rate {100 * majority:.1f}%")
    for step in range(args.steps + 1):
        if step % 100 == 0:
            model.eval()
            with torch.no_grad():
                acc = ((head(model(pixel_values=test_pixels).pooler_output) > 0).float() == y_test).float().mean()
            model.train()
            print(f"step {step:4d}: test accuracy {100 * acc.item():.1f}%  ({time.perf_counter() - start:.0f} s)",
                  flush=True)
        if step == args.steps:
            break
        idx = torch.randint(0, len(train), (128,))
        loss = F.binary_cross_entropy_with_logits(head(model(pixel_values=pixels[idx]).pooler_output), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


if __name__ == "__main__":
    main()
