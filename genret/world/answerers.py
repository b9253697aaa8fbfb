"""The miniature world's simulated users: the ``facts`` answerer, who reads the target's scene, and the ``scripted``
questioner, who asks the questions that answerer knows. Both are plug-ins of the chat stage (registered in
:data:`genret.stages.answerers.ANSWERERS` and :data:`genret.stages.chat.QUESTIONERS` when this module is imported,
which :mod:`genret.world.plugins` does through the ``genret.plugins`` entry point).
"""

from __future__ import annotations

import re
from typing import Sequence

from genret.world.scene import COLOURS, INVERSE, RELATIONS, SHAPES, SIZES, Scene
from genret.mllm.rewriter import Rewrite
from genret.stages.answerers import ANSWERERS, require_target
from genret.stages.chat import QUESTIONERS
from genret.stages.dialog import UNKNOWN, dialog_text
from genret.types import Query

SCRIPT = (
    "What colours are the objects?",
    "What else is in the image?",
    "Where are the two objects?",
    "What shapes are the objects?",
    "Are the objects large or small?",
)
"""The scripted questioner's questions, asked in order (then again from the first)."""


class FactsAnswerer:
    """A simulated user who reads the target's scene; see :func:`answer_from_scene`."""

    name = "facts"

    def answer(self, queries: Sequence[Query], questions: Sequence[str]) -> list[Rewrite]:
        """Answer each question from its query's target scene; "I don't know" where it cannot tell."""
        out = []
        for q, question in zip(queries, questions, strict=True):
            scene = Scene.from_dict(dict(require_target(q, self.name, "scene").known("scene")))
            said = answer_from_scene(scene, question, heard=dialog_text(q))
            out.append(Rewrite(UNKNOWN, "", "unanswerable") if said is None else Rewrite(said, said))
        return out



@ANSWERERS.register("facts")
def _facts(stage) -> FactsAnswerer:
    return FactsAnswerer()


@QUESTIONERS.register("scripted")
def _scripted(stage):
    """Asks :data:`SCRIPT` in order (then again from the first)."""
    def ask(queries: Sequence[Query]) -> list[tuple[Rewrite | None, str | None]]:
        return [(Rewrite(SCRIPT[len(q.meta["turns"]) % len(SCRIPT)], ""), None) for q in queries]

    return ask


# --- the facts answerer's reading of the miniature world's questions ---------------------------------------------

_C, _S = "|".join(COLOURS), "|".join(SHAPES)
_GRAMMAR = (
    ("present", re.compile(rf"is there an? ({_C}) ({_S})")),
    ("colour", re.compile(rf"what colou?r is the ({_S})")),
    ("shape", re.compile(rf"what shape is the ({_C}) one")),
    ("relation", re.compile(rf"is the ({_C}) ({_S}) ({'|'.join(RELATIONS)}) the ({_C}) ({_S})")),
    ("where", re.compile(rf"where is the ({_C}) ({_S})")),
    ("size", re.compile(rf"is the ({_C}) ({_S}) ({'|'.join(SIZES)})")),
)


def answer_from_scene(scene: Scene, question: str, heard: str = "") -> str | None:
    """What a person looking at ``scene`` says to ``question``; ``None`` where they cannot tell.

    Answers questions only (a text that ends with "?" or starts with an interrogative word; a statement
    gets ``None``). Knows the questions of :func:`genret.world.scene.questions` (presence, colour, shape,
    relation, place, size), the :data:`SCRIPT`, and, by keyword, questions about the left/top or right/bottom object, the
    colours, the shapes, the sizes, where the objects are, and what else there is (the objects ``heard``,
    the dialog so far, does not name yet).

    >>> from genret.world.scene import SceneObject
    >>> s = Scene((SceneObject("circle", "red", "small", 20, 32), SceneObject("square", "blue", "large", 44, 30)),
    ...           "left of")
    >>> answer_from_scene(s, "Is there a blue circle?"), answer_from_scene(s, "Where are the two objects?")
    ('no', 'the red circle is left of the blue square')
    """
    if not _is_question(question):  # a statement, or a caption the questioner said instead of asking: nothing to answer
        return None
    text = " ".join(question.lower().replace("?", " ").split())
    find = lambda c, s: next((o for o in scene.objects if (o.colour, o.shape) == (c, s)), None)  # noqa: E731
    for kind, pattern in _GRAMMAR:
        m = pattern.fullmatch(text)
        if not m:
            continue
        g = m.groups()
        if kind == "present":
            return "yes" if find(*g) else "no"
        if kind in ("colour", "shape"):
            attr, other = ("shape", "colour") if kind == "colour" else ("colour", "shape")
            hits = [o for o in scene.objects if getattr(o, attr) == g[0]]
            if not hits:
                return f"there is no {g[0]}" + (" one" if kind == "shape" else "")
            return " and ".join(getattr(o, other) for o in hits)
        a = find(g[0], g[1])
        if a is None:
            return f"there is no {g[0]} {g[1]}"
        if kind == "size":
            return "yes" if a.size == g[2] else "no"
        other = next(o for o in scene.objects if o is not a)
        rel = scene.relation if a is scene.objects[0] else INVERSE[scene.relation]
        if kind == "where":
            return f"{rel} the {other.noun()}"
        b = find(g[3], g[4])
        return "yes" if b is other and g[2] == rel else "no"
    return _answer_by_keyword(scene, text, heard.lower())


_ASKING = ("what", "which", "where", "how", "is", "are", "does", "do", "can", "who", "tell", "describe")


def _is_question(text: str) -> bool:
    """A question: ends with "?" or starts with an interrogative word (the simulated user answers nothing else)."""
    words = re.findall(r"[a-z]+", text.lower())
    return text.strip().endswith("?") or bool(words and words[0] in _ASKING)


def _answer_by_keyword(scene: Scene, text: str, heard: str) -> str | None:
    facts = scene.facts()
    first, second = ("left object", "right object") if scene.horizontal else ("top object", "bottom object")
    facts["objects"] = f"a {facts[first]} and a {facts[second]}"
    facts["sizes"] = "; ".join(f"the {o.noun()} is {o.size}" for o in scene.objects)
    words = set(re.findall(r"[a-z]+", text))
    if words & {"else", "other"}:
        unheard = [f"a {o.noun(True)}" for o in scene.objects if o.noun() not in heard]
        return " and ".join(unheard) if unheard else "nothing else"
    for keys, fact in (({"where", "relation", "position", "placed"}, "relation"), ({"first", "left", "top"}, first),
                       ({"second", "right", "bottom"}, second), ({"colour", "colours", "color", "colors"}, "colours"),
                       ({"shape", "shapes"}, "shapes"), ({"size", "sizes", "large", "small", "big"}, "sizes"),
                       ({"image", "picture", "see", "objects"}, "objects")):
        if words & keys:
            return facts[fact]
    return None
