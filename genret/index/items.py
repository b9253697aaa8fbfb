"""A gallery's item metadata in SQLite: read one item at a time, never the whole list into memory.

``items.sqlite`` holds one row per item (``row`` = its position in the index, ``id``, and the item as JSON), written
in batches to a temporary file and renamed, so a million-image gallery's metadata costs no memory to open and a
lookup by id is one B-tree probe. :class:`ItemStore` is a read-only ``Mapping[str, Item]`` over it, safe to share
between threads (each thread opens its own read-only connection).

Example::

    write_items("gallery/images/items.sqlite", items)
    store = ItemStore("gallery/images/items.sqlite")
    store["img042"].image
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict
from pathlib import Path

from genret._io import ArtefactError, atomic_path, cached_fingerprint
from genret.types import Item

FILE = "items.sqlite"
SCHEMA = "CREATE TABLE items (row INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, item TEXT NOT NULL)"


def write_items(path: str | os.PathLike, items: Iterable[Item], transform: Callable[[dict], dict] | None = None,
                batch: int = 10_000) -> int:
    """Write ``items`` in order (their row is their position), atomically; returns how many were written."""
    count = 0
    with atomic_path(path) as tmp:
        tmp.unlink()  # sqlite makes its own file
        db = sqlite3.connect(str(tmp))
        try:
            db.execute(SCHEMA)
            rows: list[tuple] = []
            for item in items:
                record = asdict(item)
                rows.append((count, item.id, json.dumps(transform(record) if transform else record, ensure_ascii=False)))
                count += 1
                if len(rows) >= batch:
                    db.executemany("INSERT INTO items VALUES (?, ?, ?)", rows)
                    rows = []
            db.executemany("INSERT INTO items VALUES (?, ?, ?)", rows)
            db.commit()
        finally:
            db.close()
    return count


class ItemStore(Mapping):
    """Item id → :class:`Item`, read from ``items.sqlite`` as asked for.

    Args:
        path: the file :func:`write_items` wrote.
        transform: applied to each stored record before it becomes an :class:`Item` (e.g. resolving image paths).

    Raises:
        ValueError: naming the file, when it is not a genret item table.
    """

    def __init__(self, path: str | os.PathLike, transform: Callable[[dict], dict] | None = None) -> None:
        self.path = Path(path)
        self.transform = transform
        self._local = threading.local()
        try:
            self._len = self._db().execute("SELECT COUNT(*) FROM items").fetchone()[0]
        except sqlite3.DatabaseError as err:
            raise ValueError(f"{self.path}: not a readable genret item table ({err}); build the index again") from None

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            if not self.path.is_file():
                raise FileNotFoundError(f"gallery items not found: {self.path}")
            db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
            self._local.db = db
        return db

    def _item(self, text: str) -> Item:
        try:
            record = json.loads(text)
            return Item(**(self.transform(record) if self.transform else record))
        except (ValueError, TypeError) as err:
            if isinstance(err, ArtefactError):
                raise
            raise ArtefactError(f"{self.path}: an item that is not a genret gallery item ({err}); the file was "
                                "edited: build the index again") from None

    def __getitem__(self, item_id: str) -> Item:
        row = self._db().execute("SELECT item FROM items WHERE id = ?", (str(item_id),)).fetchone()
        if row is None:
            raise KeyError(item_id)
        return self._item(row[0])

    def __contains__(self, item_id: object) -> bool:
        return self._db().execute("SELECT 1 FROM items WHERE id = ?", (str(item_id),)).fetchone() is not None

    def __iter__(self) -> Iterator[str]:
        for (item_id,) in self._db().execute("SELECT id FROM items ORDER BY row"):
            yield item_id

    def __len__(self) -> int:
        return self._len

    def values(self) -> Iterator[Item]:  # type: ignore[override]  # one pass over the table, not a probe per id
        for (text,) in self._db().execute("SELECT item FROM items ORDER BY row"):
            yield self._item(text)

    def items(self) -> Iterator[tuple[str, Item]]:  # type: ignore[override]
        for item_id, text in self._db().execute("SELECT id, item FROM items ORDER BY row"):
            yield item_id, self._item(text)


def item_image(item: Item) -> str:
    """The path of a gallery item's image, checked to be the file that was indexed (its content hash).

    Raises:
        ImageLoadError: naming the item and the file, when the image is gone or has changed since indexing.
    """
    from genret.data.images import ImageLoadError

    if not item.image:
        raise ImageLoadError(f"gallery item {item.id!r} has no image")
    path = Path(item.image)
    if not path.is_file():
        raise ImageLoadError(f"gallery item {item.id!r}: its image {path} is gone since the gallery was indexed; "
                             "put it back or build the index again")
    if item.digest is not None and cached_fingerprint(path) != item.digest:
        raise ImageLoadError(f"gallery item {item.id!r}: its image {path} has changed since the gallery was indexed "
                             "(content hash differs): the index and cached features describe the old image; put it "
                             "back or build the index again")
    return str(path)
