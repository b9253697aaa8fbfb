"""Pretraining of the mini MLLM on a dataset's images: captions and the instruction mixture the stages ask for.

The language-model loss falls on the answer tokens only. The mixture (:mod:`genret.training.instructions`,
``tasks``) covers what the stages ask of an MLLM zero-shot, in their own prompts: describe an image, answer a
question about it, judge whether a text matches it (yes/no on the prefilter's near misses), pick the matching one of
numbered candidates, rewrite a description under an edit instruction, ask the question that narrows a search. This
plays the part of a real MLLM's caption pretraining and instruction tuning, so that the rerank and rewrite stages
run zero-shot through their prompts and task LoRAs start from a model that sees.
"""

from __future__ import annotations

import logging
import os
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from genret import __version__
from genret._io import write_json
from genret.data.annotations import annotation_of, signatures
from genret.data.dataset import Dataset
from genret.data.images import load_image
from genret.training.augment import rotate
from genret.training.engine import Engine
from genret.training.instructions import DESCRIBE, TASKS, Example, Mixture, as_messages, message, prompt_texts
from genret.training.mini_mllm import MiniMLLMConfig, build_mini_mllm
from genret.training.models import enable_checkpointing
from genret.training.options import TrainOptions

logger = logging.getLogger(__name__)



@dataclass
class PretrainConfig(TrainOptions):
    """Optimisation of the mini MLLM's pretraining (and the engine's shared options)."""

    epochs: int = field(default=10, metadata={"help": "passes over the training images"})
    batch_size: int = field(default=64, metadata={"help": "examples per micro-batch and process"})
    lr: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    log_every: int = field(default=0, metadata={"help": "steps per loss entry (0: one per epoch)"})
    vision_lr_scale: float = field(default=0.1, metadata={"help": "learning-rate factor of the CLIP vision tower"})
    augment_rotation: float = field(default=0.0, metadata={"help": "rotate every training image by a random angle "
                                    "of up to this many degrees either way (0: none; as genret train clip's)"})
    questions_per_image: int = field(default=1, metadata={"help": "answer: question-answer examples per image per epoch"})
    tasks: str = field(default=",".join(TASKS), metadata={"help": "the instruction mixture, comma-separated: "
                                                                  + ", ".join(TASKS)})
    judge_per_image: int = field(default=2, metadata={"help": "judge: yes/no examples per image per epoch"})
    pick_per_image: int = field(default=1, metadata={"help": "pick: numbered-candidate examples per image per epoch"})
    rewrite_per_image: int = field(default=1, metadata={"help": "rewrite: text-only edit examples per image per epoch"})
    ask_per_image: int = field(default=1, metadata={"help": "ask: text-only next-question examples per image per epoch"})
    candidates: int = field(default=4, metadata={"help": "pick: numbered candidates (the right one among near misses)"})
    random_negatives: float = field(default=0.0, metadata={"help": "judge and pick: share of negatives drawn at "
                                    "random from the other images instead of the prefilter's near misses (easy "
                                    "pairs to learn comparing on)"})
    twin_negatives: float = field(default=0.0, metadata={"help": "judge: share of negatives that are the image's "
                                  "twin (the same words bound or placed otherwise), drawn anew by the records' "
                                  "annotation plug-in, never one of a held-out split's scenes (the binding and "
                                  "relation contrasts that mined near misses rarely are); pick: the share of rows "
                                  "with the twin among the candidates. --random-negatives then applies to the rest"})
    random_negatives_last: float = field(default=-1.0, metadata={"help": "a curriculum: the share of random "
                                         "negatives in the last epoch the run reaches (--max-steps may end it "
                                         "sooner; past the epochs they repeat in order), reached linearly from "
                                         "--random-negatives in the first (easy pairs first, near misses later; "
                                         "-1: no change)"})
    loss_average: str = field(default="token", metadata={"help": "how the answer-token loss is averaged: token "
                              "(over a batch's answer tokens, as transformers does) or example (over each "
                              "example's first, so a yes/no or a number weighs as much as a caption)"})
    init: str = field(default="", metadata={"help": "a mini MLLM folder (genret train mllm's) to go on training "
                      "with this mixture: its tokenizer and weights; the architecture options are then its"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.augment_rotation <= 180:
            raise ValueError(f"augment_rotation must be in [0, 180] degrees, got {self.augment_rotation}")
        if self.vision_lr_scale < 0 or self.questions_per_image < 0:
            raise ValueError("vision_lr_scale and questions_per_image must not be negative")
        unknown = [t for t in self.task_list if t not in TASKS]
        if unknown or not self.task_list:
            raise ValueError(f"tasks must be a comma-separated list of {', '.join(TASKS)}, got {self.tasks!r}")
        if self.candidates < 2:
            raise ValueError(f"candidates must be at least 2, got {self.candidates}")
        if not 0 <= self.random_negatives <= 1:
            raise ValueError(f"random_negatives must be a share in [0, 1], got {self.random_negatives}")
        if not 0 <= self.twin_negatives <= 1:
            raise ValueError(f"twin_negatives must be a share in [0, 1], got {self.twin_negatives}")
        if self.random_negatives_last != -1 and not 0 <= self.random_negatives_last <= 1:
            raise ValueError(f"random_negatives_last must be a share in [0, 1] (or -1: as random_negatives), got "
                             f"{self.random_negatives_last}")
        if self.loss_average not in ("token", "example"):
            raise ValueError(f"loss_average must be token or example, got {self.loss_average!r}")

    @property
    def task_list(self) -> list[str]:
        """The tasks named in :attr:`tasks`."""
        return [t.strip() for t in self.tasks.split(",") if t.strip()]

    def random_share(self, epoch: int, span: int | None = None) -> float:
        """The share of random negatives in ``epoch`` (0-based): the curriculum's point, reached linearly over the
        ``span`` epochs the run reaches (default :attr:`epochs`; fewer where ``max_steps`` ends it sooner)."""
        span = self.epochs if span is None else span
        if self.random_negatives_last == -1 or span < 2:
            return self.random_negatives
        at = min(epoch, span - 1) / (span - 1)
        return self.random_negatives + at * (self.random_negatives_last - self.random_negatives)

    def counts(self) -> dict[str, int]:
        """Examples per image and epoch of each task drawn (``describe``: every caption)."""
        per = {"describe": 1, "answer": self.questions_per_image, "judge": self.judge_per_image,
               "pick": self.pick_per_image, "rewrite": self.rewrite_per_image, "ask": self.ask_per_image}
        return {t: per[t] for t in self.task_list if per[t]}


def encode_example(processor, family, n_image_tokens: int, example: Example) -> tuple[list[int], int]:
    """Token ids of a chat turn (its images' tokens expanded) → answer, and where the answer starts."""
    prompt = processor.apply_chat_template(as_messages(example.messages), add_generation_prompt=True)
    prompt = family.expand_image_tokens(processor, prompt, [n_image_tokens] * len(example.images))
    tok = processor.tokenizer
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tok(example.answer + tok.eos_token, add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, len(prompt_ids)


def mixture(train: Dataset, clip_dir: str | os.PathLike, config: PretrainConfig, progress: bool = False,
            held_out: Dataset | None = None) -> Mixture:
    """The instruction mixture over ``train``, its judge and pick negatives mined by the CLIP at ``clip_dir``; no twin
    drawn shows a scene of ``held_out`` (the val and test splits)."""
    counts = config.counts()
    groups, texts = [], []
    if "judge" in counts or "pick" in counts:
        from genret.encoders.hf import HFDualEncoder
        from genret.training.negatives import caption_table, mine_negatives

        groups, _ = mine_negatives(HFDualEncoder(str(clip_dir), device="cpu"), train, k=max(config.candidates, 4),
                                   progress=progress)
        texts = caption_table(train)[0]
    avoid = signatures(held_out.records if held_out is not None else ())
    return Mixture(train.records, groups, texts, counts, candidates=config.candidates, seed=config.seed,
                   random_negatives=config.random_negatives, twin_negatives=config.twin_negatives, avoid=avoid)


def image_pixels(train: Dataset, mix: Mixture, processor, seed: int, family) -> torch.Tensor:
    """The pixel rows a step's examples index: the training images in order, then the mixture's twins drawn anew
    (:attr:`Mixture.drawn`, the ``k``-th drawn with seed ``seed * 1_000_003 + k`` at the training images' size);
    ``(images, channels, height, width)`` as :meth:`Family.dense_pixels` gives them."""
    images = [load_image(r.path) for r in train.records]
    images += [kind.render(value, images[0].size[0], seed * 1_000_003 + k) for k, (kind, value) in enumerate(mix.drawn)]
    parts = [family.dense_pixels(processor, images[i:i + 256]) for i in range(0, len(images), 256)]
    shapes = sorted({tuple(p.shape[1:]) for p in parts})
    if len(shapes) > 1:  # a processor that does not crop to one size (Qwen2-VL's) keeps the images' own sizes
        raise ValueError(f"{train.source}: the processor makes the training images {len(shapes)} sizes ({shapes[:3]}); "
                         "pretraining batches them as one tensor: resize them to one size first")
    return torch.cat(parts)


def saved_arch(folder: str | os.PathLike) -> dict:
    """The architecture a ``genret train mllm`` folder records (its ``genret.json``), ``{}`` where it records none."""
    from genret._io import read_json

    path = Path(folder) / "genret.json"
    return dict(read_json(path).get("arch", {})) if path.is_file() else {}


def load_init(folder: str | os.PathLike, arch: MiniMLLMConfig):
    """The mini MLLM and processor at ``folder`` (``--init``), checked against the architecture options."""
    from transformers import AutoModelForImageTextToText

    from genret._io import read_json
    from genret.mllm.backend import load_processor

    folder = Path(folder)
    if not (folder / "genret.json").is_file() or not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--init {folder}: no mini MLLM there (genret.json or config.json missing); give the "
                                "folder `genret train mllm` wrote")
    summary = read_json(folder / "genret.json")
    if summary.get("format") != "genret.mini_mllm":
        raise ValueError(f"--init {folder}: genret.json says format {summary.get('format')!r}, not genret.mini_mllm")
    saved = MiniMLLMConfig(**summary.get("arch", {}))
    wrong = [f"{k} {getattr(arch, k)!r} (the checkpoint has {v!r})" for k, v in asdict(saved).items()
             if getattr(arch, k) != v]
    if wrong:
        raise ValueError(f"--init {folder}: the architecture options differ from the checkpoint's: {', '.join(wrong)}; "
                         "leave them at the checkpoint's values")
    return AutoModelForImageTextToText.from_pretrained(folder), load_processor(str(folder))


def is_tower(family, name: str) -> bool:
    """Whether parameter ``name`` belongs to the vision tower proper (trained at ``vision_lr_scale``), not to the
    projector into the language model (Qwen2-VL's merger sits inside its tower module)."""
    parts = name.split(".")
    projectors = (family.projector_name, *family.more_projectors)
    return family.vision_tower_name in parts and not any(p in parts for p in projectors)


def example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The answer-token loss averaged over each example first, then over the batch (``loss_average="example"``)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    mask = (labels != -100).float()
    rows = mask.sum(1) > 0
    return ((token * mask).sum(1)[rows] / mask.sum(1)[rows]).mean()


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
                  config: PretrainConfig | None = None, arch: MiniMLLMConfig | None = None,
                  val: Dataset | None = None, progress: bool = True, resume: bool = False,
                  on_step: "Callable[[dict], None] | None" = None, held_out: Dataset | None = None) -> dict:
    """Build the mini MLLM from ``clip_dir`` and pretrain it on ``train``; saves a HF checkpoint.

    ``held_out``: the records whose scenes ``twin_negatives`` must never draw (the val and test splits).

    Returns:
        The summary saved as ``genret.json`` (config, loss per epoch, held-out caption loss with and
        without the image when ``val`` is given).
    """
    from genret.mllm.families import family_of

    config = config or PretrainConfig()
    if arch is None:  # the defaults, or (--init) the checkpoint's own
        arch = MiniMLLMConfig(**saved_arch(config.init)) if config.init else MiniMLLMConfig()
    if config.twin_negatives and held_out is None:
        raise ValueError("twin_negatives draws scenes anew: give held_out (the val and test splits), so that none of "
                         "theirs is drawn")
    init = load_init(config.init, arch) if config.init else None  # refused before anything is written
    engine = Engine("mllm", config, out_dir, resume=resume, progress=progress)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    texts = [c for r in train.records for c in r.captions] + prompt_texts()
    texts += [f"{q} {a}" for r in train.records[:500] if (found := annotation_of(r.meta))
              for q, a in found[1].questions(found[2], rng)]
    texts += ["Does the image match the text? Answer yes or no.", "Which image matches the text best? "
              "Answer with its number.", "Text:", "Image", "0 1 2 3 4 5 6 7 8 9"]
    mix = mixture(train, clip_dir, config, progress=engine.show, held_out=held_out)
    texts += [f"{e.answer}" for e in mix.epoch(random.Random(config.seed))[:2000] if e.task in ("ask", "rewrite")]
    model, processor = init or build_mini_mllm(clip_dir, texts, arch)
    family = family_of(model)

    if config.gradient_checkpointing:
        enable_checkpointing(model)
    vision = [p for n, p in model.named_parameters() if is_tower(family, n)]
    rest = [p for n, p in model.named_parameters() if not is_tower(family, n)]
    wrapped = engine.prepare(model, [{"params": rest, "lr": config.lr},
                                     {"params": vision, "lr": config.lr * config.vision_lr_scale}])
    per_step, chunks = engine.rows_per_step, engine.chunks
    epochs, span = [], config.epochs
    for e in range(config.epochs):
        mix.random_negatives = config.random_share(e, span)
        epochs.append(mix.epoch(rng))
        if e == 0 and config.max_steps:  # the curriculum spans the epochs the steps reach (they repeat past them)
            span = min(config.epochs, -(-config.max_steps // max(1, len(epochs[0]) // per_step)))
    pixels = image_pixels(train, mix, processor, config.seed, family)  # after the epochs: they draw the twins
    n_tokens = family.tokens_per_image(model, *pixels.shape[-2:])
    # Steps of an epoch: its examples in steps of per_step; a last, shorter step only where it fills every chunk.
    counts = [len(e) // per_step + (len(e) % per_step >= chunks) for e in epochs]
    starts = np.cumsum([0] + counts)
    total = config.max_steps or int(starts[-1])
    pad = processor.tokenizer.pad_token_id
    cache: dict[str, tuple[list[int], int]] = {}

    cycle = int(starts[-1])  # max_steps past the epochs' steps: the epochs again, in order

    def epoch_of(step: int) -> int:  # 1-based epoch of the (1-based) step
        return (step - 1) // cycle * len(epochs) + int(np.searchsorted(starts, (step - 1) % cycle + 1, side="left"))

    def draw(step: int) -> list[dict]:
        step %= cycle
        e = int(np.searchsorted(starts, step, side="right")) - 1
        rows = epochs[e][(step - int(starts[e])) * per_step:][:per_step]
        out = []
        for part in np.array_split(np.arange(len(rows)), chunks):
            chunk = [rows[i] for i in part]
            items = [cache[e.key] if e.key in cache else cache.setdefault(e.key, encode_example(
                processor, family, n_tokens, e)) for e in chunk]
            shown = [i for e in chunk for i in e.images]
            seen = rotate(pixels[shown], config.augment_rotation, config.seed, step) if shown and \
                config.augment_rotation else pixels[shown]
            batch = _batch(items, pad)
            images = family.pixel_inputs(model, seen) if shown else None
            out.append({**batch, **(images or {}),
                        **family.forward_kwargs(model, batch["input_ids"], images, batch["attention_mask"])})
        return out

    def loss(batch: dict) -> torch.Tensor:
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        if config.loss_average == "token":
            return wrapped(**batch).loss
        labels = batch.pop("labels")
        return example_loss(wrapped(**batch).logits, labels)

    run = engine.fit(total, draw, loss, epoch_of=epoch_of, on_step=on_step,
                     log_steps=None if config.log_every else [int(s) for s in starts[1:] if s <= total],
                     identity={"config": asdict(config), "arch": arch, "images": len(train)})
    final = engine.unwrapped
    summary = {"format": "genret.mini_mllm", "genret": __version__, "task": "pretrain", "clip": str(clip_dir),
               **({"init": str(config.init)} if config.init else {}),
               "arch": asdict(arch), **run.summary(config),
               "data": {"source": str(train.source), "images": len(train), "twins_drawn": len(mix.drawn),
                        "examples_per_epoch": dict(Counter(e.task for e in epochs[0]))},
               "parameters": sum(p.numel() for p in final.parameters())}
    if val is not None and engine.main:
        final.eval()
        summary["val_caption_loss"] = caption_loss(final, processor, family, val)
    summary["train_seconds"] = engine.seconds

    def write(folder: Path) -> None:
        final.save_pretrained(folder)
        processor.save_pretrained(folder)
        write_json(folder / "genret.json", summary)

    engine.save(write, ("genret.mini_mllm",))
    return summary


@torch.no_grad()
def caption_loss(model, processor, family, data: Dataset, limit: int = 200) -> dict[str, float]:
    """Mean caption-token loss on held-out images, with the right image and with a mismatched one.

    The gap between the two says how much the model looks at the image.
    """
    recs = data.records[:limit]
    device = next(model.parameters()).device
    pix = family.dense_pixels(processor, [load_image(r.path) for r in recs])
    items = [encode_example(processor, family, family.tokens_per_image(model, *pix.shape[-2:]),
                            Example("describe", (0,), message(DESCRIBE[0]), r.captions[0])) for r in recs]
    out = {}
    for name, order in (("with_image", list(range(len(recs)))), ("shuffled_image", list(range(1, len(recs))) + [0])):
        losses = []
        for s in range(0, len(recs), 50):
            batch = _batch(items[s:s + 50], processor.tokenizer.pad_token_id)
            images = family.pixel_inputs(model, pix[order[s:s + 50]])
            batch.update(images, **family.forward_kwargs(model, batch["input_ids"], images, batch["attention_mask"]))
            losses.append(model(**{k: v.to(device) for k, v in batch.items()}).loss.item())
        out[name] = round(float(np.mean(losses)), 4)
    return out
