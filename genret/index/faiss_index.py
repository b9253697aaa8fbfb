"""A faiss-backed vector index over string ids, saved with a manifest that is checked on load.

On disk: ``index.faiss`` (faiss's own format; a sharded index has ``index-000.faiss``, ``index-001.faiss``...
searched together through ``faiss.IndexShards``), ``ids.json`` (row id → item id, ``null`` for removed rows) and
``manifest.json`` (encoder, dim, metric, normalisation, factory, shards, count).

A saved index can be loaded memory-mapped (``VectorIndex.load(path, mmap=True)``): faiss maps the stored vectors
(flat codes, HNSW's storage) instead of reading them into memory, so a gallery larger than RAM is searched from the
page cache. Such an index is read-only: adding or removing raises (faiss would abort the process).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np

from genret._io import ManifestError, read_json, read_manifest, write_json
from genret._swap import atomic_dir

logger = logging.getLogger(__name__)

FORMAT = "genret.index"
VERSION = 1
METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}

# faiss only routes a query batch through BLAS above this many queries x vectors... measured
# ~6x faster flat search here with a low threshold (ENVIRONMENT.md).
faiss.cvar.distance_compute_blas_threshold = 20


class IndexMismatchError(ManifestError):
    """A saved index that does not fit what it is loaded with (encoder, dimension, format)."""


class RowIds:
    """Item ids by row, as both backends keep them: ``_ids[row]`` (``None`` once removed) and ``_row[id]``."""

    _ids: list[str | None]
    _row: dict[str, int]

    def __len__(self) -> int:
        return len(self._row)

    @property
    def ids(self) -> list[str]:
        """The live item ids, in insertion order."""
        return [i for i in self._ids if i is not None]

    def _check_k(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if k > len(self):
            raise ValueError(f"k={k} is larger than the gallery ({len(self)} items); ask for at most {len(self)}")


class VectorIndex(RowIds):
    """Nearest-neighbour search over L2-normalised embeddings with string ids.

    Args:
        dim: the embedding dimension.
        factory: a faiss factory string: ``Flat`` (exact, default), ``HNSW32``, ``IVF1024,Flat``, ``IVF1024,PQ64``...
        metric: ``ip`` (inner product: cosine on unit vectors) or ``l2``.
        encoder: what made the vectors (``DualEncoder.describe()``), recorded in the manifest.
        search_params: faiss parameter string applied at search time, e.g. ``nprobe=16`` or ``efSearch=128``.
        shards: split the vectors between this many faiss indexes (searched in parallel, saved as one file each).
        build_params: faiss parameter string applied before vectors are added, e.g. ``efConstruction=200`` (HNSW:
            a better graph, so a lower ``efSearch`` reaches the same recall; the build takes longer).

    Example:
        >>> import numpy as np
        >>> index = VectorIndex(dim=2)
        >>> index.add(["a", "b"], np.array([[1, 0], [0, 1]], dtype="float32"))
        >>> index.search(np.array([[0.9, 0.1]], dtype="float32"), k=1)[1]
        [['a']]
    """

    def __init__(self, dim: int, factory: str = "Flat", metric: str = "ip", encoder: dict | None = None,
                 search_params: str = "", modality: str = "", shards: int = 1, build_params: str = "") -> None:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        if shards < 1:
            raise ValueError(f"shards must be at least 1, got {shards}")
        try:
            parts = [faiss.IndexIDMap2(faiss.index_factory(int(dim), factory, METRICS[metric])) for _ in range(shards)]
        except RuntimeError as err:
            raise ValueError(f"invalid faiss factory string {factory!r}: {str(err).splitlines()[-1]}") from None
        if build_params:
            try:
                for part in parts:
                    faiss.ParameterSpace().set_index_parameters(part, build_params)
            except RuntimeError as err:
                raise ValueError(f"build_params {build_params!r} do not apply to a {factory!r} index "
                                 f"(faiss: {str(err).rsplit(': ', 1)[-1][:120]}); e.g. efConstruction=200 for HNSW") from None
        self.build_params = build_params
        self.dim, self.factory, self.metric = int(dim), factory, metric
        self._set_parts(parts)
        self.read_only = False
        self.encoder = dict(encoder or {})
        self.search_params = search_params
        self.modality = modality
        self._ids: list[str | None] = []
        self._row: dict[str, int] = {}
        self._tombstones: set[int] = set()

    def _set_parts(self, parts: list) -> None:
        # IndexShards does not own its shards: self.parts keeps them alive as long as the index.
        self.parts = parts
        if len(parts) == 1:
            self.index = parts[0]
            return
        self.index = faiss.IndexShards(self.dim, True, False)  # threaded; ids are the shards' own (global rows)
        for part in parts:
            self.index.add_shard(part)

    @property
    def shards(self) -> int:
        """How many faiss indexes hold the vectors."""
        return len(self.parts)

    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Add vectors under new ids (trains the index first if its type needs training: on these vectors, so the
        first batch added to an IVF or PQ index should be a representative sample, tens of vectors per list)."""
        self._check_writable("add to")
        vectors = check_new(ids, vectors, self.dim, self._row)
        if not self.index.is_trained:
            self._train(vectors)
        rows = np.arange(len(self._ids), len(self._ids) + len(ids), dtype=np.int64)
        self.index.add_with_ids(vectors, rows)
        for row, item in zip(rows.tolist(), ids):
            self._ids.append(str(item))
            self._row[str(item)] = row

    def _train(self, vectors: np.ndarray) -> None:
        try:
            self.index.train(vectors)
        except RuntimeError as err:
            raise ValueError(f"faiss index {self.factory!r} could not be trained on {len(vectors)} vectors "
                             f"({str(err).splitlines()[-1]}); use fewer lists/centroids or 'Flat'") from None

    def remove(self, ids: Sequence[str]) -> int:
        """Remove items by id; returns how many were removed. Unknown ids raise ``KeyError``."""
        self._check_writable("remove from")
        missing = [i for i in ids if i not in self._row]
        if missing:
            raise KeyError(f"ids not in the index: {missing[:5]}")
        rows = np.array([self._row.pop(i) for i in ids], dtype=np.int64)
        for row in rows.tolist():
            self._ids[row] = None
        # Graph indexes (HNSW) cannot delete, and IVF deletes without renumbering, which IndexIDMap2's own removal
        # assumes (its ids would shift onto the wrong vectors): both hide the rows at search time instead.
        if faiss.try_extract_index_ivf(self.parts[0].index) is not None:
            self._tombstones.update(rows.tolist())
            return len(rows)
        try:
            for part in self.parts:  # each shard removes the rows it holds
                part.remove_ids(rows)
        except RuntimeError:
            self._tombstones.update(rows.tolist())
        if self.shards > 1:
            self.index.syncWithSubIndexes()
        return len(rows)

    def _check_writable(self, what: str) -> None:
        if self.read_only:
            raise ValueError(f"cannot {what} an index loaded memory-mapped (read-only); load it with mmap=False to "
                             "change it, or build it again with `genret index build`")

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """The ``k`` nearest items of each query: scores ``(n, k)`` and ids, best first."""
        queries = self._check_vectors(queries, "queries")
        self._check_k(k)
        if self.search_params:
            faiss.ParameterSpace().set_index_parameters(self.index, self.search_params)  # every shard
        fetch = min(k + len(self._tombstones), self.index.ntotal)
        scores, rows = self.index.search(queries, fetch)
        out_scores = np.full((len(queries), k), -np.inf if self.metric == "ip" else np.inf, dtype=np.float32)
        out_ids: list[list[str]] = []
        for qi in range(len(queries)):
            keep = [j for j, r in enumerate(rows[qi]) if r >= 0 and r not in self._tombstones][:k]
            out_scores[qi, :len(keep)] = scores[qi, keep]
            out_ids.append([self._ids[rows[qi, j]] for j in keep])
        if self.metric == "l2":  # higher is better everywhere in genret
            out_scores = -out_scores
        return out_scores, out_ids

    def reconstruct(self, ids: Sequence[str]) -> np.ndarray:
        """The stored vectors of ``ids`` (exact for Flat/HNSW, approximate for PQ)."""
        return np.stack([self._reconstruct(self._row[i]) for i in ids]) if ids else np.zeros((0, self.dim))

    def _reconstruct(self, row: int) -> np.ndarray:
        for part in self.parts:  # IndexShards cannot reconstruct: ask the shard that holds the row
            try:
                return part.reconstruct(row)
            except RuntimeError:
                if _direct_map(part):  # an IVF index reconstructs through a direct map, made when first needed
                    try:
                        return part.reconstruct(row)
                    except RuntimeError:
                        pass
        raise KeyError(f"row {row} is in no shard")

    def memory_bytes(self) -> int:
        """Size of the serialised faiss index, a close proxy of its memory."""
        return int(sum(faiss.serialize_index(part).nbytes for part in self.parts))

    def _check_vectors(self, x: np.ndarray, what: str) -> np.ndarray:
        return check_vectors(x, self.dim, what)

    def manifest(self) -> dict:
        """What the saved index records about itself."""
        return {
            "format": FORMAT, "version": VERSION, "modality": self.modality, "encoder": self.encoder,
            "dim": self.dim, "metric": self.metric, "normalized": True, "factory": self.factory,
            "search_params": self.search_params, "build_params": self.build_params, "shards": self.shards,
            "count": len(self), "rows": len(self._ids),
            "tombstones": sorted(self._tombstones),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Save to a directory, atomically: a failed save leaves any earlier index there intact."""
        path = Path(path)
        with atomic_dir(path, (FORMAT,)) as tmp:
            for name, part in zip(_files(self.shards), self.parts):
                faiss.write_index(part, str(tmp / name))
            write_json(tmp / "ids.json", self._ids)
            write_json(tmp / "manifest.json", self.manifest())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, encoder: dict | None = None, mmap: bool = False) -> "VectorIndex":
        """Load a saved index; ``encoder`` (``DualEncoder.describe()``) must match the one that built it.

        Args:
            mmap: map the stored vectors rather than read them (read-only; for galleries larger than memory).
        """
        path = Path(path)
        manifest = read_manifest(path, FORMAT, VERSION, "index")
        if manifest.get("backend", "faiss") != "faiss":
            raise IndexMismatchError(f"{path}: a {manifest['backend']} index, not a faiss one; load it with "
                                     "genret.index.gallery.load_index")
        if encoder is not None:
            check_encoder(path, manifest["encoder"], encoder)
        try:
            self = cls(manifest["dim"], manifest["factory"], manifest["metric"], manifest["encoder"],
                       manifest.get("search_params", ""), manifest.get("modality", ""), int(manifest.get("shards", 1)),
                       manifest.get("build_params", ""))
        except (KeyError, TypeError, ValueError) as err:
            raise IndexMismatchError(f"{path / 'manifest.json'}: not a manifest this genret can read ({err}); it was "
                                     "edited or is damaged: rebuild the index") from None
        flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_MMAP if mmap else 0
        self._set_parts([_read(path / name, flags) for name in _files(int(manifest.get("shards", 1)))])
        if any(part.metric_type != METRICS[self.metric] for part in self.parts):
            raise IndexMismatchError(f"{path}: manifest.json says metric {self.metric!r}, the faiss file was built with "
                                     f"the other one: the manifest was edited; rebuild the index")
        self.read_only = mmap
        self._ids = read_json(path / "ids.json", what="index ids")
        self._tombstones = set(manifest.get("tombstones", []))
        self._row = {item: row for row, item in enumerate(self._ids) if item is not None}
        stored = sum(i is not None for i in self._ids) + len(self._tombstones)  # removed rows leave the file
        if (self.index.d != self.dim or self.index.ntotal != stored or len(self._ids) != manifest["rows"]
                or len(self) != manifest["count"]):
            raise IndexMismatchError(f"{path}: index.faiss, ids.json and manifest.json disagree (dim {self.index.d} vs "
                                     f"{self.dim}; {self.index.ntotal} vectors, {stored} ids, manifest rows "
                                     f"{manifest['rows']}): a file was replaced or cut short; rebuild the index")
        return self


def check_vectors(x: np.ndarray, dim: int, what: str) -> np.ndarray:
    """``x`` as a contiguous float32 ``(n, dim)`` array, or a ValueError that says what is wrong with it."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{what} must have shape (n, {dim}), got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    return x


def check_new(ids: Sequence[str], vectors: np.ndarray, dim: int, known) -> np.ndarray:
    """The vectors to add under new ``ids`` (checked), or a ValueError: counts differ, an id known or repeated."""
    vectors = check_vectors(vectors, dim, "vectors")
    if len(ids) != len(vectors):
        raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
    dup = [i for i in ids if i in known]
    if dup or len(set(ids)) != len(ids):
        raise ValueError(f"ids already in the index or repeated: {dup[:5] or 'repeated in the batch'}")
    return vectors


def _direct_map(part) -> bool:
    """Give an IVF shard a fresh direct map (id → list position: how it reconstructs); whether it is IVF. Made when
    needed and anew, since a direct map made earlier does not follow later adds."""
    ivf = faiss.try_extract_index_ivf(part.index)
    if ivf is None:
        return False
    ivf.set_direct_map_type(faiss.DirectMap.NoMap)
    ivf.set_direct_map_type(faiss.DirectMap.Array)
    return True


def _files(shards: int) -> list[str]:
    return ["index.faiss"] if shards == 1 else [f"index-{i:03d}.faiss" for i in range(shards)]


def _read(file: Path, flags: int):
    if not file.is_file():
        raise FileNotFoundError(f"{file.parent}: {file.name} is missing; rebuild the index with `genret index build`")
    try:
        return faiss.read_index(str(file), flags)
    except RuntimeError as err:  # a truncated or foreign file: faiss says only where in its C++ it failed
        raise IndexMismatchError(f"{file}: not a readable faiss index ({str(err).splitlines()[0][:120]}); "
                                 "it is truncated or another file: rebuild the index with `genret index build`") from None


def check_encoder(path: Path, saved: dict, current: dict) -> None:
    """Raise :class:`IndexMismatchError` when an index was built by another encoder."""
    # A model is known by its files' fingerprint (the revision, genret._hub.model_fingerprint: what its files hold),
    # not by the name or path it was given under: the same folder reached from elsewhere or moved with the pipeline,
    # and a local copy of a hub model, still match; a hub model's new commit that leaves its files as they were too.
    # An index made before carries the old key (a hub model's "<id>@<commit>"), checked by the old rule.
    from genret._hub import fingerprints_match, legacy_note

    fingerprinted = all(isinstance(d.get("revision"), str) and d["revision"] for d in (saved, current))
    if fingerprinted and not fingerprints_match(saved["revision"], current["revision"], str(current.get("model", ""))):
        raise IndexMismatchError(
            f"{path}: index was built with encoder {saved.get('model')!r} (files fingerprint {saved['revision']!r}), "
            f"but the encoder now is {current.get('model')!r} (fingerprint {current['revision']!r}): another model or "
            f"other files{legacy_note(saved['revision'])}; rebuild the index with `genret index build` or load it with the encoder that made it")
    keys = ("dim", "backend") if fingerprinted else ("dim", "model", "revision", "backend")
    # An instructed embedder's document-side settings (instruction, pooling, dimensions, image size) make the
    # vectors as much as the weights do: an index made under other ones, or by another kind of encoder, is refused.
    if ("settings" in saved or "settings" in current) and saved.get("settings") != current.get("settings"):
        raise IndexMismatchError(
            f"{path}: index was built with encoder settings {saved.get('settings')!r}, but the encoder's now are "
            f"{current.get('settings')!r}; rebuild the index with `genret index build` or load it with the settings "
            "that made it")
    for key in keys:
        if key in saved and key in current and saved[key] != current[key]:
            raise IndexMismatchError(
                f"{path}: index was built with encoder {saved.get('model')!r} ({key} {saved[key]!r}), "
                f"but the encoder now is {current.get('model')!r} ({key} {current[key]!r}); rebuild the index "
                "with `genret index build` or load it with the encoder that made it")
