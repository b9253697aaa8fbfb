"""Dialogs as genret keeps them: the target a simulated user knows, and the dialog as text.

A dialog query carries ``meta["initial"]`` (the user's first text) and ``meta["turns"]`` (question, answer and
what each did); :func:`dialog_text` is how prompts see it, :func:`joined_dialog` how retrieval does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from genret.data.annotations import annotation_of
from genret.types import Query

UNKNOWN = "I don't know"
"""What a user says to a question they cannot answer (left out of the retrieval text)."""


@dataclass(frozen=True)
class Target:
    """What a simulated user knows of the image sought: its id, file and metadata (its record's ``meta``: for the
    miniature world, ``{"scene": ...}``, which the world's plug-ins read)."""

    id: str
    image: str | None = None
    meta: Mapping[str, Any] | None = None

    @classmethod
    def from_meta(cls, value: "Target | Mapping | None") -> "Target | None":
        """A target from ``Query.meta["target"]`` (a :class:`Target` or its :meth:`to_dict`; a dict with a top-level
        ``scene``, as genret wrote them before targets carried metadata, reads as ``meta = {"scene": ...}``)."""
        if value is None or isinstance(value, Target):
            return value
        meta = value.get("meta")
        if meta is None and value.get("scene") is not None:
            meta = {"scene": value["scene"]}
        return cls(id=str(value["id"]), image=value.get("image"), meta=meta)

    def to_dict(self) -> dict:
        """JSON-able: ``{"id", "image", "meta"}``."""
        return {"id": self.id, "image": self.image, "meta": dict(self.meta) if self.meta else None}

    def known(self, need: str) -> Any:
        """``image``, or the metadata entry ``need`` (``None`` where the target does not say)."""
        return self.image if need == "image" else (self.meta or {}).get(need)


def dialog_text(query: Query) -> str:
    """The dialog so far, one line per turn, for prompts: ``Description: ...``, ``Q: ...``, ``A: ...``."""
    lines = [f"Description: {query.meta.get('initial', query.text)}"]
    for t in query.meta.get("turns", ()):
        lines += [f"Q: {t['question']}", f"A: {t['answer']}"]
    return "\n".join(lines)


def joined_dialog(initial: str, turns: Sequence[Mapping[str, str]], answers_only: bool = False) -> str:
    """The dialog so far as one retrieval text (ChatIR): ``initial, question answer, question answer``.

    With ``answers_only``: ``initial, answer, answer`` ("I don't know" left out: it says nothing of the image).
    """
    if answers_only:
        return ", ".join([initial] + [t["answer"] for t in turns if t["answer"] != UNKNOWN])
    return ", ".join([initial] + [f"{t['question']} {t['answer']}" for t in turns])


def initial_query(meta: Mapping[str, Any] | None, captions: Sequence[str], key: str, seed: int = 0) -> str:
    """The partial description a dialog starts from: one part of the image, where its metadata carries an annotation
    a plug-in knows (:meth:`~genret.data.annotations.Annotation.mention`: "a small red circle" in the miniature
    world), else the first caption (ChatIR). Which part is fixed by ``seed`` and ``key`` (e.g. the image id)."""
    import random

    found = annotation_of(meta)
    if found is None:
        if not captions:
            raise ValueError(f"image {key!r} has neither an annotation nor a caption to start a dialog from")
        return captions[0]
    return found[1].mention(found[2], random.Random(f"{seed}:{key}"))
