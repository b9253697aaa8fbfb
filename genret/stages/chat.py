"""ChatIR: retrieval by dialog. A questioner asks about the target image, an answerer who sees it replies.

The dialog starts from the user's text query (ChatIR starts from a caption). Each round the questioner
(the MLLM on text only, prompt ``chat`` table ``[question]`` with ``{dialog}``; or the fixed ``scripted``
questions) asks one question, the answerer replies, and the turn is appended to :attr:`Query.dialog` and to
the query the next stage retrieves with: the dialog so far joined as text (``query_format = "dialog"``, as
ChatIR), the initial text and the answers alone (``"answers"``: for text encoders with a short context, such
as CLIP's 77 tokens, where the questions, which carry nothing once answered, would push the answers out), or
the questioner's one-sentence summary of it (``"rewrite"``, table ``[summary]``).

Answerers (the :class:`~genret.stages.answerers.Answerer` protocol in :mod:`genret.stages.answerers`, so a
person can take the user's place; the dialog's text forms are in :mod:`genret.stages.dialog`):

- ``facts``: a simulated user who reads the target's scene in the miniature world (``meta["target"]``)
  and answers the world's questions (:func:`genret.world.scene.questions`; :mod:`genret.world.answerers`) and the scripted ones truly,
  anything else with "I don't know";
- ``mllm``: the MLLM looks at the target image and answers (table ``[answer]``: ``{image}`` + ``{question}``);
- ``human``: a person types the answer (:class:`HumanAnswerer`); no ground truth needed.

The miniature world's ``scripted`` questioner (:mod:`genret.world.answerers`) asks its ``SCRIPT`` in order: the questions the facts answerer knows, the
same for every image (it never looks at the target). With the facts answerer it is the *oracle*
questioner: the dialog then holds the whole description, the mechanism an MLLM questioner should reach.

Guards, each recorded in ``meta["turns"]``: an empty or runaway question is replaced by the next of
:data:`FALLBACK_QUESTIONS` (``question_fallback``); an empty or runaway answer by "I don't know"
(``answer_fallback``). A dialog whose next prompt no longer fits the model's context stops there: the
query keeps its last text, and ``meta["stopped"]`` says why (a warning is logged).

Per-round evaluation (:func:`genret.eval.interactive.evaluate_dialog`) drives :meth:`ChatStage.start` and
:meth:`ChatStage.next_round` with retrieval between rounds; in a plain pipeline :meth:`ChatStage.rewrite`
runs all ``rounds`` at once, reading each query's target from ``meta["target"]``.

Example pipeline file::

    [[stages]]
    type = "chat"
    model = "adapters/mini-world/mllm"
    rounds = 5
    answerer = "facts"
    cache_dir = "cache/chat"

    [[stages]]
    type = "prefilter"
    k = 50
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Sequence

from genret.config import at_least, check_fields
from genret.mllm.rewriter import Rewrite
from genret.registry import Registry
from genret.stages.answerers import ANSWERERS, Answerer, HumanAnswerer, MLLMAnswerer  # noqa: F401
from genret.stages.base import STAGES, RewriteStage, StageContext
from genret.stages.dialog import UNKNOWN, Target, dialog_text, initial_query, joined_dialog
from genret.types import Query
from genret.mllm.backend import MLLMLoadConfig

if TYPE_CHECKING:
    from genret.mllm.backend import MLLM
    from genret.mllm.rewriter import Rewriter

logger = logging.getLogger(__name__)
__all__ = ["Answerer", "ChatConfig", "ChatStage", "HumanAnswerer", "MLLMAnswerer", "QUESTIONERS", "Target",
           "dialog_text", "initial_query", "joined_dialog", "UNKNOWN", "FALLBACK_QUESTIONS"]

QUESTIONERS: Registry = Registry("questioner")
"""Who asks, by the name a chat stage's ``questioner`` setting gives: ``factory(stage) -> ask``, where ``ask(queries)``
gives each query's ``(question, None)``, or ``(None, why)`` where it cannot ask. ``mllm`` is the stage's MLLM; the
miniature world registers ``scripted`` (:mod:`genret.world.answerers`)."""
QUERY_FORMATS = ("dialog", "answers", "rewrite")
FALLBACK_QUESTIONS = (
    "What is in the image?",
    "What colours are the objects?",
    "What shapes are the objects?",
    "Where are the two objects?",
    "Are the objects large or small?",
)
"""Asked instead of an empty or runaway question: round r (from 1) takes entry ``(r - 1) % 5``."""


@dataclass
class ChatConfig(MLLMLoadConfig):
    """Settings of the chat (ChatIR) rewrite stage."""

    model: str = field(default="", metadata={"path": "model",
                                             "help": "the MLLM: questioner (on text only) and mllm answerer"})
    adapter: str = field(default="", metadata={"path": "adapter",
                                               "help": "a LoRA for the questioner (genret train rewriter; optional)"})
    questioner: str = field(default="mllm", metadata={"help": "mllm, or a registered one (the miniature world's "
                                                                "scripted: fixed questions)"})
    prompt: str = field(default="chat", metadata={"path": "prompt",
                                                  "help": "prompt with [question], [answer], [summary] tables"})
    rounds: int = field(default=5, metadata={"range": at_least(1), "help": "questions asked per query"})
    answerer: str = field(default="facts", metadata={"help": "facts (the target's scene), mllm (sees it), human"})
    query_format: str = field(default="dialog", metadata={
        "help": "dialog (joined as text), answers (the initial text and the answers), rewrite (a summary)"})
    max_new_tokens: int = field(default=32, metadata={"range": at_least(1),
                                                      "help": "longest question or summary; longer is a runaway"})
    answer_tokens: int = field(default=16, metadata={"range": at_least(1),
                                                     "help": "longest mllm answer; longer is a runaway"})
    num_beams: int = field(default=1, metadata={"range": at_least(1), "help": "beam width (1: greedy)"})
    batch_size: int = field(default=16, metadata={"range": at_least(1), "help": "prompts per generate call"})
    max_prompt_tokens: int = field(default=0, metadata={"range": at_least(0),
                                                        "help": "longest questioner prompt (0: the model's context)"})
    cache_dir: str = field(default="", metadata={"path": "dir",
                                                 "help": "where questions, answers and summaries persist ('': memory)"})

    def __post_init__(self) -> None:
        check_fields(self)
        for name, known in (("questioner", tuple(QUESTIONERS.names())), ("answerer", tuple(ANSWERERS.names())),
                            ("query_format", QUERY_FORMATS)):
            if getattr(self, name) not in known:
                raise ValueError(f"{name} must be one of {', '.join(known)}, got {getattr(self, name)!r}")
        needs = [what for what, used in (("questioner = 'mllm'", self.questioner == "mllm"),
                                         ("answerer = 'mllm'", self.answerer == "mllm"),
                                         ("query_format = 'rewrite'", self.query_format == "rewrite")) if used]
        if needs and not self.model:
            raise ValueError(f"{' and '.join(needs)} needs model (the MLLM)")
        if self.adapter and self.questioner != "mllm":
            raise ValueError("adapter is the questioner's LoRA; it needs questioner = 'mllm'")


@STAGES.register("chat")
class ChatStage(RewriteStage):
    """Ask, answer, and retrieve with the dialog so far (ChatIR); a round stage for per-round evaluation.

    Args:
        config: the settings.
        name: the stage's name.
        answerer: who answers; default the one ``config.answerer`` names (set it to plug in a person).
    """

    config_class = ChatConfig

    def __init__(self, config: ChatConfig, name: str, answerer: Answerer | None = None) -> None:
        super().__init__(config, name)
        self.answerer = answerer
        self._questioner: "Rewriter | None" = None
        self._summariser: "Rewriter | None" = None
        self._mllm: "MLLM | None" = None
        self.seconds = {"question": 0.0, "answer": 0.0, "summary": 0.0}
        self.generated = {"question": 0, "answer": 0, "summary": 0}

    def adapter_use(self, field: str) -> dict:
        return {"task": "rewriter", "mode": "question"}

    @property
    def rounds(self) -> int:
        """Questions asked per query."""
        return self.config.rounds

    def describe(self) -> dict:
        """What makes the dialogs: for reports."""
        from genret.prompts import load_prompt

        c = self.config
        return {"stage": self.name, "type": "chat", "questioner": c.questioner, "answerer": self._answerer().name,
                "query_format": c.query_format, "prompt": load_prompt(c.prompt).key, "model": c.model,
                "adapter": c.adapter, "rounds": c.rounds}

    def _load_mllm(self) -> "MLLM":
        from genret.mllm import MLLM

        if self._mllm is None:
            c = self.config
            self._mllm = MLLM.load(c.mllm_config(c.model))
        return self._mllm

    def _answerer(self) -> Answerer:
        if self.answerer is None:  # a registered answerer (genret.stages.answerers.ANSWERERS) built for this stage
            self.answerer = ANSWERERS.get(self.config.answerer)(self)
        return self.answerer

    def _rewriter(self, section: str) -> "Rewriter":
        from genret.mllm.rewriter import Rewriter

        c = self.config
        if self._questioner is None:
            mllm = self._load_mllm()
            if c.adapter and not mllm.adapters:
                mllm.attach_adapter(c.adapter, name="questioner", task="rewriter", mode="question")
            kwargs = dict(max_new_tokens=c.max_new_tokens, num_beams=c.num_beams, batch_size=c.batch_size,
                          cache_dir=c.cache_dir or None, max_prompt_tokens=c.max_prompt_tokens or None)
            self._questioner = Rewriter(mllm, c.prompt, "question", **kwargs)
            if c.query_format == "rewrite":
                self._summariser = Rewriter(mllm, c.prompt, "summary", **kwargs)
        return self._questioner if section == "question" else self._summariser

    def rewrite(self, queries: Sequence[Query], ctx: StageContext) -> list[Query]:
        """Run the whole dialog (``rounds`` questions) for each query; targets come from ``meta["target"]``."""
        queries = self.start(queries)
        for _ in range(self.rounds):
            queries = self.next_round(queries)
        return queries

    def start(self, queries: Sequence[Query], truth: Sequence[Target | None] | None = None) -> list[Query]:
        """Round 0: each query's dialog is its text alone (what the next stage retrieves with).

        Args:
            queries: text queries (a caption or a partial description of the image sought).
            truth: per query, the target a simulated user answers about (default: ``meta["target"]``).

        Raises:
            ValueError: a query without text, an image query, or ``truth`` of another length.
        """
        if truth is not None and len(truth) != len(queries):
            raise ValueError(f"{len(queries)} queries but {len(truth)} targets")
        out = []
        for i, q in enumerate(queries):
            if q.image is not None:
                raise ValueError(f"query {q.id!r}: a dialog starts from a text; this query is an {q.modality} query")
            initial = (q.text or "").strip()
            if not initial:
                raise ValueError(f"query {q.id!r}: the initial query is empty; a dialog starts from a caption or a "
                                 "partial description of the image sought")
            target = Target.from_meta(truth[i] if truth is not None else q.meta.get("target"))
            meta = {"stage": self.name, "initial": initial, "target": target.to_dict() if target else None,
                    "turns": [], "stopped": None, "query_format": self.config.query_format}
            out.append(Query(id=q.id, text=initial, dialog=(initial,), target="image", meta=meta))
        return out

    def next_round(self, queries: Sequence[Query], rankings: Sequence | None = None) -> list[Query]:
        """One more round: ask, answer, and make each query the dialog so far.

        Args:
            queries: the queries :meth:`start` or the previous round returned.
            rankings: what the last retrieval returned (unused: ChatIR's questioner sees only the dialog).

        Returns:
            The queries with one more turn; a stopped dialog (context full) comes back unchanged.
        """
        for q in queries:
            if "turns" not in q.meta:
                raise ValueError(f"query {q.id!r} has no dialog state; pass it through ChatStage.start first")
        active = [i for i, q in enumerate(queries) if not q.meta["stopped"]]
        out = list(queries)
        tick = time.perf_counter()
        asked = self._ask([queries[i] for i in active])
        self.seconds["question"] += time.perf_counter() - tick
        for i, (_, why) in zip(list(active), asked):
            if why is not None:
                out[i] = self._stop(queries[i], why)
                active.remove(i)
        asked = [a for a in asked if a[1] is None]
        if not active:
            return out
        tick = time.perf_counter()
        answers = self._answerer().answer([queries[i] for i in active], [a.text for a, _ in asked])
        self.seconds["answer"] += time.perf_counter() - tick
        self.generated["answer"] = getattr(self.answerer, "generated", 0)
        turned = {}
        for i, (question, _), answer in zip(active, asked, answers, strict=True):
            q = queries[i]
            turn = {"question": question.text, "answer": answer.text, "raw_question": question.raw,
                    "question_fallback": question.fallback, "raw_answer": answer.raw,
                    "answer_fallback": answer.fallback}
            turned[i] = (q, [*q.meta["turns"], turn])
        texts = self._query_texts(turned)
        for i, (q, turns) in turned.items():
            text, summary = texts[i]
            out[i] = Query(id=q.id, text=text, dialog=(*q.dialog, turns[-1]["question"], turns[-1]["answer"]),
                           target="image", meta={**q.meta, "turns": turns, **summary})
        return out

    def _ask(self, queries: list[Query]) -> list[tuple[Rewrite | None, str | None]]:
        """(question, None) per query, or (None, why) where the questioner's prompt no longer fits."""
        if not queries:
            return []
        return QUESTIONERS.get(self.config.questioner)(self)(queries)

    def _ask_mllm(self, queries: list[Query]) -> list[tuple[Rewrite | None, str | None]]:
        """The ``mllm`` questioner: the stage's MLLM on the dialog so far (prompt table ``[question]``)."""
        rewriter = self._rewriter("question")
        rows = [{"dialog": dialog_text(q)} for q in queries]
        fits = [_overflow(rewriter, r) for r in rows]
        ok = [j for j, why in enumerate(fits) if why is None]
        fallbacks = [FALLBACK_QUESTIONS[len(queries[j].meta["turns"]) % len(FALLBACK_QUESTIONS)] for j in ok]
        done = rewriter.rewrite([rows[j] for j in ok], fallbacks,
                                labels=[f"stage {self.name!r}: query {queries[j].id!r}" for j in ok])
        self.generated["question"] += sum(not r.cached for r in done)
        fell = sum(r.fallback is not None for r in done)
        if fell:
            logger.warning("%s: %d of %d questions were empty or runaway; fallback questions asked instead",
                           self.name, fell, len(done))
        got = dict(zip(ok, done))
        return [(got[j], None) if j in got else (None, fits[j]) for j in range(len(queries))]

    def _query_texts(self, turned: dict[int, tuple[Query, list]]) -> dict[int, tuple[str, dict]]:
        """What each query retrieves with now: the joined dialog, or its summary (with what the summary did)."""
        joined = {i: joined_dialog(q.meta["initial"], turns, self.config.query_format == "answers")
                  for i, (q, turns) in turned.items()}
        if self.config.query_format in ("dialog", "answers"):
            return {i: (text, {}) for i, text in joined.items()}
        rewriter = self._rewriter("summary")
        rows = {i: {"dialog": dialog_text(Query(id=q.id, text=q.text, meta={**q.meta, "turns": turns}))}
                for i, (q, turns) in turned.items()}
        out = {}
        for i, row in rows.items():  # a summary prompt past the context: the joined dialog is used, said so
            why = _overflow(rewriter, row)
            if why is not None:
                out[i] = (joined[i], {"summary": None, "summary_fallback": "context"})
        todo = [i for i in rows if i not in out]
        tick = time.perf_counter()
        done = rewriter.rewrite([rows[i] for i in todo], [joined[i] for i in todo])
        self.seconds["summary"] += time.perf_counter() - tick
        self.generated["summary"] += sum(not r.cached for r in done)
        for i, r in zip(todo, done):
            out[i] = (r.text, {"summary": r.raw, "summary_fallback": r.fallback})
        return out

    def _stop(self, query: Query, why: str) -> Query:
        logger.warning("%s: query %r: dialog stopped after %d round(s): %s", self.name, query.id,
                       len(query.meta["turns"]), why)
        return Query(id=query.id, text=query.text, dialog=query.dialog, target="image",
                     meta={**query.meta, "stopped": why})


def _overflow(rewriter: "Rewriter", row: Mapping[str, str]) -> str | None:
    """Why ``row``'s prompt does not fit the rewriter's context (the Rewriter would refuse it), or ``None``."""
    n = len(rewriter.mllm.tokenizer(rewriter.render(row))["input_ids"])
    if n + rewriter.max_new_tokens <= rewriter.max_prompt_tokens:
        return None
    return (f"context: the {rewriter.section} prompt is {n} tokens, with {rewriter.max_new_tokens} new ones past "
            f"the {rewriter.max_prompt_tokens} the model takes")


QUESTIONERS.register("mllm")(lambda stage: stage._ask_mllm)
