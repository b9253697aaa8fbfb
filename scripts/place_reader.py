"""Is where each object is readable from the image tokens an MLLM's language model gets? A small reader trained on them.

    python scripts/place_reader.py --mllm MLLM --data DATA [--fit 2000] [--steps 1500] [--json]

The MLLM's image features (what its language model reads, after the projector; for LLaVA also the tower's last state,
before it) are computed once, frozen. For every image and each of its two objects, the reader is told which object is
asked about and which is the other (colour and shape, as "Where is the red circle?" names them) and must say where the
first is relative to the second: left of, right of, above or below (chance 25%, and 50% within an axis). The reader:
two cross-attention queries made from the two objects' names, over the image tokens, then an MLP on what they read.

Two variants per level: the tokens alone (what their content holds of place) and the tokens with each one's 1-D index
in the sequence (learned embeddings, what a language model's 1-D positions could add). Fitted on the first ``--fit``
training images, scored on val. If the reader learns place where the MLLM does not (``twin_kinds.py --places``), the
information reaches the language model and the failure is in learning to use it.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

from genret.data import load_dataset, load_image
from genret.mllm import MLLM, scoring
from genret.world.scene import COLOURS, INVERSE, SHAPES, Scene

PLACES = ("left of", "right of", "above", "below")


def name_vector(obj) -> torch.Tensor:
    """One-hot colour and shape of an object (what a question names)."""
    v = torch.zeros(len(COLOURS) + len(SHAPES))
    v[list(COLOURS).index(obj.colour)] = 1
    v[len(COLOURS) + SHAPES.index(obj.shape)] = 1
    return v


def questions(records) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image and object: (image row, asked object's name, other's name, place class)."""
    rows, asked, other, place = [], [], [], []
    for i, r in enumerate(records):
        scene = Scene.from_dict(r.meta["scene"])
        a, b = scene.objects
        for x, y, p in ((a, b, scene.relation), (b, a, INVERSE[scene.relation])):
            rows.append(i), asked.append(name_vector(x)), other.append(name_vector(y)), place.append(PLACES.index(p))
    return torch.tensor(rows), torch.stack(asked), torch.stack(other), torch.tensor(place)


@torch.no_grad()
def token_levels(mllm: MLLM, records, batch: int = 64) -> dict[str, torch.Tensor]:
    """``(images, tokens, hidden)`` per level: after the projector, and (LLaVA) the tower's last state before it."""
    out: dict[str, list] = {"projected": [], "tower": []}
    tower = getattr(getattr(mllm.model, "model", mllm.model), "vision_tower", None)
    for s in range(0, len(records), batch):
        images = [load_image(r.path) for r in records[s:s + batch]]
        feats = scoring.image_features(mllm, images)
        out["projected"].append(torch.stack([mllm.family.feature_embeds(f) for f in feats]).float().cpu())
        if tower is not None:
            pixels = mllm.family.image_inputs(mllm.processor, images)["pixel_values"].to(mllm.device)
            n = out["projected"][-1].shape[1]
            out["tower"].append(tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, -n:]
                                .float().cpu())
    return {k: torch.cat(v) for k, v in out.items() if v}


class Reader(torch.nn.Module):
    """Two name-made queries attend over the tokens (plus, optionally, each token's index); an MLP says the place."""

    def __init__(self, hidden: int, tokens: int, names: int, width: int = 64, index: bool = False):
        super().__init__()
        self.keys = torch.nn.Linear(hidden, width)
        self.values = torch.nn.Linear(hidden, width)
        self.index = torch.nn.Parameter(torch.zeros(tokens, width)) if index else None
        self.query = torch.nn.Linear(names, width)
        self.head = torch.nn.Sequential(torch.nn.Linear(2 * width, width), torch.nn.GELU(),
                                        torch.nn.Linear(width, len(PLACES)))

    def read(self, tokens: torch.Tensor, name: torch.Tensor) -> torch.Tensor:
        k, v = self.keys(tokens), self.values(tokens)
        if self.index is not None:
            k, v = k + self.index, v + self.index
        att = torch.softmax(torch.einsum("bd,btd->bt", self.query(name), k) / k.shape[-1] ** 0.5, dim=-1)
        return torch.einsum("bt,btd->bd", att, v)

    def forward(self, tokens, asked, other):
        return self.head(torch.cat([self.read(tokens, asked), self.read(tokens, other)], dim=-1))


def fit_and_score(fit_tokens, fit_q, eval_tokens, eval_q, index: bool, steps: int, seed: int = 0) -> dict[str, float]:
    """Train a :class:`Reader` on ``fit`` (tokens standardised on it), accuracy (%) on both."""
    torch.manual_seed(seed)
    mu, sd = fit_tokens.mean((0, 1)), fit_tokens.std((0, 1)) + 1e-6
    fit_tokens, eval_tokens = (fit_tokens - mu) / sd, (eval_tokens - mu) / sd
    reader = Reader(fit_tokens.shape[-1], fit_tokens.shape[1], fit_q[1].shape[1], index=index)
    opt = torch.optim.AdamW(reader.parameters(), lr=2e-3, weight_decay=0.01)
    rows, asked, other, place = fit_q
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        pick = torch.randint(len(rows), (128,), generator=gen)
        loss = F.cross_entropy(reader(fit_tokens[rows[pick]], asked[pick], other[pick]), place[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()

    @torch.no_grad()
    def accuracy(tokens, q) -> float:
        r, a, o, p = q
        return round(100 * float((reader(tokens[r], a, o).argmax(-1) == p).float().mean()), 1)

    return {"fit": accuracy(fit_tokens, fit_q), "val": accuracy(eval_tokens, eval_q)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mllm", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--fit", type=int, default=2000, help="training images the reader is fitted on")
    parser.add_argument("--split", default="val", help="the split it is scored on")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.data)
    fit, held = data.split("train").records[:args.fit], data.split(args.split).records
    mllm = MLLM.load(args.mllm)
    mllm.model.eval()
    fit_levels, held_levels = token_levels(mllm, fit), token_levels(mllm, held)
    fit_q, held_q = questions(fit), questions(held)
    table = {f"{level}, {'with' if index else 'without'} 1-D index": fit_and_score(
        fit_levels[level], fit_q, held_levels[level], held_q, index, args.steps)
        for level in fit_levels for index in (False, True)}
    if args.json:
        print(json.dumps({"mllm": args.mllm, "fit_images": len(fit), "split": args.split, "accuracy_%": table},
                         indent=2))
        return
    print(f"{args.mllm}: where each object is, read from frozen image tokens by a small reader "
          f"({len(fit)} training images, scored on {args.split}; chance 25%)")
    print("| tokens | fit % | " + args.split + " % |\n|---|---|---|")
    for name, acc in table.items():
        print(f"| {name} | {acc['fit']} | {acc['val']} |")


if __name__ == "__main__":
    main()
