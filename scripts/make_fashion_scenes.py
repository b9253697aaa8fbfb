"""A second data set from real images: two Fashion-MNIST items, each tinted a colour, in a relation, in Karpathy format.

    python scripts/make_fashion_scenes.py OUT [--source /usr/share/datasets/fashion-mnist] [--n-train 3000 ...]

The items are real photographs of clothes (Zalando's Fashion-MNIST, 28 x 28 grey; Debian's ``dataset-fashion-mnist``
puts them in ``/usr/share/datasets/fashion-mnist``). Each 64 x 64 image holds two of them on a dark grey canvas,
each tinted one of six colours, one left of (or above) the other; its five captions name both, their colours and
the relation ("a red sneaker to the left of a blue dress", "a blue dress to the right of a red sneaker", ...).
Training images draw their items from Fashion-MNIST's training images, val and test from its test images, so no
item instance of val or test is ever trained on. The test split pairs half its images with a *twin*, as the
miniature world does: the same two items with their colours swapped (binding) or their places swapped
(relation), linked by ``twin_of``, so ``genret eval`` reports how often each stage tells a twin from its image.

Nothing of genret's miniature world is used: the same commands (``genret train clip``, ``genret train mllm``,
``genret train rerank``, ``genret eval``) run on it as on any Karpathy data set. The folder is written whole or
not at all (``genret.json`` is its manifest: the config and the SHA-256 of the four source files).
"""

from __future__ import annotations

import gzip
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

import _scenes
from genret._io import write_json
from genret._swap import atomic_dir

FORMAT = "genret.fashion_scenes"
SOURCE = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
CLASSES = ("t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
           "ankle boot")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 100, 235), "yellow": (235, 215, 40),
           "purple": (160, 60, 210), "white": (240, 240, 240)}
SIZE, ITEM, BACKGROUND = 64, 28, 40


@dataclass(frozen=True)
class FashionConfig:
    n_train: int = 3000
    n_val: int = 200
    n_test: int = 500
    seed: int = 0


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped) as an array: ``(n, 28, 28)`` uint8 images or ``(n,)`` labels.

    Raises:
        ValueError: naming the file, when it is not IDX data of unsigned bytes.
    """
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()}); give the Fashion-MNIST "
                         "files as distributed (apt-get install dataset-fashion-mnist)")
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(data[3])]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * len(dims))
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: the header says {dims} ({int(np.prod(dims))} bytes), the file holds {body.size}")
    return body.reshape(dims)


@dataclass(frozen=True)
class Scene:
    items: tuple[int, int]  # indices into the source images
    classes: tuple[int, int]
    colours: tuple[str, str]
    horizontal: bool  # items[0] left of items[1], else above it
    place: tuple[int, int, int, int]  # x0, y0, x1, y1 of the two items' top-left corners

    def captions(self, rng: random.Random, n: int = 5) -> list[str]:
        a, b = (f"{c} {CLASSES[k]}" for c, k in zip(self.colours, self.classes))
        return _scenes.captions(a, b, self.horizontal, rng, n)

    def to_dict(self) -> dict:
        return {"items": list(self.items), "classes": [CLASSES[k] for k in self.classes], "colours": list(self.colours),
                "relation": "left of" if self.horizontal else "above"}


def sample(rng: random.Random, labels: np.ndarray, pool: list[int]) -> Scene:
    """Two items of different classes, two different colours, a relation and a layout that keeps both whole."""
    while True:
        i, j = rng.sample(pool, 2)
        if labels[i] != labels[j]:
            break
    colours = tuple(rng.sample(list(COLOURS), 2))
    horizontal = rng.random() < 0.5
    gap = rng.randint(0, SIZE - 2 * ITEM - 2)  # the items never overlap along the relation's axis
    lead = rng.randint(0, SIZE - 2 * ITEM - gap)
    cross = [rng.randint(0, SIZE - ITEM) for _ in range(2)]
    if rng.random() < 0.7:  # mostly roughly level, as people stand things
        cross[1] = min(SIZE - ITEM, max(0, cross[0] + rng.randint(-6, 6)))
    along = (lead, lead + ITEM + gap)
    place = (along[0], cross[0], along[1], cross[1]) if horizontal else (cross[0], along[0], cross[1], along[1])
    return Scene((i, j), (int(labels[i]), int(labels[j])), colours, horizontal, place)


def twin(scene: Scene, kind: str) -> Scene:
    """The binding twin (colours swapped between the items) or the relation twin (places swapped)."""
    if kind == "binding":
        return Scene(scene.items, scene.classes, scene.colours[::-1], scene.horizontal, scene.place)
    x0, y0, x1, y1 = scene.place
    return Scene(scene.items[::-1], scene.classes[::-1], scene.colours[::-1], scene.horizontal, (x0, y0, x1, y1))


def render(scene: Scene, images: np.ndarray, seed: int) -> Image.Image:
    """The two items tinted on a dark grey, slightly noisy canvas (each item's grey level is its opacity)."""
    rng = np.random.default_rng(seed)
    canvas = np.full((SIZE, SIZE, 3), BACKGROUND, dtype=np.float32) + rng.integers(-6, 7, (SIZE, SIZE, 1))
    x0, y0, x1, y1 = scene.place
    for idx, colour, (x, y) in zip(scene.items, scene.colours, ((x0, y0), (x1, y1))):
        alpha = images[idx].astype(np.float32)[..., None] / 255.0
        region = canvas[y:y + ITEM, x:x + ITEM]
        canvas[y:y + ITEM, x:x + ITEM] = region * (1 - alpha) + np.array(COLOURS[colour], np.float32) * alpha
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")


def make(out: str | Path, source: str | Path = SOURCE, config: FashionConfig = FashionConfig()) -> Path:
    """Write the data set to ``out`` (``images/``, ``dataset_fashion.json``, ``genret.json``), whole or not at all."""
    source = Path(source)
    missing = [str(source / f) for pair in FILES.values() for f in pair if not (source / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: missing; install Debian's dataset-fashion-mnist (apt-get install "
                                "dataset-fashion-mnist) or pass --source with the four Fashion-MNIST .gz files")
    data = {split: tuple(read_idx(source / f) for f in pair) for split, pair in FILES.items()}
    rng = random.Random(config.seed)
    train_pool = list(range(len(data["train"][1])))
    test_pool = list(range(len(data["test"][1])))
    rng.shuffle(test_pool)
    pools = {"train": train_pool, "val": test_pool[:len(test_pool) // 2], "test": test_pool[len(test_pool) // 2:]}
    plan: list[tuple[str, Scene, int | None, str | None]] = []
    for split, n in (("train", config.n_train), ("val", config.n_val)):
        labels = data["train" if split == "train" else "test"][1]
        plan += [(split, sample(rng, labels, pools[split]), None, None) for _ in range(n)]
    pairs = config.n_test // 4  # half the test images are twin pairs
    for k in range(config.n_test - 2 * pairs):
        plan.append(("test", sample(rng, data["test"][1], pools["test"]), None, None))
    for k in range(pairs):
        base = sample(rng, data["test"][1], pools["test"])
        kind = ("binding", "relation")[k % 2]
        at = len(plan)
        plan += [("test", base, at + 1, kind), ("test", twin(base, kind), at, kind)]
    with atomic_dir(out, (FORMAT,)) as tmp:
        (tmp / "images").mkdir()
        entries, sentid = [], 0
        for imgid, (split, scene, twin_of, kind) in enumerate(plan):
            images = data["train" if split == "train" else "test"][0]
            name = f"{imgid:06d}.png"
            render(scene, images, config.seed * 1_000_003 + imgid).save(tmp / "images" / name)
            caps = scene.captions(random.Random(f"{config.seed}:{imgid}"))
            entries.append(_scenes.entry(imgid, split, caps, sentid, "fashion", scene.to_dict(), twin_of, kind))
            sentid += len(caps)
        write_json(tmp / "dataset_fashion.json", {"dataset": "fashion-scenes", "images": entries})
        write_json(tmp / "genret.json", {"format": FORMAT, "version": 1, "config": asdict(config),
                                         "source": {f: _scenes.sha256(source / f)
                                                    for pair in FILES.values() for f in pair}})
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    return _scenes.main(__doc__, FashionConfig, make, ("--source", SOURCE, "folder of the four Fashion-MNIST .gz files"), argv)


if __name__ == "__main__":
    sys.exit(main())
