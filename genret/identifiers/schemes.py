"""Identifier schemes for generative retrieval: every gallery item gets a string the MLLM learns to emit.

Five schemes, as GRACE names them, registered in :data:`SCHEMES` (item 417's identifier; new tokens):

- ``string``: ``417``, split into tokens by the model's own tokenizer; none.
- ``numeric``: ``4 1 7``, one digit per position, zero-padded to a width if asked; none.
- ``semantic``: a caption-like pseudo-query given per item, made unique; none.
- ``structured``: ``<s1_07><s2_03><p_05>``, the item's path down a recursive k-means over image
  embeddings, then its position in the leaf; one token per cluster and level, one per leaf position.
- ``atomic``: ``<id_000417>``; one token per item.

Example::

    ids = make_identifiers("structured", item_ids, embeddings=image_embeddings, k=16, leaf_size=16)
    ids.save("run/identifiers")                     # run/identifiers/identifiers.json
    add_tokens(ids, processor.tokenizer, model)     # before training or decoding
    trie = Trie.from_identifiers(ids, processor.tokenizer)
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from genret._io import ManifestError, read_json, write_json
from genret.registry import Registry

logger = logging.getLogger(__name__)

FORMAT = "genret.identifiers"
VERSION = 1
FILENAME = "identifiers.json"


@dataclass(frozen=True)
class Identifiers:
    """Every gallery item's identifier under one scheme, and the tokens the scheme adds to a vocabulary.

    Attributes:
        scheme: the name in :data:`SCHEMES` that made them.
        parameters: the scheme's parameters (JSON values), kept for the record.
        item_ids: the gallery's item ids, in gallery order.
        identifiers: each item's identifier string, aligned with ``item_ids``.
        new_tokens: the tokens a model's tokenizer must hold (:func:`add_tokens`); empty for text schemes.
    """

    scheme: str
    parameters: dict[str, Any] = field(compare=False)
    item_ids: tuple[str, ...]
    identifiers: tuple[str, ...]
    new_tokens: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.item_ids) != len(self.identifiers):
            raise ValueError(f"{len(self.item_ids)} item ids but {len(self.identifiers)} identifiers")
        if len(set(self.identifiers)) != len(self.identifiers):
            dup = next(i for i, c in Counter(self.identifiers).items() if c > 1)
            raise ValueError(f"identifiers collide: {dup!r} names more than one item")

    def __len__(self) -> int:
        return len(self.item_ids)

    @cached_property
    def _position(self) -> dict[str, int]:
        return {item: i for i, item in enumerate(self.item_ids)}

    def identifier(self, item_id: str) -> str:
        """The identifier of ``item_id`` (KeyError when it is not in the gallery)."""
        return self.identifiers[self._position[item_id]]

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``folder/identifiers.json`` atomically and return its path."""
        path = Path(folder) / FILENAME
        write_json(path, {"format": FORMAT, "version": VERSION, "scheme": self.scheme,
                          "parameters": self.parameters, "items": dict(zip(self.item_ids, self.identifiers)),
                          "new_tokens": list(self.new_tokens)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Identifiers":
        """Read identifiers saved by :meth:`save` (a folder holding ``identifiers.json``, or the file).

        Raises:
            ManifestError: naming the file, when it is not genret identifiers of this format version.
        """
        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        data = read_json(path, what="identifiers")
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ManifestError(f"{path}: not genret identifiers (format {found!r}, expected {FORMAT!r})")
        if data.get("version") != VERSION:
            raise ManifestError(f"{path}: identifiers format version {data.get('version')}, this genret reads "
                                f"{VERSION}")
        if data.get("scheme") not in SCHEMES:
            raise ManifestError(f"{path}: unknown identifier scheme {data.get('scheme')!r}; known: "
                                f"{', '.join(SCHEMES.names())}")
        items, new = data.get("items"), data.get("new_tokens", [])
        if not isinstance(items, dict) or not items or not all(isinstance(v, str) for v in items.values()):
            raise ManifestError(f"{path}: 'items' must map each item id to its identifier string")
        if not isinstance(new, list) or not all(isinstance(t, str) for t in new):
            raise ManifestError(f"{path}: 'new_tokens' must be a list of strings")
        try:
            return cls(data["scheme"], dict(data.get("parameters") or {}), tuple(items), tuple(items.values()),
                       tuple(new))
        except ValueError as err:
            raise ManifestError(f"{path}: {err}") from None


@dataclass(frozen=True)
class Scheme:
    """An identifier scheme: how it names a gallery, and how it names images added later.

    Attributes:
        name: the scheme's name (``Identifiers.scheme``).
        make: ``make(item_ids, **inputs)`` -> :class:`Identifiers`.
        extend: ``extend(old, new_items, embeddings=, old_embeddings=, texts=)`` -> :class:`Identifiers`, the old
            identifiers unchanged.
        needs: what ``make`` and ``extend`` read beyond item ids: ``"embeddings"`` (the prefilter's image
            embeddings, aligned with the items) or ``"texts"`` (item id -> candidate texts, best first).
        options: the training config's settings ``make`` takes (structured: ``k``, ``leaf_size``).
    """

    name: str
    make: Callable[..., "Identifiers"]
    extend: Callable[..., "Identifiers"]
    needs: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


SCHEMES: Registry[Scheme] = Registry("identifier scheme")


def _check_items(item_ids: Sequence[str]) -> tuple[str, ...]:
    """The item ids as a tuple, or a ValueError for an empty gallery, non-strings or duplicates."""
    items = tuple(item_ids)
    if not items:
        raise ValueError("the gallery is empty: give at least one item id")
    bad = [i for i in items if not isinstance(i, str)]
    if bad:
        raise ValueError(f"item ids must be strings, got {type(bad[0]).__name__} {bad[0]!r}")
    if len(set(items)) != len(items):
        dups = [i for i, c in Counter(items).items() if c > 1]
        raise ValueError(f"duplicate item ids ({len(dups)}, e.g. {dups[0]!r}): each gallery item needs one id")
    return items


def make_identifiers(scheme: str, item_ids: Sequence[str], **kwargs) -> Identifiers:
    """Assign identifiers to ``item_ids`` with the registered ``scheme``.

    Args:
        scheme: one of :data:`SCHEMES` (``string``, ``numeric``, ``semantic``, ``structured``, ``atomic``).
        item_ids: the gallery's item ids, in gallery order (the index of an item is its position here).
        **kwargs: the scheme's own arguments (``texts=`` for semantic, ``embeddings=`` for structured, ...).

    Returns:
        The :class:`Identifiers`.
    """
    return SCHEMES.get(scheme).make(item_ids, **kwargs)


def string_identifiers(item_ids: Sequence[str]) -> Identifiers:
    """Each item's index as text (``"417"``), split into tokens by the model's own tokenizer."""
    items = _check_items(item_ids)
    return Identifiers("string", {}, items, tuple(str(i) for i in range(len(items))), ())


def numeric_identifiers(item_ids: Sequence[str], width: int | None = None, separator: str = " ") -> Identifiers:
    """Each item's index as separated digits (``"4 1 7"``), so that every digit is a position of its own.

    The model's tokenizer still decides the tokens: a byte-level BPE without `` 1``-style merges spends a
    token on each separator too (``4``, `` ``, ``1``, ...); with a tokenizer that splits digits (Llama's),
    ``separator=""`` gives one token per digit.

    Args:
        item_ids: the gallery's item ids.
        width: pad every index with zeros to this many digits (``"0 4 1 7"``), so all ids have one length;
            ``None`` uses as many digits as each index needs.
        separator: what goes between digits.
    """
    items = _check_items(item_ids)
    if width is not None:
        if width < 1:
            raise ValueError(f"numeric width must be at least 1, got {width}")
        if len(items) > 10**width:
            raise ValueError(f"numeric ids of width {width} hold at most {10**width} items, the gallery has "
                             f"{len(items)}: raise width to {len(str(len(items) - 1))} or leave it unset")
    digits = [str(i).zfill(width or 0) for i in range(len(items))]
    return Identifiers("numeric", {"width": width, "separator": separator}, items,
                       tuple(separator.join(d) for d in digits), ())


def semantic_identifiers(item_ids: Sequence[str], texts: Mapping[str, Sequence[str]]) -> Identifiers:
    """Each item's first candidate text (a caption or pseudo-query) that no earlier item took.

    Items are served in gallery order; whitespace is collapsed. When all of an item's candidates are
    taken, its first candidate gets the smallest free suffix `` #2``, `` #3``, ... so identifiers stay
    unique and still read as text.

    Args:
        item_ids: the gallery's item ids.
        texts: item id -> candidate texts, best first (the data's captions, or an MLLM captioner's).
    """
    items = _check_items(item_ids)
    texts = {i: [t] if isinstance(t, str) else list(t) for i, t in texts.items()}  # one text is one candidate
    missing = [i for i in items if not any(" ".join(t.split()) for t in texts.get(i, ()))]
    if missing:
        raise ValueError(f"{len(missing)} items have no candidate text (e.g. {missing[0]!r}): give every item "
                         f"at least one non-empty caption or pseudo-query")
    used: set[str] = set()
    out = []
    suffixed = 0
    for item in items:
        candidates = [c for c in (" ".join(t.split()) for t in texts[item]) if c]
        choice = next((c for c in candidates if c not in used), None)
        if choice is None:
            n = 2
            while f"{candidates[0]} #{n}" in used:
                n += 1
            choice, suffixed = f"{candidates[0]} #{n}", suffixed + 1
        used.add(choice)
        out.append(choice)
    if suffixed:
        logger.info("semantic identifiers: %d of %d items needed a ' #n' suffix", suffixed, len(items))
    return Identifiers("semantic", {}, items, tuple(out), ())


def atomic_identifiers(item_ids: Sequence[str], prefix: str = "id") -> Identifiers:
    """One new token per item, ``<id_000417>``: the identifier is a single vocabulary entry."""
    items = _check_items(item_ids)
    width = max(6, len(str(len(items) - 1)))
    tokens = tuple(f"<{prefix}_{i:0{width}d}>" for i in range(len(items)))
    return Identifiers("atomic", {"prefix": prefix}, items, tokens, tokens)


def structured_identifiers(item_ids: Sequence[str], embeddings: np.ndarray, k: int = 16, leaf_size: int = 16,
                           max_depth: int | None = None, seed: int = 0, niter: int = 20) -> Identifiers:
    """Recursive k-means over image embeddings: similar images share identifier prefixes.

    A cluster larger than ``leaf_size`` is split into ``k`` sub-clusters (faiss k-means), recursively;
    an item's identifier is its path, one new token per level (``<s1_07>``: cluster 7 at level 1), then a
    position token within its leaf (``<p_05>``). Leaves may sit at different depths. Deterministic given
    ``seed``.

    Args:
        item_ids: the gallery's item ids.
        embeddings: one row per item, in ``item_ids`` order (e.g. the prefilter's image embeddings).
        k: the branching factor (GRACE uses about 30).
        leaf_size: the most items a leaf holds (and the number of position tokens).
        max_depth: the most cluster levels; ``None`` for no limit.
        seed: the k-means seed.
        niter: k-means iterations per split.
    """
    items = _check_items(item_ids)
    x = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
    if x.ndim != 2 or x.shape[0] != len(items):
        raise ValueError(f"embeddings have shape {tuple(x.shape)}, expected one row per item ({len(items)} rows)")
    if k < 2 or leaf_size < 1:
        raise ValueError(f"structured ids need k >= 2 and leaf_size >= 1, got k={k}, leaf_size={leaf_size}")
    if max_depth is not None and len(items) > leaf_size * k**max_depth:
        raise ValueError(f"structured ids with k={k}, leaf_size={leaf_size}, max_depth={max_depth} hold at most "
                         f"{leaf_size * k**max_depth} items, the gallery has {len(items)}: raise max_depth, k or "
                         f"leaf_size")
    paths: list[list[int]] = [[] for _ in items]
    positions = np.zeros(len(items), dtype=np.int64)
    depth = 0
    stack = [(np.arange(len(items)), 0)]
    while stack:
        members, level = stack.pop()
        if len(members) <= leaf_size:
            positions[members] = np.arange(len(members))
            depth = max(depth, level)
            continue
        if max_depth is not None and level >= max_depth:
            raise ValueError(f"structured ids: a cluster of {len(members)} items at depth {level} is still larger "
                             f"than leaf_size={leaf_size} (k-means split unevenly): raise max_depth, k or leaf_size")
        labels = _split(x[members], k, leaf_size, seed + level, niter)
        for c in range(int(labels.max()) + 1):
            sub = members[labels == c]
            for m in sub:
                paths[m].append(c)
            if len(sub):
                stack.append((sub, level + 1))
    digits = max(2, len(str(k - 1)))
    pdigits = max(2, len(str(leaf_size - 1)))
    level_tokens = [f"<s{lv + 1}_{c:0{digits}d}>" for lv in range(depth) for c in range(k)]
    position_tokens = [f"<p_{j:0{pdigits}d}>" for j in range(leaf_size)]
    idents = tuple("".join(f"<s{lv + 1}_{c:0{digits}d}>" for lv, c in enumerate(path))
                   + position_tokens[int(positions[i])] for i, path in enumerate(paths))
    params = {"k": k, "leaf_size": leaf_size, "max_depth": max_depth, "seed": seed, "niter": niter, "depth": depth}
    return Identifiers("structured", params, items, idents, tuple(level_tokens + position_tokens))


def _split(x: np.ndarray, k: int, leaf_size: int, seed: int, niter: int) -> np.ndarray:
    """Cluster labels for the rows of ``x``: faiss k-means, or an even split where k-means cannot separate them."""
    import faiss

    n_clusters = min(k, len(x))
    kmeans = faiss.Kmeans(x.shape[1], n_clusters, niter=niter, seed=seed, verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=256)
    kmeans.train(x)
    _, labels = kmeans.index.search(x, 1)
    labels = labels[:, 0]
    if np.bincount(labels).max() == len(x):  # identical rows: k-means cannot split, so the order does
        labels = np.arange(len(x)) * min(n_clusters, -(-len(x) // leaf_size)) // len(x)
    return labels


def _refuse_known(old: Identifiers, new_items: Sequence[str], where: str = "") -> None:
    """Refuse images that already have an identifier, naming one."""
    known = set(old.item_ids)
    dup = [i for i in new_items if i in known]
    if dup:
        raise ValueError(f"{len(dup)} of the images to add already have identifiers{where} (e.g. {dup[0]!r} is "
                         f"{old.identifier(dup[0])!r}); add only images the adapter has not memorised")


def extend_identifiers(old: Identifiers, new_items: Sequence[str], *, embeddings: np.ndarray | None = None,
                       old_embeddings: np.ndarray | None = None,
                       texts: Mapping[str, Sequence[str]] | None = None) -> Identifiers:
    """``old`` with ``new_items`` appended under the same scheme; no old identifier changes.

    Args:
        old: the parent adapter's identifiers.
        new_items: the images to add, none of which may have an identifier yet.
        embeddings: structured: the new items' prefilter image embeddings.
        old_embeddings: structured: the old items' embeddings, aligned with ``old.item_ids``.
        texts: semantic: new item id -> candidate texts, best first.

    Raises:
        ValueError: an item that already has an identifier (named), or a gallery the scheme cannot hold.
    """
    new_items = tuple(new_items)
    if not new_items:
        raise ValueError("no images to add")
    _refuse_known(old, new_items)
    if len(set(new_items)) != len(new_items):
        raise ValueError("the images to add hold duplicate ids")
    return SCHEMES.get(old.scheme).extend(old, new_items, embeddings=embeddings, old_embeddings=old_embeddings,
                                          texts=texts)


def extend_indexed(old: Identifiers, new_items: tuple[str, ...], **_) -> Identifiers:
    """string and numeric: the scheme numbers the whole gallery in order; the old items keep their indices."""
    n_old, items, params = len(old), old.item_ids + new_items, dict(old.parameters)
    try:
        ids = make_identifiers(old.scheme, items, **({"width": params.get("width"), "separator": params.get("separator", " ")}
                                                      if "width" in params or "separator" in params else {}))
    except ValueError as err:
        raise ValueError(f"cannot add {len(new_items)} images to {n_old}: {err} (the parent's width is fixed: "
                         "train a new adapter with a larger width)") from None
    if ids.identifiers[:n_old] != old.identifiers:
        raise ValueError(f"the parent's {old.scheme} identifiers are not the indices 0..{n_old - 1} in order; "
                         "they cannot be extended")
    return Identifiers(old.scheme, params, items, ids.identifiers, ())


def extend_semantic(old: Identifiers, new_items: tuple[str, ...], texts: Mapping[str, Sequence[str]] | None = None,
                    **_) -> Identifiers:
    """semantic: the new items' texts, made unique against the old identifiers."""
    texts = texts or {}
    both = {**{i: [t] for i, t in zip(old.item_ids, old.identifiers)}, **{i: texts.get(i, ()) for i in new_items}}
    ids = make_identifiers("semantic", old.item_ids + new_items, texts=both)
    return Identifiers("semantic", dict(old.parameters), old.item_ids + new_items, ids.identifiers, ())


def extend_atomic(old: Identifiers, new_items: tuple[str, ...], **_) -> Identifiers:
    """atomic: the next numbers, one new token each."""
    n_old, params = len(old), dict(old.parameters)
    prefix = params.get("prefix", "id")
    width = len(re.fullmatch(r"<.+_(\d+)>", old.identifiers[0]).group(1))
    new = tuple(f"<{prefix}_{n_old + j:0{width}d}>" for j in range(len(new_items)))
    return Identifiers("atomic", params, old.item_ids + new_items, old.identifiers + new, tuple(old.new_tokens) + new)


def extend_structured(old: Identifiers, new_items: tuple[str, ...], embeddings=None, old_embeddings=None,
                      **_) -> Identifiers:
    """structured: each new image under the leaf of its nearest old image (by the prefilter's embeddings)."""
    if embeddings is None or old_embeddings is None:
        raise ValueError("structured ids place new images by the prefilter's image embeddings: pass prefilter (--clip)")
    x = np.asarray(embeddings, dtype=np.float32)
    y = np.asarray(old_embeddings, dtype=np.float32)
    if len(x) != len(new_items) or len(y) != len(old):
        raise ValueError("structured: one embedding per new item and per old item is needed")
    x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    y = y / np.linalg.norm(y, axis=1, keepdims=True).clip(1e-12)
    nearest = (x @ y.T).argmax(1)
    pos = re.compile(r"<p_(\d+)>$")
    leaves: dict[str, set[int]] = {}
    for ident in old.identifiers:
        m = pos.search(ident)
        leaves.setdefault(ident[:m.start()], set()).add(int(m.group(1)))
    pdigits = max(2, len(str(int(old.parameters.get("leaf_size", 16)) - 1)))
    tokens, have = list(old.new_tokens), set(old.new_tokens)
    out = []
    for j in nearest:
        ident = old.identifiers[int(j)]
        leaf = ident[:pos.search(ident).start()]
        used = leaves[leaf]
        p = next(q for q in range(len(used) + 1) if q not in used)
        used.add(p)
        token = f"<p_{p:0{pdigits}d}>"
        if token not in have:  # a full leaf grows a position
            tokens.append(token)
            have.add(token)
        out.append(leaf + token)
    params = {**old.parameters, "added_by": "nearest existing image's leaf"}
    return Identifiers("structured", params, old.item_ids + new_items, old.identifiers + tuple(out), tuple(tokens))


for _scheme in (Scheme("string", string_identifiers, extend_indexed),
                Scheme("numeric", numeric_identifiers, extend_indexed),
                Scheme("semantic", semantic_identifiers, extend_semantic, needs=("texts",)),
                Scheme("atomic", atomic_identifiers, extend_atomic),
                Scheme("structured", structured_identifiers, extend_structured, needs=("embeddings",),
                       options=("k", "leaf_size"))):
    SCHEMES.register(_scheme.name)(_scheme)
