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

LoRA goes on the language model only; the vision tower and projector stay frozen, so every
training image's projected features are computed once and fed through the cached-features path.
Runs under ``accelerate`` (``accelerate launch`` for several GPUs: ``batch_size`` is per process),
is resumable from its last checkpoint, and saves the adapter with its manifest atomically.

Example::

    summary = train_rerank("adapters/mini-world/mllm", data.split("train"), "runs/rerank",
                           RerankTrainConfig(mode="listwise"), prefilter="adapters/mini-world/clip",
                           val=data.split("val"))

On several GPUs (``batch_size`` query groups per GPU; checked here with ``torchrun`` on CPU processes)::

    accelerate launch --multi_gpu --num_processes 4 $(which genret) train rerank --base ... --load-in-4bit
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from genret import __version__
from genret.data.dataset import Dataset
from genret.data.images import load_image
from genret.mllm import scoring
from genret.mllm.answers import answer_format
from genret.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from genret.training.distributed import train_step
from genret.config import check_bounds
from genret.training.negatives import QueryGroup, caption_table, mine_negatives, top_k

if TYPE_CHECKING:
    from genret.encoders.base import DualEncoder
    from genret.mllm.backend import MLLM
    from genret.prompts import Prompt

logger = logging.getLogger(__name__)

MODES = ("pointwise", "listwise", "generative")
DIRECTIONS = {"both": ("t2i", "i2t"), "t2i": ("t2i",), "i2t": ("i2t",)}


@dataclass
class RerankTrainConfig:
    """What and how to train: the rerank mode, LoRA, negatives, optimisation, evaluation, checkpoints."""

    mode: str = field(default="pointwise", metadata={"help": "pointwise (yes/no per candidate), listwise (numbered "
                                                     "candidates) or generative (log P(text | image))"})
    prompt: str = field(default="", metadata={"help": "prompt name or file (default: rerank_<mode>, the stage's)"})
    directions: str = field(default="both", metadata={"help": "training queries: t2i (captions), i2t (images) or both"})
    negatives: int = field(default=7, metadata={"help": "negatives per query, sampled from the prefilter's top mine_k"})
    mine_k: int = field(default=20, metadata={"help": "prefilter candidates per query that negatives are drawn from"})
    group_weight: float = field(default=1.0, metadata={"help": "pointwise: weight of the softmax loss over a query's group"})
    temperature: float = field(default=0.1, metadata={"help": "generative: softmax temperature over a group's mean "
                                                          "log-likelihoods"})
    lm_weight: float = field(default=1.0, metadata={"help": "generative: weight of the positive's caption "
                                                        "log-likelihood in the loss"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input (costs ~10% of a step on the CPU)"})
    lora_targets: str = field(default="", metadata={"help": "comma-separated language-model modules to adapt, e.g. "
                                                     "q_proj,v_proj (default: the family's)"})
    epochs: int = field(default=1, metadata={"help": "passes over the training queries (unless max_steps is set)"})
    max_steps: int = field(default=0, metadata={"help": "optimizer steps; 0: epochs x queries / batch"})
    batch_size: int = field(default=8, metadata={"help": "query groups per step and process"})
    lr: float = field(default=5e-4, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup: float = field(default=0.05, metadata={"help": "fraction of steps of linear warm-up (then cosine decay)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: off)"})
    eval_every: int = field(default=200, metadata={"help": "steps between evaluations on the val split (0: only at the end)"})
    eval_queries: int = field(default=100, metadata={"help": "val queries per direction in each evaluation"})
    eval_k: int = field(default=10, metadata={"help": "prefilter candidates reranked per val query"})
    save_every: int = field(default=200, metadata={"help": "steps between resumable checkpoints (0: none)"})
    log_every: int = field(default=20, metadata={"help": "steps per loss entry in the history"})
    seed: int = field(default=0, metadata={"help": "random seed (data order, negatives, dropout)"})
    dtype: str = field(default="float32", metadata={"help": "base weights dtype: float32, bfloat16, float16"})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: 4-bit NF4 base through bitsandbytes (CUDA)"})
    processor_options: dict = field(default_factory=dict, metadata={"help": "image processor settings of the base, "
                                    "as for a stage (Qwen2-VL max_pixels...), a JSON table on the command line"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward (less memory)"})
    cache_features: bool = field(default=True, metadata={"help": "compute every training image's MLLM features once"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.directions not in DIRECTIONS:
            raise ValueError(f"directions must be one of {', '.join(DIRECTIONS)}, got {self.directions!r}")
        check_bounds(self, at_least_one=("negatives", "mine_k", "lora_r", "epochs", "batch_size", "eval_queries",
                     "eval_k", "log_every"), non_negative=("max_steps", "threads", "eval_every", "save_every",
                     "group_weight", "weight_decay", "max_grad_norm", "lm_weight"))
        if self.mine_k < self.negatives:
            raise ValueError(f"mine_k ({self.mine_k}) must be at least negatives ({self.negatives})")
        if not 0 <= self.lora_dropout < 1 or not 0 <= self.warmup < 1:
            raise ValueError("lora_dropout and warmup must be in [0, 1)")
        if self.lr <= 0 or self.temperature <= 0:
            raise ValueError(f"lr and temperature must be positive, got {self.lr} and {self.temperature}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        self.lora_targets = ",".join(t.strip() for t in self.lora_targets.split(",") if t.strip())


class Example(NamedTuple):
    """One step's unit: a query and its candidates (the positive at ``target``)."""

    direction: str
    query: int
    candidates: tuple[int, ...]
    target: int


def epoch_examples(groups: Sequence[QueryGroup], config: RerankTrainConfig, epoch: int) -> list[Example]:
    """The examples of one epoch, a pure function of (seed, epoch): resuming redraws the same ones."""
    rng = random.Random(config.seed * 1_000_003 + epoch)
    order = list(range(len(groups)))
    rng.shuffle(order)
    out = []
    for g in order:
        group = groups[g]
        positive = rng.choice(group.positives)
        negs = rng.sample(group.negatives, config.negatives)
        at = rng.randrange(config.negatives + 1)
        out.append(Example(group.direction, group.query, tuple(negs[:at] + [positive] + negs[at:]), at))
    return out


class _Batch:
    """What the loss functions need: the model, the prompt, the data and their features."""

    def __init__(self, mllm: "MLLM", model, prompt: "Prompt", texts: list[str], paths: list[str],
                 feats: dict[int, torch.Tensor] | None) -> None:
        self.mllm, self.model, self.prompt = mllm, model, prompt
        self.texts, self.paths, self.feats = texts, paths, feats

    def features(self, indices: Sequence[int]) -> dict[int, torch.Tensor]:
        if self.feats is not None:
            return {i: self.feats[i] for i in indices}
        unique = sorted(set(indices))
        return dict(zip(unique, _features(self.mllm, [self.paths[i] for i in unique])))

    def text_logprobs(self, prompts: list[str], texts: list[str], images: list[list[torch.Tensor]]) -> torch.Tensor:
        """Mean log-probability of each row's ``text`` (and end-of-turn token) after its ``prompt``, with gradients.

        The same sequences and tokens as :func:`genret.mllm.scoring.generative_scores`.
        """
        fmt = answer_format(self.mllm)
        with torch.no_grad():
            starts = scoring._inputs(self.mllm, prompts, images)["attention_mask"].sum(dim=1)
            inputs = scoring._inputs(self.mllm, [p + fmt.text(t) for p, t in zip(prompts, texts)], images)
        image_inputs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "inputs_embeds")}
        extra = self.mllm.family.forward_kwargs(self.mllm.model, inputs["input_ids"], image_inputs or None,
                                                inputs["attention_mask"])
        logits = self.model(inputs_embeds=inputs["inputs_embeds"].detach(), attention_mask=inputs["attention_mask"],
                            use_cache=False, **extra).logits[:, :-1]
        ends = inputs["attention_mask"].sum(dim=1)
        return scoring._mean_token_logprob(logits, inputs["input_ids"][:, 1:], starts - 1, ends - 1)

    def forward(self, prompts: list[str], images: list[list[torch.Tensor]]) -> torch.Tensor:
        """Logits at the rows' last prompt positions, ``(rows, 1, vocab)``."""
        with torch.no_grad():  # embeddings and image features are frozen: no graph before the LoRA layers
            inputs = scoring._inputs(self.mllm, prompts, images)
        last = inputs["attention_mask"].sum(dim=1) - 1
        keep, where = torch.unique(last.unsqueeze(1), return_inverse=True)
        image_inputs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "inputs_embeds")}
        extra = self.mllm.family.forward_kwargs(self.mllm.model, inputs["input_ids"], image_inputs or None,
                                                inputs["attention_mask"])
        logits = self.model(inputs_embeds=inputs["inputs_embeds"].detach(), attention_mask=inputs["attention_mask"],
                            use_cache=False, logits_to_keep=keep, **extra).logits
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
    feats = batch.features([i for e in examples for i in (e.candidates if e.direction == "t2i" else (e.query,))])
    rows = []
    for e in examples:
        section = batch.prompt.section(e.direction)
        if e.direction == "t2i":
            query, cands, key = {"text": batch.texts[e.query]}, [feats[c] for c in e.candidates], "image"
        else:
            query, cands, key = {"image": feats[e.query]}, [batch.texts[c] for c in e.candidates], "text"
        messages, images = scoring.listwise_prompt(section["user"], section["item"], query, cands, key)
        rows.append(_answer_logprobs(batch, scoring.render(batch.mllm, messages), images, len(cands)))
    return torch.stack(rows)


def _answer_logprobs(batch: _Batch, prompt: str, images: list, k: int) -> torch.Tensor:
    """log P(answer ``n`` | prompt) for ``n`` = 1..k, with gradients (one prompt forward, one over the answers)."""
    mllm = batch.mllm
    answers = scoring.number_answers(mllm, prompt, k)
    with torch.no_grad():
        inputs = scoring._inputs(mllm, [prompt], [images])
    image_inputs = {n: v for n, v in inputs.items() if n not in ("input_ids", "attention_mask", "inputs_embeds")}
    extra = mllm.family.forward_kwargs(mllm.model, inputs["input_ids"], image_inputs or None, inputs["attention_mask"])
    out = batch.model(inputs_embeds=inputs["inputs_embeds"].detach(), attention_mask=inputs["attention_mask"],
                      use_cache=True, logits_to_keep=1, **extra)
    return scoring.answer_logprobs(mllm, batch.model, inputs, out, answers)


def listwise_loss(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over the candidates' answer log-probabilities (the whole number, every token)."""
    return F.cross_entropy(scores, target)


def _features(mllm: "MLLM", paths: Sequence[str], progress: bool = False, desc: str = "") -> list[torch.Tensor]:
    """Projected image features as ordinary (non-inference) CPU tensors in the model's dtype."""
    out: list[torch.Tensor] = []
    for s in tqdm(range(0, len(paths), 64), desc=desc, unit="batch", disable=not progress):
        chunk = scoring.image_features(mllm, [load_image(p) for p in paths[s:s + 64]])
        out += [f.clone() for f in chunk]
    return out


def _load_base(base: str, config: RerankTrainConfig, device: torch.device) -> "MLLM":
    from genret.mllm.backend import MLLM, MLLMConfig, bitsandbytes_available

    if config.load_in_4bit:
        if not bitsandbytes_available():
            raise ImportError("load_in_4bit (QLoRA) needs bitsandbytes: pip install 'genret[quant]' "
                               "(a CUDA GPU for speed), or train plain LoRA without --load-in-4bit")
        if device.type != "cuda":
            logger.warning("QLoRA on %s: bitsandbytes runs 4-bit layers here, but slowly; it is meant for CUDA", device)
    # This process's device (accelerate gives each process one): never "auto", which would shard the model
    # across every GPU under a data-parallel run.
    return MLLM.load(MLLMConfig(model=str(base), dtype=config.dtype, load_in_4bit=config.load_in_4bit,
                                device_map=str(device), processor_options=dict(config.processor_options)))


def _add_lora(mllm: "MLLM", config: RerankTrainConfig):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from genret.mllm.adapters import language_model_targets

    model = mllm.model
    checkpointing = {"use_reentrant": False}  # no input needs to require grad; the recommended variant
    if config.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=checkpointing)
    elif config.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2 name
        if enable is not None:
            enable(activation_checkpointing_kwargs=checkpointing)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    targets = tuple(config.lora_targets.split(",")) if config.lora_targets else mllm.family.lora_targets
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, bias="none",
                      target_modules=language_model_targets(model, targets))
    mllm.model = get_peft_model(model, lora)
    return mllm.model


class _Evaluator:
    """R@1 of reranking the prefilter's top-k, on a fixed sample of val queries in both directions."""

    def __init__(self, mllm: "MLLM", encoder: "DualEncoder", val: Dataset, config: RerankTrainConfig, progress: bool):
        self.texts, self.owners = caption_table(val)
        self.paths = [str(r.path) for r in val.records]
        rng = random.Random(config.seed)
        self.t2i = rng.sample(range(len(self.texts)), min(config.eval_queries, len(self.texts)))
        self.i2t = rng.sample(range(len(val)), min(config.eval_queries, len(val)))
        img = encoder.encode_images(self.paths, progress=progress)
        txt = encoder.encode_texts(self.texts)
        k = config.eval_k
        self.t2i_cands = top_k(img, txt[self.t2i], min(k, len(img)))
        self.i2t_cands = top_k(txt, img[self.i2t], min(k, len(txt)))
        need = sorted({i for row in self.t2i_cands for i in row} | set(self.i2t))
        self.feats = dict(zip(need, _features(mllm, [self.paths[i] for i in need], progress, "val image features")))
        self.k = k

    def __call__(self, mllm: "MLLM", prompt: "Prompt", mode: str) -> dict:
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
            return scoring.listwise_scores(mllm, section["user"], section["item"], {"text": self.texts[q]},
                                           [self.feats[c] for c in row], "image")
        return scoring.listwise_scores(mllm, section["user"], section["item"], {"image": self.feats[q]},
                                       [self.texts[c] for c in row], "text")


def _lr_factor(step: int, total: int, warmup: float) -> float:
    warm = max(1, int(warmup * total))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def _check_resume(state: dict, expected: dict, folder: Path) -> None:
    """Refuse to continue a checkpoint under other settings, naming the first that differs."""
    expected = json.loads(json.dumps(expected))  # as the checkpoint stores it (tuples become lists)
    for key, want in expected.items():
        have = state.get(key)
        if isinstance(want, dict) and isinstance(have, dict):  # the config: name the setting itself
            pairs = [(name, have.get(name), value) for name, value in want.items()]
        else:
            pairs = [(key, have, want)]
        for name, had, value in pairs:
            if had != value:
                raise ValueError(f"{folder}: the checkpoint was made with {name} = {had!r}, this run has {value!r}; "
                                 "resume with the same settings, or start a fresh run in another folder")


def train_rerank(base: str | os.PathLike, train: Dataset, out_dir: str | os.PathLike,
                 config: RerankTrainConfig | None = None, *, prefilter: "str | os.PathLike | DualEncoder",
                 val: Dataset | None = None, resume: bool = False, progress: bool = True,
                 on_step: Callable[[dict], None] | None = None) -> dict:
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

    Returns:
        The adapter manifest, also saved as ``out_dir/genret.json`` (config, history, metrics, speed).

    Raises:
        ValueError: resuming without a checkpoint or with other settings; starting over a folder that
            holds an unfinished run's checkpoints; data too small for the batch.
    """
    from accelerate import Accelerator

    from genret.encoders import load_encoder
    from genret.mllm.adapters import FORMAT, VERSION, save_adapter
    from genret.prompts import load_prompt
    from genret.stages.rerank import MODES as PROMPT_NEEDS

    config = config or RerankTrainConfig()
    out_dir = Path(out_dir)
    last = latest_checkpoint(out_dir)
    if resume and last is None:
        done = (out_dir / "genret.json").is_file()
        raise ValueError(f"{out_dir}: nothing to resume: " + ("the run there has finished (its adapter is saved)" if done
                         else "no checkpoint found; start the run without --resume"))
    if not resume and last is not None:
        raise ValueError(f"{out_dir} holds checkpoints of an unfinished run ({last.name}); pass --resume to continue "
                         "it, or remove the folder to start over")
    start = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    show = progress and main
    prompt = load_prompt(config.prompt or f"rerank_{config.mode}", required=PROMPT_NEEDS[config.mode], exact=True)
    mllm = _load_base(base, config, accelerator.device)
    yes, no = prompt.settings.get("yes", "yes"), prompt.settings.get("no", "no")
    if config.mode == "pointwise":  # the answer tokens are read in context; words that clash are refused here
        section = prompt.section("t2i" if config.directions != "i2t" else "i2t")["user"]
        scoring.yes_no_ids(mllm, scoring.render(mllm, scoring.user_message(section, text="a")), yes, no)

    encoder = load_encoder("hf", str(prefilter)) if isinstance(prefilter, (str, os.PathLike)) else prefilter
    groups, mining = mine_negatives(encoder, train, config.mine_k, DIRECTIONS[config.directions], progress=show)
    short = [g for g in groups if len(g.negatives) < config.negatives]
    if short:
        raise ValueError(f"{train.source}: {len(short)} queries have fewer than {config.negatives} non-matching "
                         f"candidates (the training split has {len(train)} images); lower negatives")
    texts, _ = caption_table(train)
    paths = [str(r.path) for r in train.records]
    feats = None
    if config.cache_features:
        feats = dict(enumerate(_features(mllm, paths, show, "train image features")))
        logger.info("cached the MLLM features of %d training images: %.0f MB (cache_features=False computes "
                    "them per step instead)", len(paths), sum(f.numel() * f.element_size() for f in feats.values()) / 1e6)
    evaluator = _Evaluator(mllm, encoder, val, config, show) if val is not None and main else None

    torch.manual_seed(config.seed)  # the LoRA initialisation: the same run twice gives the same adapter
    model = _add_lora(mllm, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    batch = _Batch(mllm, wrapped, prompt, texts, paths, feats)

    per_step = config.batch_size * accelerator.num_processes
    if len(groups) < per_step:
        raise ValueError(f"{train.source}: {len(groups)} training queries, fewer than one step's "
                         f"{per_step} (batch_size x processes); lower batch_size")
    steps_per_epoch = len(groups) // per_step
    total = config.max_steps or config.epochs * steps_per_epoch
    identity = {"config": asdict(config), "base_revision": mllm.revision, "queries": len(groups),
                "prompt": prompt.key, "processes": accelerator.num_processes}
    step, history, window = 0, [], []
    if resume:
        state = load_checkpoint(last, accelerator.unwrap_model(wrapped), optimizer)
        _check_resume(state, identity, last)
        step, history, window = state["step"], state["history"], state["window"]

    if evaluator is not None and not resume and config.eval_every:
        history.append({"step": 0, "eval": _eval(evaluator, mllm, wrapped, prompt, config.mode)})
        logger.info("before training: %s", history[-1]["eval"])
    bar = tqdm(total=total, initial=step, desc=f"train rerank ({config.mode})", unit="step", disable=not show)
    epoch, examples = -1, []
    first_step, t0, eval_seconds = step, time.perf_counter(), 0.0
    while step < total:
        if step // steps_per_epoch != epoch:
            epoch = step // steps_per_epoch
            examples = epoch_examples(groups, config, epoch)
        offset = (step % steps_per_epoch) * per_step + accelerator.process_index * config.batch_size
        chunk = examples[offset:offset + config.batch_size]
        # Dropout draws from a seed of (run, step, process): a resumed run repeats them exactly.
        torch.manual_seed((config.seed * 1_000_003 + step * 7919 + accelerator.process_index) % 2**63)
        lr = config.lr * _lr_factor(step, total, config.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        wrapped.train()
        target = torch.tensor([e.target for e in chunk], device=accelerator.device)
        if config.mode == "pointwise":
            loss = pointwise_loss(pointwise_scores(batch, chunk, yes, no), target, config.group_weight)
        elif config.mode == "generative":
            loss = generative_loss(generative_scores(batch, chunk), target, config.temperature, config.lm_weight)
        else:
            loss = listwise_loss(listwise_logprobs(batch, chunk), target)
        value = train_step(accelerator, optimizer, loss, trainable, config.max_grad_norm)  # the whole step's loss
        step += 1
        window.append(value)
        rate = (step - first_step) / max(time.perf_counter() - t0 - eval_seconds, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{value:.3f}", queries_s=f"{rate * per_step:.1f}")
        entry = {}
        if step % config.log_every == 0 or step == total:
            entry = {"step": step, "loss": round(float(np.mean(window)), 4), "lr": lr}
            window = []
        if evaluator is not None and ((config.eval_every and step % config.eval_every == 0) or step == total):
            tick = time.perf_counter()
            entry = {"step": step, **entry, "eval": _eval(evaluator, mllm, wrapped, prompt, config.mode)}
            eval_seconds += time.perf_counter() - tick
            bar.set_postfix(loss=f"{value:.3f}", **{f"{d}_R1": v["rerank_R@1"] for d, v in entry["eval"].items()})
        if entry:
            history.append(entry)
            logger.info("step %d: %s", step, entry)
        if config.save_every and step % config.save_every == 0 and step < total:
            accelerator.wait_for_everyone()
            if main:
                save_checkpoint(out_dir, step, accelerator.unwrap_model(wrapped), optimizer,
                                {**identity, "history": history, "window": window})
        if on_step is not None:
            on_step({"step": step, "total": total, "loss": value})
    bar.close()
    seconds = time.perf_counter() - t0 - eval_seconds  # training only: evaluations are timed apart
    done = step - first_step
    cands = config.negatives + 1
    evals = [h["eval"] for h in history if "eval" in h]
    losses = [h["loss"] for h in history if "loss" in h]
    manifest = {
        "format": FORMAT, "version": VERSION, "genret": __version__, "task": "rerank", "mode": config.mode,
        "base_model": str(base), "base_revision": mllm.revision, "family": mllm.family.name,
        "prompt": {"name": prompt.name, "version": prompt.version},
        "config": asdict(config),
        "metrics": {"loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                    **({"val": evals[-1]} if evals else {})},
        "data": {"source": str(train.source), "images": len(train), "captions": len(texts), "queries": len(groups),
                 "mining": mining, "prefilter": getattr(encoder, "model_id", str(prefilter))},
        "history": history, "steps": step,
        "speed": {"steps_per_s": round(done / max(seconds, 1e-9), 3),
                  "queries_per_s": round(done * per_step / max(seconds, 1e-9), 2),
                  "candidates_per_s": round(done * per_step * cands / max(seconds, 1e-9), 1),
                  "processes": accelerator.num_processes, "device": str(accelerator.device),
                  "eval_seconds": round(eval_seconds, 1)},
        "train_seconds": round(time.perf_counter() - start, 1),
    }
    accelerator.wait_for_everyone()
    if main:
        save_adapter(out_dir, accelerator.unwrap_model(wrapped), manifest)
    return manifest


def _eval(evaluator: _Evaluator, mllm: "MLLM", wrapped, prompt: "Prompt", mode: str) -> dict:
    wrapped.eval()
    try:
        return evaluator(mllm, prompt, mode)
    finally:
        wrapped.train()
