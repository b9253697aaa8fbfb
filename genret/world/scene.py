"""Scenes of the miniature world: two coloured shapes in a spatial relation, and the captions they imply.

The scene is the single source of truth: captions, twins, facts for a simulated user and
composed-retrieval edits (:func:`edits`) are all derived from it, never stored beside it.

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


# --- Composed-retrieval edits -------------------------------------------------------------------------------------

EDIT_KINDS = ("colour", "shape", "size", "relation", "open_colour")
"""What an :class:`Edit` changes: one object's colour, shape or size, the relation, or (open) a colour to any other."""

# {ref}/{other}: an unambiguous name of the edited / the other object ("circle" or "red circle").
_EDIT_TEMPLATES = MappingProxyType({
    "colour": ("make the {ref} {colour}", "change the colour of the {ref} to {colour}", "paint the {ref} {colour}",
               "turn the {ref} {colour}"),
    "shape": ("change the {ref} into a {shape}", "turn the {ref} into a {shape}", "make the {ref} a {shape}",
              "replace the {ref} with a {colour} {shape}"),
    "size": ("make the {ref} {size}", "make the {ref} {comparative}", "change the {ref} to a {size} one"),
    "relation": ("put the {ref} {near} the {other}", "move the {ref} {near} the {other}",
                 "place the {ref} {near} the {other}"),
    "swap": ("swap the two objects", "swap the places of the {ref} and the {other}",
             "let the {ref} and the {other} trade places"),
    "open_colour": ("give the {ref} another colour", "change the colour of the {ref}",
                    "make the {ref} a different colour", "recolour the {ref}"),
})
# Mirroring the layout in the diagonal turns a horizontal relation into a vertical one and back.
_TRANSPOSED = MappingProxyType({"left of": "above", "right of": "below", "above": "left of", "below": "right of"})


@dataclass(frozen=True)
class Edit:
    """A modification text for a reference scene and every scene that satisfies it.

    Args:
        kind: one of :data:`EDIT_KINDS`.
        text: the modification, e.g. ``"make the circle green"``; it names objects unambiguously.
        targets: the edited scenes that satisfy the text (one for a closed edit; several for an open
            one, e.g. every other colour). Each keeps the reference's other object and, but for a
            relation edit, the positions; each keeps its two objects distinct.
    """

    kind: str
    text: str
    targets: tuple[Scene, ...]

    def __post_init__(self) -> None:
        if self.kind not in EDIT_KINDS:
            raise ValueError(f"unknown edit kind {self.kind!r}; known: {', '.join(EDIT_KINDS)}")
        if not self.targets:
            raise ValueError(f"edit {self.text!r} has no target scene")

    @property
    def target_captions(self) -> tuple[str, ...]:
        """For each target, its first caption from :meth:`Scene.all_captions` (what a rewriter should say)."""
        return tuple(t.all_captions()[0] for t in self.targets)

    def accepts(self, scene: Scene) -> bool:
        """Whether ``scene`` shows what the edit asks for (its signature is a target's)."""
        return scene.signature() in {t.signature() for t in self.targets}


def edits(scene: Scene, rng: random.Random) -> list[Edit]:
    """Every composed-retrieval edit of a scene, each worded by one of a few templates.

    Colour and shape edits go to every other value that keeps the two objects distinct; size edits flip
    the size; relation edits go to each other relation (the inverse as a swap of places); open colour
    edits ("give the circle another colour") accept every such colour at once.

    Args:
        scene: the reference scene.
        rng: picks each edit's wording and how its objects are named.

    Returns:
        The edits in a fixed order (kind, then object, then value); every one changes the scene.

    Example:
        >>> a = SceneObject("circle", "red", "small", 20.0, 32.0)
        >>> b = SceneObject("square", "blue", "large", 44.0, 30.0)
        >>> e = [e for e in edits(Scene((a, b), "left of"), random.Random(0)) if e.kind == "size"][0]
        >>> e.targets[0].objects[0].size, e.target_captions[0]
        ('large', 'a large red circle to the left of a large blue square')
    """
    out: list[Edit] = []
    for kind in ("colour", "shape"):
        for i, obj in enumerate(scene.objects):
            for value in (tuple(COLOURS) if kind == "colour" else SHAPES):
                target = _changed(scene, i, **{kind: value})
                if target is not None:
                    words = {"ref": _name(scene, i, rng), "colour": obj.colour, "shape": obj.shape, kind: value}
                    out.append(Edit(kind, rng.choice(_EDIT_TEMPLATES[kind]).format(**words), (target,)))
    for i, obj in enumerate(scene.objects):
        size = SIZES[1 - SIZES.index(obj.size)]
        text = rng.choice(_EDIT_TEMPLATES["size"]).format(
            ref=_name(scene, i, rng), size=size, comparative="bigger" if size == "large" else "smaller")
        out.append(Edit("size", text, (_changed(scene, i, size=size),)))
    for relation in RELATIONS:
        if relation != scene.relation:
            out.append(_relation_edit(scene, relation, rng))
    for i, obj in enumerate(scene.objects):
        targets = tuple(t for c in COLOURS if (t := _changed(scene, i, colour=c)) is not None)
        out.append(Edit("open_colour", rng.choice(_EDIT_TEMPLATES["open_colour"]).format(ref=_name(scene, i, rng)),
                        targets))
    return out


def sample_edit(scene: Scene, rng: random.Random, kinds: tuple[str, ...] = EDIT_KINDS) -> Edit:
    """One edit of ``scene``: a kind drawn uniformly from ``kinds``, then one of its edits.

    Drawing the kind first keeps the rarer kinds (size, relation) as common as the others.
    """
    unknown = set(kinds) - set(EDIT_KINDS)
    if unknown or not kinds:
        raise ValueError(f"kinds must be some of {', '.join(EDIT_KINDS)}, got {kinds!r}")
    by_kind: dict[str, list[Edit]] = {}
    for e in edits(scene, rng):
        by_kind.setdefault(e.kind, []).append(e)
    return rng.choice(by_kind[rng.choice([k for k in kinds if k in by_kind])])


def _changed(scene: Scene, i: int, **change: str) -> Scene | None:
    """``scene`` with object ``i`` changed; None when nothing changes or the two objects would look alike."""
    objects = list(scene.objects)
    new = replace(objects[i], **change)
    if new == objects[i]:
        return None
    objects[i] = new
    a, b = objects
    if (a.shape, a.colour) == (b.shape, b.colour):
        return None
    return Scene((a, b), scene.relation)


def _name(scene: Scene, i: int, rng: random.Random) -> str:
    """A name that tells object ``i`` from the other: its shape where the shapes differ (or, by chance, the
    colour and shape), else colour and shape."""
    obj, other = scene.objects[i], scene.objects[1 - i]
    return obj.noun() if obj.shape == other.shape or rng.random() < 0.5 else obj.shape


def _relation_edit(scene: Scene, relation: str, rng: random.Random) -> Edit:
    """Move the objects so that ``objects[0]`` stands in ``relation`` to ``objects[1]``."""
    a, b = scene.objects
    if relation == INVERSE[scene.relation]:
        words = {"ref": _name(scene, 0, rng), "other": _name(scene, 1, rng)}
        return Edit("relation", rng.choice(_EDIT_TEMPLATES["swap"]).format(**words), (scene.relation_twin(),))
    # A square canvas mirrored in its diagonal keeps every margin and gap; swapping places then inverts.
    a, b = (replace(o, x=o.y, y=o.x) for o in (a, b))
    target = Scene((a, b), _TRANSPOSED[scene.relation])
    if target.relation != relation:
        target = target.relation_twin()
    i = rng.randrange(2)  # say it from either object's side: "the circle above the square" or "the square below ..."
    words = {"ref": _name(scene, i, rng), "other": _name(scene, 1 - i, rng),
             "near": _PHRASES[relation if i == 0 else INVERSE[relation]][0]}
    return Edit("relation", rng.choice(_EDIT_TEMPLATES["relation"]).format(**words), (target,))
