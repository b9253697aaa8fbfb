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

from genret._io import read_json, write_json
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

        Args:
            root: the folder the saved gallery will live in (a pipeline's): image paths are written relative
                to it, so the folder loads from any working directory and after a move with its images.
        """
        path = Path(path)
        for modality, index in self.indexes.items():
            folder = path / FOLDERS[modality]
            index.save(folder)
            items = self.items[modality]
            write_items(folder / FILE, (items[i] for i in index.ids), partial(_portable, root=root))
        write_json(path / "gallery.json", {"modalities": sorted(self.indexes), "source": self.source})

    @classmethod
    def load(cls, path: str | os.PathLike, encoder: dict | None = None, root: str | os.PathLike | None = None,
             mmap: bool = False) -> "Gallery":
        """Load a saved gallery, checking each index against ``encoder`` (relative image paths: against ``root``).

        Args:
            mmap: map the faiss indexes' vectors rather than read them (read-only; :meth:`VectorIndex.load`).
        """
        path = Path(path)
        meta = read_json(path / "gallery.json", what="gallery manifest")
        gallery = cls(source=meta.get("source", {}))
        for modality in meta["modalities"]:
            folder = path / FOLDERS[modality]
            index = gallery.indexes[modality] = load_index(folder, encoder=encoder, mmap=mmap)
            if (folder / FILE).is_file():
                store = ItemStore(folder / FILE, partial(_resolved, root=root))
                if len(store) != len(index):
                    raise ValueError(f"{folder}: {FILE} lists {len(store)} items, the index holds {len(index)}: the "
                                     "folder was modified; build the index again")
                gallery.items[modality] = store
            else:  # saved before items.sqlite
                items = [Item(**_resolved(d, root)) for d in read_json(folder / "items.json", what="gallery items")]
                gallery.items[modality] = {it.id: it for it in items}
        return gallery


def _portable(item: dict, root=None) -> dict:
    if root is None or not item.get("image"):
        return item
    return {**item, "image": os.path.relpath(Path(item["image"]).resolve(), Path(root).resolve())}


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

