"""Embedding a gallery in chunks, in one process or split between several (torchrun / accelerate launch).

One process embeds ``chunk_size`` items at a time and adds them to the index, so no ``(n, dim)`` array of the
whole gallery is ever held. Split between processes, each embeds its contiguous share (:class:`Share`) and writes
its chunks as safetensors parts under a shared work folder; the main process then adds the parts to the index in
order (rank, then chunk), which is the order one process would have added them in.

Example (what ``genret index build`` does under ``torchrun --nproc_per_node 2``)::

    share = Share(rank, world, barrier=state.wait_for_everyone, work=Path("out.parts"))
    pipe.index(dataset, share=share)   # every process; the main one ends with the whole gallery
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from genret._io import atomic_path, read_json, write_json
from genret.types import Item


@dataclass(frozen=True)
class Share:
    """This process's part of a gallery build.

    Args:
        rank: this process's index (0 is the main process, which builds and saves the index).
        world: how many processes share the build.
        barrier: waits until every process has got there (``accelerate.PartialState().wait_for_everyone``).
        work: a folder every process can read and write (parts go there); needed when ``world > 1``.
    """

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = field(default=lambda: None, compare=False, repr=False)
    work: Path | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank must be in [0, {self.world}), got {self.rank}")
        if self.world > 1 and self.work is None:
            raise ValueError("a build split between processes needs a shared work folder (Share.work)")

    @property
    def main(self) -> bool:
        """Whether this is the process that builds and saves the index."""
        return self.rank == 0

    def of(self, items: Sequence[Item]) -> list[Item]:
        """This process's contiguous share of ``items``."""
        n = len(items)
        return list(items[n * self.rank // self.world: n * (self.rank + 1) // self.world])


def encode_chunks(encoder, modality: str, items: Sequence[Item], chunk_size: int, batch_size: int,
                  progress: bool) -> Iterator[tuple[list[Item], np.ndarray]]:
    """Embed ``items`` ``chunk_size`` at a time: yields each chunk with its ``(len(chunk), dim)`` vectors."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    many = len(items) > chunk_size  # one bar over the chunks, not one per chunk
    bar = tqdm(total=len(items), desc=f"index {modality}s", unit=modality, disable=not (progress and many))
    for start in range(0, len(items), chunk_size):
        chunk = list(items[start:start + chunk_size])
        if modality == "image":
            vectors = encoder.encode_images([it.image for it in chunk], batch_size, progress and not many,
                                            role="document")
        else:
            vectors = encoder.encode_texts([it.text for it in chunk], progress=progress and not many, role="document")
        bar.update(len(chunk))
        yield chunk, vectors
    bar.close()


def write_parts(folder: Path, rank: int, chunks: Iterator[tuple[list[Item], np.ndarray]]) -> int:
    """Write each chunk as ``rank-RRRRR-chunk-CCCCC.safetensors`` (vectors, ids in the metadata), then
    ``rank-RRRRR.json`` saying how many (the mark that this process finished); returns the item count."""
    count = chunks_written = 0
    for n, (chunk, vectors) in enumerate(chunks):
        with atomic_path(folder / f"rank-{rank:05d}-chunk-{n:05d}.safetensors") as tmp:
            save_file({"vectors": np.ascontiguousarray(vectors, dtype=np.float32)}, str(tmp),
                      metadata={"ids": json.dumps([it.id for it in chunk])})
        count += len(chunk)
        chunks_written = n + 1
    write_json(folder / f"rank-{rank:05d}.json", {"items": count, "chunks": chunks_written})
    return count


def read_parts(folder: Path, world: int) -> Iterator[tuple[list[str], np.ndarray]]:
    """The parts :func:`write_parts` wrote, in order (rank, then chunk), as ``(ids, vectors)``.

    Raises:
        FileNotFoundError: a process wrote no part at all (it failed): naming the folder.
    """
    missing = [r for r in range(world) if not (folder / f"rank-{r:05d}.json").is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: process(es) {missing} did not finish their share of the gallery (they "
                                "failed: see their log); run the build again")
    files = sorted(folder.glob("rank-*-chunk-*.safetensors"))
    expected = sum(read_json(folder / f"rank-{r:05d}.json")["chunks"] for r in range(world))
    if len(files) != expected:
        raise FileNotFoundError(f"{folder}: {len(files)} part files, the processes wrote {expected}: the folder was "
                                "changed during the build; run it again")
    for f in files:
        with safe_open(str(f), framework="numpy") as fh:
            yield json.loads(fh.metadata()["ids"]), fh.get_tensor("vectors")


WORK_MARK = ".genret-work"
"""The file that marks a folder as an index build's work folder, made by the build: only such a folder is cleared."""


def clear(folder: Path) -> None:
    """Remove a work folder's parts (and the folder, once empty); a folder without :data:`WORK_MARK` is not genret's
    and is refused."""
    if not folder.is_dir() and not folder.is_symlink():
        return
    if folder.is_symlink() or not (folder / WORK_MARK).is_file():
        from genret._io import OutputError

        raise OutputError(f"{folder}: in the way of the build's work folder, and not one genret made; move it "
                          "(nothing was removed)")
    for f in sorted(folder.rglob("*"), reverse=True):
        f.unlink() if f.is_file() or f.is_symlink() else f.rmdir()
    os.rmdir(folder)
