"""Dialogs as genret keeps them: the target a simulated user knows, and the dialog as text.

A dialog query carries ``meta["initial"]`` (the user's first text) and ``meta["turns"]`` (question, answer and
what each did); :func:`dialog_text` is how prompts see it, :func:`joined_dialog` how retrieval does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from genret.data.scene import Scene, SceneObject
from genret.types import Query

UNKNOWN = "I don't know"
"""What a user says to a question they cannot answer (left out of the retrieval text)."""


@dataclass(frozen=True)
class Target:
    """What a simulated user knows of the image sought: its id, file and (miniature world) scene."""

    id: str
    image: str | None = None
    scene: Mapping[str, Any] | None = None

    @classmethod
    def from_meta(cls, value: "Target | Mapping | None") -> "Target | None":
        """A target from ``Query.meta["target"]`` (a :class:`Target` or its :meth:`to_dict`)."""
        if value is None or isinstance(value, Target):
            return value
        return cls(id=str(value["id"]), image=value.get("image"), scene=value.get("scene"))

    def to_dict(self) -> dict:
        """JSON-able: ``{"id", "image", "scene"}``."""
        return {"id": self.id, "image": self.image, "scene": dict(self.scene) if self.scene else None}


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


def initial_query(scene: Scene | Mapping | None, captions: Sequence[str], key: str, seed: int = 0) -> str:
    """The partial description a dialog starts from: one object of the scene ("a small red circle"), else the
    first caption (ChatIR). Which object is fixed by ``seed`` and ``key`` (e.g. the image id)."""
    import random

    if scene is None:
        if not captions:
            raise ValueError(f"image {key!r} has neither a scene nor a caption to start a dialog from")
        return captions[0]
    scene = scene if isinstance(scene, Scene) else Scene.from_dict(dict(scene))
    obj: SceneObject = random.Random(f"{seed}:{key}").choice(scene.objects)
    return f"a {obj.noun(with_size=True)}"
