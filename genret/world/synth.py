"""The miniature world: a deterministic synthetic image-caption data set in Karpathy format.

Each image (64×64 by default) shows two coloured shapes (circle, square, triangle, star, cross, diamond;
red, green, blue, yellow, purple, white; small or large) on a dark grey, slightly noisy background, one
"left of", "right of", "above" or "below" the other, with paraphrased captions that name the colour and
shape of both objects and the relation. :class:`~genret.world.scene.Scene` is the single source of truth;
captions are derived from it and it is saved with each image.

The test split is built so that a model must read structure, not a bag of words:

- *Twins*: about ``twin_fraction`` of the test images come in pairs, alternately a *binding* twin (the
  two colours swapped between the shapes; shapes, sizes and places kept) and a *relation* twin (the two
  objects' places swapped, so the relation inverts). Twins are drawn with the same rotations, radii and
  background noise, so their pixels differ only where the swap shows. Every caption of one twin is false
  of the other, yet uses the same words.
- *Val twins too*: ``val_twin_fraction`` of the val images come in pairs the same way (each pair a val scene
  and its twin), so that recipes and fusion weights are chosen on a split that asks what test asks.
- *Unseen combinations*: no test scene signature (the two objects' shape, colour and size plus the
  relation, whichever object is named first) occurs in train or val, and no val signature occurs in train.
- *Drawn differently*: training shapes are rotated by at most 12° and filled flat; test shapes are rotated
  by 12°–24° (either way) and get a darker outline, a rendering training never shows. Circles, which
  rotation leaves alike, differ by the outline. Val is drawn like test, so that choosing a model on val
  measures what test measures.

Deterministic: the same config gives byte-identical JSON and PNG files; each image is drawn from its own
seed, taken in order from ``random.Random(config.seed)``.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import asdict, dataclass, field, replace
from math import cos, pi, radians, sin
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from genret._io import write_json
from genret._swap import atomic_dir
from genret.world.scene import (COLOURS, MAX_CAPTIONS, RELATIONS, SHAPES, SIZES, Edit, Scene, SceneObject, edits,
                                sample_edit)

logger = logging.getLogger(__name__)

VERSION = 4
"""Bumped whenever the same config would give a different world (layout, drawing, captions, triplets).

Version 3 added the composed-retrieval triplets (``cirr/``); its Karpathy part (images and captions) is
byte-identical to version 2's for the same sizes and seed. Version 4 gave val its twins (``val_twin_fraction``),
drawn from their own random stream after every split is planned: train and test are byte-identical to version
2's, val keeps its first image of each pair and the val triplets change with it."""

TWIN_KINDS = ("binding", "relation")

# Geometry in pixels of a 64-px canvas, scaled with image_size. Nominal radii give objects ~10-14 px
# (small) and ~18-24 px (large) across; no shape reaches further than _EXTENT nominal radii from its centre.
_RADIUS = {"small": (5.0, 7.0), "large": (9.0, 12.0)}
_EXTENT = 1.2
_MARGIN = 1.0  # clear space between a shape's farthest point and the canvas edge
_GAP = 3.0  # clear space between the two shapes along the relation's axis
_CROSS_JITTER = 3.0  # each centre's offset across the relation's axis: the objects stay roughly level
_BACKGROUND, _NOISE = 40, 6


@dataclass(frozen=True)
class _Style:
    rotation: tuple[float, float]  # range of |angle| in degrees
    outline: bool


_STYLES = {"train": _Style((0.0, 12.0), outline=False), "test": _Style((12.0, 24.0), outline=True)}
_SPLIT_STYLE = {"train": "train", "val": "test", "test": "test"}
_CIR_FIELDS = ("cir_train", "cir_val", "cir_test")


@dataclass(frozen=True)
class SynthConfig:
    """Size, resolution and seed of a miniature world."""

    n_train: int = field(default=3000, metadata={"help": "training images"})
    n_val: int = field(default=200, metadata={"help": "validation images"})
    n_test: int = field(default=500, metadata={"help": "test images (twins included)"})
    image_size: int = field(default=64, metadata={"help": "image side in pixels (at least 32)"})
    captions_per_image: int = field(default=5, metadata={"help": f"distinct captions per image (1 to {MAX_CAPTIONS})"})
    twin_fraction: float = field(default=0.5, metadata={"help": "fraction of test images that come in twin pairs"})
    val_twin_fraction: float = field(default=0.5, metadata={"help": "fraction of val images that come in twin "
                                                                    "pairs"})
    seed: int = field(default=0, metadata={"help": "random seed; the same seed gives the same files"})
    cir_train: int = field(default=2000, metadata={"help": "composed-retrieval triplets on train images (cirr/; "
                                                           "at most one per image, 0: none)"})
    cir_val: int = field(default=100, metadata={"help": "composed-retrieval triplets on val images"})
    cir_test: int = field(default=400, metadata={"help": "composed-retrieval triplets on test images"})

    def __post_init__(self) -> None:
        for name in ("n_train", "n_val", "n_test", "image_size", "captions_per_image", "seed", *_CIR_FIELDS):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in ("n_train", "n_val", "n_test", *_CIR_FIELDS):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.n_train + self.n_val + self.n_test == 0:
            raise ValueError("n_train, n_val and n_test are all 0: nothing to generate")
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32, got {self.image_size}")
        if not 1 <= self.captions_per_image <= MAX_CAPTIONS:
            raise ValueError(f"captions_per_image must be in 1..{MAX_CAPTIONS} (the distinct captions the "
                             f"templates give), got {self.captions_per_image}")
        for name in ("twin_fraction", "val_twin_fraction"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def sample_scene(rng: random.Random, image_size: int = 64, distinct: bool = False) -> Scene:
    """A random scene whose relation holds clearly, laid out on an ``image_size`` canvas.

    Both objects fit at either place, so a relation twin (places swapped) stays on the canvas too.

    Args:
        rng: the source of randomness.
        image_size: canvas side in pixels.
        distinct: make the objects differ in shape *and* colour (what a binding twin needs).

    Returns:
        The scene, positions rounded to 0.01 px.
    """
    s, k = float(image_size), image_size / 64
    while True:
        (sa, ca), (sb, cb) = ((rng.choice(SHAPES), rng.choice(tuple(COLOURS))) for _ in range(2))
        if (sa, ca) != (sb, cb) and not (distinct and (sa == sb or ca == cb)):
            break
    size_a, size_b, relation = rng.choice(SIZES), rng.choice(SIZES), rng.choice(RELATIONS)
    a, b = (SceneObject(shape, colour, size, 0.0, 0.0) for shape, colour, size in ((sa, ca, size_a), (sb, cb, size_b)))
    return _laid_out(Scene((a, b), relation), rng, image_size)


def _laid_out(scene: Scene, rng: random.Random, image_size: int) -> Scene:
    """``scene`` with new positions at which its relation holds clearly and either object fits at either place."""
    (a, b), relation, s, k = scene.objects, scene.relation, float(image_size), image_size / 64
    ea, eb = (_EXTENT * _RADIUS[o.size][1] * k for o in (a, b))
    edge = max(ea, eb) + _MARGIN * k
    gap = ea + eb + _GAP * k
    # Along the relation's axis: objects[0] first (left or top), a clear gap, then objects[1].
    first = rng.uniform(edge, s - edge - gap)
    second = rng.uniform(first + gap, s - edge)
    if relation in ("right of", "below"):
        first, second = s - first, s - second
    jitter = _CROSS_JITTER * k
    across = rng.uniform(edge + jitter, s - edge - jitter)
    pos = [(first, across + rng.uniform(-jitter, jitter)), (second, across + rng.uniform(-jitter, jitter))]
    if relation in ("above", "below"):
        pos = [(x, y) for y, x in pos]
    a, b = (replace(o, x=round(x, 2), y=round(y, 2)) for o, (x, y) in zip((a, b), pos))
    return Scene((a, b), relation)


def fits(scene: Scene, image_size: int) -> bool:
    """Whether ``scene`` draws whole on an ``image_size`` canvas with its relation clear (a clear gap between the
    objects along the relation's axis), as every sampled scene does."""
    (a, b), k, tol = scene.objects, image_size / 64, 0.02  # positions are rounded to 0.01 px
    reach = [_EXTENT * _RADIUS[o.size][1] * k for o in (a, b)]
    for o, e in zip((a, b), reach):
        if not all(e + _MARGIN * k - tol <= c <= image_size - e - _MARGIN * k + tol for c in (o.x, o.y)):
            return False
    along = (b.x - a.x) if scene.horizontal else (b.y - a.y)
    sign = 1 if scene.relation in ("left of", "above") else -1
    return sign * along >= sum(reach) + _GAP * k - tol


def fit(scene: Scene, rng: random.Random, image_size: int) -> Scene:
    """``scene`` itself when it :func:`fits`, else the same objects and relation laid out anew.

    A size edit can make an object too large for the place it had; every other edit keeps a fitting layout.
    """
    return scene if fits(scene, image_size) else _laid_out(scene, rng, image_size)


def _ring(n: int, radius: float, start: float = -pi / 2) -> list[tuple[float, float]]:
    return [(radius * cos(start + 2 * pi * i / n), radius * sin(start + 2 * pi * i / n)) for i in range(n)]


def _outline(shape: str, r: float) -> list[tuple[float, float]]:
    """Polygon points around (0, 0), y down; no point further than ``_EXTENT * r``."""
    if shape == "square":
        return _ring(4, 1.16 * r, pi / 4)
    if shape == "diamond":
        return [(0, -1.2 * r), (0.8 * r, 0), (0, 1.2 * r), (-0.8 * r, 0)]
    if shape == "triangle":
        return _ring(3, 1.2 * r)
    if shape == "star":
        outer, inner = _ring(5, 1.2 * r), _ring(5, 0.5 * r, -pi / 2 + pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "cross":
        w, e = 0.4 * r, 1.1 * r
        return [(-w, -e), (w, -e), (w, -w), (e, -w), (e, w), (w, w), (w, e), (-w, e), (-w, w), (-e, w), (-e, -w),
                (-w, -w)]
    raise ValueError(f"no outline for shape {shape!r}")


def render(scene: Scene, image_size: int, seed: int, style: str = "train") -> Image.Image:
    """Draw a scene on a dark grey, slightly noisy background.

    Args:
        scene: what to draw; positions are in pixels of this canvas.
        image_size: canvas side in pixels.
        seed: fixes the noise and each object's radius and rotation; objects draw their jitter in the
            order of ``scene.objects``, so twins drawn from one seed look alike but for the swap.
        style: ``"train"`` (rotation up to 12°, flat fill) or ``"test"`` (rotation 12°–24°, darker outline).

    Returns:
        An RGB image of ``image_size`` × ``image_size``.
    """
    if style not in _STYLES:
        raise ValueError(f"unknown style {style!r}; known: {', '.join(_STYLES)}")
    look, k = _STYLES[style], image_size / 64
    rng = random.Random(seed)
    noise = np.random.default_rng(rng.getrandbits(64)).integers(-_NOISE, _NOISE + 1, size=(image_size, image_size, 1))
    img = Image.fromarray(np.repeat(_BACKGROUND + noise, 3, axis=2).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    width = max(1, round(k))
    for obj in scene.objects:
        r = rng.uniform(*_RADIUS[obj.size]) * k
        angle = radians(rng.uniform(*look.rotation) * rng.choice((-1, 1)))
        fill = COLOURS[obj.colour]
        line = tuple(int(c * 0.55) for c in fill) if look.outline else None
        if obj.shape == "circle":
            draw.ellipse([obj.x - r, obj.y - r, obj.x + r, obj.y + r], fill=fill, outline=line, width=width)
        else:
            c, s = cos(angle), sin(angle)
            points = [(obj.x + px * c - py * s, obj.y + px * s + py * c) for px, py in _outline(obj.shape, r)]
            draw.polygon(points, fill=fill, outline=line, width=width)
    return img


@dataclass(frozen=True)
class _Planned:
    split: str
    scene: Scene
    captions: tuple[str, ...]
    seed: int
    twin_of: int | None = None
    twin_kind: str | None = None


def _plan(config: SynthConfig, rng: random.Random) -> list[_Planned]:
    """Every image's split, scene, captions, drawing seed and twin, in train, val, test order.

    Test is sampled first so that val and train can avoid its signatures.
    """
    size, n_caps = config.image_size, config.captions_per_image
    offset = config.n_train + config.n_val
    n_pairs = min(config.n_test // 2, int(config.n_test * config.twin_fraction / 2 + 0.5))
    test: list[_Planned] = []
    for pair in range(n_pairs):
        kind = TWIN_KINDS[pair % 2]
        # A binding twin of a scene whose objects share a shape or a colour would be the scene itself.
        base = sample_scene(rng, size, distinct=kind == "binding")
        twin = base.binding_twin() if kind == "binding" else base.relation_twin()
        seed, i = rng.getrandbits(32), offset + len(test)
        test += [_Planned("test", base, tuple(base.captions(rng, n_caps)), seed, i + 1, kind),
                 _Planned("test", twin, tuple(twin.captions(rng, n_caps)), seed, i, kind)]
    while len(test) < config.n_test:
        scene = sample_scene(rng, size)
        test.append(_Planned("test", scene, tuple(scene.captions(rng, n_caps)), rng.getrandbits(32)))
    taken = {p.scene.signature() for p in test}
    val = _avoiding("val", config.n_val, taken, rng, config)
    taken |= {p.scene.signature() for p in val}
    train = _avoiding("train", config.n_train, taken, rng, config)
    return train + _val_twins(val, config, taken | {p.scene.signature() for p in train}) + test


def _val_twins(val: list[_Planned], config: SynthConfig, taken: set) -> list[_Planned]:
    """``val`` with every second image of its first ``val_twin_fraction`` replaced by the twin of the one before
    (binding and relation alternately), where that twin's signature is in no split; from its own random stream, so
    that the splits planned before are unchanged."""
    rng = random.Random(f"genret-val-twins-{config.seed}")
    out, offset = list(val), config.n_train
    n_pairs = min(len(val) // 2, int(len(val) * config.val_twin_fraction / 2 + 0.5))
    taken = taken | {p.scene.signature() for p in val}
    for pair in range(n_pairs):
        base = out[2 * pair]
        for kind in (TWIN_KINDS[pair % 2], TWIN_KINDS[1 - pair % 2]):
            twin = base.scene.binding_twin() if kind == "binding" else base.scene.relation_twin()
            if twin.signature() not in taken:
                break
        else:  # both twins' signatures are taken (a binding twin of a scene sharing a shape is itself): keep it
            continue
        taken.add(twin.signature())
        i = offset + 2 * pair
        out[2 * pair] = replace(base, twin_of=i + 1, twin_kind=kind)
        out[2 * pair + 1] = _Planned("val", twin, tuple(twin.captions(rng, config.captions_per_image)), base.seed,
                                     i, kind)
    return out


def _avoiding(split: str, n: int, taken: set, rng: random.Random, config: SynthConfig) -> list[_Planned]:
    out: list[_Planned] = []
    misses = 0
    while len(out) < n:
        scene = sample_scene(rng, config.image_size)
        if scene.signature() in taken:
            misses += 1
            if misses > 10_000:  # ~10k signatures exist; test and val can only exhaust them if huge
                raise ValueError(f"cannot find {split} scenes unseen in the later splits: n_test and n_val "
                                 f"({config.n_test}, {config.n_val}) leave almost no signature free")
            continue
        misses = 0
        out.append(_Planned(split, scene, tuple(scene.captions(rng, config.captions_per_image)),
                            rng.getrandbits(32)))
    return out


def _entry(imgid: int, name: str, planned: _Planned, first_sentid: int) -> dict:
    """One Karpathy image entry, with the scene and twin link the miniature world adds."""
    sentids = list(range(first_sentid, first_sentid + len(planned.captions)))
    entry = {"filename": name, "filepath": "images", "split": planned.split, "imgid": imgid, "sentids": sentids,
             "sentences": [{"raw": raw, "tokens": raw.replace(",", " ").split(), "imgid": imgid, "sentid": sid}
                           for sid, raw in zip(sentids, planned.captions)],
             "scene": planned.scene.to_dict()}
    if planned.twin_of is not None:
        entry["twin_of"], entry["twin_kind"] = planned.twin_of, planned.twin_kind
    return entry


def generate_world(out_dir: str | os.PathLike, config: SynthConfig = SynthConfig(), progress: bool = True) -> Path:
    """Write the miniature world: ``images/NNNNNN.png``, ``cirr/`` and, last, ``dataset_synth.json`` (Karpathy format).

    ``cirr/`` holds the composed-retrieval triplets in the CIRR layout (see :func:`_write_cirr`); it is
    left out when every ``cir_*`` count is 0. The world is written as one artefact (:func:`genret._swap.atomic_dir`):
    a new folder that replaces ``out_dir`` once complete, so an interrupted run never leaves a JSON that points to
    missing or half-written images, and files of the user's in ``out_dir`` refuse the write (``--overwrite``:
    kept beside the world).

    Args:
        out_dir: the folder to write (created if needed).
        config: sizes, resolution and seed.
        progress: show a progress bar while rendering.

    Returns:
        The path of ``dataset_synth.json``.
    """
    out = Path(out_dir)
    with atomic_dir(out, ("genret.world",)) as tmp:
        images_dir = tmp / "images"
        images_dir.mkdir()
        plan = _plan(config, random.Random(config.seed))
        entries, sentid = [], 0
        for imgid, planned in enumerate(tqdm(plan, desc="render world", unit="img", disable=not progress)):
            name = f"{imgid:06d}.png"
            _save_png(render(planned.scene, config.image_size, planned.seed, _SPLIT_STYLE[planned.split]),
                      images_dir / name)
            entries.append(_entry(imgid, name, planned, sentid))
            sentid += len(planned.captions)
        _write_cirr(tmp / "cirr", config, plan, progress)
        provenance = {"generator": "genret.world.synth", "version": VERSION, "config": asdict(config)}
        write_json(tmp / "dataset_synth.json", {"dataset": "synth", "genret": provenance, "images": entries})
        write_json(tmp / "manifest.json", {"format": "genret.world", "version": VERSION})
    logger.info("wrote %d images (%d train, %d val, %d test, %d twin pairs) to %s", len(entries), config.n_train,
                config.n_val, config.n_test, sum(p.twin_of is not None for p in plan) // 2, out)
    return out / "dataset_synth.json"


def _save_png(img: Image.Image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")  # not mkstemp: that would make the image unreadable to others (0600)
    try:
        img.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --- Composed-retrieval triplets in the CIRR layout ----------------------------------------------------------------

_SCENES = "scenes.json"
_CIRR_VERSION = "rc2"  # CIRR's own release tag, so that CIRR readers find cap.rc2.<split>.json
_NEAR_MISSES = 2


@dataclass(frozen=True)
class _Shown:
    """A rendered image of a CIR split: its name, scene and drawing seed."""

    name: str
    scene: Scene
    seed: int


def _write_cirr(folder: Path, config: SynthConfig, plan: list[_Planned], progress: bool) -> None:
    """Write the composed-retrieval triplets of every split to ``folder`` in the CIRR layout (none: no folder).

    Layout (paths in ``image_splits`` are relative to ``img_raw/``, as in CIRR)::

        captions/cap.rc2.<split>.json     [{pairid, reference, target_hard, target_soft, caption, img_set,
                                            edit_kind, target_caption}, ...]
        image_splits/split.rc2.<split>.json  {name: "./<split>/<name>.png" or "../../images/NNNNNN.png"}
        img_raw/<split>/<name>.png        the rendered targets and near misses
        scenes.json                       {name: scene} for every image of every split (genret's extension)

    Each triplet's reference is a distinct image of the world's split, named by its Karpathy ``imgid``
    and not copied: ``image_splits`` points at ``images/`` two folders up. Its targets (1 for a closed
    edit, 2-3 of the valid scenes for an open one) and two near misses (a target with one more thing
    changed) are drawn anew in the split's style. ``target_soft`` scores 1.0 for every image of the split,
    rendered or not, that shows a valid target scene. ``edit_kind`` and ``target_caption`` (the first
    caption of ``target_hard``'s scene) are genret's additions to CIRR's keys.
    """
    counts = {}
    for split in ("train", "val", "test"):
        wanted, have = getattr(config, f"cir_{split}"), sum(p.split == split for p in plan)
        counts[split] = min(wanted, have)
        if have < wanted:
            logger.info("cir_%s: %d triplets, not %d: one per %s image", split, have, wanted, split)
    if not any(counts.values()):
        return
    with atomic_dir(folder, ("genret.cirr",)) as tmp:
        scenes: dict[str, dict] = {}
        pairid = 0
        for split, n in counts.items():
            if n == 0:
                continue
            world = [(str(imgid), p) for imgid, p in enumerate(plan) if p.split == split]
            rng = random.Random(f"genret.cirr:{config.seed}:{split}")
            triplets = [_cir_triplet(pairid + j, split, name, planned.scene, rng, config.image_size)
                        for j, (name, planned) in enumerate(sorted(rng.sample(world, n), key=lambda w: int(w[0])))]
            pairid += n
            (tmp / "img_raw" / split).mkdir(parents=True)
            paths = {name: f"../../images/{int(name):06d}.png" for name, _ in world}
            shown = {name: planned.scene for name, planned in world}
            style = _SPLIT_STYLE[split]
            for t in tqdm(triplets, desc=f"render cirr {split}", unit="triplet", disable=not progress):
                for image in t["targets"] + t["near"]:
                    _save_png(render(image.scene, config.image_size, image.seed, style),
                              tmp / "img_raw" / split / f"{image.name}.png")
                    paths[image.name], shown[image.name] = f"./{split}/{image.name}.png", image.scene
            by_signature: dict[tuple, list[str]] = {}
            for name, scene in shown.items():
                by_signature.setdefault(scene.signature(), []).append(name)
            entries = [_cirr_entry(t, by_signature, rng) for t in triplets]
            write_json(tmp / "image_splits" / f"split.{_CIRR_VERSION}.{split}.json", paths)
            write_json(tmp / "captions" / f"cap.{_CIRR_VERSION}.{split}.json", entries)
            scenes.update((name, scene.to_dict()) for name, scene in shown.items())
            logger.info("cirr %s: %d triplets, %d gallery images", split, n, len(paths))
        write_json(tmp / _SCENES, scenes)
        write_json(tmp / "manifest.json", {"format": "genret.cirr", "version": _CIRR_VERSION})


def _cir_triplet(pairid: int, split: str, reference: str, scene: Scene, rng: random.Random, image_size: int) -> dict:
    """Plan one triplet: the edit of the reference scene, the targets to draw and the near misses."""
    edit = sample_edit(scene, rng)
    valid = edit.targets if len(edit.targets) == 1 else rng.sample(edit.targets, min(len(edit.targets),
                                                                                    rng.randint(2, 3)))
    # Targets and near misses are new pictures, as in CIRR: the same objects and relation, laid out anew, so that
    # the reference's layout alone does not find them.
    targets = [_Shown(f"{split}-{pairid:06d}-t{j}", _laid_out(t, rng, image_size), rng.getrandbits(32))
               for j, t in enumerate(valid)]
    near = [_Shown(f"{split}-{pairid:06d}-n{j}", _laid_out(m, rng, image_size), rng.getrandbits(32))
            for j, m in enumerate(_near_misses(scene, edit, valid[0], rng))]
    return {"pairid": pairid, "reference": reference, "edit": edit, "targets": targets, "near": near}


def _near_misses(reference: Scene, edit: Edit, target: Scene, rng: random.Random) -> list[Scene]:
    """Scenes one change away from ``target`` that satisfy neither the edit nor equal the reference.

    One changes the edited attribute again (so the text is needed: it looks like the reference with
    another change), one changes something else (so the reference is needed: the text alone fits it),
    where the edit allows both.
    """
    taken = {t.signature() for t in edit.targets} | {reference.signature()}
    edited = _differences(reference, target)
    again: dict[tuple, Scene] = {}
    other: dict[tuple, Scene] = {}
    for e in edits(target, rng):
        if e.kind == "open_colour":
            continue
        miss = e.targets[0]
        if miss.signature() not in taken:
            (again if _differences(target, miss) <= edited else other).setdefault(miss.signature(), miss)
    pools = [list(again.values()), list(other.values())]
    out = [rng.choice(pool) for pool in pools if pool]
    rest = [m for pool in pools for m in pool if m not in out]
    out += rng.sample(rest, max(0, _NEAR_MISSES - len(out)))
    return out[:_NEAR_MISSES]


def _differences(a: Scene, b: Scene) -> set[tuple]:
    """What differs between two scenes whose objects correspond by index: (index, attribute) and ("relation",)."""
    out = {(i, attr) for i, (p, q) in enumerate(zip(a.objects, b.objects))
           for attr in ("shape", "colour", "size") if getattr(p, attr) != getattr(q, attr)}
    return out | ({("relation",)} if a.relation != b.relation else set())


def _cirr_entry(triplet: dict, by_signature: dict[tuple, list[str]], rng: random.Random) -> dict:
    """One CIRR caption entry (with genret's ``edit_kind`` and ``target_caption``)."""
    edit, hard = triplet["edit"], triplet["targets"][0]
    soft = {name: 1.0 for t in edit.targets for name in by_signature.get(t.signature(), ())}
    members = [triplet["reference"]] + [i.name for i in triplet["targets"] + triplet["near"]]
    rng.shuffle(members)  # as in CIRR, a member's place says nothing
    return {"pairid": triplet["pairid"], "reference": triplet["reference"], "target_hard": hard.name,
            "target_soft": dict(sorted(soft.items())), "caption": edit.text,
            "img_set": {"id": triplet["pairid"], "members": members,
                        "reference_rank": members.index(triplet["reference"]),
                        "target_rank": members.index(hard.name)},
            "edit_kind": edit.kind, "target_caption": hard.scene.all_captions()[0]}
