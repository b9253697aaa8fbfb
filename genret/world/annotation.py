"""The miniature world's ``scene`` annotation, as genret's stages and trainers ask for it (a plug-in of
:data:`genret.data.annotations.ANNOTATIONS`, registered when :mod:`genret.world.plugins` is imported).

A scene (:class:`~genret.world.scene.Scene`, stored as its dict in ``record.meta["scene"]`` and in ``scenes.json``)
answers every question of the :class:`~genret.data.annotations.Annotation` protocol: its signature, one object as a
partial description, its full captions, its questions and facts, an edit of it, and a shape swap drawn anew.
"""

from __future__ import annotations

import random
from typing import Any, Mapping

from genret.data.annotations import ANNOTATIONS
from genret.world.scene import SHAPES, Scene, questions, sample_edit


def _scene(value: Scene | Mapping[str, Any]) -> Scene:
    return value if isinstance(value, Scene) else Scene.from_dict(dict(value))


def full_captions(scene: Scene) -> list[str]:
    """The scene's captions that name both objects with their sizes (what a complete description says)."""
    return [c for c in scene.all_captions() if all(o.noun(True) in c for o in scene.objects)]


def shape_swap(scene: Scene, rng: random.Random) -> Scene:
    """The scene with one object's shape changed: same colours, sizes and places, so only shape tells them apart
    (as only binding tells a test image from its twin). The new pair stays distinct."""
    k = rng.randrange(2)
    obj, other = scene.objects[k], scene.objects[1 - k]
    shape = rng.choice([s for s in SHAPES if s != obj.shape and (s, obj.colour) != (other.shape, other.colour)])
    objects = list(scene.objects)
    objects[k] = type(obj)(shape, obj.colour, obj.size, obj.x, obj.y)
    return Scene(tuple(objects), scene.relation)


def scene_attributes(scene: Scene) -> dict[str, str]:
    """Each object's shape, colour and size, in reading order (left then right, or top then bottom), and the layout
    (side by side or one above the other): what the image shows, whichever object a caption names first.

    The relation itself ("left of" / "right of") is not an attribute: the same image is "A left of B" and "B right
    of A"; the layout and the reading order say all of it.
    """
    first, second = scene._in_reading_order()
    out = {"layout": "side by side" if scene.horizontal else "one above the other"}
    for place, obj in (("first", first), ("second", second)):
        out.update({f"{place} shape": obj.shape, f"{place} colour": obj.colour, f"{place} size": obj.size})
    return out


class SceneAnnotation:
    """The miniature world's scenes behind :class:`~genret.data.annotations.Annotation`."""

    def signature(self, value) -> tuple:
        """:meth:`Scene.signature` (objects and relation, not the pixel positions)."""
        return _scene(value).signature()

    def mention(self, value, rng: random.Random) -> str:
        """One object, with its size (``"a small red circle"``)."""
        return f"a {rng.choice(_scene(value).objects).noun(with_size=True)}"

    def descriptions(self, value) -> list[str]:
        """:func:`full_captions`."""
        return full_captions(_scene(value))

    def questions(self, value, rng: random.Random) -> list[tuple[str, str]]:
        """:func:`genret.world.scene.questions`."""
        return questions(_scene(value), rng)

    def facts(self, value) -> dict[str, str]:
        """:meth:`Scene.facts`: the two objects, the relation, the colours, the shapes."""
        return _scene(value).facts()

    def edit(self, value, rng: random.Random) -> tuple[str, list[Scene]]:
        """An edit drawn as the world draws its triplets' (:func:`genret.world.scene.sample_edit`)."""
        edit = sample_edit(_scene(value), rng)
        return edit.text, list(edit.targets)

    def hard_negative(self, value, rng: random.Random) -> Scene:
        """:func:`shape_swap`."""
        return shape_swap(_scene(value), rng)

    def render(self, value, size: int, seed: int):
        """:func:`genret.world.synth.render` (the training style)."""
        from genret.world.synth import render

        return render(_scene(value), size, seed)

    def captions(self, value, rng: random.Random, n: int) -> list[str]:
        """:meth:`Scene.captions`."""
        return _scene(value).captions(rng, n)

    def sample(self, rng: random.Random, image_size: int) -> Scene:
        """:func:`genret.world.synth.sample_scene` (as the world draws its training images)."""
        from genret.world.synth import sample_scene

        return sample_scene(rng, image_size)

    def twins(self, value) -> list[Scene]:
        """The binding twin (where the two colours differ) and the relation twin: the scenes the test split pairs
        with this one (drawn anew, they are new pictures of those scenes, not pixel-aligned copies)."""
        scene = _scene(value)
        return [t for t in (scene.binding_twin(), scene.relation_twin()) if t.signature() != scene.signature()]

    def attributes(self, value) -> dict[str, str]:
        """:func:`scene_attributes`."""
        return scene_attributes(_scene(value))


SCENE = ANNOTATIONS.register("scene")(SceneAnnotation())
