"""GRACE training: an MLLM memorises a gallery of images as identifiers and learns to retrieve them from text.

Two tasks, mixed in every batch (``retrieve_ratio`` of the rows retrieve, the rest memorise), both a
plain next-token loss on the identifier's tokens (eos included, exactly the sequences the trie holds):

- memorise: a gallery image (prompt ``grace.memorise``) → its identifier;
- retrieve: a query text (``grace.retrieve``) → the identifier of its image. The queries are the
  training split's captions of gallery images that belong to it (if any) and, for every gallery image,
  a pseudo-query: the base MLLM's own greedy caption of it (``grace.caption``), computed once and kept
  in the adapter folder (``pseudo_queries.json``). The captions of evaluation images are never used.

LoRA goes on the language model only; the new identifier tokens' embedding rows (and their output
rows, tied or not) are trained through peft's ``trainable_token_indices``, which saves just those rows
with the adapter. They start from the prefilter's image embeddings (``init="prefilter"``: a fixed random
projection to the LM's width, rescaled to the mean and spread of the existing rows; a token shared by
several items, e.g. a structured cluster token, gets the mean of its items') or from the mean row.

The adapter folder: peft's files, ``genret.json`` (task ``grace``, mode = scheme), ``identifiers.json``,
the tokenizer with the added tokens, and ``pseudo_queries.json``. Checkpoints every ``save_every`` steps under
``out_dir/checkpoints`` (LoRA + new rows + optimizer + data order) make a run resumable.

Several processes (``accelerate launch`` on GPUs, ``torchrun`` on CPUs) train like the rerank trainer:
each takes its ``batch_size`` rows of the step, DDP averages the gradients, the main process alone
captions the pseudo-queries (sent to the others), evaluates and saves::

    accelerate launch --multi_gpu --num_processes 4 $(which genret) train grace --scheme atomic ...

Example::

    manifest = train_grace("adapters/mini-world/mllm", data, "runs/grace-atomic",
                           GraceTrainConfig(scheme="atomic", max_steps=300), prefilter="adapters/mini-world/clip")
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from genret import __version__
from genret.config import check_bounds
from genret.data.dataset import TRAIN_SPLITS, Dataset
from genret.data.images import load_image
from genret.identifiers import SCHEMES, Identifiers, Trie, add_tokens, constrained_beam_search, tokenize
from genret.mllm import scoring
from genret.mllm.answers import answer_context
from genret.mllm.textcache import image_key
from genret.stages.generate import PROMPT_NEEDS  # the stage owns what its prompt holds
from genret.training.distributed import on_main
from genret.training.engine import Engine, Streams
from genret.training.models import add_lora, image_features, load_base, lora_groups
from genret.training.options import LoraOptions, TrainOptions

if TYPE_CHECKING:
    from genret.encoders.base import DualEncoder
    from genret.mllm.backend import MLLM
    from genret.prompts import Prompt

logger = logging.getLogger(__name__)

PSEUDO_FILE = "pseudo_queries.json"
INITS = ("prefilter", "mean")


@dataclass
class GraceTrainConfig(LoraOptions, TrainOptions):
    """What and how to train: scheme, gallery, task mix, new-token rows, evaluation (and the shared options)."""

    scheme: str = field(default="atomic", metadata={"help": "identifier scheme: string, numeric, semantic, structured, atomic"})
    gallery_splits: str = field(default="test", metadata={"help": "comma-separated splits whose images become retrievable"})
    prompt: str = field(default="grace", metadata={"help": "prompt name or file with [memorise], [retrieve], [caption]"})
    retrieve_ratio: float = field(default=0.5, metadata={"help": "fraction of each batch that is retrieve (text -> id)"})
    pseudo_queries: bool = field(default=True, metadata={"help": "the base MLLM's caption of each gallery image as a query"})
    caption_tokens: int = field(default=32, metadata={"help": "most tokens of a pseudo-query caption"})
    init: str = field(default="prefilter", metadata={"help": "new-token rows: prefilter (image embeddings) or mean"})
    k: int = field(default=16, metadata={"help": "structured: k-means branching factor"})
    leaf_size: int = field(default=16, metadata={"help": "structured: most items per leaf"})
    epochs: int = field(default=3, metadata={"help": "passes over the gallery's memorise rows (unless max_steps)"})
    batch_size: int = field(default=16, metadata={"help": "rows per micro-batch and process"})
    lr: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate of the LoRA weights"})
    token_lr: float = field(default=1e-2, metadata={"help": "learning rate of the new tokens' rows"})
    eval_queries: int = field(default=32, metadata={"help": "images and texts per val evaluation"})
    num_beams: int = field(default=5, metadata={"help": "beam width of the val evaluation"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(SCHEMES.names())}, got {self.scheme!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if not 0 <= self.retrieve_ratio <= 1:
            raise ValueError(f"retrieve_ratio must be in [0, 1], got {self.retrieve_ratio}")
        check_bounds(self, at_least_one=("eval_queries", "num_beams", "caption_tokens", "k", "leaf_size"))
        if self.token_lr <= 0:
            raise ValueError(f"token_lr must be positive, got {self.token_lr}")
        self.gallery_splits = ",".join(s.strip() for s in self.gallery_splits.split(",") if s.strip())
        if not self.gallery_splits:
            raise ValueError("gallery_splits names no split")


def pseudo_queries(mllm: "MLLM", prompt: "Prompt", paths: Sequence[str], max_new_tokens: int = 32,
                   batch_size: int = 16, progress: bool = False) -> list[str]:
    """The MLLM's greedy caption of each image, with the prompt's ``[caption]`` template.

    Args:
        mllm: the captioner (the base model, before any adapter).
        prompt: a prompt with a ``[caption]`` table (``grace``).
        paths: image files.
        max_new_tokens: the longest caption, in tokens.
        batch_size: images per ``generate`` call.
        progress: show a progress bar.

    Returns:
        One caption per image, stripped (empty where the model said nothing).
    """
    from genret.mllm.captioner import Captioner

    captioner = Captioner(mllm, prompt, section="caption", max_new_tokens=max_new_tokens, batch_size=batch_size)
    return captioner.caption(paths, progress=progress)


def init_token_rows(identifiers: Identifiers, tokenizer, model, embeddings: np.ndarray | None, seed: int = 0) -> str:
    """Set the new tokens' input (and untied output) embedding rows; returns how (``prefilter`` or ``mean``).

    With ``embeddings`` (one row per item, e.g. the prefilter's image embeddings), each item's vector is
    projected to the LM's width by a fixed random Gaussian matrix, standardised per dimension, and
    mapped to the mean and standard deviation of the existing rows; a token gets the mean over the items
    whose identifier holds it (a structured cluster token: its cluster; a leaf-position token: ~ the
    mean row). Without, every new row is the mean of the existing rows.
    """
    new_ids = tokenizer.convert_tokens_to_ids(list(identifiers.new_tokens))
    if not new_ids:
        return "none"
    first = min(new_ids)
    members: dict[str, list[int]] = {t: [] for t in identifiers.new_tokens}
    if embeddings is not None:
        for i, ident in enumerate(identifiers.identifiers):
            for t in set(re.findall(r"<[^<>]+>", ident)):
                if t in members:
                    members[t].append(i)
    tables = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != tables[0].data_ptr():
        tables.append(out.weight)
    how = "mean"
    with torch.no_grad():
        for table in tables:
            old = table[:first].float()
            mu, sd = old.mean(0), old.std(0)
            rows = mu.expand(len(new_ids), -1).clone()
            if embeddings is not None:
                gen = torch.Generator().manual_seed(seed)
                x = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
                x = F.normalize(x, dim=-1) @ (torch.randn(x.shape[1], table.shape[1], generator=gen) / math.sqrt(x.shape[1]))
                z = (x - x.mean(0)) / x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.zeros_like(x)
                for r, t in enumerate(identifiers.new_tokens):
                    if members[t]:
                        rows[r] = mu + sd * z[members[t]].mean(0)
                how = "prefilter"
            table[new_ids] = rows.to(table.dtype)
    return how


def identifier_loss(mllm: "MLLM", prompts: list[str], images: list[list[torch.Tensor]],
                    targets: list[list[int]], model=None) -> torch.Tensor:
    """Mean next-token cross-entropy of each row's ``targets`` (identifier tokens + eos) after its prompt.

    The prompt's embeddings (cached image features included) carry no gradient; the target tokens are
    embedded by the (peft-wrapped) input embedding, so the new tokens' rows learn as inputs too.
    ``model``: what the forward pass goes through (accelerate's DDP wrapper of ``mllm.model`` when
    several processes train); default ``mllm.model``.
    """
    with torch.no_grad():
        inputs = scoring._inputs(mllm, prompts, images)
        if "inputs_embeds" not in inputs:  # text-only rows (no image in the batch): embed the prompt here
            inputs["inputs_embeds"] = mllm.model.get_input_embeddings()(inputs["input_ids"])
    lengths = inputs["attention_mask"].sum(dim=1).tolist()
    table = mllm.model.get_input_embeddings()
    device = inputs["input_ids"].device
    width = max(n + len(t) for n, t in zip(lengths, targets))
    pad = mllm.tokenizer.pad_token_id or 0
    rows, ids, labels = [], [], []
    for r, (n, tgt) in enumerate(zip(lengths, targets)):
        tgt_t = torch.tensor(tgt, device=device)
        seq = torch.cat([inputs["input_ids"][r, :n], tgt_t])
        emb = torch.cat([inputs["inputs_embeds"][r, :n].detach(), table(tgt_t).to(inputs["inputs_embeds"].dtype)])
        rows.append(F.pad(emb, (0, 0, 0, width - len(seq))))
        ids.append(F.pad(seq, (0, width - len(seq)), value=pad))
        labels.append(F.pad(torch.cat([torch.full((n,), -100, device=device), tgt_t]), (0, width - len(seq)), value=-100))
    input_ids, labels_t = torch.stack(ids), torch.stack(labels)
    mask = (torch.arange(width, device=device)[None] < torch.tensor([n + len(t) for n, t in zip(lengths, targets)],
                                                                    device=device)[:, None]).long()
    image_inputs = {k: v for k, v in inputs.items() if k not in scoring._TEXT_KEYS}
    extra = mllm.family.forward_kwargs(mllm.model, input_ids, image_inputs or None, mask)
    logits = (model or mllm.model)(inputs_embeds=torch.stack(rows), attention_mask=mask, use_cache=False, **extra).logits
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels_t[:, 1:].reshape(-1),
                           ignore_index=-100)


def _prompts(mllm: "MLLM", prompt: "Prompt", texts: Sequence[str | None]) -> list[str]:
    """Rendered prompts: ``None`` is a memorise row (an image), a string a retrieve row (a text)."""
    mem, ret = prompt.section("memorise")["user"], prompt.section("retrieve")["user"]
    return [scoring.render(mllm, scoring.user_message(mem) if t is None else scoring.user_message(ret, text=t))
            for t in texts]


@torch.no_grad()
def evaluate_grace(mllm: "MLLM", prompt: "Prompt", trie: Trie, item_ids: Sequence[str],
                   images: Sequence[torch.Tensor | str], queries: Sequence[tuple[str, str]], num_beams: int = 5,
                   batch_size: int = 16) -> dict:
    """Image → id top-1 (memorisation) and text → id R@1 (retrieval), in percent, by trie beam search.

    Args:
        mllm: the model (adapter attached).
        prompt: the ``grace`` prompt.
        trie: the identifiers to decode.
        item_ids: the images' items, aligned with ``images`` (image files).
        images: image files of the memorise check.
        queries: ``(text, item id)`` pairs of the retrieve check.
        num_beams: beam width.
        batch_size: prompts per ``generate`` call.
    """
    tok = mllm.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    mllm.model.eval()
    try:
        def top1(texts: list[str | None], pics: list, want: list[str]) -> float:
            hits = 0
            for s in range(0, len(texts), batch_size):
                rendered = _prompts(mllm, prompt, texts[s:s + batch_size])
                kw = {"images": mllm.family.processor_images([[load_image(p)] for p in pics[s:s + batch_size]])
                      } if pics else {}
                inputs = mllm.processor(text=rendered, padding=True, return_tensors="pt", **kw)
                # as the captioner and answerer: the family keeps what generate needs (Gemma 3's token_type_ids)
                inputs = {k: v.to(mllm.device) for k, v in mllm.family.generate_inputs(mllm.model, inputs).items()}
                found = constrained_beam_search(mllm.model, inputs, trie, num_beams=num_beams, num_return_sequences=1,
                                                pad_token_id=tok.pad_token_id)
                hits += sum(bool(f) and f[0].item_id == w for f, w in zip(found, want[s:s + batch_size]))
            return round(100.0 * hits / max(1, len(texts)), 2)

        return {"image_to_id_top1": top1([None] * len(images), list(images), list(item_ids)),
                "text_to_id_R@1": top1([q for q, _ in queries], [], [i for _, i in queries]),
                "images": len(images), "texts": len(queries)}
    finally:
        tok.padding_side = side


def _load_pseudo(path: Path, key: dict) -> list[str] | None:
    from genret._io import read_json

    if not path.is_file():
        return None
    data = read_json(path, what="pseudo-queries")
    return data.get("queries") if isinstance(data, dict) and data.get("key") == key else None


def train_grace(base: str | os.PathLike, data: Dataset, out_dir: str | os.PathLike,
                config: GraceTrainConfig | None = None, *, prefilter: "str | os.PathLike | DualEncoder | None" = None,
                queries: "Mapping[str, Sequence[str]] | None" = None, resume: bool = False, progress: bool = True,
                on_step: "Callable[[dict], None] | None" = None) -> dict:
    """Train a GRACE adapter on ``base``: memorise the gallery's images, retrieve them from text; saves ``out_dir``.

    Args:
        base: the MLLM (Hugging Face id or local directory).
        data: the whole data set; the gallery is its ``config.gallery_splits`` images, the retrieve captions
            come from its training split only.
        out_dir: the adapter folder to write.
        config: see :class:`GraceTrainConfig`.
        prefilter: the dual encoder whose image embeddings build structured ids and initialise new rows
            (a directory/id loaded with the ``hf`` backend, or a loaded encoder); required for ``structured``.
        queries: more retrieve queries, gallery image id -> texts (e.g. another captioner's pseudo-queries);
            never the evaluation captions of the images, which would train on the test queries.
        resume: continue from the last checkpoint under ``out_dir/checkpoints`` (same settings required).
        progress: show progress bars.
        on_step: called after every optimizer step with ``{"step", "total", "loss"}``.

    Returns:
        The adapter manifest (also ``out_dir/genret.json``): config, history, val metrics, speed.
    """
    from genret._io import write_json
    from genret.encoders import load_encoder
    from genret.mllm.adapters import ADAPTER_FORMATS, FORMAT, VERSION, write_adapter
    from genret.prompts import load_prompt

    config = config or GraceTrainConfig()
    engine = Engine(f"grace-{config.scheme}", config, out_dir, resume=resume, progress=progress, base=base)
    out_dir, show = Path(out_dir), engine.show
    prompt = load_prompt(config.prompt, required=PROMPT_NEEDS)
    gallery = data.split(*config.gallery_splits.split(","))
    items = [r.id for r in gallery.records]
    paths = [str(r.path) for r in gallery.records]
    scheme = SCHEMES.get(config.scheme)
    if "embeddings" in scheme.needs and prefilter is None:
        raise ValueError(f"the {scheme.name} scheme names images by the prefilter's image embeddings: pass prefilter (--clip)")
    encoder = load_encoder("hf", str(prefilter)) if isinstance(prefilter, (str, os.PathLike)) else prefilter
    embeddings = encoder.encode_images(paths, progress=show, role="document") if encoder is not None else None
    mllm = load_base(str(base), config, engine.device)

    extra = dict(queries or {})
    unknown = [i for i in extra if i not in set(items)]
    if unknown:
        raise ValueError(f"queries name {len(unknown)} images outside the gallery (e.g. {unknown[0]!r})")
    queries: list[tuple[str, int]] = []  # (text, gallery position)
    for g, rec in enumerate(gallery.records):
        if rec.split in TRAIN_SPLITS:
            queries += [(c, g) for c in rec.captions]
    n_captions = len(queries)
    queries += [(t, g) for g, i in enumerate(items) for t in extra.get(i, ())]
    pseudo: list[str] = []
    if config.pseudo_queries:
        key = {"base_revision": mllm.revision, "prompt": prompt.key, "items": len(items), "first": items[0],
               "last": items[-1], "caption_tokens": config.caption_tokens, "images": image_key(mllm)}
        pseudo = _load_pseudo(out_dir / PSEUDO_FILE, key) or on_main(
            engine.accelerator, lambda: pseudo_queries(mllm, prompt, paths, config.caption_tokens, progress=show))
        queries += [(t, g) for g, t in enumerate(pseudo) if t]
        if not any(pseudo):
            logger.warning("the captioner gave no pseudo-query for any of the %d gallery images (an untrained base?)",
                           len(pseudo))
    if config.retrieve_ratio > 0 and not queries:
        raise ValueError(f"no retrieve queries: the gallery ({config.gallery_splits}) holds no training images, no "
                         "queries were given and the captioner gave no pseudo-query; pass queries or set retrieve_ratio 0")

    kw: dict = {o: getattr(config, o) for o in scheme.options}
    if "embeddings" in scheme.needs:
        kw["embeddings"] = embeddings
    if "texts" in scheme.needs:
        if not pseudo:
            raise ValueError(f"the {scheme.name} scheme names images by their pseudo-queries: turn pseudo_queries on")
        # A pseudo-query names an image; a training image without one falls back to its captions, an evaluation
        # image never does (its captions are the test queries).
        kw["texts"] = {i: [t] if t else list(r.captions) if r.split in TRAIN_SPLITS else []
                       for i, t, r in zip(items, pseudo, gallery.records)}
    identifiers = scheme.make(items, **kw)
    add_tokens(identifiers, mllm.tokenizer, mllm.model)
    targets = tokenize(identifiers, mllm.tokenizer, *answer_context(mllm))  # as the model writes them
    token_ids = mllm.tokenizer.convert_tokens_to_ids(list(identifiers.new_tokens))
    init = init_token_rows(identifiers, mllm.tokenizer, mllm.model,
                           embeddings if config.init == "prefilter" else None, config.seed)
    trie = Trie(targets, items)
    feats = image_features(mllm, paths, show, "gallery image features")

    torch.manual_seed(config.seed)
    model = add_lora(mllm, config, token_ids=token_ids, gradient_checkpointing=config.gradient_checkpointing)
    wrapped = engine.prepare(model, lora_groups(model, config.lr, config.token_lr))
    n_ret = round(config.batch_size * config.retrieve_ratio) if queries else 0
    n_mem = config.batch_size - n_ret
    chunks = engine.chunks
    total = config.max_steps or config.epochs * math.ceil(len(items) / max(1, n_mem * chunks))
    streams = Streams(config.seed, {"mem": range(len(items)), "ret": range(len(queries))})

    def draw(step: int) -> list[list[tuple[str | None, int]]]:
        """The step's micro-batches: each ``n_mem`` memorise rows ``(None, image)`` then ``n_ret`` retrieve rows."""
        mem = streams.take("mem", n_mem * chunks)
        ret = [queries[i] for i in streams.take("ret", n_ret * chunks)]
        return [[(None, g) for g in mem[c * n_mem:(c + 1) * n_mem]] + ret[c * n_ret:(c + 1) * n_ret]
                for c in range(chunks)]

    def loss(chunk: list[tuple[str | None, int]]) -> torch.Tensor:
        return identifier_loss(mllm, _prompts(mllm, prompt, [t for t, _ in chunk]),
                               [[feats[g]] if t is None else [] for t, g in chunk], [targets[g] for _, g in chunk],
                               model=wrapped)

    rng_eval = random.Random(config.seed + 1)
    check_img = rng_eval.sample(range(len(items)), min(config.eval_queries, len(items)))
    check_txt = rng_eval.sample(queries, min(config.eval_queries, len(queries)))

    def val() -> dict:  # on the main process; the others wait for it at their next gradient exchange
        return evaluate_grace(mllm, prompt, trie, [items[i] for i in check_img], [paths[i] for i in check_img],
                              [(t, items[g]) for t, g in check_txt], config.num_beams)

    run = engine.fit(total, draw, loss, evaluate=val, on_step=on_step,
                     state=streams.hooks,
                     identity={"config": asdict(config), "base_revision": mllm.revision, "prompt": prompt.key,
                               "items": len(items), "retrieve_queries": len(queries)})
    manifest = {
        "format": FORMAT, "version": VERSION, "genret": __version__, "task": "grace", "mode": config.scheme,
        "scheme": config.scheme, "base_model": str(base), "base_revision": mllm.revision, "family": mllm.family.name,
        "prompt": {"name": prompt.name, "version": prompt.version}, **run.summary(config),
        "gallery": {"source": str(data.source), "splits": config.gallery_splits, "images": len(items)},
        "tokens": {"vocab_size": len(mllm.tokenizer), "new_token_ids": [int(t) for t in token_ids[:1] + token_ids[-1:]],
                   "new_tokens": len(token_ids), "init": init},
        "data": {"captions": n_captions, "pseudo_queries": sum(map(bool, pseudo)),
                 "given_queries": sum(map(len, extra.values())), "retrieve_queries": len(queries),
                 "prefilter": getattr(encoder, "model_id", str(prefilter)) if encoder is not None else None},
        "train_seconds": engine.seconds,
    }

    def write(folder: Path) -> None:
        write_adapter(folder, engine.unwrapped, manifest)
        identifiers.save(folder)
        mllm.tokenizer.save_pretrained(str(folder))
        if pseudo:
            write_json(folder / PSEUDO_FILE, {"key": key, "items": items, "queries": pseudo})

    engine.save(write, ADAPTER_FORMATS)
    return manifest
