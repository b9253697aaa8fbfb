"""A Qdrant collection as the vector index, behind :class:`~genret.index.faiss_index.VectorIndex`'s contract.

For deployments that already run Qdrant (extra ``genret[qdrant]``). The pipeline file says so::

    [index]
    backend = "qdrant"
    url = "http://qdrant:6333"     # a server or cluster; "" = Qdrant's local in-memory mode
    search_params = "hnsw_ef=128"  # Qdrant's search parameters (hnsw_ef, exact)

Points are numbered by row (Qdrant ids are integers or UUIDs) and carry the gallery id in their payload; the row →
id list is ``ids.json`` as for faiss, and ``manifest.json`` records the backend, the server, the collection, the
encoder, dim, metric and count, all checked against the collection on load.

Where the vectors live:

- a server (``url = "http://..."``): in the collection. Each new index writes a new collection
  (``<collection>-<8 hex>``), so a build that dies midway never touches the collection a saved pipeline names;
  older collections are left on the server for you to drop. The API key comes from ``QDRANT_API_KEY`` and is never
  written to disk.
- local mode (``url = ""``): in memory, and saved with the index as ``vectors.safetensors`` (loaded back into a
  fresh in-memory collection). Qdrant's own on-disk local mode stores pickles, which genret does not load.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np

from genret._io import read_json, read_manifest, write_json
from genret._swap import atomic_dir
from genret.index.faiss_index import (FORMAT, VERSION, IndexMismatchError, RowIds, check_encoder, check_new,
                                      check_vectors)

BACKEND = "qdrant"
VECTORS = "vectors.safetensors"
_DISTANCES = {"ip": "Dot", "l2": "Euclid"}


def _qdrant():
    try:
        import qdrant_client
        from qdrant_client import models
    except ImportError:
        raise ImportError("the qdrant index backend needs qdrant-client: pip install 'genret[qdrant]'") from None
    return qdrant_client, models


def _parse_params(text: str) -> dict:
    """``"hnsw_ef=128,exact=false"`` → Qdrant ``SearchParams`` keyword arguments, with a clear error."""
    out: dict = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        if key == "hnsw_ef" and value.isdigit() and int(value) > 0:
            out["hnsw_ef"] = int(value)
        elif key == "exact" and value.lower() in ("true", "false"):
            out["exact"] = value.lower() == "true"
        else:
            raise ValueError(f"search_params {text!r}: {part!r} is not a Qdrant search parameter; use hnsw_ef=N "
                             "(N ≥ 1) and/or exact=true|false, comma-separated")
    return out


class QdrantIndex(RowIds):
    """Nearest-neighbour search in a Qdrant collection, over L2-normalised embeddings with string ids.

    Args:
        dim: the embedding dimension.
        metric: ``ip`` (Qdrant's Dot) or ``l2`` (Euclid; scores are minus the squared distance, as faiss's).
        encoder: what made the vectors (``DualEncoder.describe()``), recorded in the manifest.
        search_params: Qdrant search parameters, ``hnsw_ef=N`` and/or ``exact=true``.
        url: the Qdrant server (``http://host:6333``); ``""`` for the local in-memory mode.
        collection: the collection's base name (a new index adds a random suffix on a server).

    Example:
        >>> import numpy as np
        >>> index = QdrantIndex(dim=2)
        >>> index.add(["a", "b"], np.array([[1, 0], [0, 1]], dtype="float32"))
        >>> index.search(np.array([[0.9, 0.1]], dtype="float32"), k=1)[1]
        [['a']]
    """

    factory = "qdrant"
    shards = 1
    read_only = False

    def __init__(self, dim: int, metric: str = "ip", encoder: dict | None = None, search_params: str = "",
                 modality: str = "", url: str = "", collection: str = "genret", _existing: str | None = None) -> None:
        if metric not in _DISTANCES:
            raise ValueError(f"metric must be one of {sorted(_DISTANCES)}, got {metric!r}")
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self._params = _parse_params(search_params)
        self.dim, self.metric, self.encoder = int(dim), metric, dict(encoder or {})
        self.search_params, self.modality, self.url = search_params, modality, url
        qdrant_client, models = _qdrant()
        self._models = models
        try:
            self.client = (qdrant_client.QdrantClient(location=":memory:") if not url else
                           qdrant_client.QdrantClient(url=url, api_key=os.environ.get("QDRANT_API_KEY") or None))
        except Exception as err:  # noqa: BLE001 - qdrant-client raises many kinds for a bad address
            raise ValueError(f"index url {url!r}: cannot open a Qdrant client ({err}); give http://HOST:PORT") from None
        self._ids: list[str | None] = []
        self._row: dict[str, int] = {}
        if _existing is not None:
            self.collection = _existing
            return
        self.collection = f"{collection}-{uuid.uuid4().hex[:8]}" if url else collection
        try:
            self.client.create_collection(self.collection, vectors_config=models.VectorParams(
                size=self.dim, distance=getattr(models.Distance, _DISTANCES[metric].upper())))
        except Exception as err:  # noqa: BLE001 - connection refused, auth, ... all read the same to a user
            raise ConnectionError(f"Qdrant at {url}: cannot create collection {self.collection!r} ({_short(err)}); "
                                  "check the url, that the server runs, and QDRANT_API_KEY") from None

    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Add vectors under new ids."""
        vectors = check_new(ids, vectors, self.dim, self._row)
        rows = list(range(len(self._ids), len(self._ids) + len(ids)))
        self._upsert(rows, vectors, [str(i) for i in ids])
        for row, item in zip(rows, ids):
            self._ids.append(str(item))
            self._row[str(item)] = row

    def _upsert(self, rows: Sequence[int], vectors: np.ndarray, ids: Sequence[str]) -> None:
        """Write points (row number, vector, the gallery id as payload), in bounded requests to a server."""
        for s in range(0, len(rows), 1024):
            self.client.upsert(self.collection, wait=True, points=self._models.Batch(
                ids=list(rows[s:s + 1024]), vectors=vectors[s:s + 1024].tolist(),
                payloads=[{"id": i} for i in ids[s:s + 1024]]))

    def remove(self, ids: Sequence[str]) -> int:
        """Remove items by id; returns how many were there. Unknown ids are ignored."""
        rows = [self._row.pop(i) for i in ids if i in self._row]
        if rows:
            self.client.delete(self.collection, points_selector=self._models.PointIdsList(points=rows), wait=True)
            for row in rows:
                self._ids[row] = None
        return len(rows)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """The ``k`` nearest items of each query: scores ``(n, k)`` and ids, best first."""
        queries = check_vectors(queries, self.dim, "queries")
        self._check_k(k)
        params = self._models.SearchParams(**self._params) if self._params else None
        answers = self.client.query_batch_points(self.collection, requests=[
            self._models.QueryRequest(query=q.tolist(), limit=k, params=params) for q in queries])
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        out_ids: list[list[str]] = []
        for qi, answer in enumerate(answers):
            points = answer.points[:k]
            got = np.array([p.score for p in points], dtype=np.float32)
            scores[qi, :len(points)] = -got ** 2 if self.metric == "l2" else got  # higher is better everywhere
            out_ids.append([self._ids[int(p.id)] for p in points])
        return scores, out_ids

    def reconstruct(self, ids: Sequence[str]) -> np.ndarray:
        """The stored vectors of ``ids``."""
        if not ids:
            return np.zeros((0, self.dim), dtype=np.float32)
        rows = [self._row[i] for i in ids]
        by_row = {int(p.id): p.vector for p in self.client.retrieve(self.collection, ids=rows, with_vectors=True)}
        missing = [i for i, r in zip(ids, rows) if r not in by_row]
        if missing:
            raise IndexMismatchError(f"Qdrant collection {self.collection!r} lacks items {missing[:5]}: it was changed "
                                     "outside genret; rebuild the index")
        return np.asarray([by_row[r] for r in rows], dtype=np.float32)

    def memory_bytes(self) -> int:
        """The vectors' size (float32): held by this process in local mode, by the server otherwise."""
        return len(self) * self.dim * 4

    def manifest(self) -> dict:
        """What the saved index records about itself (never the API key)."""
        return {"format": FORMAT, "version": VERSION, "backend": BACKEND, "modality": self.modality,
                "encoder": self.encoder, "dim": self.dim, "metric": self.metric, "normalized": True,
                "factory": self.factory, "search_params": self.search_params, "url": self.url,
                "collection": self.collection, "count": len(self), "rows": len(self._ids)}

    def save(self, path: str | os.PathLike) -> Path:
        """Save ids and manifest (and, in local mode, the vectors) to a directory, atomically."""
        from safetensors.numpy import save_file

        path = Path(path)
        with atomic_dir(path, (FORMAT,)) as tmp:
            if not self.url:
                live = self.ids
                save_file({"rows": np.asarray([self._row[i] for i in live], dtype=np.int64),
                           "vectors": self.reconstruct(live)}, str(tmp / VECTORS))
            write_json(tmp / "ids.json", self._ids)
            write_json(tmp / "manifest.json", self.manifest())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, encoder: dict | None = None) -> "QdrantIndex":
        """Load a saved index, checking it against the collection (and ``encoder`` against the one that built it)."""
        path = Path(path)
        manifest = read_manifest(path, FORMAT, VERSION, "index")
        if manifest.get("backend") != BACKEND:
            raise IndexMismatchError(f"{path}: a {manifest.get('backend', 'faiss')} index, not a Qdrant one")
        if encoder is not None:
            check_encoder(path, manifest["encoder"], encoder)
        url = manifest.get("url", "")
        self = cls(manifest["dim"], manifest["metric"], manifest["encoder"], manifest.get("search_params", ""),
                   manifest.get("modality", ""), url, manifest["collection"],
                   _existing=manifest["collection"] if url else None)
        self._ids = read_json(path / "ids.json", what="index ids")
        self._row = {item: row for row, item in enumerate(self._ids) if item is not None}
        if len(self._ids) != manifest["rows"] or len(self) != manifest["count"]:
            raise IndexMismatchError(f"{path}: ids.json and manifest.json disagree ({len(self._ids)} rows, "
                                     f"{len(self)} items; manifest {manifest['rows']}, {manifest['count']}): a file was "
                                     "replaced; rebuild the index")
        if not url:
            self._upload(path)
        self._check_collection(path, manifest)
        return self

    def _upload(self, path: Path) -> None:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        file = path / VECTORS
        if not file.is_file():
            raise FileNotFoundError(f"{path}: {VECTORS} is missing; rebuild the index with `genret index build`")
        try:
            saved = load_file(str(file))
            rows, vectors = saved["rows"], saved["vectors"]
        except (SafetensorError, KeyError, OSError) as err:
            raise IndexMismatchError(f"{file}: not readable ({_short(err)}); it is truncated or another file: rebuild "
                                     "the index") from None
        live = [self._row[i] for i in self.ids]
        if rows.tolist() != live or vectors.shape != (len(self), self.dim):
            raise IndexMismatchError(f"{file}: holds {tuple(vectors.shape)} vectors, the index lists {len(self)} of dim "
                                     f"{self.dim} in other rows: a file was replaced; rebuild the index")
        self._upsert(live, vectors, self.ids)

    def _check_collection(self, path: Path, manifest: dict) -> None:
        try:
            info = self.client.get_collection(self.collection)
            count = self.client.count(self.collection, exact=True).count
        except Exception as err:  # noqa: BLE001
            raise IndexMismatchError(f"{path}: Qdrant collection {self.collection!r} at {self.url or 'local memory'} "
                                     f"cannot be read ({_short(err)}); is the server up, the collection there? "
                                     "Rebuild the index with `genret index build`") from None
        vectors = info.config.params.vectors
        distance = getattr(getattr(vectors, "distance", None), "value", None)
        if getattr(vectors, "size", None) != self.dim or distance != _DISTANCES[self.metric] or count != len(self):
            raise IndexMismatchError(f"{path}: Qdrant collection {self.collection!r} holds {count} vectors of size "
                                     f"{getattr(vectors, 'size', '?')} ({distance}); the manifest says {len(self)} of "
                                     f"{self.dim} ({_DISTANCES[self.metric]}): it was changed outside genret; rebuild "
                                     "the index")


def _short(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:160]
