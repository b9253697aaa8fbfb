"""The token trie against a brute-force reference, and tokenization against a real tokenizer."""

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from genret.identifiers import Trie, add_tokens, make_identifiers, tokenize

EOS = 2
# Different lengths, and identifiers that are prefixes of others (eos keeps them apart).
SEQUENCES = {"a": [5, EOS], "b": [5, 7, EOS], "c": [5, 7, 8, EOS], "d": [9, EOS], "e": [5, 8, 8, EOS]}


@pytest.fixture
def trie():
    return Trie(list(SEQUENCES.values()), list(SEQUENCES))


@pytest.mark.parametrize("prefix, expected", [
    ([], [5, 9]),
    ([5], [EOS, 7, 8]),
    ([5, 7], [EOS, 8]),
    ([5, 7, 8], [EOS]),
    ([5, 7, 8, EOS], []),  # after a whole identifier: nothing
    ([5, EOS], []),
    ([6], []),  # off the trie
    ([5, 7, 8, EOS, 1], []),  # longer than any identifier
])
def test_allowed(trie, prefix, expected):
    assert trie.allowed(prefix).tolist() == expected


@pytest.mark.parametrize("sequence, item", [
    ([5, EOS], "a"), ([5, 7, EOS], "b"), ([5, 7, 8, EOS], "c"), ([9, EOS], "d"),
    ([5], None), ([5, 7], None), ([5, 7, 8], None), ([], None), ([6, EOS], None), ([5, 7, 8, EOS, EOS], None),
])
def test_lookup(trie, sequence, item):
    assert trie.lookup(sequence) == item
    assert (sequence in trie) == (item is not None)


def test_trie_facts(trie):
    assert len(trie) == 5 and trie.max_length == 4 and trie.eos == EOS
    assert trie.nbytes == 5 * 4 * 4 + 5 * 4  # int32 table + int32 row -> item
    assert sorted(trie.item_ids) == sorted(SEQUENCES)
    assert Trie([[1, 2], [1, 3]], ["x", "y"]).eos is None


def _reference(sequences):
    """prefix -> set of next tokens, by brute force."""
    ref: dict[tuple, set] = {}
    for seq in sequences:
        for i in range(len(seq)):
            ref.setdefault(tuple(seq[:i]), set()).add(seq[i])
    return ref


@pytest.mark.parametrize("seed, n, vocab", [(0, 300, 4), (1, 2000, 3), (2, 500, 50)])
def test_matches_a_brute_force_trie(seed, n, vocab):
    rng = np.random.default_rng(seed)
    seqs = {tuple(rng.integers(3, 3 + vocab, size=rng.integers(1, 7)).tolist()) + (EOS,) for _ in range(n)}
    seqs = sorted(seqs)
    items = [f"i{j}" for j in range(len(seqs))]
    trie = Trie(seqs, items)
    ref = _reference(seqs)
    for prefix, nxt in ref.items():
        assert trie.allowed(prefix).tolist() == sorted(nxt), prefix
    for seq, item in zip(seqs, items):
        assert trie.lookup(seq) == item and trie.allowed(seq).size == 0
    for _ in range(200):  # random probes: allowed exactly where the reference has the prefix
        probe = tuple(rng.integers(2, 3 + vocab, size=rng.integers(0, 6)).tolist())
        assert trie.allowed(probe).tolist() == sorted(ref.get(probe, ()))


def test_subset_keeps_only_the_given_items(trie):
    sub = trie.subset(["b", "d"])
    assert len(sub) == 2 and sorted(sub.item_ids) == ["b", "d"] and sub.nbytes < trie.nbytes
    assert sub.allowed([]).tolist() == [5, 9]
    assert sub.allowed([5]).tolist() == [7]
    assert sub.allowed([5, 7]).tolist() == [EOS]
    assert sub.lookup([5, 7, EOS]) == "b" and sub.lookup([5, EOS]) is None and sub.lookup([5, 7, 8, EOS]) is None
    assert sub.max_length == 3  # the long identifiers are gone
    subsub = sub.subset(["d"])
    assert subsub.allowed([]).tolist() == [9] and subsub.lookup([9, EOS]) == "d"
    with pytest.raises(KeyError, match="not in the trie.*'a'"):
        sub.subset(["a", "b"])
    with pytest.raises(ValueError, match="subset is empty"):
        trie.subset([])


@pytest.mark.parametrize("sequences, items, message", [
    ([], [], "at least one identifier"),
    ([[1, 2]], ["a", "b"], "1 sequences for 2 item ids"),
    ([[1, 2], []], ["a", "b"], "item 'b' has an empty token sequence"),
    ([[1, -3]], ["a"], "non-negative"),
    ([[1, 2], [3, 2], [1, 2]], ["a", "b", "c"], "items 'a' and 'c' have the same token sequence"),
])
def test_bad_sequences_are_refused(sequences, items, message):
    with pytest.raises(ValueError, match=message):
        Trie(sequences, items)


def test_large_trie_is_compact():
    n = 100_000
    i = np.random.default_rng(0).permutation(n)  # unsorted input: three digits-like positions, then eos
    seqs = np.stack([i // 1000, i % 1000 // 10, i % 10], axis=1) + EOS + 1
    seqs = np.concatenate([seqs, np.full((n, 1), EOS)], axis=1)
    trie = Trie(seqs.tolist(), [str(j) for j in i])
    assert trie.nbytes == n * 4 * 4 + n * 4
    assert trie.lookup(seqs[123].tolist()) == str(i[123])
    assert trie.allowed([]).tolist() == list(range(EOS + 1, EOS + 101))
    assert trie.allowed(seqs[7, :2]).tolist() == list(range(EOS + 1, EOS + 11))


# --- tokenization against Hugging Face tokenizers ---

@pytest.fixture(scope="module")
def tokenizer():
    from genret.bpe import train_chat_tokenizer

    return train_chat_tokenizer(["a red circle left of a blue square", "0123456789 img"], 300)


@pytest.mark.parametrize("scheme, kwargs", [
    ("string", {}), ("numeric", {}), ("atomic", {}),
    ("semantic", {"texts": {f"img{i}": ["a red circle", f"a blue square {i}"] for i in range(120)}}),
    ("structured", {"embeddings": np.random.default_rng(0).normal(size=(120, 4)), "k": 4, "leaf_size": 8}),
])
def test_tokenize_every_scheme_into_a_trie(tokenizer, scheme, kwargs):
    import copy

    tok = copy.deepcopy(tokenizer)
    ids = make_identifiers(scheme, [f"img{i}" for i in range(120)], **kwargs)
    added = add_tokens(ids, tok)
    assert added == len(ids.new_tokens) and add_tokens(ids, tok) == 0  # a second call adds nothing
    seqs = tokenize(ids, tok)
    assert all(s[-1] == tok.eos_token_id and tok.eos_token_id not in s[:-1] for s in seqs)
    assert [tok.decode(s[:-1]) for s in seqs] == list(ids.identifiers)  # the tokens spell the identifier
    if ids.new_tokens:  # each new token is one token
        assert len(seqs[0]) - 1 == ids.identifiers[0].count("<")
    trie = Trie.from_identifiers(ids, tok)
    assert len(trie) == 120 and trie.eos == tok.eos_token_id
    assert all(trie.lookup(s) == item for s, item in zip(seqs, ids.item_ids))


@pytest.mark.parametrize("scheme", ["atomic", "structured"])
def test_tokenize_without_the_new_tokens_says_call_add_tokens(tokenizer, scheme):
    kwargs = {"embeddings": np.eye(40)} if scheme == "structured" else {}
    ids = make_identifiers(scheme, [f"i{j}" for j in range(40)], **kwargs)
    with pytest.raises(ValueError, match="scheme and model vocabulary do not match.*call .*add_tokens"):
        tokenize(ids, tokenizer)


def test_tokenize_finds_collisions_the_strings_hide():
    from transformers import PreTrainedTokenizerFast

    word = Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1, "red": 2, "circle": 3}, unk_token="[UNK]"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=word, unk_token="[UNK]", eos_token="</s>")
    texts = {"a": ["red circle"], "b": ["red zebra"], "c": ["red yak"]}
    ids = make_identifiers("semantic", list(texts), texts=texts)  # three different strings...
    with pytest.raises(ValueError, match="collide after tokenization: 'red zebra' \\(item 'b'\\) and 'red yak'"):
        tokenize(ids, tok)  # ...but 'zebra' and 'yak' are both [UNK]


def test_add_tokens_resizes_the_model(tokenizer):
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    tok = copy.deepcopy(tokenizer)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    ids = make_identifiers("atomic", [f"i{j}" for j in range(30)])
    assert add_tokens(ids, tok, model) == 30
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == model.get_output_embeddings().weight.shape[0]
    assert tok.convert_tokens_to_ids("<id_000029>") == len(tok) - 1
