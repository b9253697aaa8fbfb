"""Pretraining of the mini MLLM on a dataset's captions (and, for the miniature world, questions).

The language-model loss falls on the answer tokens only: describing an image (every caption is a
target) and, where records carry a ``scene``, answering questions about it. This plays the part of
a real MLLM's caption pretraining and instruction tuning, so that rerank and rewrite stages can run
zero-shot through prompts and task LoRAs start from a model that sees.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from genret import __version__
from genret._io import atomic_dir, write_json
from genret.data.dataset import Dataset
from genret.data.images import load_image
from genret.data.scene import Scene, questions
from genret.training.mini_mllm import MiniMLLMConfig, build_mini_mllm

logger = logging.getLogger(__name__)

CAPTION_INSTRUCTIONS = ("Describe the image.", "What does the image show?", "Write a caption for this image.")


@dataclass
class PretrainConfig:
    """Optimisation of the mini MLLM's pretraining."""

    epochs: int = field(default=10, metadata={"help": "passes over the training images"})
    batch_size: int = field(default=64, metadata={"help": "examples per step"})
    lr: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate"})
    vision_lr_scale: float = field(default=0.1, metadata={"help": "learning-rate factor of the CLIP vision tower"})
    questions_per_image: int = field(default=1, metadata={"help": "question-answer examples per image per epoch"})
    seed: int = field(default=0, metadata={"help": "random seed"})

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be at least 1")


def examples(train: Dataset, rng: random.Random, n_questions: int) -> list[tuple[int, str, str]]:
    """One epoch of (image index, instruction, answer): every caption, plus questions where a scene is known."""
    out = []
    for i, rec in enumerate(train.records):
        out += [(i, rng.choice(CAPTION_INSTRUCTIONS), c) for c in rec.captions]
        if "scene" in rec.meta and n_questions:
            qa = questions(Scene.from_dict(rec.meta["scene"]), rng)
            out += [(i, q, a) for q, a in rng.sample(qa, min(n_questions, len(qa)))]
    rng.shuffle(out)
    return out


def encode_example(processor, family, n_image_tokens: int, instruction: str, answer: str) -> tuple[list[int], int]:
    """Token ids of a chat turn (image + instruction → answer) and where the answer starts."""
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    prompt = processor.apply_chat_template(user, add_generation_prompt=True)
    prompt = family.expand_image_tokens(processor, prompt, [n_image_tokens])
    tok = processor.tokenizer
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tok(answer + tok.eos_token, add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, len(prompt_ids)


def _batch(items: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, (seq, start) in enumerate(items):
        ids[row, :len(seq)] = torch.tensor(seq)
        labels[row, start:len(seq)] = torch.tensor(seq[start:])
        mask[row, :len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pretrain_mllm(clip_dir: str | os.PathLike, train: Dataset, out_dir: str | os.PathLike,
                  config: PretrainConfig = PretrainConfig(), arch: MiniMLLMConfig = MiniMLLMConfig(),
                  val: Dataset | None = None, progress: bool = True) -> dict:
    """Build the mini MLLM from ``clip_dir`` and pretrain it on ``train``; saves a HF checkpoint.

    Returns:
        The summary saved as ``genret.json`` (config, loss per epoch, held-out caption loss with and
        without the image when ``val`` is given).
    """
    from accelerate import Accelerator

    from genret.mllm.families import family_of

    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    texts = [c for r in train.records for c in r.captions] + list(CAPTION_INSTRUCTIONS)
    texts += [f"{q} {a}" for r in train.records[:500] if "scene" in r.meta
              for q, a in questions(Scene.from_dict(r.meta["scene"]), rng)]
    texts += ["Does the image match the text? Answer yes or no.", "Which image matches the text best? "
              "Answer with its number.", "Text:", "Image", "0 1 2 3 4 5 6 7 8 9"]
    model, processor = build_mini_mllm(clip_dir, texts, arch)
    family = family_of(model)
    n_tokens = model.config.image_seq_length
    start = time.perf_counter()
    pixels = torch.cat([processor.image_processor(images=[load_image(r.path) for r in train.records[i:i + 256]],
                                                  return_tensors="pt")["pixel_values"]
                        for i in range(0, len(train.records), 256)])

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    vision = [p for n, p in model.named_parameters() if "vision_tower" in n]
    rest = [p for n, p in model.named_parameters() if "vision_tower" not in n]
    optimizer = torch.optim.AdamW([{"params": rest, "lr": config.lr},
                                   {"params": vision, "lr": config.lr * config.vision_lr_scale}], weight_decay=0.01)
    epoch_examples = [examples(train, rng, config.questions_per_image) for _ in range(config.epochs)]
    steps = sum(math.ceil(len(e) / config.batch_size) for e in epoch_examples)
    warm = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model.train()
    pad = processor.tokenizer.pad_token_id
    cache: dict[tuple[str, str], tuple[list[int], int]] = {}
    history = []
    bar = tqdm(total=steps, desc="pretrain mllm", unit="step", disable=not progress)
    for epoch, batch_examples in enumerate(epoch_examples):
        losses = []
        for s in range(0, len(batch_examples), config.batch_size):
            chunk = batch_examples[s:s + config.batch_size]
            items = [cache.setdefault((q, a), encode_example(processor, family, n_tokens, q, a)) for _, q, a in chunk]
            batch = _batch(items, pad)
            batch["pixel_values"] = pixels[[i for i, _, _ in chunk]]
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            loss = model(**batch).loss
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        history.append({"epoch": epoch + 1, "loss": round(float(np.mean(losses)), 4)})
        logger.info("epoch %d: loss %.4f", epoch + 1, history[-1]["loss"])
    bar.close()
    model = accelerator.unwrap_model(model).cpu().eval()
    summary = {"format": "genret.mini_mllm", "genret": __version__, "task": "pretrain", "clip": str(clip_dir),
               "config": asdict(config), "arch": asdict(arch), "history": history,
               "data": {"source": str(train.source), "images": len(train)},
               "parameters": sum(p.numel() for p in model.parameters()),
               "train_seconds": round(time.perf_counter() - start, 1)}
    if val is not None:
        summary["val_caption_loss"] = caption_loss(model, processor, family, val)
    with atomic_dir(out_dir, ("genret.mini_mllm",)) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_json(Path(tmp) / "genret.json", summary)
    return summary


@torch.no_grad()
def caption_loss(model, processor, family, data: Dataset, limit: int = 200) -> dict[str, float]:
    """Mean caption-token loss on held-out images, with the right image and with a mismatched one.

    The gap between the two says how much the model looks at the image.
    """
    recs = data.records[:limit]
    pix = processor.image_processor(images=[load_image(r.path) for r in recs], return_tensors="pt")["pixel_values"]
    items = [encode_example(processor, family, model.config.image_seq_length, CAPTION_INSTRUCTIONS[0], r.captions[0])
             for r in recs]
    out = {}
    for name, order in (("with_image", list(range(len(recs)))), ("shuffled_image", list(range(1, len(recs))) + [0])):
        losses = []
        for s in range(0, len(recs), 50):
            batch = _batch(items[s:s + 50], processor.tokenizer.pad_token_id)
            batch["pixel_values"] = pix[order[s:s + 50]]
            losses.append(model(**batch).loss.item())
        out[name] = round(float(np.mean(losses)), 4)
    return out
