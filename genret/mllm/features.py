"""A gallery's cached MLLM image features: in memory while they are computed, memory-mapped once saved.

A LLaVA-1.5 image is 576 × 4096 features (4.7 MB in bf16); a gallery's worth does not belong in RAM.
:class:`FeatureStore` keeps what was computed in this process in memory, and reads a saved
``features.safetensors`` through safetensors' memory map, one image at a time as candidates need
them. Features keep the dtype the model made them in (bf16 on a GPU by default).

Example::

    store = FeatureStore.open("runs/pipe/stages/rerank/features.safetensors")
    store["img042"]        # one (tokens, hidden) tensor, read from the file now
    store.save(path)       # atomically; the mapped file stays readable until the rename
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, MutableMapping
from pathlib import Path

import torch


class FeatureStore(MutableMapping):
    """Image id → feature tensor; a saved file is memory-mapped and read per item."""

    def __init__(self) -> None:
        self._memory: dict[str, torch.Tensor] = {}
        self._files: list = []
        self._keys: dict[str, tuple[int, str]] = {}  # item id -> (mapped file, tensor name in it)
        self.path: Path | None = None

    @classmethod
    def open(cls, path: str | os.PathLike, *more: str | os.PathLike) -> "FeatureStore":
        """Map a file written by :meth:`save` (or several: the shares of a gallery indexed by several processes,
        an id found in more than one taken from the first); no tensor is read until it is asked for.

        Raises:
            ValueError: naming the file, when it is not a safetensors file of genret features.
        """
        from safetensors import SafetensorError, safe_open

        store = cls()
        for file in (path, *more):
            try:
                fh = safe_open(str(file), framework="pt")
                ids = json.loads((fh.metadata() or {})["ids"])
            except (OSError, KeyError, ValueError, SafetensorError) as err:
                raise ValueError(f"{file}: not a readable genret feature file ({err}); delete it and index again") from None
            missing = set(map(str, range(len(ids)))) - set(fh.keys())
            if missing:
                raise ValueError(f"{file}: the file lists {len(ids)} images but holds {len(ids) - len(missing)} "
                                 "tensors; it is truncated or was written by something else: index again")
            for n, i in enumerate(ids):
                store._keys.setdefault(i, (len(store._files), str(n)))
            store._files.append(fh)
        store.path = Path(path)
        return store

    def __getitem__(self, item_id: str) -> torch.Tensor:
        if item_id in self._memory:
            return self._memory[item_id]
        file, name = self._keys[item_id]
        return self._files[file].get_tensor(name)

    def __setitem__(self, item_id: str, value: torch.Tensor) -> None:
        self._memory[item_id] = value

    def __delitem__(self, item_id: str) -> None:
        self._memory.pop(item_id, None)
        self._keys.pop(item_id, None)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._memory or item_id in self._keys

    def __iter__(self) -> Iterator[str]:
        yield from self._keys
        yield from (i for i in self._memory if i not in self._keys)

    def __len__(self) -> int:
        return len(self._keys) + sum(i not in self._keys for i in self._memory)

    @property
    def in_memory(self) -> int:
        """How many features are held in memory (the rest are read from the mapped file)."""
        return len(self._memory)

    def save(self, path: str | os.PathLike) -> None:
        """Write every feature to ``path`` (safetensors, one tensor per image: Qwen's shapes differ), atomically."""
        from safetensors.torch import save_file

        from genret._io import atomic_path

        ids = list(self)
        with atomic_path(path) as tmp:
            save_file({str(n): self[i].contiguous() for n, i in enumerate(ids)}, str(tmp),
                      metadata={"ids": json.dumps(ids)})
