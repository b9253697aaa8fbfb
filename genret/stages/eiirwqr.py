"""EIIRwQR: interactive retrieval by query rewriting, round after round.

Each round: the results of the last retrieval that the user has not seen yet (the first ``shown`` of
them) are shown; a simulated user marks the relevant ones (``feedback = "relevant"``) or gives no
feedback at all (``"none"``); the MLLM captions the shown images (:class:`~genret.mllm.captioner.Captioner`);
the rewriter (the MLLM on text only, prompt ``eiirwqr``: ``[feedback]`` with ``{query}``, ``{relevant}``,
``{irrelevant}``, or ``[blind]`` with ``{query}``, ``{shown}``) rewrites the *original* query from those
captions; the next stage retrieves with the rewrite.

The simulated user judges from ground truth, by a relevance judge registered in :data:`JUDGES` (a plug-in, like the
chat stage's answerers): ``relevance = "target"`` marks the image sought alone; the miniature world's ``"facts"``
(:mod:`genret.world.judges`) also marks every image whose scene shares at least ``min_facts`` of the target's five
facts (the two objects, the relation, the colours, the shapes) — images "like the one sought". Stopping rule: a query stops the round its target is shown
(the user found it; its query is kept), and after ``rounds`` rounds.

Every round is recorded in ``Query.meta["rounds"]`` (shown ids, marked ids, captions, the rewrite, any
fallback: an empty or runaway rewrite keeps the original query and says so). A round stage for
:func:`genret.eval.interactive.evaluate_dialog` (:meth:`start`, :meth:`next_round`).

Example pipeline file::

    [[stages]]
    type = "eiirwqr"
    model = "adapters/mini-world/mllm"
    rounds = 3
    shown = 5
    relevance = "facts"

    [[stages]]
    type = "prefilter"
    k = 50
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Protocol, Sequence

from genret.stages.base import STAGES, RewriteStage, StageContext
from genret.stages.dialog import Target
from genret.config import at_least, check_fields
from genret.index.items import item_image
from genret.types import Item, Query, Ranking
from genret.mllm.backend import MLLMLoadConfig
from genret.registry import Registry

if TYPE_CHECKING:
    from genret.index.gallery import Gallery
    from genret.mllm.backend import MLLM

logger = logging.getLogger(__name__)
FEEDBACK = ("relevant", "none")
NONE = "none"

class Judge(Protocol):
    """A simulated user's relevance judgement, from ground truth."""

    def check(self, config: "EIIRwQRConfig") -> None:
        """Raise ``ValueError`` for settings this judge cannot serve (called when the config is made)."""

    def __call__(self, target: Target, ids: Sequence[str], metadata: Mapping[str, Mapping],
                 config: "EIIRwQRConfig") -> list[str]:
        """The ``ids`` marked relevant; ``metadata`` is the gallery images' (by id). Raises ``ValueError`` where the
        target lacks what the judge reads."""


JUDGES: Registry[Judge] = Registry("relevance judge")
"""Relevance judges by name (``relevance = ...``); plug-ins register theirs (the world's ``facts``)."""


class TargetJudge:
    """The image sought, and nothing else."""

    def check(self, config) -> None:
        """Every setting will do."""

    def __call__(self, target: Target, ids: Sequence[str], metadata: Mapping[str, Mapping], config) -> list[str]:
        return [i for i in ids if i == target.id]


JUDGES.register("target")(TargetJudge())


@dataclass
class EIIRwQRConfig(MLLMLoadConfig):
    """Settings of the EIIRwQR round stage."""

    model: str = field(default="", metadata={"path": "model",
                                             "help": "the MLLM that captions the shown images and rewrites"})
    adapter: str = field(default="", metadata={"path": "adapter",
                                               "help": "a rewriter LoRA (task rewriter) for the rewrites (optional)"})
    prompt: str = field(default="eiirwqr", metadata={"path": "prompt",
                                                     "help": "rewrite prompt: [feedback] and [blind] tables"})
    caption_prompt: str = field(default="caption", metadata={"path": "prompt", "help": "captioner prompt"})
    rounds: int = field(default=3, metadata={"range": at_least(1), "help": "feedback rounds after the first retrieval"})
    shown: int = field(default=5, metadata={"range": at_least(1),
                                            "help": "results not shown before that the user sees per round"})
    feedback: str = field(default="relevant", metadata={"help": "relevant (the user marks results) or none"})
    relevance: str = field(default="facts", metadata={"help": "a relevance judge: target (the image sought only) or a "
                                                              "plug-in's (facts: the miniature world's shared facts)"})
    min_facts: int = field(default=3, metadata={"range": at_least(1),
                                                "help": "relevance=facts: shared scene facts (of 5) to be relevant"})
    caption_tokens: int = field(default=48, metadata={"range": at_least(1), "help": "longest caption, in tokens"})
    max_new_tokens: int = field(default=48, metadata={"range": at_least(1),
                                                      "help": "longest rewrite; longer is a runaway (fallback)"})
    num_beams: int = field(default=1, metadata={"range": at_least(1), "help": "beam width (1: greedy)"})
    batch_size: int = field(default=16, metadata={"range": at_least(1), "help": "images or prompts per generate call"})
    cache_dir: str = field(default="", metadata={"path": "dir",
                                                 "help": "where captions and rewrites persist ('' : memory only)"})

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.model:
            raise ValueError("model is required (the MLLM that captions and rewrites)")
        if self.feedback not in FEEDBACK:
            raise ValueError(f"feedback must be one of {', '.join(FEEDBACK)}, got {self.feedback!r}")
        if self.relevance not in JUDGES:
            raise ValueError(f"relevance must be a registered judge ({', '.join(JUDGES.names())}), got {self.relevance!r}")
        JUDGES.get(self.relevance).check(self)


@STAGES.register("eiirwqr")
class EIIRwQRStage(RewriteStage):
    """Show unseen results, take the user's marks, caption, rewrite the original query, retrieve again."""

    config_class = EIIRwQRConfig

    def __init__(self, config: EIIRwQRConfig, name: str) -> None:
        super().__init__(config, name)
        self.images: Mapping[str, Item] = {}  # the gallery's image items, their files checked when captioned
        self.metadata: dict[str, Mapping] = {}
        self._mllm: "MLLM | None" = None
        self._captioner = None
        self._rewriter = None
        self.seconds = {"caption": 0.0, "rewrite": 0.0}

    def adapter_use(self, field: str) -> dict:
        return {"task": "rewriter", "mode": "feedback" if self.config.feedback == "relevant" else "blind"}

    @property
    def rounds(self) -> int:
        """Feedback rounds per query."""
        return self.config.rounds

    def describe(self) -> dict:
        """What makes the rewrites: for reports."""
        from genret.prompts import load_prompt

        c = self.config
        return {"stage": self.name, "type": "eiirwqr", "model": c.model, "adapter": c.adapter,
                "prompt": load_prompt(c.prompt).key, "rounds": c.rounds, "shown": c.shown, "feedback": c.feedback,
                "relevance": c.relevance, "min_facts": c.min_facts}

    def index_gallery(self, gallery: "Gallery", progress: bool = False) -> None:
        """Keep the gallery images' files: the shown results are captioned from them."""
        self.images = gallery.items.get("image", {})

    def set_metadata(self, metadata: Mapping[str, Mapping]) -> None:
        """The gallery images' metadata (their records' ``meta``), for a judge that reads it (``facts``)."""
        self.metadata = {str(k): v for k, v in metadata.items() if v}

    def _models(self):
        from genret.mllm import MLLM
        from genret.mllm.captioner import Captioner
        from genret.mllm.rewriter import Rewriter

        c = self.config
        if self._captioner is None:
            self._mllm = MLLM.load(c.mllm_config(c.model))
            self._captioner = Captioner(self._mllm, c.caption_prompt, max_new_tokens=c.caption_tokens,
                                        batch_size=c.batch_size, cache_dir=c.cache_dir or None, num_beams=c.num_beams)
            writer = self._mllm
            section = "feedback" if c.feedback == "relevant" else "blind"
            if c.adapter:  # the captioner keeps the plain base: the LoRA rewriter gets its own copy
                writer = MLLM.load(c.mllm_config(c.model))
                writer.attach_adapter(c.adapter, task="rewriter", mode=section)
            self._rewriter = Rewriter(writer, c.prompt, section, max_new_tokens=c.max_new_tokens, num_beams=c.num_beams,
                                      batch_size=c.batch_size, cache_dir=c.cache_dir or None)
        return self._captioner, self._rewriter

    def rewrite(self, queries: Sequence[Query], ctx: StageContext) -> list[Query]:
        """In a plain pipeline there is no user to show results to: queries pass unchanged."""
        return list(queries)

    def start(self, queries: Sequence[Query], truth: Sequence[Target | None] | None = None) -> list[Query]:
        """Round 0: every query as given, with its target (what the simulated user knows) and nothing shown."""
        if truth is not None and len(truth) != len(queries):
            raise ValueError(f"{len(queries)} queries but {len(truth)} targets")
        out = []
        for i, q in enumerate(queries):
            if not (q.text or "").strip():
                raise ValueError(f"query {q.id!r}: EIIRwQR rewrites a text query; this one has no text")
            target = Target.from_meta(truth[i] if truth is not None else q.meta.get("target"))
            if target is None:
                raise ValueError(f"query {q.id!r}: the simulated user needs the target (meta['target'])")
            JUDGES.get(self.config.relevance)(target, [], {}, self.config)  # a judge says now what it lacks
            meta = {"stage": self.name, "initial": q.text, "target": target.to_dict(), "rounds": [], "seen": [],
                    "stopped": None}
            out.append(Query(id=q.id, text=q.text, target="image", meta=meta))
        return out

    def _relevant(self, target: Mapping, ids: Sequence[str]) -> list[str]:
        return JUDGES.get(self.config.relevance)(Target.from_meta(target), ids, self.metadata, self.config)

    def next_round(self, queries: Sequence[Query], rankings: Sequence[Ranking] | None = None) -> list[Query]:
        """Show each active query's unseen results, take the marks, caption, rewrite the original query.

        Raises:
            ValueError: no rankings (the round needs what retrieval returned), or gallery images without a file.
        """
        out, rows = self.show(queries, rankings)
        if not rows:
            return out
        captioner, rewriter = self._models()
        tick = time.perf_counter()
        ids = sorted({x for _, shown, _ in rows for x in shown})
        caption = dict(zip(ids, captioner.caption([item_image(self.images[x]) for x in ids])))
        self.seconds["caption"] += time.perf_counter() - tick
        prompts = self.prompt_rows(queries, rows, caption)
        tick = time.perf_counter()
        done = rewriter.rewrite(prompts, [queries[i].meta["initial"] for i, _, _ in rows],
                                labels=[f"stage {self.name!r}: query {queries[i].id!r}" for i, _, _ in rows])
        self.seconds["rewrite"] += time.perf_counter() - tick
        for (i, shown, marked), r in zip(rows, done):
            q = queries[i]
            record = {"shown": shown, "marked": marked, "captions": [caption[x] for x in shown], "rewrite": r.raw,
                      "fallback": r.fallback}
            out[i] = Query(id=q.id, text=r.text, target="image",
                           meta={**q.meta, "rounds": [*q.meta["rounds"], record], "seen": [*q.meta["seen"], *shown]})
        return out

    def show(self, queries: Sequence[Query], rankings: Sequence[Ranking] | None
             ) -> tuple[list[Query], list[tuple[int, list[str], list[str]]]]:
        """The user's side of a round: stop the queries whose target is shown (or that have nothing new), and for
        the others the ``(query index, shown ids, marked ids)`` to caption and rewrite from."""
        if rankings is None or len(rankings) != len(queries):
            raise ValueError("EIIRwQR needs the last round's rankings, one per query")
        c = self.config
        out, rows = list(queries), []
        for i, (q, r) in enumerate(zip(queries, rankings)):
            if "rounds" not in q.meta:
                raise ValueError(f"query {q.id!r} has no EIIRwQR state; pass it through EIIRwQRStage.start first")
            if q.meta["stopped"]:
                continue
            seen = set(q.meta["seen"])
            shown = [x for x in r.ids if x not in seen][: c.shown]
            target = q.meta["target"]
            if target["id"] in shown:  # the user found it: stop asking
                out[i] = Query(id=q.id, text=q.text, target="image",
                               meta={**q.meta, "seen": [*q.meta["seen"], *shown], "stopped": "found"})
                continue
            if not shown:
                out[i] = Query(id=q.id, text=q.text, target="image", meta={**q.meta, "stopped": "nothing new to show"})
                continue
            rows.append((i, shown, self._relevant(target, shown) if c.feedback == "relevant" else []))
        missing = sorted({x for _, shown, _ in rows for x in shown if x not in self.images})
        if missing:
            raise ValueError(f"stage {self.name!r}: {len(missing)} shown results have no image file (e.g. "
                             f"{missing[0]!r}); index the gallery through the pipeline first")
        return out, rows

    def prompt_rows(self, queries: Sequence[Query], rows: Sequence[tuple[int, list[str], list[str]]],
                    caption: Mapping[str, str]) -> list[dict[str, str]]:
        """The rewrite prompt's values for each row of :meth:`show`, from the captions of the shown images."""
        out = []
        for i, shown, marked in rows:
            initial = queries[i].meta["initial"]
            if self.config.feedback == "relevant":
                out.append({"query": initial, "relevant": _join(caption[x] for x in marked),
                            "irrelevant": _join(caption[x] for x in shown if x not in marked)})
            else:
                out.append({"query": initial, "shown": _join(caption[x] for x in shown)})
        return out


def _join(texts) -> str:
    texts = [t for t in texts if t]
    return "; ".join(texts) if texts else NONE
