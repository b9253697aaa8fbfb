"""A third data set from real images: two emoji, each small or large, in a relation, in Karpathy format.

    python scripts/make_emoji_scenes.py OUT [--font /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf] [--n-train 3000 ...]

The items are Google's Noto Color Emoji drawings (Debian's ``fonts-noto-color-emoji``), of things that Unicode draws
twice: a cat (U+1F408 CAT and U+1F431 CAT FACE), a dog, a car (AUTOMOBILE and ONCOMING AUTOMOBILE), an apple (red and
green), ... Training scenes show each thing's first drawing, val and test its second, so no drawing of val or test is
ever trained on: a model must know a cat when it sees another picture of one. Each 64 x 64 image holds two different
things on a dark grey, slightly noisy canvas, each small or large and turned a little, one left of (or above) the
other; its five captions name both, their sizes and the relation ("a small cat to the left of a large bus").

Half the val and half the test images come in *twin* pairs, as in the miniature world: the same two drawings with
their sizes swapped (binding) or their places swapped (relation), linked by ``twin_of``, so ``genret eval`` reports
how often each stage tells a twin from its image, and recipes chosen on val face the same question.

Nothing of genret's miniature world is used: the same commands run on it as on any Karpathy data set. The folder is
written whole or not at all (``genret.json`` is its manifest: the config and the font file's SHA-256).
"""

from __future__ import annotations

import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import _scenes
from genret._io import write_json
from genret._swap import atomic_dir

FORMAT = "genret.emoji_scenes"
FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
# Each thing and its two drawings: (training, held-out).
THINGS = {"cat": (0x1F408, 0x1F431), "dog": (0x1F415, 0x1F436), "mouse": (0x1F401, 0x1F42D),
          "rabbit": (0x1F407, 0x1F430), "cow": (0x1F404, 0x1F42E), "pig": (0x1F416, 0x1F437),
          "tiger": (0x1F405, 0x1F42F), "horse": (0x1F40E, 0x1F434), "monkey": (0x1F412, 0x1F435),
          "dragon": (0x1F409, 0x1F432), "whale": (0x1F40B, 0x1F433), "chicken": (0x1F414, 0x1F413),
          "car": (0x1F697, 0x1F698), "bus": (0x1F68C, 0x1F68D), "taxi": (0x1F695, 0x1F696),
          "police car": (0x1F693, 0x1F694), "train": (0x1F686, 0x1F682), "apple": (0x1F34E, 0x1F34F),
          "book": (0x1F4D5, 0x1F4D8)}
SIZES = {"small": (14, 16), "large": (22, 24)}  # an item's side in pixels
CANVAS, BACKGROUND, TURN = 64, 40, 10.0
# Half the extent of the largest item turned by TURN: every layout fits whichever item stands where (twins swap them).
REACH = int(np.ceil(max(SIZES["large"]) * (np.cos(np.radians(TURN)) + np.sin(np.radians(TURN))) / 2))


@dataclass(frozen=True)
class EmojiConfig:
    n_train: int = 3000
    n_val: int = 200
    n_test: int = 500
    seed: int = 0


@dataclass(frozen=True)
class Scene:
    things: tuple[str, str]
    sizes: tuple[str, str]
    horizontal: bool  # things[0] left of things[1], else above it
    place: tuple[int, int, int, int]  # x0, y0, x1, y1: the two items' centres
    turns: tuple[float, float]  # degrees
    sides: tuple[int, int]  # pixels, within each size's range

    def captions(self, rng: random.Random, n: int = 5) -> list[str]:
        a, b = (f"{s} {t}" for s, t in zip(self.sizes, self.things))
        return _scenes.captions(a, b, self.horizontal, rng, n)

    def signature(self) -> tuple:
        """What the captions say: which thing, how big, is left of (or above) which (``things[0]`` always is)."""
        return self.things, self.sizes, self.horizontal

    def to_dict(self) -> dict:
        return {"things": list(self.things), "sizes": list(self.sizes),
                "relation": "left of" if self.horizontal else "above"}


def sample(rng: random.Random) -> Scene:
    """Two different things, two different sizes, a relation and a layout that keeps both whole and apart."""
    things = tuple(rng.sample(sorted(THINGS), 2))
    sizes = tuple(rng.sample(sorted(SIZES), 2))
    sides = tuple(rng.randint(*SIZES[s]) for s in sizes)
    horizontal = rng.random() < 0.5
    first = rng.randint(REACH, CANVAS - 3 * REACH - 2)  # centres along the relation's axis, 2 px apart at least
    second = rng.randint(first + 2 * REACH + 2, CANVAS - REACH)
    cross = rng.randint(REACH, CANVAS - REACH)
    other = min(CANVAS - REACH, max(REACH, cross + rng.randint(-5, 5)))  # roughly level
    place = (first, cross, second, other) if horizontal else (cross, first, other, second)
    turns = tuple(rng.uniform(-TURN, TURN) for _ in range(2))
    return Scene(things, sizes, horizontal, place, turns, sides)


def twin(scene: Scene, kind: str) -> Scene:
    """The binding twin (the sizes swapped between the things) or the relation twin (the places swapped)."""
    if kind == "binding":
        return Scene(scene.things, scene.sizes[::-1], scene.horizontal, scene.place, scene.turns, scene.sides[::-1])
    return Scene(scene.things[::-1], scene.sizes[::-1], scene.horizontal, scene.place, scene.turns[::-1],
                 scene.sides[::-1])


class Drawings:
    """Every thing's two drawings, cut out of the font once (RGBA, cropped to the drawing)."""

    def __init__(self, font: Path) -> None:
        face = ImageFont.truetype(str(font), 109)  # the one size Noto Color Emoji's bitmaps come in
        self.art: dict[tuple[str, int], Image.Image] = {}
        for thing, points in THINGS.items():
            for which, point in enumerate(points):
                im = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
                ImageDraw.Draw(im).text((8, 8), chr(point), font=face, embedded_color=True)
                box = im.getbbox()
                if box is None:
                    raise ValueError(f"{font}: draws nothing for U+{point:X} ({thing}); use Debian's "
                                     "fonts-noto-color-emoji")
                self.art[thing, which] = im.crop(box)

    def item(self, thing: str, which: int, side: int, turn: float) -> Image.Image:
        art = self.art[thing, which]
        scale = side / max(art.size)
        art = art.resize((max(1, round(art.width * scale)), max(1, round(art.height * scale))), Image.LANCZOS)
        return art.rotate(turn, resample=Image.BICUBIC, expand=True)


def render(scene: Scene, drawings: Drawings, which: int, seed: int) -> Image.Image:
    """The two items on a dark grey, slightly noisy canvas."""
    rng = np.random.default_rng(seed)
    noise = np.full((CANVAS, CANVAS, 3), BACKGROUND, dtype=np.int16) + rng.integers(-6, 7, (CANVAS, CANVAS, 1))
    canvas = Image.fromarray(noise.clip(0, 255).astype(np.uint8), "RGB")
    x0, y0, x1, y1 = scene.place
    for thing, side, turn, (x, y) in zip(scene.things, scene.sides, scene.turns, ((x0, y0), (x1, y1))):
        art = drawings.item(thing, which, side, turn)
        canvas.paste(art, (x - art.width // 2, y - art.height // 2), art)
    return canvas


def plan(config: EmojiConfig) -> list[tuple[str, Scene, int | None, str | None]]:
    """Every image's split, scene and twin (train, val, test order). Val and test scenes say nothing a training
    scene says (their signatures are unseen), and each twin pair's two scenes are both new."""
    rng = random.Random(config.seed)
    out: list[tuple[str, Scene, int | None, str | None]] = []
    taken: set = set()

    def fresh() -> Scene:
        for _ in range(100_000):
            scene = sample(rng)
            if scene.signature() not in taken:
                return scene
        raise ValueError(f"cannot find {config.n_val + config.n_test} held-out scenes unseen elsewhere; "
                         "lower --n-val or --n-test")

    held: dict[str, list] = {}
    for split, n in (("test", config.n_test), ("val", config.n_val)):  # held-out scenes first, as the world does
        rows: list = []
        pairs = n // 4  # half the images are twin pairs
        for k in range(pairs):
            kind = ("binding", "relation")[k % 2]
            base = fresh()
            taken.add(base.signature())
            other = twin(base, kind)
            if other.signature() in taken:
                continue
            taken.add(other.signature())
            rows.append((split, base, 1, kind))
            rows.append((split, other, -1, kind))
        while len(rows) < n:
            scene = fresh()
            taken.add(scene.signature())
            rows.append((split, scene, None, None))
        held[split] = rows
    train, misses = [], 0
    while len(train) < config.n_train:
        scene = sample(rng)
        if scene.signature() not in taken:
            train.append(("train", scene, None, None))
        else:
            misses += 1
            if misses > 100_000:
                raise ValueError("the held-out splits take almost every scene: lower --n-val or --n-test")
    for split_rows in (train, held["val"], held["test"]):
        for split, scene, step, kind in split_rows:
            at = len(out)
            out.append((split, scene, None if step is None else at + step, kind))
    return out


def make(out: str | Path, font: str | Path = FONT, config: EmojiConfig = EmojiConfig()) -> Path:
    """Write the data set to ``out`` (``images/``, ``dataset_emoji.json``, ``genret.json``), whole or not at all."""
    font = Path(font)
    if not font.is_file():
        raise FileNotFoundError(f"{font}: missing; install Debian's fonts-noto-color-emoji (apt-get install "
                                "fonts-noto-color-emoji) or pass --font with NotoColorEmoji.ttf")
    try:
        drawings = Drawings(font)
    except OSError as err:
        raise ValueError(f"{font}: not a font Pillow can read ({err}); give Noto Color Emoji's .ttf") from None
    scenes = plan(config)
    with atomic_dir(out, (FORMAT,)) as tmp:
        (tmp / "images").mkdir()
        entries, sentid = [], 0
        for imgid, (split, scene, twin_of, kind) in enumerate(scenes):
            name = f"{imgid:06d}.png"
            which = 0 if split == "train" else 1
            seed = config.seed * 1_000_003 + (imgid if twin_of is None else min(imgid, twin_of))  # twins: one noise
            render(scene, drawings, which, seed).save(tmp / "images" / name)
            caps = scene.captions(random.Random(f"{config.seed}:{imgid}"))
            meta = {**scene.to_dict(), "drawings": [f"U+{THINGS[t][which]:X}" for t in scene.things]}
            entries.append(_scenes.entry(imgid, split, caps, sentid, "emoji", meta, twin_of, kind))
            sentid += len(caps)
        write_json(tmp / "dataset_emoji.json", {"dataset": "emoji-scenes", "images": entries})
        write_json(tmp / "genret.json", {"format": FORMAT, "version": 1, "config": asdict(config),
                                         "font": {"file": font.name, "sha256": _scenes.sha256(font)}})
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    return _scenes.main(__doc__, EmojiConfig, make, ("--font", FONT, "Noto Color Emoji's .ttf"), argv)


if __name__ == "__main__":
    sys.exit(main())
