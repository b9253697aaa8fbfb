"""Generative identifiers (GRACE): identifier schemes, a compact token trie, and trie-constrained beam search.

An MLLM learns to emit an item's identifier for the item's image (memorise) and for a query about it
(retrieve); at query time beam search constrained by the trie of valid identifiers returns a ranked list
of items. See :mod:`genret.identifiers.schemes` for the five schemes, :mod:`~genret.identifiers.trie` for the
trie and :mod:`~genret.identifiers.decode` for decoding.

Example::

    ids = make_identifiers("atomic", item_ids)
    add_tokens(ids, processor.tokenizer, model)
    trie = Trie.from_identifiers(ids, processor.tokenizer)
    hits = constrained_beam_search(model, processor(text=prompts, return_tensors="pt"), trie, num_beams=10)
"""

from genret.identifiers.decode import Decoded, constrained_beam_search
from genret.identifiers.schemes import SCHEMES, Identifiers, make_identifiers
from genret.identifiers.trie import Trie, add_tokens, tokenize

__all__ = ["SCHEMES", "Decoded", "Identifiers", "Trie", "add_tokens", "constrained_beam_search", "make_identifiers",
           "tokenize"]
