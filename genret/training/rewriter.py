"""``genret train rewriter``: text-generation LoRAs for the rewrite stages, one recipe per ``task``.

- ``cirevl``: (caption of the reference, modification) → the target's description (below);
- ``chat``: the dialog so far → the next question, imitating the oracle questioner (the scripted questions
  asked of the facts answerer on the training images): behaviour cloning of a questioner that asks;
- ``eiirwqr``: (original query, captions of the shown results the simulated user marked, and of the rest)
  → the target's caption, from one feedback round simulated on the training images with the prefilter
  (``--clip``) and the stage's own user, captioner and prompt.

All three train the same way (next-token loss on the target, LoRA on the language model) and save an
adapter of task ``rewriter`` whose mode names the prompt table it serves (``rewrite``, ``question``,
``feedback``).

CIReVL in detail:

CIReVL is training-free: any instruction-following LLM recomposes the caption. Where the base does
that badly (a small model, a new domain), a LoRA on the composed-retrieval training triplets teaches
it. Each training row is the ``cirevl`` prompt filled with the captioner's caption of the reference
image (the same captioner, prompt and settings the stage uses, so training sees what inference
sees) and the modification. Where the data set describes its own images (the miniature world's
scenes; ``reference_text`` ``auto`` or ``both``), every triplet gives a second row with that clean
description of the reference instead, so the rewriter learns the edit itself and not only the
captioner's mistakes (``dataset``: those rows only; ``captioner``: the captioner's only, as for CIRR).
The target is the triplet's ``target_caption`` when the data gives one (the miniature world does) or
else the captioner's caption of the target image; where the data set describes the target in several
equivalent ways, the one closest to the row's reference description (a minimal edit). Loss: next-token
cross-entropy on the target's tokens (eos included), LoRA on the language model only.

Runs in several processes like the other trainers (``torchrun`` / ``accelerate launch``; captioning
on the main process). The adapter folder holds peft's files and ``genret.json`` (task ``rewriter``,
mode = the prompt table, the caption settings) — the stage checks them on attach.
"""

from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from genret import __version__
from genret.config import check_bounds
from genret.mllm.answers import answer_format, continuation_ids
from genret.training.distributed import on_main
from genret.training.engine import Engine, Streams
from genret.training.grace import identifier_loss
from genret.training.models import add_lora, load_base
from genret.training.options import LoraOptions, TrainOptions

if TYPE_CHECKING:
    from genret.data.cir import CIRSet

logger = logging.getLogger(__name__)


TASKS = {"cirevl": ("cirevl", "rewrite"), "chat": ("chat", "question"), "eiirwqr": ("eiirwqr", "feedback")}
"""task -> (default prompt, the prompt table the adapter learns to answer)."""
REFERENCE_TEXTS = ("auto", "captioner", "dataset", "both")


@dataclass
class RewriterTrainConfig(LoraOptions, TrainOptions):
    """What the rewriter LoRA learns from, and how (and the shared options)."""

    task: str = field(default="cirevl", metadata={"help": "cirevl (CIR triplets), chat (questions), eiirwqr (feedback)"})
    prompt: str = field(default="", metadata={"help": "prompt name or file (default: the task's)"})
    rounds: int = field(default=5, metadata={"help": "chat: dialog turns simulated per training image"})
    shown: int = field(default=5, metadata={"help": "eiirwqr: results shown per round"})
    min_facts: int = field(default=3, metadata={"help": "eiirwqr: shared scene facts to be marked relevant"})
    reference_text: str = field(default="auto", metadata={"help": "cirevl: what describes the reference in training "
                                                                "rows: captioner (as the stage sees it), dataset (the "
                                                                "data set's own captions), both, or auto (both where "
                                                                "the data set describes its images, else captioner)"})
    scene_edits: int = field(default=0, metadata={"help": "cirevl, miniature world: text-only rows per training "
                                                            "image, each a fresh edit of its scene (full caption, "
                                                            "edit, the edited scene's closest full caption)"})
    caption_prompt: str = field(default="caption", metadata={"help": "captioner prompt (as the stage uses it)"})
    caption_tokens: int = field(default=48, metadata={"help": "longest caption, in tokens (as the stage uses it)"})
    max_new_tokens: int = field(default=48, metadata={"help": "longest rewrite at evaluation"})
    cache_dir: str = field(default="", metadata={"help": "caption cache ('' : OUT.cache beside the output folder)"})
    epochs: int = field(default=3, metadata={"help": "passes over the training rows (unless max_steps)"})
    batch_size: int = field(default=16, metadata={"help": "rows per micro-batch and process"})
    lr: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate"})
    eval_triplets: int = field(default=64, metadata={"help": "val triplets rewritten at the end (exact-match check)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        self.prompt = self.prompt or TASKS[self.task][0]
        if self.reference_text not in REFERENCE_TEXTS:
            raise ValueError(f"reference_text must be one of {', '.join(REFERENCE_TEXTS)}, got {self.reference_text!r}")
        check_bounds(self, at_least_one=("caption_tokens", "max_new_tokens", "rounds", "shown", "min_facts"),
                     non_negative=("scene_edits", "eval_triplets"))


def rewrite_pairs(cir: "CIRSet", captions: dict[str, str]) -> list[tuple[dict, str]]:
    """``({"caption", "modification"}, target text)`` per triplet with a usable target.

    The target text is the triplet's ``target_caption``, or the captioner's caption of its target. Where the
    data set describes the target in several ways (the miniature world's scenes), it is the description
    naming every object with its size that is closest word by word to the reference's, so the rewriter
    learns to edit the caption it is given, not to guess which of many equivalent phrasings the
    annotation happened to use.

    Args:
        cir: the triplets.
        captions: image id -> a description of it (the captioner's caption, or the data set's own; references,
            and targets without ``target_caption``).
    """
    out = []
    for t in cir.triplets:
        target = t.meta.get("target_caption") or (captions.get(_first_target(t)) if t.targets else None)
        if not target or t.reference not in captions:
            continue
        caption = captions[t.reference]
        scene = cir.scenes.get(_first_target(t)) if t.targets else None
        if scene is not None:
            target = closest_text(caption, _scenes(cir).descriptions(scene) or [target])
        out.append(({"caption": caption, "modification": t.modification}, target))
    return out


def closest_text(text: str, options: list[str]) -> str:
    """The option most like ``text`` word by word (difflib's ratio; the first of equals)."""
    from difflib import SequenceMatcher

    words = normalise_text(text).split()
    return max(options, key=lambda o: SequenceMatcher(None, words, normalise_text(o).split(), autojunk=False).ratio())


def dataset_captions(cir: "CIRSet", seed: int = 0) -> dict[str, str]:
    """Image id -> one of the data set's own full captions of it (seeded pick), for every image with a scene.

    Only the miniature world describes its CIR images (``scenes.json``); CIRR and CIRCO do not, so this
    refuses them rather than train on nothing.
    """
    if not cir.scenes:
        raise ValueError(f"{cir.source}: reference_text 'dataset' or 'both' needs the data set's own descriptions of "
                         "its images (the miniature world's scenes.json); this set has none: use 'captioner'")
    rng = random.Random(seed)
    kind = _scenes(cir)
    return {i: rng.choice(kind.descriptions(s)) for i, s in sorted(cir.scenes.items())}


def scene_edit_pairs(cir: "CIRSet", per_image: int, seed: int = 0, *, avoid: frozenset) -> list[tuple[dict, str]]:
    """Text-only rows drawn from the world's facts: ``per_image`` fresh edits of each gallery image's scene.

    Each row is the scene's full caption (seeded pick), an edit drawn as the world draws its triplets'
    (:meth:`~genret.data.annotations.Annotation.edit`), and the full caption of one valid edited scene closest to
    that caption. No image is drawn or captioned: the rewriter works on text, so its lesson (edit a
    description) can come in far more variety than the split's triplets give. No target is a scene whose signature
    is in ``avoid`` (the held-out splits' scenes: their descriptions are not learnt as answers); an edit all of whose
    targets are is drawn again.
    """
    if not cir.scenes:
        raise ValueError(f"{cir.source}: scene_edits draws edits from the world's scenes (scenes.json); this set "
                         "has none: set scene_edits to 0")
    rng = random.Random(f"genret.scene_edits:{seed}")
    kind, out = _scenes(cir), []
    for i in sorted(cir.images):
        if i not in cir.scenes:
            continue
        scene = cir.scenes[i]
        for _ in range(per_image):
            text, targets = draw_avoiding_all(lambda: kind.edit(scene, rng), kind, avoid, f"{cir.source}: {i}")
            caption = rng.choice(kind.descriptions(scene))
            target = closest_text(caption, kind.descriptions(rng.choice(targets)))
            out.append(({"caption": caption, "modification": text}, target))
    return out


def draw_avoiding_all(draw, kind, avoid: frozenset, what: str, tries: int = 100):
    """``draw()`` of an edit ``(text, targets)`` until a target is not in ``avoid``; the edit with those targets only."""
    from genret.data.annotations import not_held_out

    for _ in range(tries):
        text, targets = draw()
        kept = not_held_out(kind, targets, avoid)
        if kept:
            return text, kept
    raise ValueError(f"{what}: {tries} edits in a row led only to held-out scenes; hold out fewer scenes")


def cir_scene_signatures(cirs) -> frozenset:
    """The signatures of every scene of the CIR sets ``cirs`` (the held-out splits'), for :func:`scene_edit_pairs`."""
    return frozenset(_scenes(cir).signature(v) for cir in cirs if cir.scenes for v in cir.scenes.values())


def _scenes(cir: "CIRSet"):
    """The plug-in that knows the set's ``scenes.json`` (the miniature world's scene annotation)."""
    from genret.data.annotations import require_annotation

    return require_annotation("scene", f"{cir.source}: the scenes of scenes.json")


def _first_target(t) -> str:
    return t.meta.get("target_hard") or t.targets[0]


def _images_to_caption(cir: "CIRSet") -> list[str]:
    ids = {t.reference for t in cir.triplets}
    ids |= {_first_target(t) for t in cir.triplets if t.targets and not t.meta.get("target_caption")}
    return sorted(ids)


def chat_pairs(records, rounds: int, seed: int = 0) -> list[tuple[dict, str]]:
    """``({"dialog"}, next question)`` per image and turn: the oracle dialogs (scripted questions, facts answers)."""
    return [({"dialog": dialog}, question) for _, dialog, question in oracle_turns(records, rounds, seed)]


def oracle_turns(records, rounds: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """``(image id, dialog so far, the question asked next)`` per image and turn of the oracle dialogs."""
    from genret.eval.interactive import dialog_queries
    from genret.stages.chat import ChatConfig, ChatStage, dialog_text

    stage = ChatStage(ChatConfig(questioner="scripted", answerer="facts", rounds=rounds), "chat")
    queries = stage.start(*dialog_queries(records, seed))
    out = []
    for _ in range(rounds):
        asking = {q.id: dialog_text(q) for q in queries if not q.meta["stopped"]}
        queries = stage.next_round(queries)
        out += [(q.id, asking[q.id], q.meta["turns"][-1]["question"]) for q in queries if q.id in asking]
    return out


def feedback_pairs(records, base: str | os.PathLike, prefilter: "str | os.PathLike",
                   caption: "Callable[[list[str]], list[str]]", config: RewriterTrainConfig,
                   seed: int = 0) -> list[tuple[dict, str]]:
    """``({"query", "relevant", "irrelevant"}, target caption)`` from one simulated EIIRwQR round per image.

    The images are both gallery and queries: each starts from its partial description, the prefilter
    retrieves, the stage's simulated user marks the shown results, ``caption`` describes them (with
    ``base``, the MLLM the stage names; only the user's side of the stage runs here).
    """
    from genret.eval.interactive import dialog_queries
    from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline
    from genret.stages.eiirwqr import EIIRwQRConfig, EIIRwQRStage
    from genret.types import Item

    user = EIIRwQRConfig(model=str(base), shown=config.shown, min_facts=config.min_facts, relevance="facts")
    stage = EIIRwQRStage(user, "eiirwqr")
    pipe = RetrievalPipeline(PipelineConfig(name="feedback", encoder=EncoderConfig(model=str(prefilter)),
                                            stages=({"type": "prefilter", "k": 100},)))
    pipe.index_items({"image": [Item(id=r.id, modality="image", image=str(r.path)) for r in records]},
                     {"task": "feedback"}, progress=False)
    stage.index_gallery(pipe.gallery)
    stage.set_metadata({r.id: r.meta for r in records})
    queries = stage.start(*dialog_queries(records, seed))
    _, rows = stage.show(queries, pipe.run(queries)[-1][1])
    ids = sorted({x for _, shown, _ in rows for x in shown})
    captions = dict(zip(ids, caption([stage.images[x] for x in ids])))
    prompts = stage.prompt_rows(queries, rows, captions)
    by_id = {r.id: r for r in records}
    return [(p, by_id[queries[i].meta["target"]["id"]].captions[0]) for p, (i, _, _) in zip(prompts, rows)]


def train_rewriter(base: str | os.PathLike, train, out_dir: str | os.PathLike,
                   config: RewriterTrainConfig | None = None, *, val=None, prefilter: "str | os.PathLike | None" = None,
                   resume: bool = False, progress: bool = True,
                   on_step: "Callable[[dict], None] | None" = None, held_out=None) -> dict:
    """Train a rewriter LoRA for ``config.task``; saves the adapter in ``out_dir``.

    Args:
        base: the MLLM (it also captions, as the stage does).
        train: the training data: a CIR set (``cirevl``) or a data set whose training split is used (``chat``,
            ``eiirwqr``: images with scenes, the miniature world).
        val: held-out data of the same kind for the exact-match check (cirevl: a CIR set; else a data set,
            its val split).
        prefilter: the dual encoder that retrieves the shown results (``eiirwqr``).
        resume: continue from the last checkpoint under ``out_dir/checkpoints`` (same settings required).
        held_out: the held-out CIR sets (val, test) whose scenes ``scene_edits`` must never give as a target;
            required with ``scene_edits``.

    Returns:
        The manifest (also ``out_dir/genret.json``): config, history, val exact match before/after, speed.
    """
    from genret.mllm.adapters import ADAPTER_FORMATS, FORMAT, VERSION, write_adapter
    from genret.mllm.captioner import Captioner
    from genret.mllm.rewriter import Rewriter
    from genret.prompts import load_prompt

    config = config or RewriterTrainConfig()
    if config.scene_edits and held_out is None:
        raise ValueError("scene_edits draws edited scenes anew: give held_out (the val and test CIR sets), so that "
                         "none of their scenes is learnt as a target")
    out_dir = Path(out_dir)
    engine = Engine(f"rewriter-{config.task}", config, out_dir, resume=resume, progress=progress, base=base)
    accelerator, show = engine.accelerator, engine.show
    section = TASKS[config.task][1]
    prompt = load_prompt(config.prompt, required={section: {"user": ()}})
    if config.task == "eiirwqr" and prefilter is None:
        raise ValueError("task eiirwqr simulates a feedback round with the prefilter: pass prefilter (--clip)")
    mllm = load_base(str(base), config, engine.device)
    cache = config.cache_dir or str(out_dir.with_name(out_dir.name + ".cache"))  # kept when the adapter replaces OUT
    captioner = Captioner(mllm, config.caption_prompt, max_new_tokens=config.caption_tokens, cache_dir=cache)

    def build(data, split: str, reference_text: str) -> list:
        if config.task == "cirevl":
            pairs = []
            if reference_text in ("dataset", "both"):
                pairs += rewrite_pairs(data, dataset_captions(data, config.seed))
            if config.scene_edits and split == "train":
                pairs += scene_edit_pairs(data, config.scene_edits, config.seed,
                                          avoid=cir_scene_signatures(held_out))
            if reference_text in ("captioner", "both"):
                ids = _images_to_caption(data)
                caps = dict(zip(ids, captioner.caption([str(data.images[i]) for i in ids], progress=show)))
                pairs += rewrite_pairs(data, caps)
            return pairs
        records = data.split(split).records
        if config.task == "chat":
            return chat_pairs(records, config.rounds, config.seed)
        return feedback_pairs(records, base, prefilter, lambda paths: captioner.caption(paths, progress=show), config,
                              config.seed)

    reference_text = config.reference_text
    if config.task == "cirevl" and reference_text == "auto":
        reference_text = "both" if train.scenes else "captioner"
    pairs = [tuple(p) for p in on_main(accelerator, lambda: build(train, "train", reference_text))]
    source = getattr(train, "source", "?")
    per_step = engine.rows_per_step
    if len(pairs) < per_step:
        raise ValueError(f"{source}: {len(pairs)} training rows with a target text, fewer than one step's {per_step} "
                         "(batch_size x gradient_accumulation_steps x processes); lower batch_size")
    val_pairs = []
    if val is not None and config.eval_triplets:
        # Measured as inference works: from the captioner's captions.
        val_pairs = [tuple(p) for p in on_main(accelerator, lambda: build(val, "val", "captioner"))]
        val_pairs = val_pairs[: config.eval_triplets]
    rewriter = Rewriter(mllm, prompt, section, max_new_tokens=config.max_new_tokens)

    def exact_match() -> dict:
        if not val_pairs:
            return {}
        done = rewriter.rewrite([r for r, _ in val_pairs], ["" for _ in val_pairs])
        hits = sum(normalise_text(d.text) == normalise_text(t) for d, (_, t) in zip(done, val_pairs))
        return {"exact_match": round(100.0 * hits / len(val_pairs), 2), "fallbacks": sum(d.fallback is not None for d in done),
                "triplets": len(val_pairs), "examples": [{"input": r, "target": t, "rewrite": d.text}
                                                          for d, (r, t) in list(zip(done, val_pairs))[:3]]}

    before = on_main(accelerator, exact_match)
    caption_key = captioner.key  # of the plain base, before the LoRA is added
    torch.manual_seed(config.seed)
    model = add_lora(mllm, config, gradient_checkpointing=config.gradient_checkpointing)
    rewriter = Rewriter(mllm, prompt, section, max_new_tokens=config.max_new_tokens)  # no adapter digest in its key
    wrapped = engine.prepare(model)
    rendered = [rewriter.render(r) for r, _ in pairs]
    fmt = answer_format(mllm)  # each target as the model writes its answer: the template's prefix and end of turn
    targets = [continuation_ids(mllm, r, [fmt.text(t)])[0] for r, (_, t) in zip(rendered, pairs)]
    total = config.max_steps or config.epochs * math.ceil(len(pairs) / per_step)
    streams = Streams(config.seed, {"pairs": range(len(pairs))})

    def draw(step: int) -> list[list[int]]:
        rows = streams.take("pairs", per_step)
        return [rows[c * config.batch_size:(c + 1) * config.batch_size] for c in range(engine.chunks)]

    def loss(chunk: list[int]) -> torch.Tensor:
        return identifier_loss(mllm, [rendered[i] for i in chunk], [[] for _ in chunk], [targets[i] for i in chunk],
                               model=wrapped)

    run = engine.fit(total, draw, loss, on_step=on_step,
                     state=streams.hooks,
                     identity={"config": asdict(config), "base_revision": mllm.revision, "prompt": prompt.key,
                               "pairs": len(pairs)})
    model.eval()
    rewriter.cache.entries.clear()
    after = on_main(accelerator, exact_match)
    summary = run.summary(config)
    manifest = {
        "format": FORMAT, "version": VERSION, "genret": __version__, "task": "rewriter", "mode": section,
        "base_model": str(base), "base_revision": mllm.revision, "family": mllm.family.name,
        "prompt": {"name": prompt.name, "version": prompt.version}, **summary,
        "captioner": caption_key,
        "data": {"source": str(source), "task": config.task, "pairs": len(pairs), "example": pairs[0],
                 "target_text": _target_text(config.task, train),
                 **({"reference_text": reference_text} if config.task == "cirevl" else {})},
        "metrics": {**summary["metrics"], "val_before": before, "val": after},
        "train_seconds": engine.seconds,
    }
    engine.save(lambda folder: write_adapter(folder, engine.unwrapped, manifest), ADAPTER_FORMATS)
    return manifest


def _target_text(task: str, train) -> str:
    if task == "chat":
        return "the oracle questioner's next question"
    if task == "eiirwqr":
        return "the target's first caption"
    return "target_caption" if any(t.meta.get("target_caption") for t in train.triplets) else "captioner"


def normalise_text(text: str) -> str:
    """Lower case, commas and full stops dropped, spaces collapsed: how rewrites are compared for exact match."""
    return " ".join(text.lower().replace(",", " ").replace(".", " ").split())
