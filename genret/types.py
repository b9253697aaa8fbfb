"""Typed records shared by every stage: queries, gallery items, candidates and rankings, and what a search returns."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal, Mapping, Sequence

Modality = Literal["image", "text"]


def _frozen_mapping(values: Mapping[str, float] | None) -> Mapping[str, float]:
    return MappingProxyType(dict(values or {}))


@dataclass(frozen=True)
class Item:
    """One gallery entry: an image (by path) or a caption (by text).

    Args:
        id: stable identifier, unique within its modality's gallery.
        modality: ``"image"`` or ``"text"``.
        text: the caption, for text items.
        image: the image file path, for image items.
        group: the id of the image a caption belongs to (for image-to-text ground truth).
        digest: the image file's content hash when it was indexed (:func:`genret._io.fingerprint`): a gallery
            image changed since is refused, not used in silence.
    """

    id: str
    modality: Modality
    text: str | None = None
    image: str | None = None
    group: str | None = None
    digest: str | None = None


@dataclass(frozen=True)
class Query:
    """What the user asks for: a text, an image, an image plus a modification text, or a dialog.

    ``target`` says which gallery is searched: text queries default to images and image
    queries to texts; a composed query (image + text) searches images.

    Example:
        >>> Query(id="q1", text="a red circle").target
        'image'
        >>> Query(id="q2", image="cat.png").target
        'text'
    """

    id: str
    text: str | None = None
    image: str | None = None
    dialog: tuple[str, ...] = ()
    target: Modality | None = None
    meta: Mapping[str, object] = field(default_factory=dict, hash=False, compare=False)
    """What a rewrite stage did to make this query (the original text, a caption, the model's raw answer,
    a fallback and why): kept for reports, never used to retrieve."""
    instruction: str | None = None
    """The task instruction a pointwise reranker's prompt takes for this query (Qwen3-VL-Reranker's
    ``<Instruct>``); None: the stage's ``instruction``, else the checkpoint's default."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta or {})))
        if self.instruction is not None and (not isinstance(self.instruction, str) or not self.instruction.strip()):
            raise ValueError(f"query {self.id!r}: instruction must be non-empty text or None, got {self.instruction!r}")
        if self.text is None and self.image is None and not self.dialog:
            raise ValueError(f"query {self.id!r} has no text, image or dialog")
        if self.text is not None and not isinstance(self.text, str):
            raise TypeError(f"query {self.id!r}: text must be a string, got {type(self.text).__name__}")
        if self.target is None:
            object.__setattr__(self, "target", "image" if (self.text is not None or self.dialog) else "text")
        if self.target not in ("image", "text"):
            raise ValueError(f"query {self.id!r}: target must be 'image' or 'text', got {self.target!r}")

    @property
    def modality(self) -> str:
        """``text``, ``image``, ``image+text`` or ``dialog``."""
        if self.dialog:
            return "dialog"
        if self.image is not None and self.text is not None:
            return "image+text"
        return "image" if self.image is not None else "text"


@dataclass(frozen=True)
class Candidate:
    """A gallery item proposed for a query, with the score each stage gave it.

    ``score`` is the score the candidate is ranked by now; ``scores`` keeps every stage's own
    score by stage name so fusion and reports can use them.
    """

    item_id: str
    score: float
    scores: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scores", _frozen_mapping(self.scores))

    def rescored(self, stage: str, stage_score: float, score: float | None = None) -> "Candidate":
        """A copy with ``stage``'s score recorded and the ranking score set (default: the stage score)."""
        scores = dict(self.scores)
        scores[stage] = float(stage_score)
        return replace(self, score=float(stage_score if score is None else score), scores=scores)


@dataclass(frozen=True)
class Ranking:
    """The ranked candidates a stage returns for one query, best first."""

    query: Query
    candidates: tuple[Candidate, ...]
    stage: str = ""

    @property
    def ids(self) -> list[str]:
        """The candidates' item ids, best first."""
        return [c.item_id for c in self.candidates]

    def top(self, k: int) -> "Ranking":
        """The first ``k`` candidates.

        Raises:
            ValueError: ``k`` not a whole number from 1 (a slice would take ``-1`` as "all but the last").
        """
        check_k(k)
        return replace(self, candidates=self.candidates[:k])


def check_k(k: object, name: str = "k") -> None:
    """Refuse a result count that is not a whole number from 1 (``True``, ``2.5``, ``0``, ``-1``)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{name} must be a whole number from 1, got {k!r}")


@dataclass(frozen=True)
class Hit:
    """One result of a search, as a user sees it: rank, gallery id, the score it is ranked by, every stage's score,
    and what the item is (its text, or its image file)."""

    rank: int
    id: str
    score: float
    scores: Mapping[str, float] = field(default_factory=dict)
    text: str | None = None
    image: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "scores", _frozen_mapping(self.scores))


@dataclass(frozen=True)
class SearchResult:
    """What a search returns: the query as asked, the query the rank stages saw (where a rewrite stage changed it),
    the hits best first, each stage's seconds for this search, and a note where fewer hits came than asked for.

    :meth:`to_dict` is the JSON of ``genret search --json``.

    Example:
        >>> r = SearchResult(Query(id="q", text="a red circle"), [Hit(1, "7", 0.5, {"prefilter": 0.5}, image="7.png")])
        >>> r.to_dict()["results"][0]
        {'rank': 1, 'id': '7', 'score': 0.5, 'scores': {'prefilter': 0.5}, 'image': '7.png'}
    """

    query: Query
    hits: Sequence[Hit]
    rewritten: str | None = None
    seconds: Mapping[str, float] = field(default_factory=dict)
    note: str | None = None

    def to_dict(self) -> dict:
        """JSON-able: ``{"query", "target", "results", "seconds"}`` and ``"rewritten"`` and ``"note"`` where set."""
        target = self.query.target
        results = [{"rank": h.rank, "id": h.id, "score": round(h.score, 4),
                    "scores": {k: round(v, 4) for k, v in h.scores.items()},
                    target: h.text if target == "text" else h.image} for h in self.hits]
        out = {"query": {"text": self.query.text, "image": self.query.image}, "target": target, "results": results,
               "seconds": {k: round(v, 4) for k, v in self.seconds.items()}}
        if self.rewritten is not None:
            out["rewritten"] = self.rewritten
        if self.note:
            out["note"] = self.note
        return out

    def render(self) -> str:
        """One line per hit, for a terminal: rank, score, id, what it is."""
        lines = [f"rewritten: {self.rewritten}"] if self.rewritten is not None else []
        lines += [f"{h.rank:>3}  {h.score:+.4f}  {h.id:<12} {h.text if self.query.target == 'text' else h.image}"
                  for h in self.hits]
        return "\n".join(lines)
