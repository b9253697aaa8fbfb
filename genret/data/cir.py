"""Composed image retrieval (CIR) data: triplets of a reference image, a modification text and its targets.

Two layouts are read as they are downloaded, without conversion:

- **CIRR** (and the miniature world's ``cirr/``): ``captions/cap.<ver>.<split>.json``, a list of
  ``{"pairid", "reference", "target_hard", "target_soft": {name: score}, "caption", "img_set": {"id",
  "members"}}``, and ``image_splits/split.<ver>.<split>.json``, ``{name: "./relative/path.png"}``, relative
  to ``img_raw/`` (the official layout) or to the folder itself or its parent (the layout CLIP4Cir and
  SEARLE use). Splits: ``train``, ``val``, ``test1`` (``test`` finds ``test1``). The valid targets are
  ``target_hard`` and every ``target_soft`` image scored 1.0 (CIRR's annotators' "yes"; 0.5 "maybe" and
  -1 "no" are not). CIRR's official R@K counts ``target_hard`` alone: it is kept in ``meta["target_hard"]``.
  ``test1`` hides its targets; its triplets load with none.
- **CIRCO**: ``annotations/<split>.json``, a list of ``{"id", "reference_img_id", "target_img_id",
  "relative_caption", "shared_concept", "gt_img_ids"}`` (``val``; ``test`` has no targets), over the
  COCO 2017 unlabeled images ``COCO2017_unlabeled/unlabeled2017/<file_name>``, whose ids are listed in
  ``COCO2017_unlabeled/annotations/image_info_unlabeled2017.json``. The valid targets are ``gt_img_ids``.

Image ids are strings: the CIRR name, or the CIRCO (COCO) id.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

from genret.data.annotations import check_annotations
from genret.data.dataset import OnError
from genret.data.entries import DatasetError, Entry, as_id, file_problem, read_json_file
from genret.types import Item, Query

logger = logging.getLogger(__name__)

FORMATS = ("cirr", "circo")
_CIRCO_IMAGES = Path("COCO2017_unlabeled") / "unlabeled2017"
_CIRCO_INFO = Path("COCO2017_unlabeled") / "annotations" / "image_info_unlabeled2017.json"


@dataclass(frozen=True)
class Triplet:
    """One composed query and its ground truth.

    Args:
        id: the query id (CIRR ``pairid``, CIRCO ``id``), as a string.
        reference: the reference image's id.
        modification: the text that says how the target differs from the reference.
        targets: every valid target image id; empty where the split hides them (CIRR ``test1``, CIRCO test).
        subset: CIRR's ``img_set`` members (reference included), for R_subset@K; empty if none.
        meta: anything else, e.g. ``target_hard``, ``edit_kind``, ``target_caption``, ``shared_concept``.
    """

    id: str
    reference: str
    modification: str
    targets: tuple[str, ...]
    subset: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))


@dataclass
class CIRSet:
    """The triplets of one split and the gallery they are searched in.

    Args:
        name: the data set's name (its folder's name).
        source: the annotation file the triplets came from.
        split: the split loaded.
        format: ``"cirr"`` or ``"circo"``.
        triplets: the queries, in file order.
        images: the split's gallery, image id -> file.
        scenes: image id -> scene dict, from the miniature world's ``scenes.json`` (empty elsewhere).
    """

    name: str
    source: Path
    split: str
    format: str
    triplets: list[Triplet]
    images: dict[str, Path]
    scenes: dict[str, dict] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.triplets)

    def queries(self) -> tuple[list[Query], list[set[str]]]:
        """Image+text queries (one per triplet, searching images) and, for each, its valid target ids."""
        queries = [Query(id=t.id, text=t.modification, image=str(self.images[t.reference]), target="image")
                   for t in self.triplets]
        return queries, [set(t.targets) for t in self.triplets]

    def gallery_items(self) -> list[Item]:
        """Every gallery image as an item."""
        return [Item(id=name, modality="image", image=str(path)) for name, path in self.images.items()]

    def subsets(self) -> list[set[str]]:
        """For each triplet, the ids of its CIRR ``img_set`` without the reference (what R_subset@K ranks)."""
        return [set(t.subset) - {t.reference} for t in self.triplets]


def load_cir(
    path: str | os.PathLike, split: str = "val", image_root: str | os.PathLike | None = None,
    on_error: OnError = "raise",
) -> CIRSet:
    """Load one split of a CIRR or CIRCO folder (the format is told by the folder's contents).

    Args:
        path: the CIRR folder (holding ``captions/`` and ``image_splits/``, or ``cirr/`` holding them,
            such as the miniature world's folder) or the CIRCO folder (holding ``annotations/`` and
            ``COCO2017_unlabeled/``).
        split: ``train``, ``val`` or ``test`` (CIRR's ``test1``); CIRCO has ``val`` and ``test``.
        image_root: where the images are, when not where the layout puts them.
        on_error: ``"raise"`` stops at the first bad triplet; ``"skip"`` drops bad triplets (a missing
            key, an empty modification, a reference or target outside the gallery) and gallery images
            whose file is missing, with one warning that counts them.

    Returns:
        The split's triplets and gallery, every image file checked to exist.

    Raises:
        FileNotFoundError: the folder, an annotation file or the image folder is not where it should be.
        DatasetError: a malformed file or (with ``on_error="raise"``) a bad triplet, naming file and entry.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"CIR data set folder not found: {path}")
    root = Path(image_root) if image_root is not None else None
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"image root not found: {root}")
    for folder in (path, path / "cirr"):
        if (folder / "captions").is_dir() and (folder / "image_splits").is_dir():
            return _load_cirr(folder, split, root, on_error, name=path.name)
    if (path / "annotations").is_dir() and (path / "COCO2017_unlabeled").is_dir():
        return _load_circo(path, split, root, on_error)
    raise FileNotFoundError(
        f"{path}: not a CIR data set folder: expected CIRR's captions/ and image_splits/ (here or under cirr/) "
        "or CIRCO's annotations/ and COCO2017_unlabeled/")


# --- CIRR ---------------------------------------------------------------------------------------------------------

def _load_cirr(folder: Path, split: str, root: Path | None, on_error: OnError, name: str) -> CIRSet:
    split_file = _one_file(folder / "image_splits", "split.*.{}.json", split)
    captions = _one_file(folder / "captions", "cap.*.{}.json", split)
    split = captions.name.split(".")[-2]  # "test" may have found "test1"
    paths = read_json_file(split_file, what="CIRR image split file")
    if not isinstance(paths, dict) or not all(isinstance(v, str) for v in paths.values()):
        raise DatasetError(f"{split_file}: expected an object mapping image names to relative paths")
    if not paths:
        raise DatasetError(f"{split_file}: lists no images")
    roots = [root] if root is not None else [folder / "img_raw", folder, folder.parent]
    base = next((r for r in roots if (r / next(iter(paths.values()))).is_file()), None)
    if base is None:
        first, rel = next(iter(paths.items()))
        raise FileNotFoundError(
            f"{split_file}: image {first!r} ({rel}) not found under {' or '.join(str(r) for r in roots)}; "
            "pass the folder its paths are relative to as image_root")
    images, skipped = _existing(split_file, {k: Path(os.path.normpath(base / v)) for k, v in paths.items()}, on_error)
    entries = read_json_file(captions, what="CIRR captions file")
    if not isinstance(entries, list):
        raise DatasetError(f"{captions}: expected a list of triplets")
    triplets = _parse(captions, entries, (split_file, images), on_error, skipped, _cirr_triplet)
    scenes_file = folder / "scenes.json"
    scenes = read_json_file(scenes_file, what="scene file") if scenes_file.is_file() or scenes_file.is_symlink() else {}
    if not isinstance(scenes, dict) or not all(isinstance(v, dict) for v in scenes.values()):
        raise DatasetError(f"{scenes_file}: expected an object mapping image names to scenes")
    for name, scene in scenes.items():
        check_annotations({"scene": scene}, lambda msg, name=name: DatasetError(f"{scenes_file}: {name!r}: {msg}"))
    return CIRSet(name=name, source=captions, split=split, format="cirr", triplets=triplets, images=images,
                  scenes={k: v for k, v in scenes.items() if k in images})


def _one_file(folder: Path, pattern: str, split: str) -> Path:
    found = sorted(p for p in folder.glob(pattern.format(split)) if not p.name.startswith("cap.ext."))
    if not found and split == "test":
        return _one_file(folder, pattern, "test1")
    if len(found) != 1:
        what = "none" if not found else ", ".join(p.name for p in found)
        have = sorted({p.name.split(".")[-2] for p in folder.glob(pattern.format("*"))})
        raise FileNotFoundError(f"{folder}: expected one {pattern.format(split)} file, found {what} "
                                f"(splits here: {', '.join(have) or 'none'})")
    return found[0]


def _cirr_triplet(entry: Entry) -> Triplet:
    soft = entry.table("target_soft", {})
    hard = entry.optional_id("target_hard")
    targets = ([hard] if hard is not None else []) + [as_id(n, f"target_soft key {n!r}", entry.fail)
                                                      for n, s in soft.items() if _score(s, entry.fail) >= 1.0]
    members = Entry(entry.table("img_set", {}), entry.fail, "img_set.").ids("members", ())
    meta = entry.rest("pairid", "reference", "caption", "target_soft", "img_set")
    if hard is not None:
        meta["target_hard"] = hard
    return Triplet(id=entry.id("pairid"), reference=entry.id("reference"), modification=entry.text("caption"),
                   targets=tuple(dict.fromkeys(targets)), subset=members, meta=meta)


def _score(value: Any, fail: Callable[[str], DatasetError]) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(f"'target_soft' score {value!r} is not a number")
    return float(value)


# --- CIRCO --------------------------------------------------------------------------------------------------------

def _load_circo(folder: Path, split: str, root: Path | None, on_error: OnError) -> CIRSet:
    annotations = folder / "annotations" / f"{split}.json"
    if not annotations.is_file():
        have = sorted(p.stem for p in (folder / "annotations").glob("*.json"))
        raise FileNotFoundError(f"CIRCO annotations not found: {annotations} "
                                f"(splits here: {', '.join(have) or 'none'})")
    image_dir = root if root is not None else folder / _CIRCO_IMAGES
    if not image_dir.is_dir():
        raise FileNotFoundError(f"CIRCO images not found: expected the COCO 2017 unlabeled images in {image_dir}")
    info = folder / _CIRCO_INFO
    if info.is_file():
        data = read_json_file(info, what="COCO image info file")
        listed = data.get("images") if isinstance(data, dict) else None
        if not isinstance(listed, list):
            raise DatasetError(f"{info}: expected an object with an 'images' list")
        files = {}
        for i, image in enumerate(listed):
            def fail(msg: str, i: int = i) -> DatasetError:
                return DatasetError(f"{info}: images[{i}]: {msg} (expected an object with 'id' and 'file_name')")

            image = Entry(image, fail)
            files[image.id("id")] = image_dir / image.name("file_name")
    else:  # the images without COCO's list: their names are the zero-padded ids
        logger.info("%s not found: the gallery is every .jpg in %s", info, image_dir)
        files = {str(int(p.stem)): p for p in sorted(image_dir.glob("*.jpg")) if p.stem.isdigit()}
        info = image_dir
    if not files:
        raise DatasetError(f"{info}: lists no images")
    images, skipped = _existing(info, files, on_error)
    entries = read_json_file(annotations, what="CIRCO annotations file")
    if not isinstance(entries, list):
        raise DatasetError(f"{annotations}: expected a list of queries")
    triplets = _parse(annotations, entries, (info, images), on_error, skipped, _circo_triplet)
    return CIRSet(name=folder.name, source=annotations, split=split, format="circo", triplets=triplets,
                  images=images)


def _circo_triplet(entry: Entry) -> Triplet:
    target = entry.optional_id("target_img_id")
    targets = ([target] if target is not None else []) + list(entry.ids("gt_img_ids", ()))
    meta = entry.rest("id", "reference_img_id", "relative_caption", "gt_img_ids", "target_img_id")
    if target is not None:
        meta["target_hard"] = target
    return Triplet(id=entry.id("id"), reference=entry.id("reference_img_id"),
                   modification=entry.text("relative_caption"), targets=tuple(dict.fromkeys(targets)), meta=meta)


# --- shared -------------------------------------------------------------------------------------------------------

def _existing(source: Path, files: dict[str, Path], on_error: OnError) -> tuple[dict[str, Path], list[str]]:
    """The gallery images whose file exists; a missing one raises, or is counted as skipped."""
    images, skipped = {}, []
    for name, file in files.items():
        if file.is_file():
            images[name] = file
            continue
        problem = f"file not found: {file}" if not file.is_symlink() else file_problem(file)
        if on_error == "raise":
            raise DatasetError(f"{source}: image {name!r}: {problem}")
        skipped.append(f"{source}: image {name!r}: {problem}")
    return images, skipped


def _parse(source: Path, entries: list, gallery: tuple[Path, dict[str, Path]], on_error: OnError,
           skipped: list[str], make: Callable[[Entry], Triplet]) -> list[Triplet]:
    """Triplets from the file's entries, each checked against the gallery (its list file and images)."""
    listing, images = gallery
    triplets: list[Triplet] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        where = f"{source}: entry {i}"
        if isinstance(entry, dict) and ("pairid" in entry or "id" in entry):
            where += f" (id {str(entry.get('pairid', entry.get('id')))[:40]})"

        def fail(msg: str, where: str = where) -> DatasetError:
            return DatasetError(f"{where}: {msg}")

        try:
            triplet = make(Entry(entry, fail))
            if triplet.id in seen:
                raise fail(f"query id {triplet.id!r} appears more than once")
            for role, ids in (("reference", (triplet.reference,)), ("target", triplet.targets),
                              ("img_set member", triplet.subset)):
                missing = [x for x in ids if x not in images]
                if missing:
                    raise fail(f"{role} {missing[0]!r} is not in the split's gallery ({listing})")
        except DatasetError as err:
            if on_error == "raise":
                raise
            skipped.append(str(err))
            continue
        seen.add(triplet.id)
        triplets.append(triplet)
    if skipped:
        logger.warning("%s: skipped %d bad entries; first: %s", source, len(skipped), skipped[0])
    if not triplets:
        raise DatasetError(f"{source}: no usable triplets" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return triplets
