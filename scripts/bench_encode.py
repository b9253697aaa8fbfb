"""Encoding throughput of a dual encoder (images/s and texts/s) at several batch sizes.

    python scripts/bench_encode.py demo-out/clip --data demo-out/world [--batch-sizes 1,32,128] [--json]

Thin: it loads the encoder and the dataset through genret and times ``encode_images`` /
``encode_texts`` (no cache), best of ``--repeats`` runs, on ``--threads`` CPU threads.
"""

from __future__ import annotations

import argparse
import json

import torch
from _bench import best_of

from genret.data import load_dataset
from genret.data.images import load_image
from genret.encoders import load_encoder




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="encoder model directory or id")
    parser.add_argument("--data", required=True, help="dataset (its test split is encoded)")
    parser.add_argument("--backend", default="hf")
    parser.add_argument("--batch-sizes", default="1,32,128")
    parser.add_argument("--n", type=int, default=512, help="images (and texts) per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    encoder = load_encoder(args.backend, args.model, device="cpu")
    records = load_dataset(args.data).split("test").records
    images = [load_image(r.path) for r in records][: args.n]  # decoded once: we time the model, not PNG decoding
    texts = [c for r in records for c in r.captions][: args.n]
    rows = []
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        n_img = min(len(images), max(bs * 4, 64) if bs == 1 else len(images))
        ti = best_of(lambda: encoder.encode_images(images[:n_img], batch_size=bs), args.repeats)
        tt = best_of(lambda: encoder.encode_texts(texts[:n_img], batch_size=bs), args.repeats)
        rows.append({"batch_size": bs, "images_per_s": round(n_img / ti, 1), "texts_per_s": round(n_img / tt, 1),
                     "n": n_img})
    n_params = sum(p.numel() for p in encoder.model.parameters())
    result = {"model": args.model, "parameters": n_params, "threads": args.threads, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.model}: {n_params / 1e6:.2f}M parameters, {args.threads} threads")
    print("| batch | images/s | texts/s |\n|---|---|---|")
    for r in rows:
        print(f"| {r['batch_size']} | {r['images_per_s']:.0f} | {r['texts_per_s']:.0f} |")


if __name__ == "__main__":
    main()
