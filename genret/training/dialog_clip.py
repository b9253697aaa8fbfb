"""A dialog-trained retriever, as ChatIR trains its own: a CLIP's text tower fine-tuned on (dialog so far → image).

The chat stage retrieves with the dialog so far joined as one text (:func:`genret.stages.dialog.joined_dialog`),
which a CLIP trained on captions never saw, and which outgrows a short text context after a few rounds. Here the
simulated users of the chat stage (the ``scripted`` questioner and the ``facts`` answerer, registered plug-ins)
hold a dialog about each training image; every round's joined dialog is a query whose target is that image, and the
text tower (with a longer context: new positions start as copies of the last one) is trained contrastively against
the image embeddings, which stay frozen: the vision tower and its projection are not touched, so an image index
built with the plain CLIP serves the fine-tuned one unchanged. A share of the rows are the images' own captions, so
the tower keeps reading captions.

The result is a plain CLIP checkpoint (model, processor with the longer tokenizer context, ``genret.json``).
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from genret import __version__
from genret._io import write_json
from genret.config import check_bounds
from genret.data.dataset import Dataset
from genret.training.engine import Engine
from genret.training.options import TrainOptions

QUERY_FORMATS = ("dialog", "answers")


@dataclass
class DialogCLIPConfig(TrainOptions):
    """The dialogs, the longer context and the optimisation of the text tower's fine-tuning."""

    rounds: int = field(default=5, metadata={"help": "dialog rounds per image (each round one query, round 0 too)"})
    query_format: str = field(default="answers", metadata={"help": "dialog (questions and answers) or answers, as the "
                                                                   "chat stage's query_format it will serve"})
    context_length: int = field(default=77, metadata={"help": "text positions of the fine-tuned tower"})
    caption_share: float = field(default=0.25, metadata={"help": "share of rows that are the images' own captions"})
    epochs: int = field(default=10, metadata={"help": "passes over the dialog rows"})
    batch_size: int = field(default=128, metadata={"help": "rows per micro-batch (the in-batch negatives)"})
    lr: float = field(default=2e-4, metadata={"help": "peak AdamW learning rate"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bounds(self, at_least_one=("rounds", "context_length"))
        if self.query_format not in QUERY_FORMATS:
            raise ValueError(f"query_format must be one of {', '.join(QUERY_FORMATS)}, got {self.query_format!r}")
        if not 0 <= self.caption_share < 1:
            raise ValueError(f"caption_share must be in [0, 1), got {self.caption_share}")


def dialog_rows(records, rounds: int, query_format: str, seed: int = 0) -> list[tuple[str, int]]:
    """``(query text, record index)`` for each image and round 0..``rounds``: the oracle dialog (scripted questions,
    facts answers) joined as the chat stage joins it."""
    from genret.eval.interactive import dialog_queries
    from genret.stages.chat import ChatConfig, ChatStage

    stage = ChatStage(ChatConfig(questioner="scripted", answerer="facts", rounds=rounds, query_format=query_format),
                      "chat")
    queries = stage.start(*dialog_queries(records, seed))
    index = {r.id: i for i, r in enumerate(records)}
    rows = [(q.text, index[q.id]) for q in queries]
    for _ in range(rounds):
        queries = stage.next_round(queries)
        rows += [(q.text, index[q.id]) for q in queries if len(q.meta["turns"]) and not q.meta.get("stopped")]
    return rows


def extend_context(model, tokenizer, length: int) -> None:
    """Give ``model``'s text tower ``length`` positions (new ones copy the last trained one) and the tokenizer the
    same limit; a shorter ``length`` than the model has is refused."""
    emb = model.text_model.embeddings
    old = emb.position_embedding.weight.shape[0]
    if length < old:
        raise ValueError(f"context_length {length} is shorter than the model's {old} text positions")
    if length > old:
        weight = emb.position_embedding.weight.data
        new = torch.nn.Embedding(length, weight.shape[1]).to(weight)
        new.weight.data[:old] = weight
        new.weight.data[old:] = weight[-1]
        emb.position_embedding = new
        emb.register_buffer("position_ids", torch.arange(length).unsqueeze(0), persistent=False)
        model.config.text_config.max_position_embeddings = length
    tokenizer.model_max_length = length


def train_dialog_clip(clip_dir: str | os.PathLike, train: Dataset, out_dir: str | os.PathLike,
                      config: DialogCLIPConfig | None = None, *, val: Dataset | None = None, progress: bool = True,
                      resume: bool = False, on_step: "Callable[[dict], None] | None" = None) -> dict:
    """Fine-tune ``clip_dir``'s text tower on the dialogs of ``train``'s images; saves a CLIP checkpoint.

    Returns:
        The summary saved as ``genret.json``; with ``val``, the R@1 and R@10 of every round's dialogs about its images
        (among them), before and after.
    """
    from transformers import AutoProcessor, CLIPModel

    from genret.data.images import load_image

    config = config or DialogCLIPConfig()
    engine = Engine("clip-dialog", config, out_dir, resume=resume, progress=progress)
    torch.manual_seed(config.seed)
    model, processor = CLIPModel.from_pretrained(clip_dir), AutoProcessor.from_pretrained(clip_dir)
    extend_context(model, processor.tokenizer, config.context_length)
    for p in model.parameters():
        p.requires_grad = False
    for p in (*model.text_model.parameters(), *model.text_projection.parameters(), model.logit_scale):
        p.requires_grad = True

    @torch.no_grad()
    def images(records) -> torch.Tensor:
        out = []
        for s in range(0, len(records), 256):
            pix = processor.image_processor(images=[load_image(r.path) for r in records[s:s + 256]], return_tensors="pt")
            out.append(F.normalize(model.get_image_features(**pix).pooler_output, dim=-1))
        return torch.cat(out)

    def tokens(texts: list[str]) -> dict:
        return processor.tokenizer(texts, padding="max_length", truncation=True, max_length=config.context_length,
                                   return_tensors="pt")

    gallery = images(train.records)
    rows = dialog_rows(train.records, config.rounds, config.query_format, config.seed)
    n_dialog = len(rows)
    captions = [(c, i) for i, r in enumerate(train.records) for c in r.captions]
    want = round(n_dialog * config.caption_share / (1 - config.caption_share))
    rows += random.Random(config.seed).sample(captions, min(want, len(captions)))
    evaluate = None
    if val is not None:
        val_rows = dialog_rows(val.records, config.rounds, config.query_format, config.seed)
        val_gallery = images(val.records)

        def evaluate() -> dict:
            return _recall(engine.unwrapped, tokens, val_rows, val_gallery)

        before = _recall(model, tokens, val_rows, val_gallery)
    wrapped = engine.prepare(model)
    per_step = engine.rows_per_step
    steps_per_epoch = max(1, len(rows) // per_step)
    total = config.max_steps or steps_per_epoch * config.epochs
    order = np.random.default_rng(config.seed)
    epochs: dict[int, list[int]] = {}

    def draw(step: int) -> list[dict]:
        e = step // steps_per_epoch
        perm = epochs.setdefault(e, order.permutation(len(rows)).tolist())
        take = perm[(step % steps_per_epoch) * per_step:][:per_step]
        out = []
        for c in range(engine.chunks):
            part = [rows[j] for j in take[c * config.batch_size:(c + 1) * config.batch_size]]
            out.append({**tokens([t for t, _ in part]), "targets": torch.tensor([i for _, i in part])})
        return out

    def loss(batch: dict) -> torch.Tensor:
        targets = batch.pop("targets")
        text = F.normalize(wrapped.get_text_features(**{k: v.to(engine.device) for k, v in batch.items()
                                                          if k != "token_type_ids"}).pooler_output, dim=-1)
        keys, owner = torch.unique(targets, return_inverse=True)  # each image once: its other rows are no negative
        logits = wrapped.logit_scale.exp() * text @ gallery[keys].to(text.device).T
        return F.cross_entropy(logits, owner.to(text.device))

    run = engine.fit(total, draw, loss, evaluate=evaluate, on_step=on_step,
                     state=(lambda: {"epochs": {str(k): v for k, v in epochs.items()}},
                            lambda s: epochs.update({int(k): v for k, v in s["epochs"].items()})),
                     identity={"config": asdict(config), "clip": str(clip_dir), "images": len(train)})
    summary = {"format": "genret.clip", "genret": __version__, "task": "clip-dialog", "base_clip": str(clip_dir),
               **run.summary(config), "data": {"source": str(train.source), "images": len(train),
                                              "dialog_rows": n_dialog, "caption_rows": len(rows) - n_dialog},
               "train_seconds": engine.seconds}
    if val is not None:
        summary["metrics"]["val_before"] = before

    def write(folder: Path) -> None:
        engine.unwrapped.save_pretrained(folder)
        processor.save_pretrained(folder)
        write_json(folder / "genret.json", summary)

    engine.save(write, ("genret.clip",))
    return summary


@torch.no_grad()
def _recall(model, tokens, rows: list[tuple[str, int]], gallery: torch.Tensor, ks: tuple[int, ...] = (1, 10)) -> dict:
    """R@K (%) of the dialog texts (every round's) against the image embeddings."""
    device = next(model.parameters()).device
    hits = dict.fromkeys(ks, 0)
    for s in range(0, len(rows), 256):
        part = rows[s:s + 256]
        batch = {k: v.to(device) for k, v in tokens([t for t, _ in part]).items() if k != "token_type_ids"}
        text = F.normalize(model.get_text_features(**batch).pooler_output, dim=-1)
        top = (text @ gallery.to(device).T).topk(min(max(ks), len(gallery)), dim=1).indices.tolist()
        for k in ks:
            hits[k] += sum(int(i in row[:k]) for (_, i), row in zip(part, top))
    return {f"val_dialog_R@{k}": round(100.0 * n / max(1, len(rows)), 2) for k, n in hits.items()}
