"""Contrastive training of a small ``CLIPModel`` (symmetric InfoNCE) on any image-caption dataset.

The result is a plain Hugging Face checkpoint (model, processor, tokenizer) plus ``genret.json``,
so ``CLIPModel.from_pretrained``, ``AutoProcessor`` and genret's encoder backends load it like any
CLIP checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from genret import __version__
from genret._io import write_json
from genret.bpe import train_clip_tokenizer
from genret.config import check_bounds
from genret.data.annotations import annotation_of, draw_avoiding, signatures
from genret.data.dataset import Dataset
from genret.data.images import load_image
from genret.eval.metrics import recall_at_k
from genret.training.augment import rotate
from genret.training.engine import Engine
from genret.training.models import enable_checkpointing
from genret.training.options import TrainOptions

logger = logging.getLogger(__name__)


@dataclass
class CLIPTrainConfig(TrainOptions):
    """Architecture and optimisation of a mini CLIP (and the engine's shared options)."""

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
    batch_size: int = field(default=128, metadata={"help": "image-caption pairs per micro-batch and process (the "
                            "in-batch negatives: accumulation adds steps, not negatives)"})
    lr: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (matrices only)"})
    log_every: int = field(default=0, metadata={"help": "steps per loss entry (0: one per epoch)"})
    eval_every: int = field(default=0, metadata={"help": "steps between val R@1 checks (0: after every epoch)"})
    shape_negatives: bool = field(default=False, metadata={"help": "miniature world: add to every batch each image "
                                                                   "redrawn with one shape changed, and its captions"})
    fresh_images: bool = field(default=False, metadata={"help": "draw every batch anew from the records' annotation "
                               "plug-in (the miniature world's generator: unlimited images); an epoch is then as many "
                               "images as the training split holds, and the split's files serve the tokenizer only"})
    attribute_weight: float = field(default=0.0, metadata={"help": "weight of auxiliary linear heads on the vision "
                                    "tower's pooled output that name the plug-in's attributes of each image (shape, "
                                    "colour, size per object, layout); the heads are not saved (0: none)"})
    augment_rotation: float = field(default=0.0, metadata={"help": "rotate every training image by a random angle "
                                    "of up to this many degrees either way (edges replicated; validation images are "
                                    "not rotated; 0: none)"})
    init: str = field(default="", metadata={"help": "a trained CLIP checkpoint folder to go on training (longer "
                      "training as a new run, with its own schedule): its weights, tokenizer and processor are "
                      "kept, and the architecture options must match it"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bounds(self, at_least_one=("image_size", "patch_size", "vision_layers", "vision_width", "text_layers",
                     "text_width", "heads", "projection_dim", "context_length"))
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.vision_width % self.heads or self.text_width % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide vision_width and text_width")
        if self.attribute_weight < 0:
            raise ValueError(f"attribute_weight must not be negative, got {self.attribute_weight}")
        if not 0 <= self.augment_rotation <= 180:
            raise ValueError(f"augment_rotation must be in [0, 180] degrees, got {self.augment_rotation}")


class CLIPWithHeads(torch.nn.Module):
    """A ``CLIPModel`` and, for ``attribute_weight``, linear heads on its vision tower's pooled output: one per
    attribute, over that attribute's classes. What trains; only :attr:`clip` is saved.

    Args:
        clip: the model.
        classes: attribute name -> its classes, in label order (empty: no heads).
        weight: the heads' loss weight against CLIP's InfoNCE.
    """

    def __init__(self, clip, classes: dict[str, list[str]], weight: float) -> None:
        super().__init__()
        self.clip, self.weight, self.names = clip, weight, list(classes)
        width = clip.config.vision_config.hidden_size
        self.heads = torch.nn.ModuleList([torch.nn.Linear(width, len(c)) for c in classes.values()])

    def forward(self, pixel_values, input_ids, attention_mask, labels=None) -> torch.Tensor:
        """CLIP's own symmetric InfoNCE, plus ``weight`` × the heads' mean cross-entropy where ``labels`` are given
        (``-100``: a class the heads do not know)."""
        out = self.clip(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, return_loss=True)
        if labels is None or not self.names:
            return out.loss
        vision = self.clip.vision_model  # the tower's pooled state (the output's pooler_output is projected already)
        pooled = vision.post_layernorm(out.vision_model_output.last_hidden_state[:, 0])
        ce = [F.cross_entropy(head(pooled), labels[:, j].to(pooled.device), ignore_index=-100)
              for j, head in enumerate(self.heads)]
        return out.loss + self.weight * torch.stack(ce).mean()

    @torch.no_grad()
    def accuracy(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Percent of images whose class each head names right (a linear probe of the tower, trained as it trains)."""
        vision = self.clip.vision_model
        pooled = vision.post_layernorm(vision(pixel_values=pixel_values).last_hidden_state[:, 0])
        return {name: round(100 * float((head(pooled).argmax(-1).cpu() == labels[:, j]).float().mean()), 1)
                for j, (name, head) in enumerate(zip(self.names, self.heads))}


def attribute_classes(records) -> tuple[object | None, dict[str, list[str]]]:
    """The records' annotation plug-in and each attribute's classes (sorted) over the records."""
    classes: dict[str, set] = {}
    kind = None
    for r in records:
        found = annotation_of(r.meta)
        if found is None:
            raise ValueError(f"{r.path}: fresh_images and attribute_weight need every training record's scene (or "
                             "another annotation a plug-in knows); this one has none")
        kind = found[1]
        for name, value in kind.attributes(found[2]).items():
            classes.setdefault(name, set()).add(value)
    return kind, {name: sorted(values) for name, values in classes.items()}


def _labels(kind, values, classes: dict[str, list[str]]) -> torch.Tensor:
    rows = []
    for v in values:
        got = kind.attributes(v)
        rows.append([classes[n].index(got[n]) if got.get(n) in classes[n] else -100 for n in classes])
    return torch.tensor(rows, dtype=torch.long)


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


def load_init(config: CLIPTrainConfig):
    """The ``CLIPModel`` and processor at ``config.init``, checked against the architecture options."""
    from transformers import AutoProcessor, CLIPModel

    folder = Path(config.init)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--init {folder}: no CLIP checkpoint there (config.json missing); give the folder "
                                "`genret train clip` wrote")
    model = CLIPModel.from_pretrained(folder)
    vision, text = model.config.vision_config, model.config.text_config
    wanted = {"image_size": vision.image_size, "patch_size": vision.patch_size, "vision_layers": vision.num_hidden_layers,
              "vision_width": vision.hidden_size, "text_layers": text.num_hidden_layers, "text_width": text.hidden_size,
              "heads": vision.num_attention_heads, "projection_dim": model.config.projection_dim,
              "context_length": text.max_position_embeddings}
    wrong = [f"--{k.replace('_', '-')} {getattr(config, k)} (the checkpoint has {v})" for k, v in wanted.items()
             if getattr(config, k) != v]
    if wrong:
        raise ValueError(f"--init {folder}: the architecture options differ from the checkpoint's: {', '.join(wrong)}; "
                         "leave them at the checkpoint's values")
    return model, AutoProcessor.from_pretrained(folder)


def hard_negatives(records, image_size: int, captions_per_image: int, seed: int = 0, *,
                   avoid: frozenset) -> tuple[list, list[list[str]]]:
    """For each record, its annotation with one attribute changed, drawn anew, and that near miss's captions.

    The hard negatives of ``shape_negatives``, made by the plug-in that knows the records' annotation
    (:meth:`~genret.data.annotations.Annotation.hard_negative`; for the miniature world's scenes, one object's shape
    swapped: same colours, sizes and places, so only shape tells an image from its swap). None is a scene whose
    signature is in ``avoid`` (the held-out splits': :func:`genret.data.annotations.signatures`).

    Raises:
        ValueError: a record without an annotation a plug-in knows.
    """
    _, images, texts = _swaps(records, image_size, captions_per_image, seed, avoid)
    return images, texts


def _swaps(records, image_size: int, captions_per_image: int, seed: int,
           avoid: frozenset) -> tuple[list, list, list[list[str]]]:
    import random

    rng = random.Random(seed)
    values, images, texts = [], [], []
    for r in records:
        found = annotation_of(r.meta)
        if found is None:
            raise ValueError(f"{r.path}: shape_negatives needs every training record's scene (or another "
                             "annotation a plug-in can draw a near miss of); this one has none")
        _, kind, value = found
        swapped = draw_avoiding(lambda: kind.hard_negative(value, rng), kind, avoid, f"{r.path}: its shape swap")
        values.append(swapped)
        images.append(kind.render(swapped, image_size, rng.getrandbits(32)))
        texts.append(kind.captions(swapped, rng, captions_per_image))
    return values, images, texts


def fresh_values(kind, step: int, n: int, config: CLIPTrainConfig, *, avoid: frozenset):
    """The annotations :func:`fresh_rows` draws for ``step`` (its ``n`` scenes, then their swaps under
    ``shape_negatives``), none in ``avoid``, and the generator it goes on drawing with."""
    import random

    rng = random.Random(f"genret.clip.fresh:{config.seed}:{step}")
    what = f"fresh images at step {step}"
    values = [draw_avoiding(lambda: kind.sample(rng, config.image_size), kind, avoid, what) for _ in range(n)]
    if config.shape_negatives:
        values += [draw_avoiding(lambda v=v: kind.hard_negative(v, rng), kind, avoid, what) for v in values]
    return values, rng


def fresh_rows(kind, step: int, n: int, config: CLIPTrainConfig, tok, processor,
               classes: dict[str, list[str]], *, avoid: frozenset) -> dict[str, torch.Tensor]:
    """``n`` image-caption rows drawn anew for ``step`` from the plug-in (seeded by the config's seed and the step, so
    every process and a resumed run draw the same), with their shape swaps after them under ``shape_negatives``;
    none shows a scene whose signature is in ``avoid`` (the held-out splits')."""
    values, rng = fresh_values(kind, step, n, config, avoid=avoid)
    images = [kind.render(v, config.image_size, rng.getrandbits(32)) for v in values]
    tokens = tok([kind.captions(v, rng, 1)[0] for v in values])
    rows = {"pixel_values": processor.image_processor(images=images, return_tensors="pt")["pixel_values"],
            "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
    if classes:
        rows["labels"] = _labels(kind, values, classes)
    return rows


def _pixels(processor, records, batch: int = 256) -> torch.Tensor:
    chunks = []
    for i in range(0, len(records), batch):
        images = [load_image(r.path) for r in records[i:i + batch]]
        chunks.append(processor.image_processor(images=images, return_tensors="pt")["pixel_values"])
    return torch.cat(chunks)


@torch.no_grad()
def _val_recall(model, pixels: torch.Tensor, tokens: dict, owners: np.ndarray) -> float:
    device = next(model.parameters()).device
    img = F.normalize(model.get_image_features(pixel_values=pixels.to(device)).pooler_output, dim=-1)
    txt = F.normalize(model.get_text_features(**{k: v.to(device) for k, v in tokens.items()}).pooler_output, dim=-1)
    top = (txt @ img.T).argmax(dim=1).cpu().numpy()
    return recall_at_k([[str(t)] for t in top], [{str(o)} for o in owners], 1)


def _file_batches(train: Dataset, config: CLIPTrainConfig, processor, tok, rng, per_step: int, kind, classes,
                  avoid: frozenset):
    """The split's own images in a seeded order, an epoch a pass: ``draw(step)`` -> the step's rows (each record's
    swap after the rows under ``shape_negatives``), and the (get, set) of its resumable state."""
    pixels = _pixels(processor, train.records)
    cap_tokens = [tok(list(r.captions)) for r in train.records]
    labels = _labels(kind, [annotation_of(r.meta)[2] for r in train.records], classes) if classes else None
    if config.shape_negatives:
        values, images, texts = _swaps(train.records, config.image_size, len(train.records[0].captions), config.seed,
                                       avoid)
        swap_pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        swap_tokens = [tok(t) for t in texts]
        swap_labels = _labels(kind, values, classes) if classes else None
    steps_per_epoch = max(1, len(train.records) // per_step)
    stream: dict = {"order": []}

    def rows(idx, tokens) -> tuple[torch.Tensor, torch.Tensor]:
        picks = [(i, rng.integers(len(tokens[i]["input_ids"]))) for i in idx]
        return (torch.stack([tokens[i]["input_ids"][j] for i, j in picks]),
                torch.stack([tokens[i]["attention_mask"][j] for i, j in picks]))

    def draw(step: int) -> dict[str, torch.Tensor]:
        if step % steps_per_epoch == 0:
            stream["order"] = rng.permutation(len(train.records)).tolist()
        idx = stream["order"][(step % steps_per_epoch) * per_step:][:per_step]
        ids, mask = rows(idx, cap_tokens)
        out = {"pixel_values": pixels[idx], "input_ids": ids, "attention_mask": mask}
        if labels is not None:
            out["labels"] = labels[idx]
        if config.shape_negatives:
            swap_ids, swap_mask = rows(idx, swap_tokens)
            extra = {"pixel_values": swap_pixels[idx], "input_ids": swap_ids, "attention_mask": swap_mask,
                     **({"labels": swap_labels[idx]} if labels is not None else {})}
            out = {k: torch.cat([v, extra[k]]) for k, v in out.items()}
        return out

    def restore(saved: dict) -> None:
        rng.bit_generator.state = saved["rng"]
        stream["order"] = saved["order"]

    return draw, (lambda: {"rng": rng.bit_generator.state, "order": stream["order"]}, restore)


def _micro_batches(rows: dict[str, torch.Tensor], n: int, chunks: int, size: int, swaps: bool) -> list[dict]:
    """Split a step's ``n`` rows (and, with ``swaps``, their ``n`` near misses after them) into ``chunks`` micro-batches
    of ``size``, each near miss in its own row's micro-batch (the in-batch negative it is made for)."""
    out = []
    for c in range(chunks):
        part = slice(c * size, (c + 1) * size)
        batch = {k: v[part] for k, v in rows.items()}
        if swaps:
            batch = {k: torch.cat([batch[k], v[n:][part]]) for k, v in rows.items()}
        out.append(batch)
    return out


def train_clip(train: Dataset, out_dir: str | os.PathLike, config: CLIPTrainConfig, val: Dataset | None = None,
               progress: bool = True, resume: bool = False, on_step: "Callable[[dict], None] | None" = None,
               held_out: Dataset | None = None) -> dict:
    """Train a mini CLIP on ``train`` and save it under ``out_dir`` (atomically).

    Args:
        train: training records (``dataset.split("train")``).
        out_dir: the checkpoint folder to write.
        config: architecture and optimisation.
        val: optional held-out records; text→image R@1 on them is logged each epoch.
        progress: show a progress bar with the loss.
        resume: continue from the last checkpoint under ``out_dir/checkpoints``.
        on_step: called after every optimizer step with ``{"step", "total", "loss"}``.
        held_out: the records whose scenes ``fresh_images`` and ``shape_negatives`` must never draw (the val and
            test splits); required with either.

    Returns:
        The training summary also saved as ``genret.json``.
    """
    if (config.fresh_images or config.shape_negatives) and held_out is None:
        raise ValueError(f"{'fresh_images' if config.fresh_images else 'shape_negatives'} draws scenes anew: give "
                         "held_out (the val and test splits), so that none of theirs is drawn for training")
    init = load_init(config) if config.init else None  # refused before anything is written
    engine = Engine("clip", config, out_dir, resume=resume, progress=progress)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    captions = [c for r in train.records for c in r.captions]
    if init is not None:
        model, processor = init
        tokenizer = processor.tokenizer
    else:
        tokenizer = train_clip_tokenizer(captions, config.vocab_size, config.context_length)
        model, processor = build_clip(config, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("mini CLIP: %.2fM parameters, vocabulary %d", n_params / 1e6, len(tokenizer))

    tok = lambda texts: tokenizer(texts, padding="max_length", truncation=True,  # noqa: E731
                                  max_length=config.context_length, return_tensors="pt")
    kind, classes = (attribute_classes(train.records) if config.fresh_images or config.attribute_weight
                     else (None, {}))
    classes = classes if config.attribute_weight else {}
    evaluate = None
    if val is not None:
        val_pixels = _pixels(processor, val.records)
        val_tokens = tok([r.captions[0] for r in val.records])
        val_tokens = {"input_ids": val_tokens["input_ids"], "attention_mask": val_tokens["attention_mask"]}

        val_labels = _labels(kind, [annotation_of(r.meta)[2] for r in val.records], classes) if classes else None

        def val_recall() -> dict:
            recall = _val_recall(engine.unwrapped.clip, val_pixels, val_tokens, np.arange(len(val.records)))
            heads = engine.unwrapped.accuracy(val_pixels.to(engine.device), val_labels) if classes else {}
            return {"val_t2i_R@1": round(100 * recall, 2), **({"val_heads": heads} if heads else {})}

        evaluate = val_recall

    if config.gradient_checkpointing:
        enable_checkpointing(model)
    trained = CLIPWithHeads(model, classes, config.attribute_weight)
    decay = [p for n, p in trained.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in trained.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    wrapped = engine.prepare(trained, [{"params": decay, "weight_decay": config.weight_decay},
                                       {"params": rest, "weight_decay": 0.0}])
    per_step = engine.rows_per_step
    steps_per_epoch = max(1, len(train.records) // per_step)
    total = config.max_steps or steps_per_epoch * config.epochs
    state = None
    avoid = signatures(held_out.records) if held_out is not None else frozenset()
    if config.fresh_images:
        rows = lambda step: fresh_rows(kind, step, per_step, config, tok, processor, classes,  # noqa: E731
                                       avoid=avoid)
    else:
        rows, state = _file_batches(train, config, processor, tok, rng, per_step, kind, classes, avoid)

    def draw(step: int) -> list[dict]:
        drawn = rows(step)
        if config.augment_rotation:
            drawn["pixel_values"] = rotate(drawn["pixel_values"], config.augment_rotation, config.seed, step)
        return _micro_batches(drawn, per_step, engine.chunks, config.batch_size, config.shape_negatives)

    def loss(batch: dict) -> torch.Tensor:
        return wrapped(**{k: v.to(engine.device) for k, v in batch.items()})  # CLIP's InfoNCE (+ the heads')

    ends = [steps_per_epoch * e for e in range(1, total // steps_per_epoch + 1)]
    run = engine.fit(total, draw, loss, evaluate=evaluate, on_step=on_step, epoch_of=lambda s: math.ceil(s / steps_per_epoch),
                     log_steps=None if config.log_every else ends, eval_steps=None if config.eval_every else ends,
                     state=state, identity={"config": asdict(config), "images": len(train)})
    summary = {"format": "genret.clip", "genret": __version__, "task": "clip", **run.summary(config),
               "data": {"source": str(train.source), "images": len(train), "captions": len(captions),
                        "images_seen": total * per_step, "fresh_images": config.fresh_images,
                        **({"init": config.init} if config.init else {}),
                        **({"attributes": classes} if classes else {})},
               "parameters": n_params, "vocab_size": len(tokenizer), "train_seconds": engine.seconds}

    def write(folder: Path) -> None:
        engine.unwrapped.clip.save_pretrained(folder)
        processor.save_pretrained(folder)
        write_json(folder / "genret.json", summary)

    engine.save(write, ("genret.clip",))
    return summary
