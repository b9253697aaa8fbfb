"""From identifiers to token ids: the scheme's vocabulary, tokenization, and a compact prefix trie.

The trie is two numpy arrays, not a tree of Python dicts: the token sequences padded with -1 and
sorted lexicographically, stored column by column, plus each row's item. The rows sharing a prefix
form one contiguous block, found by a binary search per prefix position; the tokens that may come
next are the distinct values of the next column in that block. 100k identifiers of 4 tokens take
under 2 MB and build in milliseconds. The trie is rebuilt from ``identifiers.json`` on load, never saved.

Example::

    add_tokens(ids, tokenizer, model)
    trie = Trie.from_identifiers(ids, tokenizer)
    trie.allowed([])                     # the first tokens of all identifiers
    trie.lookup(sequence)                # the item id, or None
    top = trie.subset(prefilter_top_ids) # constrain decoding to some items
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from genret.identifiers.schemes import Identifiers


def add_tokens(identifiers: Identifiers, tokenizer, model=None) -> int:
    """Add the scheme's new tokens to a Hugging Face tokenizer, and resize the model's embeddings.

    Tokens the tokenizer already holds are left alone, so calling it twice is harmless.

    Args:
        identifiers: the identifiers whose ``new_tokens`` are needed.
        tokenizer: a transformers tokenizer (e.g. ``processor.tokenizer``).
        model: the model to resize to ``len(tokenizer)`` (its new rows start from the mean embedding).

    Returns:
        How many tokens were added.
    """
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    missing = [t for t in identifiers.new_tokens if t not in vocab]
    # normalized=False: the token matches the raw text, whatever the tokenizer's normaliser does.
    added = tokenizer.add_tokens([AddedToken(t, normalized=False) for t in missing]) if missing else 0
    if model is not None and model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    return added


def tokenize(identifiers: Identifiers, tokenizer, context: str = "", prefix: str = "", end: str = "") -> list[list[int]]:
    """Token ids of each identifier, each ending with the tokenizer's eos id (or ``end``'s), aligned with ``item_ids``.

    These exact sequences are what training targets and what the trie holds; do not re-tokenize the
    identifier text elsewhere.

    With ``context`` (a rendered generation prompt) and ``prefix`` (what the template writes before an
    answer, see :func:`genret.mllm.answers.answer_context`) each identifier is tokenized as the model
    writes it after its prompt, ``prefix`` included: sentencepiece's ``417`` alone is ``▁4 1 7``, after
    ``ASSISTANT:`` + ``" 417"`` it is ``▁ 4 1 7``; byte-level BPE's starts with ``Ġ`` after ``Assistant:``.
    With ``end`` (the one token that ends the template's answer, Gemma 3's ``<end_of_turn>``) each sequence ends
    with that token instead of the tokenizer's eos.

    Raises:
        ValueError: the tokenizer lacks the scheme's new tokens (call :func:`add_tokens` first), has no eos
            token, or two identifiers tokenize to the same sequence.
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in identifiers.new_tokens if t not in vocab]
    if missing:
        raise ValueError(f"scheme and model vocabulary do not match: the tokenizer lacks {len(missing)} of the "
                         f"{identifiers.scheme} scheme's {len(identifiers.new_tokens)} new tokens (e.g. "
                         f"{missing[0]!r}); call genret.identifiers.add_tokens(identifiers, tokenizer, model) first")
    eos = tokenizer.eos_token_id
    if end:
        ids = tokenizer(end, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"the answer's end {end!r} is {len(ids)} tokens: an identifier must end with one")
        eos = ids[0]
    if eos is None:
        raise ValueError("the tokenizer has no eos token: identifiers need one to end each sequence")
    if context or prefix:
        head = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
        rows = tokenizer([context + prefix + t for t in identifiers.identifiers], add_special_tokens=False)["input_ids"]
        bad = next((t for t, r in zip(identifiers.identifiers, rows) if r[:len(head)] != head), None)
        if bad is not None:
            raise ValueError(f"the tokenizer merges the end of the prompt with the identifier {bad!r}: no token "
                             "boundary separates them")
        encoded = [r[len(head):] for r in rows]
    else:
        encoded = tokenizer(list(identifiers.identifiers), add_special_tokens=False)["input_ids"]
    sequences = [list(ids) + [eos] for ids in encoded]
    seen: dict[tuple[int, ...], int] = {}
    for i, seq in enumerate(sequences):
        j = seen.setdefault(tuple(seq), i)
        if j != i:
            raise ValueError(f"identifiers collide after tokenization: {identifiers.identifiers[j]!r} (item "
                             f"{identifiers.item_ids[j]!r}) and {identifiers.identifiers[i]!r} (item "
                             f"{identifiers.item_ids[i]!r}) are the same tokens {seq}; use a scheme or tokenizer "
                             f"that keeps them apart")
    return sequences


class Trie:
    """A prefix trie over token-id sequences (each ending with eos), one per item.

    Args:
        sequences: the token ids of each identifier, eos included (see :func:`tokenize`).
        item_ids: the item of each sequence.

    Raises:
        ValueError: no sequences, a count that differs from the items', empty sequences, negative token ids, or
            two items with one sequence.
    """

    def __init__(self, sequences: Sequence[Sequence[int]], item_ids: Sequence[str]) -> None:
        items = tuple(item_ids)
        if len(sequences) != len(items):
            raise ValueError(f"{len(sequences)} sequences for {len(items)} item ids")
        if not items:
            raise ValueError("a trie needs at least one identifier")
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(items))
        if lengths.min() == 0:
            raise ValueError(f"item {items[int(lengths.argmin())]!r} has an empty token sequence")
        flat = np.fromiter((t for s in sequences for t in s), dtype=np.int64, count=int(lengths.sum()))
        if flat.min() < 0 or flat.max() > np.iinfo(np.int32).max:
            raise ValueError("token ids must be non-negative int32 values")
        table = np.full((len(items), int(lengths.max())), -1, dtype=np.int32)
        table[np.arange(table.shape[1]) < lengths[:, None]] = flat
        order = np.lexsort(table.T[::-1])  # the last key is primary: sort by column 0, then 1, ...
        table = table[order]
        same = np.flatnonzero((table[1:] == table[:-1]).all(axis=1))
        if len(same):
            a, b = items[order[same[0]]], items[order[same[0] + 1]]
            raise ValueError(f"items {a!r} and {b!r} have the same token sequence; identifiers must differ")
        self._init(np.ascontiguousarray(table.T), order.astype(np.int32), items)

    def _init(self, columns: np.ndarray, rows: np.ndarray, items: tuple[str, ...]) -> None:
        self._columns = columns  # (max length, n): column j of every sorted row, contiguous
        self._rows = rows  # sorted row -> index into self._items
        self._items = items
        self._root = self._next(0, len(rows), 0)
        last = columns[(columns >= 0).sum(axis=0) - 1, np.arange(columns.shape[1])]
        # The token every identifier ends with (decoding stops on it), or None when they end differently.
        self.eos: int | None = int(last[0]) if (last == last[0]).all() else None

    @classmethod
    def from_identifiers(cls, identifiers: Identifiers, tokenizer, context: str = "", prefix: str = "",
                         end: str = "") -> "Trie":
        """The trie of :func:`tokenize` ``(identifiers, tokenizer, context, prefix, end)``."""
        return cls(tokenize(identifiers, tokenizer, context, prefix, end), identifiers.item_ids)

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def max_length(self) -> int:
        """The longest identifier's token count, eos included: the most new tokens decoding needs."""
        return self._columns.shape[0]

    @property
    def nbytes(self) -> int:
        """Memory of the trie's arrays in bytes (the item id strings are shared, not counted)."""
        return self._columns.nbytes + self._rows.nbytes

    @property
    def item_ids(self) -> list[str]:
        """The items this trie holds, in sorted-sequence order."""
        return [self._items[i] for i in self._rows]

    def _block(self, prefix: Sequence[int]) -> tuple[int, int]:
        """The rows [lo, hi) whose sequences start with ``prefix`` (empty when none do)."""
        lo, hi = 0, len(self._rows)
        if len(prefix) > self._columns.shape[0]:
            return 0, 0
        for j, token in enumerate(prefix):
            column = self._columns[j, lo:hi]
            lo, hi = lo + int(np.searchsorted(column, token, "left")), lo + int(np.searchsorted(column, token, "right"))
            if lo == hi:
                break
        return lo, hi

    def _next(self, lo: int, hi: int, depth: int) -> np.ndarray:
        if depth >= self._columns.shape[0] or lo == hi:
            return np.empty(0, dtype=np.int32)
        column = self._columns[depth, lo:hi]  # sorted within the block
        distinct = column[np.concatenate(([True], column[1:] != column[:-1]))]
        return distinct[distinct >= 0]

    def allowed(self, prefix: Sequence[int]) -> np.ndarray:
        """The distinct tokens that may follow ``prefix`` (sorted); empty after a whole identifier or off the trie."""
        prefix = [int(t) for t in prefix]
        if not prefix:
            return self._root
        lo, hi = self._block(prefix)
        return self._next(lo, hi, len(prefix))

    def lookup(self, sequence: Sequence[int]) -> str | None:
        """The item whose identifier is exactly ``sequence`` (eos included), or None."""
        sequence = [int(t) for t in sequence]
        lo, hi = self._block(sequence)
        if lo == hi or not sequence:
            return None
        # -1 pads sort first, so the row that ends here (if any) leads its block.
        if len(sequence) < self._columns.shape[0] and self._columns[len(sequence), lo] != -1:
            return None
        return self._items[self._rows[lo]]

    def __contains__(self, sequence: object) -> bool:
        return isinstance(sequence, Iterable) and self.lookup(list(sequence)) is not None  # type: ignore[arg-type]

    def subset(self, item_ids: Iterable[str]) -> "Trie":
        """A trie over only ``item_ids`` (e.g. the prefilter's top-k), sharing this one's arrays' layout.

        Raises:
            KeyError: an item id this trie does not hold.
        """
        position = {self._items[r]: r for r in self._rows.tolist()}
        wanted = set(item_ids)
        unknown = [i for i in wanted if i not in position]
        if unknown:
            raise KeyError(f"{len(unknown)} item ids are not in the trie (e.g. {sorted(unknown)[0]!r})")
        if not wanted:
            raise ValueError("a trie needs at least one identifier: the subset is empty")
        keep = np.isin(self._rows, np.fromiter((position[i] for i in wanted), dtype=np.int32, count=len(wanted)))
        columns = self._columns[:, keep]
        columns = np.ascontiguousarray(columns[: int((columns >= 0).any(axis=1).sum())])
        trie = Trie.__new__(Trie)
        trie._init(columns, self._rows[keep], self._items)
        return trie
