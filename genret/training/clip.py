"""Contrastive training of a small ``CLIPModel`` (symmetric InfoNCE) on any image-caption dataset.

The result is a plain Hugging Face checkpoint (model, processor, tokenizer) plus ``genret.json``,
so ``CLIPModel.from_pretrained``, ``AutoProcessor`` and genret's encoder backends load it like any
CLIP checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from genret import __version__
from genret._io import atomic_dir, write_json
from genret.data.dataset import Dataset
from genret.data.images import load_image
from genret.eval.metrics import recall_at_k
from genret.config import check_bounds
from genret.bpe import train_clip_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class CLIPTrainConfig:
    """Architecture and optimisation of a mini CLIP."""

    image_size: int = field(default=64, metadata={"help": "input resolution (square)"})
    patch_size: int = field(default=8, metadata={"help": "ViT patch size"})
    vision_layers: int = field(default=4, metadata={"help": "ViT layers"})
    vision_width: int = field(default=128, metadata={"help": "ViT hidden size"})
    text_layers: int = field(default=4, metadata={"help": "text transformer layers"})
    text_width: int = field(default=128, metadata={"help": "text transformer hidden size"})
    heads: int = field(default=4, metadata={"help": "attention heads in both towers"})
    projection_dim: int = field(default=128, metadata={"help": "shared embedding dimension"})
    context_length: int = field(default=32, metadata={"help": "text tokens per caption"})
    vocab_size: int = field(default=2000, metadata={"help": "upper bound of the BPE vocabulary"})
    epochs: int = field(default=20, metadata={"help": "passes over the training images"})
    batch_size: int = field(default=128, metadata={"help": "image-caption pairs per step (in-batch negatives)"})
    lr: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay"})
    warmup: float = field(default=0.05, metadata={"help": "fraction of steps of linear warm-up"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})
    shape_negatives: bool = field(default=False, metadata={"help": "miniature world: add to every batch each image "
                                                                   "redrawn with one shape changed, and its captions"})

    def __post_init__(self) -> None:
        check_bounds(self, at_least_one=("image_size", "patch_size", "vision_layers", "vision_width", "text_layers",
                     "text_width", "heads", "projection_dim", "context_length", "epochs", "batch_size"))
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.vision_width % self.heads or self.text_width % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide vision_width and text_width")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")


def build_clip(config: CLIPTrainConfig, tokenizer):
    """A randomly initialised ``CLIPModel`` and its ``CLIPProcessor`` for ``config``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    text = dict(vocab_size=len(tokenizer), hidden_size=config.text_width, intermediate_size=4 * config.text_width,
                num_hidden_layers=config.text_layers, num_attention_heads=config.heads,
                max_position_embeddings=config.context_length, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=config.vision_width, intermediate_size=4 * config.vision_width,
                  num_hidden_layers=config.vision_layers, num_attention_heads=config.heads,
                  image_size=config.image_size, patch_size=config.patch_size)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=config.projection_dim))
    size = config.image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def shape_swaps(records, image_size: int, captions_per_image: int, seed: int = 0) -> tuple[list, list[list[str]]]:
    """For each record with a scene, the scene with one object's shape changed, drawn anew, and its captions.

    The hard negatives of ``shape_negatives``: same colours, sizes and places, another shape, so only
    shape tells an image from its swap (as only binding tells a test image from its twin).
    """
    import random

    from genret.data.scene import SHAPES, Scene
    from genret.data.synth import render

    rng = random.Random(seed)
    images, texts = [], []
    for r in records:
        scene = Scene.from_dict(r.meta["scene"])
        k = rng.randrange(2)
        obj = scene.objects[k]
        other = scene.objects[1 - k]
        shape = rng.choice([s for s in SHAPES if s != obj.shape and (s, obj.colour) != (other.shape, other.colour)])
        objects = list(scene.objects)
        objects[k] = type(obj)(shape, obj.colour, obj.size, obj.x, obj.y)
        swapped = Scene(tuple(objects), scene.relation)
        images.append(render(swapped, image_size, rng.getrandbits(32)))
        texts.append(swapped.captions(rng, captions_per_image))
    return images, texts


def _pixels(processor, records, batch: int = 256) -> torch.Tensor:
    chunks = []
    for i in range(0, len(records), batch):
        images = [load_image(r.path) for r in records[i:i + batch]]
        chunks.append(processor.image_processor(images=images, return_tensors="pt")["pixel_values"])
    return torch.cat(chunks)


@torch.no_grad()
def _val_recall(model, pixels: torch.Tensor, tokens: dict, owners: np.ndarray) -> float:
    model.eval()
    img = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    txt = F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
    top = (txt @ img.T).argmax(dim=1).numpy()
    model.train()
    return recall_at_k([[str(t)] for t in top], [{str(o)} for o in owners], 1)


def train_clip(train: Dataset, out_dir: str | os.PathLike, config: CLIPTrainConfig, val: Dataset | None = None,
               progress: bool = True) -> dict:
    """Train a mini CLIP on ``train`` and save it under ``out_dir`` (atomically).

    Args:
        train: training records (``dataset.split("train")``).
        out_dir: the checkpoint folder to write.
        config: architecture and optimisation.
        val: optional held-out records; text→image R@1 on them is logged each epoch.
        progress: show a progress bar with the loss.

    Returns:
        The training summary also saved as ``genret.json``.
    """
    from accelerate import Accelerator

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    captions = [c for r in train.records for c in r.captions]
    tokenizer = train_clip_tokenizer(captions, config.vocab_size, config.context_length)
    model, processor = build_clip(config, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("mini CLIP: %.2fM parameters, vocabulary %d", n_params / 1e6, len(tokenizer))

    start = time.perf_counter()
    pixels = _pixels(processor, train.records)
    tok = lambda texts: tokenizer(texts, padding="max_length", truncation=True,  # noqa: E731
                                  max_length=config.context_length, return_tensors="pt")
    cap_tokens = [tok(list(r.captions)) for r in train.records]
    if config.shape_negatives:
        if not all("scene" in r.meta for r in train.records):
            raise ValueError(f"{train.source}: shape_negatives needs every training record's scene (the miniature "
                             "world's); this data set has none")
        swap_images, swap_texts = shape_swaps(train.records, config.image_size, len(train.records[0].captions),
                                              config.seed)
        swap_pixels = processor.image_processor(images=swap_images, return_tensors="pt")["pixel_values"]
        swap_tokens = [tok(t) for t in swap_texts]
    if val is not None:
        val_pixels = _pixels(processor, val.records)
        val_tokens = tok([r.captions[0] for r in val.records])
        val_tokens = {"input_ids": val_tokens["input_ids"], "attention_mask": val_tokens["attention_mask"]}
        val_owners = np.arange(len(val.records))

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=config.lr)
    steps_per_epoch = max(1, len(train.records) // config.batch_size)
    total = steps_per_epoch * config.epochs
    warm = max(1, int(config.warmup * total))
    schedule = lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model.train()

    history = []
    bar = tqdm(total=total, desc="train clip", unit="step", disable=not progress)
    for epoch in range(config.epochs):
        order = rng.permutation(len(train.records))
        losses = []
        for s in range(steps_per_epoch):
            idx = order[s * config.batch_size:(s + 1) * config.batch_size]
            picks = [(i, rng.integers(len(cap_tokens[i]["input_ids"]))) for i in idx]
            batch = {"pixel_values": pixels[idx],
                     "input_ids": torch.stack([cap_tokens[i]["input_ids"][j] for i, j in picks]),
                     "attention_mask": torch.stack([cap_tokens[i]["attention_mask"][j] for i, j in picks])}
            if config.shape_negatives:  # each image's shape swap and a caption of it join the batch
                picks2 = [(i, rng.integers(len(swap_tokens[i]["input_ids"]))) for i in idx]
                batch = {"pixel_values": torch.cat([batch["pixel_values"], swap_pixels[idx]]),
                         "input_ids": torch.cat([batch["input_ids"],
                                                 torch.stack([swap_tokens[i]["input_ids"][j] for i, j in picks2])]),
                         "attention_mask": torch.cat([batch["attention_mask"], torch.stack(
                             [swap_tokens[i]["attention_mask"][j] for i, j in picks2])])}
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            out = model(**batch, return_loss=True)  # CLIP's own symmetric InfoNCE
            accelerator.backward(out.loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            losses.append(out.loss.item())
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{out.loss.item():.3f}")
        entry = {"epoch": epoch + 1, "loss": round(float(np.mean(losses)), 4)}
        if val is not None:
            entry["val_t2i_R@1"] = round(100 * _val_recall(accelerator.unwrap_model(model), val_pixels, val_tokens, val_owners), 2)
            bar.set_postfix(epoch=epoch + 1, loss=f"{entry['loss']:.3f}", val_r1=entry["val_t2i_R@1"])
        history.append(entry)
        logger.info("epoch %d: %s", epoch + 1, entry)
    bar.close()

    summary = {"format": "genret.clip", "genret": __version__, "task": "clip", "config": asdict(config),
               "data": {"source": str(train.source), "images": len(train), "captions": len(captions)},
               "parameters": n_params, "vocab_size": len(tokenizer), "history": history,
               "train_seconds": round(time.perf_counter() - start, 1)}
    model = accelerator.unwrap_model(model).cpu()
    with atomic_dir(out_dir, ("genret.clip",)) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_json(Path(tmp) / "genret.json", summary)
    return summary
