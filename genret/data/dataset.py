"""Image-caption data sets: Karpathy JSON (Flickr30K, MS-COCO, the miniature world) and JSONL.

A *dataset* is a list of images, each with its captions and split. Text items get ids
``"<image id>#<j>"`` so the image a caption belongs to is always known.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Literal, Mapping, Sequence

from genret.data.annotations import check_annotations
from genret.data.entries import DatasetError, Entry, file_problem, read_json_file, read_jsonl_lines
from genret.data.images import probe_image
from genret.types import Item, Query

logger = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
TRAIN_SPLITS = ("train", "restval")
"""Karpathy's COCO file calls part of its training data ``restval``; training uses both."""

# Where the usual downloads keep their images, relative to the folder of the annotation file.
_IMAGE_DIRS = ("", "images", "flickr30k-images", "flickr30k_images", "Images", "Flicker8k_Dataset")


@dataclass(frozen=True)
class ImageRecord:
    """One image and its captions.

    Args:
        id: the image id (Karpathy ``imgid`` or JSONL ``id``), as a string.
        path: the resolved image file.
        split: ``train``, ``val``, ``test`` or ``restval``.
        captions: the image's captions.
        meta: anything else the entry carried (for the miniature world: ``scene``, ``twin_of``).
    """

    id: str
    path: Path
    split: str
    captions: tuple[str, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    def caption_ids(self) -> list[str]:
        """The ids of this image's captions."""
        return [f"{self.id}#{j}" for j in range(len(self.captions))]


@dataclass(frozen=True)
class Dataset:
    """A loaded data set: its name, source file and image records."""

    name: str
    source: Path
    records: tuple[ImageRecord, ...]

    def __len__(self) -> int:
        return len(self.records)

    def split(self, *names: str) -> "Dataset":
        """The records of the given splits (``split("train")`` also takes Karpathy's ``restval``)."""
        wanted = set(names)
        if "train" in wanted:
            wanted.update(TRAIN_SPLITS)
        records = tuple(r for r in self.records if r.split in wanted)
        if not records:
            have = sorted({r.split for r in self.records})
            raise DatasetError(f"{self.source}: no images in split {'/'.join(names)}; splits present: {have}")
        return replace(self, records=records)

    def image_items(self) -> list[Item]:
        """Every image as a gallery item."""
        return [Item(id=r.id, modality="image", image=str(r.path)) for r in self.records]

    def text_items(self) -> list[Item]:
        """Every caption as a gallery item, grouped by its image."""
        return [
            Item(id=cid, modality="text", text=text, group=r.id)
            for r in self.records
            for cid, text in zip(r.caption_ids(), r.captions)
        ]

    def text_queries(self) -> tuple[list[Query], list[set[str]]]:
        """Text→image queries (every caption) and, for each, the set of relevant image ids."""
        queries = [Query(id=item.id, text=item.text, target="image") for item in self.text_items()]
        return queries, [{q.id.rsplit("#", 1)[0]} for q in queries]

    def image_queries(self) -> tuple[list[Query], list[set[str]]]:
        """Image→text queries (every image) and, for each, the ids of its captions."""
        queries = [Query(id=r.id, image=str(r.path), target="text") for r in self.records]
        return queries, [set(r.caption_ids()) for r in self.records]

    def by_id(self) -> dict[str, ImageRecord]:
        """Records keyed by image id."""
        return {r.id: r for r in self.records}


def load_dataset(
    path: str | os.PathLike, image_root: str | os.PathLike | None = None, on_error: OnError = "raise"
) -> Dataset:
    """Load a Karpathy JSON file, a JSONL file, or a directory holding one of them.

    Args:
        path: ``dataset_*.json`` (Karpathy), ``*.jsonl``, or a directory that holds exactly one of them.
        image_root: where the images are; default the annotation file's folder (the usual
            Flickr30K/COCO layouts beneath it are found: ``flickr30k-images/``, ``val2014/``...).
        on_error: ``"raise"`` stops at the first bad entry; ``"skip"`` drops bad entries (missing
            image file, empty captions) with one warning that counts them.

    Returns:
        The dataset, with every image path resolved and checked to exist.
    """
    path = Path(path)
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if path.is_dir():
        path = _find_annotation_file(path)
    elif path.is_symlink() and not path.exists():
        raise DatasetError(f"dataset: {file_problem(path)}")
    elif not path.exists():
        raise FileNotFoundError(f"dataset not found: {path} (give a dataset_*.json, a .jsonl, or a folder with one)")
    root = Path(image_root) if image_root is not None else path.parent
    if not root.is_dir():
        raise FileNotFoundError(f"image root not found: {root}")
    skipped: list[str] = []
    if path.suffix == ".jsonl":
        name, entries = path.stem, _read_jsonl(path, skipped if on_error == "skip" else None)
    else:
        name, entries = _read_karpathy(path)
    karpathy = path.suffix != ".jsonl"
    records: list[ImageRecord] = []
    for where, entry in entries:
        try:
            records.append(_make_record(path, where, entry, root, karpathy))
        except DatasetError as err:
            if on_error == "raise":
                raise
            skipped.append(str(err))
    if on_error == "skip":  # an image that exists but does not decode goes too, with its captions (no stray queries)
        readable = []
        for record in records:
            problem = unreadable_reason(record.path)
            if problem:
                skipped.append(f"{path}: image {record.id}: {problem}")
            else:
                readable.append(record)
        records = readable
    if skipped:
        shown = "; ".join(skipped[:5]) + (f"; and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        logger.warning("%s: skipped %d bad entries (--on-error skip): %s", path, len(skipped), shown)
    if not records:
        raise DatasetError(f"{path}: no usable images" + (f" ({len(skipped)} skipped)" if skipped else ""))
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DatasetError(f"{path}: image id {dup!r} appears more than once")
    return Dataset(name=name, source=path, records=tuple(records))


def unreadable_reason(path: Path) -> str | None:
    """Why an image file cannot be used, naming it, or None when it can (:func:`genret.data.images.probe_image`:
    the checks that need no full decode)."""
    return probe_image(path)


def _find_annotation_file(folder: Path) -> Path:
    found, problems = [], []
    for pattern in ("dataset_*.json", "*.jsonl"):
        for candidate in sorted(folder.glob(pattern)):
            problem = file_problem(candidate)
            if problem:  # e.g. a symlink loop beside the real file: named, and not taken for it
                logger.warning("%s: skipped %s", folder, problem)
                problems.append(problem)
            else:
                found.append(candidate)
        if found:
            break
    if len(found) != 1:
        what = "none" if not found else ", ".join(p.name for p in found)
        raise FileNotFoundError(f"{folder}: expected one dataset_*.json or *.jsonl file, found {what}"
                                + (f" (skipped: {'; '.join(problems)})" if problems and not found else ""))
    return found[0]


def _read_karpathy(path: Path) -> tuple[str, list[tuple[str, dict]]]:
    data = read_json_file(path, what="dataset file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path}: not a Karpathy-format file (expected an object with an 'images' list)")
    if not data["images"]:
        raise DatasetError(f"{path}: the 'images' list is empty")
    name = data.get("dataset")
    name = name if isinstance(name, str) and name else path.stem.removeprefix("dataset_")
    return name, [(f"images[{i}]", entry) for i, entry in enumerate(data["images"])]


def _read_jsonl(path: Path, skipped: list[str] | None = None) -> list[tuple[str, dict]]:
    """The entries of a JSONL file; a line that is not UTF-8 or not JSON raises, or with a ``skipped`` list is noted
    there and left out."""
    entries = [(f"line {lineno}", value) for lineno, value in read_jsonl_lines(path, skipped)]
    if not entries and not skipped:
        raise DatasetError(f"{path}: the file is empty")
    return entries


_KARPATHY_FIELDS = ("filename", "filepath", "sentences", "split", "sentids")
_JSONL_FIELDS = ("image", "captions", "split", "id")


def _make_record(path: Path, where: str, entry: Any, root: Path, karpathy: bool) -> ImageRecord:
    def fail(msg: str) -> DatasetError:
        return DatasetError(f"{path}: {where}: {msg}")

    e = Entry(entry, fail)
    if karpathy:
        rel = e.name("filename")
        sub = e.name("filepath") if e.data.get("filepath") else ""
        image_id = e.id("imgid") if "imgid" in e else e.id("cocoid", where)
        if "sentences" not in e:
            raise fail("missing 'sentences' (a Karpathy entry lists its captions as [{\"raw\": \"...\"}, ...])")
        sentences = e.data["sentences"]
        if not isinstance(sentences, list):
            raise fail(f"'sentences' is {'null' if sentences is None else type(sentences).__name__}, not a list of "
                       "{\"raw\": \"...\"} objects")
        raw = []
        for j, sentence in enumerate(sentences):
            if isinstance(sentence, dict) and "raw" not in sentence:
                raise fail(f"sentences[{j}] has no 'raw' text (got {json.dumps(sentence)[:60]})")
            raw.append(sentence.get("raw") if isinstance(sentence, dict) else sentence)
        captions = Entry({"sentences": raw}, fail).texts("sentences")
        meta = e.rest(*_KARPATHY_FIELDS)
    else:  # JSONL
        rel = e.name("image")
        sub = ""
        image_id = e.id("id", rel)
        captions = e.texts("captions")
        meta = e.rest(*_JSONL_FIELDS)
    if not captions:
        raise fail("has no captions")
    split = e.name("split", "train")
    check_annotations(meta, fail)
    return ImageRecord(id=image_id, path=_resolve_image(path, where, root, sub, rel), split=split,
                       captions=captions, meta=meta)


def _resolve_image(path: Path, where: str, root: Path, sub: str, rel: str) -> Path:
    if os.path.isabs(rel):
        candidates: Iterable[Path] = [Path(rel)]
    else:
        candidates = [root / sub / rel] + [root / d / rel for d in _IMAGE_DIRS]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    for candidate in candidates:  # a link there that leads nowhere: say so, not "not found"
        if candidate.is_symlink():
            raise DatasetError(f"{path}: {where}: image {rel}: {file_problem(candidate)}")
    raise DatasetError(
        f"{path}: {where}: image file not found: {rel} (looked under {root}; pass the image folder as image_root)"
    )
