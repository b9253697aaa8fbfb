"""A gallery: the searchable items of each modality, with their vector indexes.

On disk, one folder per modality (``images/``, ``texts/``) holding a :class:`VectorIndex` and an
``items.sqlite`` with what a later stage needs to look at each item (the caption, the image path), read per item
(:mod:`genret.index.items`); galleries saved before it have an ``items.json``, still read (whole).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from genret._io import ArtefactError, cached_fingerprint, read_json, write_json
from genret.data.images import ImageLoadError
from genret.index.faiss_index import VectorIndex
from genret.index.items import FILE, ItemStore, write_items
from genret.types import Item

FOLDERS = {"image": "images", "text": "texts"}


@dataclass
class Gallery:
    """Items and indexes by modality (``"image"``, ``"text"``), plus where they came from."""

    indexes: dict[str, VectorIndex] = field(default_factory=dict)
    items: dict[str, Mapping[str, Item]] = field(default_factory=dict)
    source: dict = field(default_factory=dict)

    def index(self, modality: str) -> VectorIndex:
        """The index of ``modality``, with an error that says how to build it."""
        if modality not in self.indexes:
            raise LookupError(f"the pipeline has no {modality} gallery; index one with `genret index build` "
                              "or RetrievalPipeline.index(dataset)")
        return self.indexes[modality]

    def item(self, modality: str, item_id: str) -> Item:
        """One gallery item."""
        return self.items[modality][item_id]

    def save(self, path: str | os.PathLike, root: str | os.PathLike | None = None) -> None:
        """Save every modality's index and items under ``path``.

        Image paths are written relative to the gallery's *image root* (the deepest folder holding every image),
        itself recorded relative to ``root``; each image's content hash is kept with it.

        Args:
            root: the folder the saved gallery will live in (a pipeline's): the image root is written relative
                to it, so the folder loads from any working directory and after a move with its images.
        """
        path = Path(path)
        image_root = _image_root(self.items.values())
        for modality, index in self.indexes.items():
            folder = path / FOLDERS[modality]
            index.save(folder)
            items = self.items[modality]
            write_items(folder / FILE, (items[i] for i in index.ids), partial(_portable, image_root=image_root))
        where = None
        if image_root is not None:
            where = os.path.relpath(image_root, Path(root).resolve()) if root is not None else str(image_root)
        write_json(path / "gallery.json", {"modalities": sorted(self.indexes), "source": self.source,
                                           "image_root": where})

    @classmethod
    def load(cls, path: str | os.PathLike, encoder: dict | None = None, root: str | os.PathLike | None = None,
             mmap: bool = False) -> "Gallery":
        """Load a saved gallery, checking each index against ``encoder`` and its items against the index (the
        same ids in the same order); image paths resolve inside the gallery's image root (relative to ``root``).

        Args:
            mmap: map the faiss indexes' vectors rather than read them (read-only; :meth:`VectorIndex.load`).

        Raises:
            ArtefactError: naming the file, when items and index disagree.
        """
        path = Path(path)
        meta = read_json(path / "gallery.json", what="gallery manifest")
        if not isinstance(meta, dict) or not isinstance(meta.get("modalities"), list):
            raise ArtefactError(f"{path / 'gallery.json'}: not a genret gallery manifest; build the index again")
        gallery = cls(source=meta.get("source", {}))
        base = Path(root).resolve() if root is not None else Path.cwd()
        image_root = meta.get("image_root")
        for modality in meta["modalities"]:
            if modality not in FOLDERS:
                raise ArtefactError(f"{path / 'gallery.json'}: unknown modality {modality!r}; build the index again")
            folder = path / FOLDERS[modality]
            index = gallery.indexes[modality] = load_index(folder, encoder=encoder, mmap=mmap)
            if (folder / FILE).is_file():
                if "image_root" in meta:  # galleries saved since image paths are kept inside an image root
                    resolve = partial(_inside, root=Path(os.path.normpath(base / image_root)) if image_root else None,
                                      file=folder / FILE)
                else:
                    resolve = partial(_resolved, root=root)
                store = ItemStore(folder / FILE, resolve)
                if len(store) != len(index) or list(store) != index.ids:
                    raise ArtefactError(f"{folder / FILE}: its items are not those of the index beside it "
                                        f"({len(store)} items, {len(index)} indexed; ids or order differ): the file "
                                        "was replaced or edited; build the index again")
                gallery.items[modality] = store
            else:  # saved before items.sqlite
                items = [Item(**_resolved(d, root)) for d in read_json(folder / "items.json", what="gallery items")]
                gallery.items[modality] = {it.id: it for it in items}
        return gallery


def _image_root(galleries) -> Path | None:
    """The deepest folder that holds every image of ``galleries`` (resolved), or None when none has images."""
    folders: set[str] = set()
    for items in galleries:
        for item in items.values():
            if item.image:
                folders.add(str(Path(item.image).resolve().parent))
    return Path(os.path.commonpath(sorted(folders))) if folders else None


def _portable(item: dict, image_root: Path | None = None) -> dict:
    if not item.get("image"):
        return item
    image = Path(item["image"]).resolve()
    if not image.is_file():
        raise ImageLoadError(f"gallery item {item.get('id')!r}: its image {image} is gone; index the gallery again")
    digest = item.get("digest") or cached_fingerprint(image)
    return {**item, "image": image.relative_to(image_root).as_posix(), "digest": digest}


def _inside(item: dict, root: Path | None, file: Path) -> dict:
    """An item read back: its image path made absolute under ``root``, refused when it would lead outside it."""
    rel = item.get("image")
    if not rel:
        return item
    full = Path(os.path.normpath(root / rel)) if root is not None and not Path(rel).is_absolute() else None
    if full is None or (full != root and root not in full.parents):
        raise ArtefactError(f"{file}: item {item.get('id')!r} names the image {rel!r}, outside the gallery's images "
                            f"({root}); the file was edited: build the index again")
    if not item.get("digest"):  # every image is saved with its content hash: without one it cannot be checked
        raise ArtefactError(f"{file}: item {item.get('id')!r} has no content hash for its image; the file was edited: "
                            "build the index again")
    return {**item, "image": str(full)}


def _resolved(item: dict, root=None) -> dict:
    if root is None or not item.get("image") or Path(item["image"]).is_absolute():
        return item
    return {**item, "image": os.path.normpath(Path(root).resolve() / item["image"])}


def load_index(folder: Path, encoder: dict | None = None, mmap: bool = False):
    """A saved index of either backend, as its manifest says (faiss's :class:`VectorIndex` or a Qdrant collection)."""
    manifest = read_json(folder / "manifest.json", what="index manifest") if (folder / "manifest.json").is_file() else {}
    if isinstance(manifest, dict) and manifest.get("backend", "faiss") == "qdrant":
        from genret.index.qdrant_index import QdrantIndex

        return QdrantIndex.load(folder, encoder=encoder)
    return VectorIndex.load(folder, encoder=encoder, mmap=mmap)

