"""LoRA (and, on CUDA, QLoRA) fine-tuning of an MLLM reranker on hard negatives mined by the prefilter.

Each training query (a caption ranking images, or an image ranking captions) is a group: its
positive and ``negatives`` candidates drawn from the prefilter's top-``mine_k`` non-matching ones
(:mod:`genret.training.negatives`). The prompt is the rerank stage's own (``rerank_<mode>``), and
the model is trained on exactly the score that stage reads:

- pointwise: ``s = logit(yes) − logit(no)`` at the answer position of each (query, candidate) prompt.
  Loss = balanced binary cross-entropy on ``s`` (the positive and the mean over negatives weigh the
  same) + ``group_weight`` × softmax cross-entropy over the group's ``s`` (the positive should win).
- listwise: the group's candidates numbered in one prompt, the positive at a random position.
  Loss = cross-entropy over the number tokens' logits at the answer position, plus the
  log-likelihood of the rest of the right answer (e.g. the end-of-turn token), so that the whole
  answer the listwise scorer reads is trained.

- generative: ``s = mean log P(text | image)`` over the text's tokens, the stage's generative score.
  Loss = softmax cross-entropy over the group's ``s / temperature`` (the positive should win) −
  ``lm_weight`` × the positive's ``s`` (its caption likelihood, which keeps the captioner a captioner).

``twin_negatives``: a share of the queries get, in place of one mined negative, their image's *twin* (the records'
annotation plug-in's :meth:`~genret.data.annotations.Annotation.twins`: the same words bound or placed otherwise),
drawn anew once per training image (never a val or test scene) for t2i, its caption for i2t: the question the test
split's twins ask, which the training split's mined near misses almost never are.

By default LoRA goes on the language model only; the vision tower and projector stay frozen, so every
training image's projected features are computed once and fed through the cached-features path. With
``vision = "projector"`` the projector trains too (whole), with ``"tower"`` also a LoRA on the vision tower:
the images then run through the vision side at every step (the forward a real LLaVA fine-tune runs), and
the validation features are recomputed at every evaluation.
Runs on the training engine (:mod:`genret.training.engine`: accumulation, mixed precision, trackers,
several processes; ``batch_size`` query groups per micro-batch and process), is resumable from its last
checkpoint, and saves the adapter with its manifest atomically.

Example::

    summary = train_rerank("adapters/mini-world/mllm", data.split("train"), "runs/rerank",
                           RerankTrainConfig(mode="listwise"), prefilter="adapters/mini-world/clip",
                           val=data.split("val"))

On several GPUs (``batch_size`` query groups per GPU; checked here with ``torchrun`` on CPU processes)::

    accelerate launch --multi_gpu --num_processes 4 $(which genret) train rerank --base ... --load-in-4bit
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from genret import __version__
from genret.config import check_bounds
from genret.data.dataset import Dataset
from genret.data.images import load_image
from genret.mllm import scoring
from genret.mllm.adapters import VISION_ADAPT
from genret.mllm.answers import answer_format
from genret.training.engine import Engine
from genret.training.models import add_lora, image_features, lays_out_several, load_base
from genret.training.options import LoraOptions, TrainOptions
from genret.training.negatives import QueryGroup, caption_table, embed_as, mine_negatives, top_k

if TYPE_CHECKING:
    from genret.encoders.base import DualEncoder
    from genret.mllm.backend import MLLM
    from genret.prompts import Prompt

logger = logging.getLogger(__name__)

MODES = ("pointwise", "listwise", "generative")
DIRECTIONS = {"both": ("t2i", "i2t"), "t2i": ("t2i",), "i2t": ("i2t",)}


@dataclass
class RerankTrainConfig(LoraOptions, TrainOptions):
    """What and how to train: the rerank mode, negatives, evaluation (and the engine's and LoRA's shared options)."""

    mode: str = field(default="pointwise", metadata={"help": "pointwise (yes/no per candidate), listwise (numbered "
                                                     "candidates) or generative (log P(text | image))"})
    prompt: str = field(default="", metadata={"help": "prompt name or file (default: rerank_<mode>, the stage's)"})
    directions: str = field(default="both", metadata={"help": "training queries: t2i (captions), i2t (images) or both"})
    negatives: int = field(default=7, metadata={"help": "negatives per query, sampled from the prefilter's top mine_k"})
    mine_k: int = field(default=20, metadata={"help": "prefilter candidates per query that negatives are drawn from"})
    false_negatives: float = field(default=0.0, metadata={"help": "false-negative filtering (U-MARVEL's): drop a mined "
                                   "candidate whose prefilter embedding has at least this cosine with the positive's "
                                   "(a likely unlabelled match); 0: keep them all"})
    twin_negatives: float = field(default=0.0, metadata={"help": "share of queries one of whose negatives is their "
                                  "image's twin (the same words bound or placed otherwise), drawn anew by the "
                                  "records' annotation plug-in, never a val or test scene; 0: mined negatives only"})
    permutations: int = field(default=1, metadata={"help": "listwise: orders each query's candidates appear in within "
                              "a batch (the positive elsewhere in each), so no answer position is learnt"})
    group_weight: float = field(default=1.0, metadata={"help": "pointwise: weight of the softmax loss over a query's group"})
    temperature: float = field(default=0.1, metadata={"help": "generative: softmax temperature over a group's mean "
                                                          "log-likelihoods"})
    lm_weight: float = field(default=1.0, metadata={"help": "generative: weight of the positive's caption "
                                                        "log-likelihood in the loss"})
    batch_size: int = field(default=8, metadata={"help": "query groups per micro-batch and process"})
    lr: float = field(default=5e-4, metadata={"help": "peak AdamW learning rate"})
    eval_every: int = field(default=200, metadata={"help": "steps between evaluations on the val split (0: only at the end)"})
    eval_queries: int = field(default=100, metadata={"help": "val queries per direction in each evaluation"})
    eval_k: int = field(default=10, metadata={"help": "prefilter candidates reranked per val query"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input (costs ~10%% of a step on the CPU)"})
    cache_features: bool = field(default=True, metadata={"help": "compute every training image's MLLM features once "
                                 "(not with --vision projector/tower: the features then change as the adapter trains); "
                                 "off: the images run through the vision tower at every step, laid out as the "
                                 "checkpoint's processor does (SmolVLM's tiles kept)"})
    vision: str = field(default="none", metadata={"help": "what trains beside the language model's LoRA: none; "
                        "projector (the projector, whole, saved with the adapter); tower (the projector and a LoRA on "
                        "the vision tower). The images then run through the vision side at every step, and a rerank "
                        "stage computes (and keys) its gallery features with the adapter"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.directions not in DIRECTIONS:
            raise ValueError(f"directions must be one of {', '.join(DIRECTIONS)}, got {self.directions!r}")
        check_bounds(self, at_least_one=("negatives", "mine_k", "eval_queries", "eval_k"),
                     non_negative=("group_weight", "lm_weight"))
        if self.mine_k < self.negatives:
            raise ValueError(f"mine_k ({self.mine_k}) must be at least negatives ({self.negatives})")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0 <= self.twin_negatives <= 1:
            raise ValueError(f"twin_negatives must be a share in [0, 1], got {self.twin_negatives}")
        if not 0 <= self.false_negatives <= 1:
            raise ValueError(f"false_negatives must be a cosine in [0, 1] (0: off), got {self.false_negatives}")
        if self.permutations > self.negatives + 1:
            raise ValueError(f"permutations ({self.permutations}) must not exceed the candidates per query "
                             f"(negatives + 1 = {self.negatives + 1}): each order puts the positive at another number")
        if self.permutations < 1 or (self.permutations > 1 and self.mode != "listwise"):
            raise ValueError(f"permutations must be at least 1, and above 1 only with mode listwise (got "
                             f"{self.permutations} with mode {self.mode})")
        if self.vision not in VISION_ADAPT:
            raise ValueError(f"vision must be one of {', '.join(VISION_ADAPT)}, got {self.vision!r}")


class Example(NamedTuple):
    """One step's unit: a query and its candidates (the positive at ``target``)."""

    direction: str
    query: int
    candidates: tuple[int, ...]
    target: int


def epoch_examples(groups: Sequence[QueryGroup], config: RerankTrainConfig, epoch: int,
                   twins: dict[tuple[str, int], int] | None = None) -> list[Example]:
    """The examples of one epoch, a pure function of (seed, epoch): resuming redraws the same ones.

    ``twins``: ``(direction, image) -> candidate index`` of the image's twin (:func:`draw_twins`); a share
    ``twin_negatives`` of the queries that have one get it in place of a random one of their negatives."""
    rng = random.Random(config.seed * 1_000_003 + epoch)
    order = list(range(len(groups)))
    rng.shuffle(order)
    out = []
    for g in order:
        group = groups[g]
        positive = rng.choice(group.positives)
        negs = rng.sample(group.negatives, config.negatives)
        if twins and config.twin_negatives:
            image = group.positives[0] if group.direction == "t2i" else group.query
            twin = twins.get((group.direction, image))
            if twin is not None and rng.random() < config.twin_negatives:
                negs[rng.randrange(len(negs))] = twin
        at = rng.randrange(config.negatives + 1)
        out.append(Example(group.direction, group.query, tuple(negs[:at] + [positive] + negs[at:]), at))
    return out


def draw_twins(train: Dataset, config: RerankTrainConfig, avoid: frozenset, texts: list[str],
               images: list) -> dict[tuple[str, int], int]:
    """One twin per training image that has one, drawn anew (seeded by the config's seed and the image): for t2i
    queries its picture appended to ``images``, for i2t one of its captions to ``texts`` (only what the config's
    directions need). Returns ``(direction, image) -> candidate index`` for :func:`epoch_examples`."""
    from genret.data.annotations import annotation_of, eligible_twins

    out: dict[tuple[str, int], int] = {}
    directions = DIRECTIONS[config.directions]
    size = load_image(train.records[0].path).size[0] if train.records else 0
    for i, record in enumerate(train.records):
        found = annotation_of(record.meta)
        twins = eligible_twins(found, avoid)
        if not twins:
            continue
        rng = random.Random(f"genret.rerank.twin:{config.seed}:{i}")
        kind, (_, twin) = found[1], rng.choice(twins)
        seed = rng.getrandbits(32)
        if "t2i" in directions:
            out["t2i", i] = len(images)
            images.append(kind.render(twin, size, seed))
        if "i2t" in directions:
            out["i2t", i] = len(texts)
            texts.append(kind.captions(twin, rng, 1)[0])
    if not out:
        raise ValueError(f"{train.source}: twin_negatives found no training image with a twin to draw (the "
                         "records' annotation plug-in draws none, or every twin is a held-out scene): set "
                         "twin_negatives to 0")
    return out


class _Batch:
    """What the loss functions need: the model, the prompt, the data and their features."""

    def __init__(self, mllm: "MLLM", model, prompt: "Prompt", texts: list[str], paths: list[str],
                 feats: dict[int, torch.Tensor] | None, vision: str = "none") -> None:
        self.mllm, self.model, self.prompt = mllm, model, prompt
        self.texts, self.paths, self.feats, self.vision = texts, paths, feats, vision
        self.several: dict[int, torch.Tensor] = {}  # features laid out as one of several images, made as needed

    def features(self, indices: Sequence[int], several: bool = False) -> dict:
        """Each image's cached features; the images themselves when the vision side trains or nothing is cached
        (they run through the vision side in the forward, laid out by the processor).

        ``several``: the images sit in a prompt of several (listwise candidates), which LLaVA-OneVision lays out
        otherwise than an image alone: features of that layout, cached as they are first needed."""
        unique = sorted(set(indices))
        if self.vision != "none" or self.feats is None:  # the images run through the vision side in the forward,
            return {i: load_image(self.paths[i]) for i in unique}  # laid out by the processor (SmolVLM's tiles kept)
        if several and lays_out_several(self.mllm):
            missing = [i for i in unique if i not in self.several]
            self.several.update(zip(missing, image_features(self.mllm, [self.paths[i] for i in missing], several=True)))
            return {i: self.several[i] for i in unique}
        return {i: self.feats[i] for i in unique}

    def call(self, inputs: dict[str, torch.Tensor], **kwargs):
        """The trained model's forward on :func:`genret.mllm.scoring._inputs`: cached features through the
        embeddings (frozen, so detached), or the pixels through the vision side that trains."""
        image_inputs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "inputs_embeds")}
        extra = self.mllm.family.forward_kwargs(self.mllm.model, inputs["input_ids"], image_inputs or None,
                                                inputs["attention_mask"])
        if "inputs_embeds" in inputs:
            args = {"inputs_embeds": inputs["inputs_embeds"].detach(), "attention_mask": inputs["attention_mask"]}
        else:
            args = dict(inputs)
        return self.model(**{**args, **extra, **kwargs})

    def text_logprobs(self, prompts: list[str], texts: list[str], images: list[list[torch.Tensor]]) -> torch.Tensor:
        """Mean log-probability of each row's ``text`` (and end-of-turn token) after its ``prompt``, with gradients.

        The same sequences and tokens as :func:`genret.mllm.scoring.generative_scores`.
        """
        fmt = answer_format(self.mllm)
        with torch.no_grad():
            starts = scoring._inputs(self.mllm, prompts, images)["attention_mask"].sum(dim=1)
            inputs = scoring._inputs(self.mllm, [p + fmt.text(t) for p, t in zip(prompts, texts)], images)
        logits = self.call(inputs, use_cache=False).logits[:, :-1]
        ends = inputs["attention_mask"].sum(dim=1)
        return scoring._mean_token_logprob(logits, inputs["input_ids"][:, 1:], starts - 1, ends - 1)

    def forward(self, prompts: list[str], images: list[list[torch.Tensor]]) -> torch.Tensor:
        """Logits at the rows' last prompt positions, ``(rows, 1, vocab)``."""
        with torch.no_grad():  # embeddings and image features are frozen: no graph before the LoRA layers
            inputs = scoring._inputs(self.mllm, prompts, images)
        last = inputs["attention_mask"].sum(dim=1) - 1
        keep, where = torch.unique(last.unsqueeze(1), return_inverse=True)
        logits = self.call(inputs, use_cache=False, logits_to_keep=keep).logits
        rows = torch.arange(len(prompts), device=logits.device).unsqueeze(1)
        return logits[rows, where].float()


def pointwise_scores(batch: _Batch, examples: Sequence[Example], yes: str, no: str) -> torch.Tensor:
    """``log P(yes) − log P(no)`` of every (query, candidate) prompt: ``(queries, candidates)``, with gradients.

    The same prompts, answer position and answer tokens as :func:`genret.mllm.scoring.pointwise_scores`.
    """
    section = {d: batch.prompt.section(d)["user"] for d in {e.direction for e in examples}}
    feats = batch.features([c if e.direction == "t2i" else e.query for e in examples
                            for c in (e.candidates if e.direction == "t2i" else e.candidates[:1])])
    prompts, images = [], []
    for e in examples:
        if e.direction == "t2i":
            text = scoring.render(batch.mllm, scoring.user_message(section["t2i"], text=batch.texts[e.query]))
            prompts += [text] * len(e.candidates)
            images += [[feats[c]] for c in e.candidates]
        else:
            prompts += [scoring.render(batch.mllm, scoring.user_message(section["i2t"], text=batch.texts[c]))
                        for c in e.candidates]
            images += [[feats[e.query]]] * len(e.candidates)
    logits = batch.forward(prompts, images)
    yes_ids, no_ids = scoring.yes_no_ids(batch.mllm, prompts[0], yes, no)
    return scoring.yes_no_score(logits[:, 0], yes_ids, no_ids).view(len(examples), -1)


def pointwise_loss(scores: torch.Tensor, target: torch.Tensor, group_weight: float) -> torch.Tensor:
    """Balanced BCE on each score (positive vs the negatives' mean) + ``group_weight`` × softmax CE per group."""
    is_pos = F.one_hot(target, scores.shape[1]).bool()
    bce = F.binary_cross_entropy_with_logits(scores, is_pos.float(), reduction="none")
    balanced = 0.5 * (bce[is_pos] + bce.masked_fill(is_pos, 0).sum(1) / (scores.shape[1] - 1))
    return balanced.mean() + group_weight * F.cross_entropy(scores, target)


def generative_scores(batch: _Batch, examples: Sequence[Example]) -> torch.Tensor:
    """Mean log P(text | image) of every (query, candidate) pair: ``(queries, candidates)``, with gradients.

    The stage's generative score (:func:`genret.mllm.scoring.generative_scores`): a caption query is
    scored against each candidate image, an image query against each candidate caption.
    """
    feats = batch.features([c if e.direction == "t2i" else e.query for e in examples
                            for c in (e.candidates if e.direction == "t2i" else e.candidates[:1])])
    prompt = {d: scoring.render(batch.mllm, scoring.user_message(batch.prompt.section(d)["user"]))
              for d in {e.direction for e in examples}}
    prompts, texts, images = [], [], []
    for e in examples:
        prompts += [prompt[e.direction]] * len(e.candidates)
        if e.direction == "t2i":
            texts += [batch.texts[e.query]] * len(e.candidates)
            images += [[feats[c]] for c in e.candidates]
        else:
            texts += [batch.texts[c] for c in e.candidates]
            images += [[feats[e.query]]] * len(e.candidates)
    return batch.text_logprobs(prompts, texts, images).view(len(examples), -1)


def generative_loss(scores: torch.Tensor, target: torch.Tensor, temperature: float, lm_weight: float) -> torch.Tensor:
    """Softmax CE over the group's ``scores / temperature`` − ``lm_weight`` × the positive's mean log-likelihood."""
    positive = scores.gather(1, target.unsqueeze(1)).squeeze(1)
    return F.cross_entropy(scores / temperature, target) - lm_weight * positive.mean()


def listwise_logprobs(batch: _Batch, examples: Sequence[Example]) -> torch.Tensor:
    """Log-probability of every candidate's number as the answer to its query's numbered prompt, with gradients.

    ``(queries, candidates)``: exactly :func:`genret.mllm.scoring.listwise_scores` — each number written as
    the model writes an answer and scored on all its tokens (sentencepiece writes every number as ``▁`` and
    digits, Qwen's ``12`` is ``1`` ``2``): the prompt runs once, its KV cache is repeated for the k answers.
    """
    feats = batch.features([e.query for e in examples if e.direction == "i2t"])
    several = batch.features([c for e in examples if e.direction == "t2i" for c in e.candidates], several=True)
    rows = []
    for e in examples:
        section = batch.prompt.section(e.direction)
        if e.direction == "t2i":
            query, cands, key = {"text": batch.texts[e.query]}, [several[c] for c in e.candidates], "image"
        else:
            query, cands, key = {"image": feats[e.query]}, [batch.texts[c] for c in e.candidates], "text"
        messages, images = scoring.listwise_prompt(section["user"], section["item"], query, cands, key)
        rows.append(_answer_logprobs(batch, scoring.render(batch.mllm, messages), images, len(cands)))
    return torch.stack(rows)


def _answer_logprobs(batch: _Batch, prompt: str, images: list, k: int) -> torch.Tensor:
    """log P(answer ``n`` | prompt) for ``n`` = 1..k, with gradients (one prompt forward, one over the answers; under
    gradient checkpointing, which keeps no KV cache, one forward of k rows: :func:`genret.mllm.scoring.number_logprobs`)."""
    return scoring.number_logprobs(batch.mllm, batch.call, batch.model, prompt, images, k)


def permuted(examples: Sequence[Example], n: int, seed: int) -> list[Example]:
    """Each example and ``n - 1`` reorderings of its candidates, the positive at another number in each (spread
    over the list) and the negatives shuffled: a pure function of the example and ``seed``."""
    out = []
    for e in examples:
        out.append(e)
        k = len(e.candidates)
        rng = random.Random(f"{seed}:{e.direction}:{e.query}:{e.candidates}")
        negatives = [c for j, c in enumerate(e.candidates) if j != e.target]
        for p in range(1, n):
            rng.shuffle(negatives)
            at = (e.target + p * max(1, k // n)) % k
            out.append(Example(e.direction, e.query, tuple(negatives[:at] + [e.candidates[e.target]] + negatives[at:]),
                               at))
    return out


def listwise_loss(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over the candidates' answer log-probabilities (the whole number, every token)."""
    return F.cross_entropy(scores, target)


class _Evaluator:
    """R@1 of reranking the prefilter's top-k, on a fixed sample of val queries in both directions."""

    def __init__(self, mllm: "MLLM", encoder: "DualEncoder", val: Dataset, config: RerankTrainConfig, progress: bool):
        self.texts, self.owners = caption_table(val)
        self.paths = [str(r.path) for r in val.records]
        rng = random.Random(config.seed)
        self.t2i = rng.sample(range(len(self.texts)), min(config.eval_queries, len(self.texts)))
        self.i2t = rng.sample(range(len(val)), min(config.eval_queries, len(val)))
        img = embed_as(encoder, "image", self.paths, ("document", "query"), progress=progress)
        txt = embed_as(encoder, "text", self.texts, ("query", "document"))
        k = config.eval_k
        self.t2i_cands = top_k(img["document"], txt["query"][self.t2i], min(k, len(self.paths)))
        self.i2t_cands = top_k(txt["document"], img["query"][self.i2t], min(k, len(self.texts)))
        self.need = sorted({i for row in self.t2i_cands for i in row} | set(self.i2t))
        self.vision, self.progress = config.vision, progress
        self.cache = config.cache_features  # off: PIL images, laid out by the processor as in training
        self.feats = self._features(mllm)
        self.several: dict[int, torch.Tensor] = {}  # listwise candidates' features of that layout, as needed
        self.k = k

    def _features(self, mllm: "MLLM") -> dict:
        if not self.cache:
            return {i: load_image(self.paths[i]) for i in self.need}
        return dict(zip(self.need, image_features(mllm, [self.paths[i] for i in self.need], self.progress,
                                                  "val image features")))

    def __call__(self, mllm: "MLLM", prompt: "Prompt", mode: str) -> dict:
        if self.vision != "none":  # the adapter changes the image features: compute them with it as it is now
            self.feats, self.several = self._features(mllm), {}
        out = {}
        for direction, queries, cands in (("t2i", self.t2i, self.t2i_cands), ("i2t", self.i2t, self.i2t_cands)):
            section = prompt.section(direction)
            pre = rerank = reach = 0
            for q, row in zip(queries, cands):
                hit = (lambda c: c == self.owners[q]) if direction == "t2i" else (lambda c: self.owners[c] == q)
                scores = self._scores(mllm, prompt, section, mode, direction, q, row)
                pre += hit(row[0])
                rerank += hit(row[int(np.argmax(scores))])
                reach += any(hit(c) for c in row)
            n = max(1, len(queries))
            out[direction] = {"prefilter_R@1": round(100 * pre / n, 2), "rerank_R@1": round(100 * rerank / n, 2),
                              f"prefilter_R@{self.k}": round(100 * reach / n, 2), "queries": len(queries)}
        return out

    def _scores(self, mllm, prompt, section, mode, direction, q, row) -> list[float]:
        if mode == "pointwise":
            yes, no = prompt.settings.get("yes", "yes"), prompt.settings.get("no", "no")
            if direction == "t2i":
                return scoring.pointwise_scores(mllm, section["user"], [self.texts[q]] * len(row),
                                                [self.feats[c] for c in row], yes, no)
            return scoring.pointwise_scores(mllm, section["user"], [self.texts[c] for c in row],
                                            [self.feats[q]] * len(row), yes, no)
        if mode == "generative":
            if direction == "t2i":
                return scoring.generative_scores(mllm, section["user"], [self.texts[q]] * len(row),
                                                 [self.feats[c] for c in row])
            return scoring.generative_scores(mllm, section["user"], [self.texts[c] for c in row],
                                             [self.feats[q]] * len(row))
        if direction == "t2i":
            feats = self.feats
            if len(row) > 1 and self.cache and lays_out_several(mllm):  # LLaVA-OneVision: candidates laid out as several images
                missing = [c for c in row if c not in self.several]
                self.several.update(zip(missing, image_features(mllm, [self.paths[c] for c in missing], several=True)))
                feats = self.several
            return scoring.listwise_scores(mllm, section["user"], section["item"], {"text": self.texts[q]},
                                           [feats[c] for c in row], "image")
        return scoring.listwise_scores(mllm, section["user"], section["item"], {"image": self.feats[q]},
                                       [self.texts[c] for c in row], "text")


def train_rerank(base: str | os.PathLike, train: Dataset, out_dir: str | os.PathLike,
                 config: RerankTrainConfig | None = None, *, prefilter: "str | os.PathLike | DualEncoder",
                 val: Dataset | None = None, resume: bool = False, progress: bool = True,
                 on_step: Callable[[dict], None] | None = None, held_out: Dataset | None = None) -> dict:
    """Fine-tune a LoRA reranker on ``base`` with prefilter-mined hard negatives; saves it to ``out_dir``.

    Args:
        base: the MLLM (Hugging Face id or local directory) the adapter is trained on.
        train: training records (``dataset.split("train")``).
        out_dir: the adapter folder to write (checkpoints live under ``out_dir/checkpoints`` meanwhile).
        config: see :class:`RerankTrainConfig`.
        prefilter: the dual encoder that mines negatives: a checkpoint directory or id (loaded with the
            ``hf`` backend), or a loaded :class:`~genret.encoders.base.DualEncoder`.
        val: held-out records; reranked R@1 on a sample of them is logged every ``eval_every`` steps.
        resume: continue from the last checkpoint in ``out_dir``.
        progress: show progress bars (loss and speed).
        on_step: called after every optimizer step with ``{"step", "total", "loss"}``.
        held_out: the records whose scenes ``twin_negatives`` must never draw (the val and test splits); required
            with ``twin_negatives``.

    Returns:
        The adapter manifest, also saved as ``out_dir/genret.json`` (config, history, metrics, speed).

    Raises:
        ValueError: resuming without a checkpoint or with other settings; starting over a folder that
            holds an unfinished run's checkpoints; data too small for the batch.
    """
    from genret.encoders import load_encoder
    from genret.mllm.adapters import ADAPTER_FORMATS, FORMAT, VERSION, write_adapter
    from genret.prompts import load_prompt
    from genret.stages.rerank import MODES as PROMPT_NEEDS

    config = config or RerankTrainConfig()
    if config.twin_negatives:
        from genret.data.annotations import annotation_of

        if held_out is None:
            raise ValueError("twin_negatives draws scenes anew: give held_out (the val and test splits), so that none "
                             "of theirs is drawn for training")
        if not any(annotation_of(r.meta) for r in train.records):
            raise ValueError(f"{train.source}: twin_negatives draws each image's twin from its annotation (the "
                             "miniature world's scenes); these records carry none: set twin_negatives to 0")
    engine = Engine(f"rerank-{config.mode}", config, out_dir, resume=resume, progress=progress, base=base)
    show = engine.show
    prompt = load_prompt(config.prompt or f"rerank_{config.mode}", required=PROMPT_NEEDS[config.mode], exact=True)
    mllm = load_base(base, config, engine.device)
    if config.cache_features and config.vision == "none":  # as the rerank stage: features a cache can hold
        note = mllm.family.prepare_feature_cache(mllm.processor)
        if note:
            logger.warning("train rerank (%s), for the training images' cached features: %s; --no-cache-features "
                           "(cache_features = false) trains on the checkpoint's own layout instead", base, note)
    yes, no = prompt.settings.get("yes", "yes"), prompt.settings.get("no", "no")
    if config.mode == "pointwise":  # the answer tokens are read in context; words that clash are refused here
        section = prompt.section("t2i" if config.directions != "i2t" else "i2t")["user"]
        scoring.yes_no_ids(mllm, scoring.render(mllm, scoring.user_message(section, text="a")), yes, no)

    encoder = load_encoder("hf", str(prefilter)) if isinstance(prefilter, (str, os.PathLike)) else prefilter
    groups, mining = mine_negatives(encoder, train, config.mine_k, DIRECTIONS[config.directions], progress=show,
                                    duplicate_threshold=config.false_negatives or None)
    short = [g for g in groups if len(g.negatives) < config.negatives]
    if short:
        filtered = (f" left after false-negative filtering at cosine {config.false_negatives}" if config.false_negatives
                    else "")
        raise ValueError(f"{train.source}: {len(short)} queries have fewer than {config.negatives} non-matching "
                         f"candidates{filtered} (the training split has {len(train)} images); lower negatives"
                         + (" or raise false_negatives" if config.false_negatives else ""))
    per_step = engine.rows_per_step
    if len(groups) < per_step:
        raise ValueError(f"{train.source}: {len(groups)} training queries, fewer than one step's {per_step} "
                         "(batch_size x gradient_accumulation_steps x processes); lower batch_size")
    texts, _ = caption_table(train)
    n_captions = len(texts)  # before any twin's caption joins them
    paths: list = [str(r.path) for r in train.records]
    twins = None
    if config.twin_negatives:
        from genret.data.annotations import signatures

        twins = draw_twins(train, config, signatures(held_out.records), texts, paths)
    feats = None
    if config.cache_features and config.vision == "none":
        feats = dict(enumerate(image_features(mllm, paths, show, "train image features")))
        logger.info("cached the MLLM features of %d training images: %.0f MB (cache_features=False computes "
                    "them per step instead)", len(paths), sum(f.numel() * f.element_size() for f in feats.values()) / 1e6)
    evaluator = _Evaluator(mllm, encoder, val, config, show) if val is not None and engine.main else None

    torch.manual_seed(config.seed)  # the LoRA initialisation: the same run twice gives the same adapter
    model = add_lora(mllm, config, gradient_checkpointing=config.gradient_checkpointing, vision=config.vision)
    batch = _Batch(mllm, engine.prepare(model), prompt, texts, paths, feats, config.vision)

    steps_per_epoch = len(groups) // per_step
    total = config.max_steps or config.epochs * steps_per_epoch
    epoch: dict = {}

    def draw(step: int) -> list[list[Example]]:  # a pure function of (seed, step): a resumed run draws the same
        if epoch.get("n") != step // steps_per_epoch:
            epoch.update(n=step // steps_per_epoch,
                         examples=epoch_examples(groups, config, step // steps_per_epoch, twins))
        rows = epoch["examples"][(step % steps_per_epoch) * per_step:][:per_step]
        return [rows[c * config.batch_size:(c + 1) * config.batch_size] for c in range(engine.chunks)]

    def loss(chunk: list[Example]) -> torch.Tensor:
        if config.permutations > 1:
            chunk = permuted(chunk, config.permutations, config.seed)
        target = torch.tensor([e.target for e in chunk], device=engine.device)
        if config.mode == "pointwise":
            return pointwise_loss(pointwise_scores(batch, chunk, yes, no), target, config.group_weight)
        if config.mode == "generative":
            return generative_loss(generative_scores(batch, chunk), target, config.temperature, config.lm_weight)
        return listwise_loss(listwise_logprobs(batch, chunk), target)

    run = engine.fit(total, draw, loss, evaluate=(lambda: evaluator(mllm, prompt, config.mode)) if evaluator else None,
                     eval_at_start=bool(config.eval_every), on_step=on_step, progress_keys=("t2i/rerank_R@1", "i2t/rerank_R@1"),
                     identity={"config": asdict(config), "base_revision": mllm.revision, "queries": len(groups),
                               "prompt": prompt.key})
    cands = config.negatives + 1
    manifest = {
        "format": FORMAT, "version": VERSION, "genret": __version__, "task": "rerank", "mode": config.mode,
        "base_model": str(base), "base_revision": mllm.revision, "family": mllm.family.name, "vision": config.vision,
        "prompt": {"name": prompt.name, "version": prompt.version}, **run.summary(config),
        "data": {"source": str(train.source), "images": len(train), "captions": n_captions,
                 "queries": len(groups),
                 **({"twins_drawn": len({i for _, i in twins})} if twins else {}),
                 "mining": mining, "prefilter": getattr(encoder, "model_id", str(prefilter))},
        "train_seconds": engine.seconds,
    }
    manifest["speed"].update(queries_per_s=run.rate(per_step), candidates_per_s=run.rate(per_step * cands))
    engine.save(lambda folder: write_adapter(folder, engine.unwrapped, manifest), ADAPTER_FORMATS)
    return manifest
