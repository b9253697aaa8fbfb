"""An on-disk embedding cache keyed by model and content, in safetensors shards.

Layout: ``<root>/<model namespace>/shard-<n>.safetensors``, each shard holding an ``embeddings``
tensor and, in its metadata, the content keys of its rows. Shards are written to a temporary file
and renamed, so a crash never leaves a half-written shard behind.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from genret._io import atomic_path

logger = logging.getLogger(__name__)


class EmbeddingCache:
    """Maps (model namespace, content key) to an embedding, persisted under ``root``."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self._loaded: dict[str, dict[str, np.ndarray]] = {}

    def _namespace(self, namespace: str) -> dict[str, np.ndarray]:
        if namespace not in self._loaded:
            table: dict[str, np.ndarray] = {}
            for shard in sorted((self.root / namespace).glob("shard-*.safetensors")):
                try:
                    with safe_open(str(shard), framework="numpy") as fh:
                        keys = json.loads(fh.metadata()["keys"])
                        vecs = fh.get_tensor("embeddings")
                except Exception as err:  # a damaged shard only costs a re-encode
                    logger.warning("embedding cache: ignoring unreadable shard %s (%s)", shard, err)
                    continue
                table.update(zip(keys, vecs))
            self._loaded[namespace] = table
        return self._loaded[namespace]

    def get(self, namespace: str, keys: Sequence[str]) -> dict[int, np.ndarray]:
        """The cached vectors of ``keys``, by position in ``keys``."""
        table = self._namespace(namespace)
        return {i: table[k] for i, k in enumerate(keys) if k in table}

    def put(self, namespace: str, keys: Sequence[str], vectors: np.ndarray) -> None:
        """Store ``vectors`` (one row per key) as a new shard."""
        if len(keys) != len(vectors):
            raise ValueError(f"{len(keys)} keys for {len(vectors)} vectors")
        unique = dict(zip(keys, np.asarray(vectors, dtype=np.float32)))
        shard = self.root / namespace / f"shard-{uuid.uuid4().hex}.safetensors"
        with atomic_path(shard) as tmp:
            save_file({"embeddings": np.stack(list(unique.values()))}, str(tmp),
                      metadata={"keys": json.dumps(list(unique))})
        self._namespace(namespace).update(unique)

    def __len__(self) -> int:
        return sum(len(self._namespace(p.name)) for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else 0
