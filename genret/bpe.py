"""Deterministic BPE training: a merge learner, and the tokenizers of the tiny and mini models trained with it
(CLIP-style for the mini CLIP; byte-level with genret's chat tokens and template for the mini MLLM and the tiny LLaVA).

``tokenizers``' own ``BpeTrainer`` is not reproducible across processes: it breaks ties between
equally frequent pairs by token ids handed out in hash-map order, which Rust seeds per process
(huggingface/tokenizers#1794), so the same captions gave a different vocabulary in every run.
:func:`learn_bpe` learns the merges in plain Python with a fixed tie-break; the ``models.BPE``
built from its vocabulary and merges then loads and tokenizes like any trained one.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
EOW = "</w>"
# CLIP's own pre-tokenisation (letters, single digits, punctuation runs), so the vocabulary
# trained here tokenises exactly as CLIPTokenizer will at inference.
_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def byte_alphabet() -> list[str]:
    """The 256 characters byte-level BPE spells bytes with, in code-point order.

    ``ByteLevel.alphabet()`` lists them in hash-map order, which changes from process to process.
    """
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def count_words(texts: Iterable[str], pre_tokenizer, normalizer=None) -> Counter[str]:
    """How often each pre-token occurs in ``texts``: the words a ``tokenizers`` trainer would count.

    Args:
        texts: the training texts.
        pre_tokenizer: a ``tokenizers.pre_tokenizers`` object, the one the trained tokenizer will use.
        normalizer: a ``tokenizers.normalizers`` object applied first, if any.

    Returns:
        A ``Counter`` from word to frequency, in order of first occurrence.
    """
    words: Counter[str] = Counter()
    for text, n in Counter(texts).items():  # captions repeat: split each distinct one once
        if normalizer is not None:
            text = normalizer.normalize_str(text)
        for word, _ in pre_tokenizer.pre_tokenize_str(text):
            words[word] += n
    return words


def learn_bpe(words: Mapping[str, int], vocab_size: int, special: Sequence[str] = (), alphabet: Iterable[str] = (),
              end_of_word_suffix: str = "") -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn BPE merges from word frequencies, the same in every process.

    Each step merges the most frequent adjacent pair of symbols over all words (weighted by their
    frequency); among equally frequent pairs, the lexicographically smallest ``(left, right)`` (by
    code point) wins. Words are kept split as the finished ``models.BPE`` would split them with the
    merges learned so far. Learning stops when the vocabulary reaches ``vocab_size`` or every word is
    one symbol.

    Args:
        words: word -> frequency, as from :func:`count_words`.
        vocab_size: the most tokens the vocabulary may have (``special`` and the alphabet count, and
            are kept whole even past it).
        special: tokens given the first ids, in this order.
        alphabet: characters in the vocabulary even if no word has them; those the words have are added.
        end_of_word_suffix: marks a word's last symbol (CLIP's ``"</w>"``), as in ``models.BPE``.

    Returns:
        ``(vocab, merges)``: token -> id (special tokens, the characters in code-point order, the
        word-final characters likewise, then merged tokens in the order learned) and the merges in
        rank order, ready for ``models.BPE(vocab, merges, end_of_word_suffix=...)``.

    Example (``("a", "b")`` and ``("b", "a")`` both occur twice; the first wins):
        >>> learn_bpe({"abab": 1, "ba": 1}, vocab_size=3)
        ({'a': 0, 'b': 1, 'ab': 2}, [('a', 'b')])
    """
    vocab = {token: i for i, token in enumerate(special)}
    for char in sorted(set(alphabet).union(*words)):
        vocab.setdefault(char, len(vocab))
    initial = [_spell(word, end_of_word_suffix) for word in words]
    for char in sorted({symbols[-1] for symbols in initial if symbols}):
        vocab.setdefault(char, len(vocab))

    freqs = list(words.values())
    splits = [list(symbols) for symbols in initial]
    counts: Counter[tuple[str, str]] = Counter()
    where: defaultdict[tuple[str, str], set[int]] = defaultdict(set)  # pair -> words that had it
    for i, symbols in enumerate(splits):
        for pair in zip(symbols, symbols[1:]):
            counts[pair] += freqs[i]
            where[pair].add(i)
    # Max-heap on (count, smallest pair): negated counts; stale entries are skipped when popped.
    heap = [(-count, pair) for pair, count in counts.items()]
    heapq.heapify(heap)
    ranks: dict[tuple[str, str], tuple[int, str]] = {}
    merges: list[tuple[str, str]] = []
    while heap and len(vocab) < vocab_size:
        negative, pair = heapq.heappop(heap)
        if counts.get(pair) != -negative:
            continue
        merged = pair[0] + pair[1]
        ranks[pair] = (len(merges), merged)
        merges.append(pair)
        vocab.setdefault(merged, len(vocab))  # the same token may come from two splits: one id
        touched: dict[tuple[str, str], None] = {}
        for i in sorted(where.pop(pair)):
            old = list(zip(splits[i], splits[i][1:]))
            if pair not in old:
                continue
            # Split anew from the characters: a merge can make an earlier merge's pair adjacent again.
            splits[i] = _apply_merges(initial[i], ranks)
            for p in old:
                counts[p] -= freqs[i]
                touched[p] = None
            for p in zip(splits[i], splits[i][1:]):
                counts[p] += freqs[i]
                where[p].add(i)
                touched[p] = None
        for p in touched:
            if counts[p] > 0:
                heapq.heappush(heap, (-counts[p], p))
            else:
                del counts[p]
    return vocab, merges


def _spell(word: str, end_of_word_suffix: str) -> tuple[str, ...]:
    symbols = list(word)
    if symbols and end_of_word_suffix:
        symbols[-1] += end_of_word_suffix
    return tuple(symbols)


def _apply_merges(symbols: Sequence[str], ranks: Mapping[tuple[str, str], tuple[int, str]]) -> list[str]:
    """Split a word as ``models.BPE`` does: lowest-ranked adjacent pair first, leftmost among equals."""
    symbols = list(symbols)
    alive = [True] * len(symbols)
    prev = list(range(-1, len(symbols) - 1))
    nxt = list(range(1, len(symbols) + 1))
    queue = [(ranks[p][0], i, ranks[p][1]) for i, p in enumerate(zip(symbols, symbols[1:])) if p in ranks]
    heapq.heapify(queue)
    while queue:
        _, pos, merged = heapq.heappop(queue)
        right = nxt[pos]
        if not alive[pos] or right >= len(symbols):
            continue
        current = ranks.get((symbols[pos], symbols[right]))
        if current is None or current[1] != merged:  # an expired entry: a neighbour has changed
            continue
        symbols[pos], alive[right] = merged, False
        nxt[pos] = nxt[right]
        if nxt[pos] < len(symbols):
            prev[nxt[pos]] = pos
        for left in (prev[pos], pos):
            if left >= 0 and nxt[left] < len(symbols):
                found = ranks.get((symbols[left], symbols[nxt[left]]))
                if found is not None:
                    heapq.heappush(queue, (found[0], left, found[1]))
    return [s for s, keep in zip(symbols, alive) if keep]


def clip_normalizer():
    """NFC, whitespace runs to one space, lower case: what CLIP's tokenizer does before splitting."""
    return normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])


def clip_pre_tokenizer():
    """CLIP's split into words, each then spelt in byte-level characters."""
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])


def train_clip_tokenizer(texts: Iterable[str], vocab_size: int = 1000, model_max_length: int = 32):
    """Train a BPE vocabulary on ``texts`` and wrap it as a ``transformers.CLIPTokenizer``.

    The same texts and settings give the same tokenizer in every process (see :func:`learn_bpe`).

    Args:
        texts: the training captions.
        vocab_size: the most tokens the learned vocabulary may have (small worlds stop earlier); the
            word-final forms of all 256 bytes are added on top where missing.
        model_max_length: the text tower's context length; longer texts are truncated.

    Returns:
        A ``CLIPTokenizer`` whose ``save_pretrained`` output loads with ``AutoTokenizer``.
    """
    from transformers import CLIPTokenizer

    alphabet = byte_alphabet()
    words = count_words(texts, clip_pre_tokenizer(), clip_normalizer())
    vocab, merges = learn_bpe(words, vocab_size, special=(BOS, EOS), alphabet=alphabet, end_of_word_suffix=EOW)
    # As in CLIP's own vocabulary, every byte also exists as a word-final token, so no text ever
    # falls back to the unknown token (which is EOS, where CLIP pools).
    for char in alphabet:
        vocab.setdefault(char + EOW, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


CHAT_TEMPLATE = Path(__file__).resolve().parent / "mllm" / "templates" / "mini_chat.jinja"
SPECIAL = ("<|pad|>", "<|bos|>", "<|eos|>", "<image>", "<|system|>", "<|user|>", "<|assistant|>")


def byte_level_bpe(texts: Iterable[str], special: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE trained on ``texts``, ``special`` tokens first (ids 0, 1, ...).

    The same texts and settings give the same tokenizer in every process
    (see :func:`learn_bpe`).
    """
    special = list(special)
    pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    vocab, merges = learn_bpe(count_words(texts, pre_tokenizer), vocab_size, special=special,
                              alphabet=byte_alphabet())
    bpe = Tokenizer(models.BPE(vocab, merges))
    bpe.pre_tokenizer = pre_tokenizer
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(special)
    return bpe


def train_chat_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer with genret's chat special tokens and template."""
    from transformers import PreTrainedTokenizerFast

    bpe = byte_level_bpe(texts, SPECIAL, vocab_size)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
        extra_special_tokens={"image_token": "<image>"}, chat_template=CHAT_TEMPLATE.read_text(),
        padding_side="right", model_max_length=4096)
