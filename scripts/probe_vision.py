"""What the vision side of the mini models can see: a linear probe per attribute of the images.

    python scripts/probe_vision.py --clip CLIP [--mllm MLLM] --data DATA [--train 2000] [--redraw] [--threads 2] [--json]

The labels are the records' attributes as their annotation plug-in names them
(:meth:`genret.data.annotations.Annotation.attributes`; for the miniature world: each object's shape, colour and
size in reading order, and the layout, which with the reading order is the relation). A softmax probe per
attribute is fitted on the features of ``--train`` training images and scored on the whole test split, beside the
majority-class rate (what a probe that reads nothing gets):

- ``clip``: the dual encoder's image embedding (what the prefilter searches with);
- ``mllm projected``: the mini MLLM's projected image features, the tokens its language model reads (flattened).

With ``--redraw``, the test scenes are drawn again by the plug-in's ``render`` (the training images' look; for the
miniature world its training style, where val and test turn their objects further and outline them) and probed as
a third column set: what of a drop is the test style and what is the scene.

With ``--mllm --captions``, the MLLM's greedy captions of the test images (prompt ``caption``) are also scored against
the attributes: how often a caption names every object's colour, shape and both.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from genret.data import load_dataset
from genret.data.annotations import annotation_of


def labels(records) -> tuple[dict[str, list[str]], torch.Tensor]:
    """Each attribute's classes (sorted) and the records' class indices, one column per attribute."""
    attrs = []
    for r in records:
        found = annotation_of(r.meta)
        if found is None:
            raise SystemExit(f"{r.path}: no annotation a plug-in knows; the probe needs the records' attributes")
        attrs.append(found[1].attributes(found[2]))
    classes = {name: sorted({a[name] for a in attrs}) for name in attrs[0]}
    return classes, torch.tensor([[classes[n].index(a[n]) for n in classes] for a in attrs])


def probe(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor, n_classes: list[int],
          steps: int = 300, decay: float = 1e-3) -> list[float]:
    """Test accuracy (%) of a softmax probe per attribute (column), fitted on standardised training features."""
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    out = []
    for j, k in enumerate(n_classes):
        torch.manual_seed(0)
        w = torch.zeros(xtr.shape[1], k, requires_grad=True)
        b = torch.zeros(k, requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=1e-2)
        for _ in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(xtr @ w + b, ytr[:, j]) + decay * w.pow(2).sum()
            loss.backward()
            opt.step()
        out.append(100 * float(((xte @ w + b).argmax(1) == yte[:, j]).float().mean()))
    return out


def majority(ytr: torch.Tensor, yte: torch.Tensor) -> list[float]:
    """Test accuracy (%) of naming each attribute's most frequent training class."""
    return [100 * float((yte[:, j] == ytr[:, j].mode().values).float().mean()) for j in range(ytr.shape[1])]


@torch.no_grad()
def mllm_features(path: str, records) -> torch.Tensor:
    """The MLLM's projected image features (what its language model reads), flattened per image."""
    from genret.mllm import MLLM
    from genret.training.models import image_features

    mllm = MLLM.load(path)
    return torch.stack([f.float().flatten() for f in image_features(mllm, [str(r.path) for r in records])])


def caption_accuracy(mllm_path: str, records) -> dict:
    """Percent of captions naming every object's colour, every shape, and every colour-shape pair."""
    from genret.mllm import MLLM
    from genret.mllm.captioner import Captioner

    captions = Captioner(MLLM.load(mllm_path), "caption", max_new_tokens=48).caption([str(r.path) for r in records])
    hits = {"colours": 0, "shapes": 0, "pairs": 0}
    for r, text in zip(records, captions):
        _, kind, value = annotation_of(r.meta)
        a = kind.attributes(value)
        objs = [(a[f"{p} colour"], a[f"{p} shape"]) for p in ("first", "second")]
        text = f" {text.lower()} "
        hits["colours"] += all(c in text for c, _ in objs)
        hits["shapes"] += all(s in text for _, s in objs)
        hits["pairs"] += all(f" {c} {s}" in text for c, s in objs)
    return {k: round(100.0 * v / len(records), 1) for k, v in hits.items()}


def redraw(records, folder: Path) -> list:
    """``records`` with their images drawn again by their plug-in's ``render`` into ``folder`` (same size, seeded)."""
    from dataclasses import replace

    from genret.data.images import load_image

    out = []
    for i, r in enumerate(records):
        _, kind, value = annotation_of(r.meta)
        path = folder / f"{i}.png"
        kind.render(value, load_image(r.path).size[0], 1_000_003 + i).save(path)
        out.append(replace(r, path=path))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", required=True)
    parser.add_argument("--mllm", default="")
    parser.add_argument("--data", required=True)
    parser.add_argument("--train", type=int, default=2000, help="training images the probes are fitted on")
    parser.add_argument("--captions", action="store_true", help="with --mllm: score its captions too")
    parser.add_argument("--redraw", action="store_true", help="also probe the test scenes drawn again by the "
                        "plug-in's render (the training images' look)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from genret.encoders.hf import HFDualEncoder

    data = load_dataset(args.data)
    train, test = data.split("train").records[: args.train], data.split("test").records
    classes, ytr = labels(train)
    test_classes, yte_raw = labels(test)
    yte = torch.tensor([[classes[n].index(test_classes[n][int(i)]) if test_classes[n][int(i)] in classes[n] else -1
                         for n, i in zip(classes, row)] for row in yte_raw])
    clip = HFDualEncoder(args.clip, device="cpu")
    feats = {"clip": tuple(torch.as_tensor(clip.encode_images([str(r.path) for r in recs])) for recs in (train, test))}
    if args.mllm:
        feats["mllm projected"] = (mllm_features(args.mllm, train), mllm_features(args.mllm, test))
    if args.redraw:
        with tempfile.TemporaryDirectory() as tmp:
            redrawn = redraw(test, Path(tmp))
            feats["clip, test redrawn"] = (feats["clip"][0], torch.as_tensor(clip.encode_images([str(r.path) for r in redrawn])))
            if args.mllm:
                feats["mllm, test redrawn"] = (feats["mllm projected"][0], mllm_features(args.mllm, redrawn))
    sizes = [len(c) for c in classes.values()]
    table = {"majority": dict(zip(classes, (round(v, 1) for v in majority(ytr, yte))))}
    for name, (xtr, xte) in feats.items():
        table[name] = dict(zip(classes, (round(v, 1) for v in probe(xtr.float(), ytr, xte.float(), yte, sizes))))
    captions = caption_accuracy(args.mllm, test) if args.mllm and args.captions else None
    if args.json:
        print(json.dumps({"train": len(train), "test": len(test), "dims": {k: int(v[0].shape[1]) for k, v in feats.items()},
                          "accuracy": table, "captions": captions}, indent=2))
        return
    cols = list(table)
    print(f"linear probes, {len(train)} training images -> {len(test)} test images, accuracy %:")
    print("| attribute | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for attr in classes:
        print(f"| {attr} | " + " | ".join(f"{table[c][attr]:.1f}" for c in cols) + " |")
    print("| lowest | " + " | ".join(f"{min(table[c].values()):.1f}" for c in cols) + " |")
    if captions:
        print(f"MLLM captions of the test images naming every colour {captions['colours']}%, every shape "
              f"{captions['shapes']}%, every colour-shape pair {captions['pairs']}%")


if __name__ == "__main__":
    main()
