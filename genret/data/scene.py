"""Scenes of the miniature world: two coloured shapes in a spatial relation, and the captions they imply.

The scene is the single source of truth: captions, twins, facts for a simulated user and (later)
composed-retrieval edits are all derived from it, never stored beside it.

>>> a = SceneObject("circle", "red", "small", 20.0, 32.0)
>>> b = SceneObject("square", "blue", "large", 44.0, 30.0)
>>> scene = Scene((a, b), "left of")
>>> scene.all_captions()[0]
'a small red circle to the left of a large blue square'
>>> scene.relation_twin().relation
'right of'
>>> scene.signature() == Scene((b, a), "right of").signature()
True
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace
from types import MappingProxyType

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS = MappingProxyType({
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 100, 235),
    "yellow": (235, 215, 40), "purple": (160, 60, 210), "white": (240, 240, 240),
})
SIZES = ("small", "large")
INVERSE = MappingProxyType({"left of": "right of", "right of": "left of", "above": "below", "below": "above"})
RELATIONS = tuple(INVERSE)

# Each relation as a long and a short phrase, so paraphrases vary the wording, not the meaning.
_PHRASES = {"left of": ("to the left of", "left of"), "right of": ("to the right of", "right of"),
            "above": ("above", "over"), "below": ("below", "under")}
# {a}/{b}: "red circle"; {A}/{B}: "small red circle"; {ra}/{rb}: "red one" or "circle", whichever tells the
# two objects apart. Every template names colour and shape of both objects, so none is true of a twin.
_TEMPLATES = (
    "a {A} {near} a {B}",
    "a {a} {short} a {b}",
    "the {a} is {near} the {b}",
    "a {A} is {short} a {B}",
    "the {a} sits {near} the {b}",
    "there is a {a} {near} a {B}",
    "an image of a {A} {short} a {b}",
    "a {a} and a {b}, the {ra} {near} the {rb}",
)
# Said from the side that comes first in reading order (left, top) only, to avoid "on the right and ... on the left".
_SIDES = {"left of": ("on the left", "on the right"), "above": ("at the top", "at the bottom")}
_SIDE_TEMPLATES = (
    "a {A} {first} and a {B} {second}",
    "there is a {a} {first} and a {b} {second}",
)

MAX_CAPTIONS = 2 * len(_TEMPLATES) + len(_SIDE_TEMPLATES)
"""How many distinct captions the templates give for every scene (both orientations of the relation)."""


@dataclass(frozen=True)
class SceneObject:
    """One shape: what it is, and where its centre is (pixels from the top-left corner)."""

    shape: str
    colour: str
    size: str
    x: float
    y: float

    def __post_init__(self) -> None:
        for name, known in (("shape", SHAPES), ("colour", tuple(COLOURS)), ("size", SIZES)):
            if getattr(self, name) not in known:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; known: {', '.join(known)}")

    def noun(self, with_size: bool = False) -> str:
        """``"red circle"``, or ``"small red circle"`` with the size."""
        return f"{self.size} {self.colour} {self.shape}" if with_size else f"{self.colour} {self.shape}"

    def kind(self) -> tuple[str, str, str]:
        """What the object is, regardless of where: (shape, colour, size)."""
        return (self.shape, self.colour, self.size)


@dataclass(frozen=True)
class Scene:
    """Two objects; ``objects[0]`` stands in ``relation`` to ``objects[1]`` (e.g. "left of")."""

    objects: tuple[SceneObject, SceneObject]
    relation: str

    def __post_init__(self) -> None:
        if self.relation not in INVERSE:
            raise ValueError(f"unknown relation {self.relation!r}; known: {', '.join(RELATIONS)}")
        if len(self.objects) != 2:
            raise ValueError(f"a scene holds exactly two objects, got {len(self.objects)}")
        a, b = self.objects
        if (a.shape, a.colour) == (b.shape, b.colour):
            raise ValueError(f"both objects are a {a.noun()}: captions could not tell them apart")

    def to_dict(self) -> dict:
        """Plain JSON-able data: ``{"objects": [{shape, colour, size, x, y}, ...], "relation": ...}``."""
        return {"objects": [asdict(o) for o in self.objects], "relation": self.relation}

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        """Inverse of :meth:`to_dict`."""
        a, b = (SceneObject(**o) for o in data["objects"])
        return cls((a, b), data["relation"])

    def signature(self) -> tuple:
        """What the scene shows, independent of layout jitter and of which object is named first.

        "A left of B" and "B right of A" have the same signature.
        """
        a, b = self.objects
        return min((a.kind(), self.relation, b.kind()), (b.kind(), INVERSE[self.relation], a.kind()))

    def binding_twin(self) -> Scene:
        """The same shapes, sizes and places with the two colours swapped."""
        a, b = self.objects
        return replace(self, objects=(replace(a, colour=b.colour), replace(b, colour=a.colour)))

    def relation_twin(self) -> Scene:
        """The same objects with their places swapped, so the relation inverts."""
        a, b = self.objects
        return Scene((replace(a, x=b.x, y=b.y), replace(b, x=a.x, y=a.y)), INVERSE[self.relation])

    def all_captions(self) -> list[str]:
        """Every distinct caption the templates give for this scene, in a fixed order.

        Returns:
            :data:`MAX_CAPTIONS` captions: each template said both ways round ("A left of B",
            "B right of A"), plus the "on the left ... on the right" forms.
        """
        out: list[str] = []
        for (a, b), rel in ((self.objects, self.relation), (self.objects[::-1], INVERSE[self.relation])):
            near, short = _PHRASES[rel]
            ra, rb = (f"{o.colour} one" for o in (a, b)) if a.colour != b.colour else (a.shape, b.shape)
            words = {"a": a.noun(), "b": b.noun(), "A": a.noun(True), "B": b.noun(True), "near": near,
                     "short": short, "ra": ra, "rb": rb}
            out += [t.format(**words) for t in _TEMPLATES]
            if rel in _SIDES:
                first, second = _SIDES[rel]
                out += [t.format(first=first, second=second, **words) for t in _SIDE_TEMPLATES]
        return list(dict.fromkeys(out))

    def captions(self, rng: random.Random, n: int) -> list[str]:
        """``n`` distinct captions drawn from :meth:`all_captions`.

        Args:
            rng: the source of randomness (the caller's, so a seed fixes the choice).
            n: how many; at most :data:`MAX_CAPTIONS`.

        Returns:
            ``n`` different lower-case captions, each true of this scene.
        """
        pool = self.all_captions()
        if not 1 <= n <= len(pool):
            raise ValueError(f"asked for {n} captions, the templates give 1 to {len(pool)} for this scene")
        return rng.sample(pool, n)

    def facts(self) -> dict[str, str]:
        """Flat facts by place, e.g. ``{"left object": "small red circle", "right object": ..., ...}``."""
        p, q = self._in_reading_order()
        first, second = ("left", "right") if self.horizontal else ("top", "bottom")
        return {f"{first} object": p.noun(True), f"{second} object": q.noun(True),
                "relation": f"the {p.noun()} is {'left of' if self.horizontal else 'above'} the {q.noun()}",
                "colours": f"{p.colour} and {q.colour}", "shapes": f"{p.shape} and {q.shape}"}

    @property
    def horizontal(self) -> bool:
        """Whether the objects stand side by side (left of / right of) rather than one above the other."""
        return self.relation in ("left of", "right of")

    def _in_reading_order(self) -> tuple[SceneObject, SceneObject]:
        a, b = self.objects
        return (a, b) if self.relation in ("left of", "above") else (b, a)


def questions(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """Questions about a scene with their true answers: presence (bound attributes), colour, relation.

    The "no" questions name objects that share words with the scene (the colour of one shape on the
    other shape, the relation inverted), so answering needs binding and order, not word overlap.

    Args:
        scene: the scene asked about.
        rng: picks which object the object-specific questions ask about.

    Returns:
        ``(question, answer)`` pairs; answers are "yes", "no", a colour, a shape or a place.
    """
    a, b = scene.objects
    swapped = f"{b.colour} {a.shape}" if a.colour != b.colour else f"{a.colour} {b.shape}"
    present = rng.choice([a, b])
    other = b if present is a else a
    rel = scene.relation
    out = [
        (f"Is there a {present.noun()}?", "yes"),
        (f"Is there a {swapped}?", "no" if swapped not in (a.noun(), b.noun()) else "yes"),
        (f"What colour is the {present.shape}?", present.colour) if a.shape != b.shape else
        (f"What shape is the {present.colour} one?", present.shape),
        (f"Is the {a.noun()} {rel} the {b.noun()}?", "yes"),
        (f"Is the {a.noun()} {INVERSE[rel]} the {b.noun()}?", "no"),
        (f"Where is the {present.noun()}?", f"{rel if present is a else INVERSE[rel]} the {other.noun()}"),
    ]
    size = rng.choice(SIZES)
    out.append((f"Is the {present.noun()} {size}?", "yes" if size == present.size else "no"))
    return out
