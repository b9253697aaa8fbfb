"""Structured annotations a data set's records may carry, and the plug-ins that know them.

A record's ``meta`` can hold more than its captions: the miniature world's ``scene`` (two objects, their colours,
shapes, sizes and relation), a product's attributes, a scene graph. genret's stages and trainers never read such a
structure themselves; they ask the :class:`Annotation` registered under its ``meta`` key in :data:`ANNOTATIONS` (a
plug-in: the miniature world registers ``scene`` from :mod:`genret.world.annotation`). Where a record carries no
known annotation, each caller falls back to what any data set has (its captions, its image id) or says why it cannot.

What an annotation is asked:

- :meth:`~Annotation.signature`: what the image shows; two images of one signature are not each other's negatives;
- :meth:`~Annotation.mention`: a partial description (one part of the image), where a dialog starts;
- :meth:`~Annotation.descriptions`: the complete descriptions (every part named);
- :meth:`~Annotation.questions`: questions about the image with their true answers (instruction tuning);
- :meth:`~Annotation.facts`: named facts, for a simulated user who judges "like the one sought";
- :meth:`~Annotation.edit`: an edit instruction and the annotations it can lead to (composed retrieval);
- :meth:`~Annotation.hard_negative`, :meth:`~Annotation.render`, :meth:`~Annotation.captions`: a copy with one
  attribute changed, drawn as an image, and its captions (contrastive hard negatives);
- :meth:`~Annotation.twins`: the copies that differ only in how the parts are bound or placed (the same words,
  another picture): the negatives that teach a judge to read structure;
- :meth:`~Annotation.sample`: a fresh annotation drawn as the data set draws its own (a generator: unlimited
  training images, rendered on the fly);
- :meth:`~Annotation.attributes`: what the image shows as named classes (``{"first shape": "circle", ...}``):
  the labels of a linear probe, or of a vision tower's auxiliary heads.

A plug-in implements what its data allows; a method it cannot serve raises ``NotImplementedError``.
"""

from __future__ import annotations

import random
from typing import Any, Hashable, Iterator, Mapping, Protocol

from genret.registry import Registry


class Annotation(Protocol):
    """What a plug-in knows of one kind of structured annotation (``record.meta[key]``, JSON-able)."""

    def signature(self, value: Any) -> Hashable:
        """What the image shows: equal for images of the same content."""

    def mention(self, value: Any, rng: random.Random) -> str:
        """A partial description: one part of the image (``"a small red circle"``)."""

    def descriptions(self, value: Any) -> list[str]:
        """The complete descriptions: every part named."""

    def questions(self, value: Any, rng: random.Random) -> list[tuple[str, str]]:
        """``(question, true answer)`` pairs about the image."""

    def facts(self, value: Any) -> dict[str, str]:
        """Named facts of the image (``{"relation": "left of", ...}``)."""

    def edit(self, value: Any, rng: random.Random) -> tuple[str, list[Any]]:
        """An edit instruction drawn for the image and the annotations that satisfy it."""

    def hard_negative(self, value: Any, rng: random.Random) -> Any:
        """The annotation with one attribute changed (a near miss)."""

    def twins(self, value: Any) -> list[Any]:
        """The annotations that name the same parts bound or placed otherwise (none where there is no such)."""

    def render(self, value: Any, size: int, seed: int) -> Any:
        """The annotation drawn as a ``size`` × ``size`` PIL image."""

    def captions(self, value: Any, rng: random.Random, n: int) -> list[str]:
        """``n`` captions of the annotation, as the data set writes them."""

    def sample(self, rng: random.Random, image_size: int) -> Any:
        """A new annotation drawn as the data set's generator draws them, laid out on an ``image_size`` canvas."""

    def attributes(self, value: Any) -> dict[str, str]:
        """The image's attributes as named classes, each read off the image alone (no hidden order or name)."""


ANNOTATIONS: Registry[Annotation] = Registry("annotation kind")
"""Annotation kinds by their ``meta`` key; plug-ins register an instance (``ANNOTATIONS.register("scene")(obj)``)."""


def annotations_of(meta: Mapping[str, Any] | None) -> Iterator[tuple[str, Annotation, Any]]:
    """``(key, annotation, value)`` for each known annotation in ``meta``, in key order."""
    for key in sorted(meta or {}):
        if meta[key] is not None and key in ANNOTATIONS:
            yield key, ANNOTATIONS.get(key), meta[key]


def annotation_of(meta: Mapping[str, Any] | None) -> tuple[str, Annotation, Any] | None:
    """The first known annotation in ``meta`` (:func:`annotations_of`), or ``None``."""
    return next(annotations_of(meta), None)


def signatures(records) -> frozenset:
    """The :meth:`~Annotation.signature` of every record in ``records`` that carries a known annotation: what a
    trainer that draws images anew (fresh images, twins) must never draw, given the held-out splits' records."""
    return frozenset(found[1].signature(found[2]) for r in records if (found := annotation_of(r.meta)))


def not_held_out(kind: Annotation, values, avoid: frozenset) -> list:
    """The annotations of ``values`` whose signature is not in ``avoid`` (the held-out splits' scenes)."""
    return [v for v in values if kind.signature(v) not in avoid] if avoid else list(values)


def draw_avoiding(draw, kind: Annotation, avoid: frozenset, what: str, tries: int = 1000) -> Any:
    """``draw()`` again until its annotation's signature is not in ``avoid`` (a held-out scene); an error naming
    ``what`` after ``tries`` draws (the held-out splits cover what the generator can draw)."""
    for _ in range(tries):
        value = draw()
        if not_held_out(kind, [value], avoid):
            return value
    raise ValueError(f"{what}: {tries} draws in a row showed a held-out scene; the held-out splits cover what the "
                     "generator draws: draw from a larger space or hold out fewer scenes")


def eligible_twins(found: tuple[str, Annotation, Any] | None, avoid: frozenset = frozenset()) -> list[tuple[int, Any]]:
    """``(which, twin)`` for each of an annotation's :meth:`~Annotation.twins` not in ``avoid`` (a held-out scene);
    none where ``found`` (:func:`annotation_of`'s) is ``None`` or its plug-in knows no twins."""
    if found is None:
        return []
    _, kind, value = found
    try:
        return [(k, t) for k, t in enumerate(kind.twins(value)) if kind.signature(t) not in avoid]
    except (NotImplementedError, AttributeError):  # a plug-in that knows no twins
        return []


def check_annotations(meta: Mapping[str, Any] | None, fail) -> None:
    """Read each known annotation in ``meta`` once, as a data set is loaded (its :meth:`~Annotation.signature`), so a
    malformed one (a scene given as a number, an object missing its colour) is named there, by file and entry, not
    deep in a stage or a trainer.

    Args:
        fail: makes the error naming the file and entry (``fail("message")`` returns the exception to raise).
    """
    for key, annotation, value in annotations_of(meta):
        try:
            annotation.signature(value)
        except NotImplementedError:
            continue
        except Exception as err:  # noqa: BLE001 - whatever the plug-in raises on a bad value, named by entry here
            raise fail(f"{key!r} is not a valid {key} annotation ({type(err).__name__}: {str(err)[:120]})") from None


def require_annotation(key: str, what: str) -> Annotation:
    """The annotation registered under ``key``, or a ``ValueError`` that says what needed it."""
    if key not in ANNOTATIONS:
        raise ValueError(f"{what} needs a plug-in that knows the {key!r} annotation (installed: "
                         f"{', '.join(ANNOTATIONS.names()) or 'none'}); install genret with its miniature world, "
                         "or register one in genret.data.annotations.ANNOTATIONS")
    return ANNOTATIONS.get(key)
