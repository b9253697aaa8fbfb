"""Train a CLIP-style byte-level BPE tokenizer on a dataset's captions, loadable as ``CLIPTokenizer``."""

from __future__ import annotations

from typing import Iterable

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's own pre-tokenisation (letters, single digits, punctuation runs), so the vocabulary
# trained here tokenises exactly as CLIPTokenizer will at inference.
_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def train_clip_tokenizer(texts: Iterable[str], vocab_size: int = 1000, model_max_length: int = 32):
    """Train a BPE vocabulary on ``texts`` and wrap it as a ``transformers.CLIPTokenizer``.

    Args:
        texts: the training captions.
        vocab_size: the most tokens the vocabulary may have (small worlds stop earlier).
        model_max_length: the text tower's context length; longer texts are truncated.

    Returns:
        A ``CLIPTokenizer`` whose ``save_pretrained`` output loads with ``AutoTokenizer``.
    """
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(unk_token=EOS, end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], end_of_word_suffix="</w>",
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    model = bpe.model
    vocab = bpe.get_vocab()
    # As in CLIP's own vocabulary, every byte also exists as a word-final token, so no text ever
    # falls back to the unknown token (which is EOS, where CLIP pools).
    for char in pre_tokenizers.ByteLevel.alphabet():
        vocab.setdefault(char + "</w>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in _merges(model)]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _merges(model) -> list:
    import json

    return json.loads(Tokenizer(model).to_str())["model"]["merges"]
