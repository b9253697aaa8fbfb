"""The BPE tokenizers are the same in every process, cover their captions, and respect their size."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
from tokenizers import Regex, pre_tokenizers

from genret.bpe import SPECIAL, byte_level_bpe, train_chat_tokenizer
from genret.bpe import (_SPLIT, BOS, EOS, EOW, byte_alphabet, clip_normalizer, clip_pre_tokenizer,
                                       count_words, learn_bpe, train_clip_tokenizer)

COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
RELATIONS = ("left of", "right of", "above", "below")
# Many equally frequent pairs: the case where tokenizers' own BpeTrainer picked merges by hash order.
CAPTIONS = [f"A {c1} {s1} {r} a {c2} {s2}." for c1, s1, r, c2, s2
            in itertools.product(COLOURS, SHAPES, RELATIONS, COLOURS[:2], SHAPES[:2])]

TRAINERS = {
    "clip": lambda texts, size: train_clip_tokenizer(texts, size, model_max_length=64),
    "chat": train_chat_tokenizer,
}

_SAVE_BOTH = """
import json, sys
from genret.bpe import train_chat_tokenizer
from genret.bpe import train_clip_tokenizer
CAPTIONS = json.load(sys.stdin)
train_clip_tokenizer(CAPTIONS, 320, 24).save_pretrained(sys.argv[1] + "/clip")
train_chat_tokenizer(CAPTIONS, 320).save_pretrained(sys.argv[1] + "/chat")
"""


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_files_in_every_process(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    outs = []
    for seed in ("1", "2"):  # Python's string hashing differs too
        out = tmp_path / seed
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo}
        subprocess.run([sys.executable, "-c", _SAVE_BOTH, str(out)], input=json.dumps(CAPTIONS), text=True,
                       check=True, cwd=repo, env=env)
        outs.append(_files(out))
    assert {str(p) for p in outs[0]} >= {"clip/tokenizer.json", "chat/tokenizer.json"}
    assert outs[0] == outs[1]


@pytest.mark.parametrize("name", TRAINERS)
def test_same_tokenizer_in_one_process(name):
    first, second = (TRAINERS[name](CAPTIONS, 320) for _ in range(2))
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()


def test_clip_tokenizes_captions_without_unknown_and_decodes_normalised_words():
    tokenizer = TRAINERS["clip"](CAPTIONS, 320)
    words = pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True)
    for text in CAPTIONS + ["Ünïcode  ☃\tTEXT, it's 42!"]:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.convert_tokens_to_ids(BOS) and ids[-1] == tokenizer.convert_tokens_to_ids(EOS)
        assert tokenizer.unk_token_id not in ids[1:-1]  # the unknown token is EOS, where CLIP pools
        expected = [w for w, _ in words.pre_tokenize_str(clip_normalizer().normalize_str(text))]
        assert tokenizer.decode(ids, skip_special_tokens=True).split() == expected


def test_chat_tokenizes_captions_and_decodes_them_back():
    tokenizer = TRAINERS["chat"](CAPTIONS, 320)
    for text in CAPTIONS + ["Ünïcode  ☃\tTEXT, it's 42!"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert None not in tokenizer.convert_ids_to_tokens(ids)
        assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("size", [270, 300, 330])
def test_chat_vocab_size_is_the_limit(size):
    assert len(train_chat_tokenizer(CAPTIONS, size)) == size


@pytest.mark.parametrize("size", [270, 290, 310])
def test_clip_vocab_size_bounds_the_learned_part(size):
    # Learned: the specials, the byte alphabet, the word-final characters the captions have, the merges;
    # then every byte's word-final form, so the word-final characters are counted once.
    finals = {word[-1] + EOW for word in count_words(CAPTIONS, clip_pre_tokenizer(), clip_normalizer())}
    assert len(train_clip_tokenizer(CAPTIONS, size)) == size - len(finals) + 256


@pytest.mark.parametrize("name", TRAINERS)
def test_a_large_vocabulary_makes_each_word_one_token(name):
    # The learner splits its words as the finished BPE model does, so merging until no pair is left
    # leaves every training word whole.
    tokenizer = TRAINERS[name](CAPTIONS, 5000)
    assert len(tokenizer) < 5000
    for text in CAPTIONS[:20]:
        n_words = len(text.split()) + 1  # the final full stop is a word of its own
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == n_words


@pytest.mark.parametrize("words, merges", [
    ({"ab": 1, "cd": 1}, [("a", "b"), ("c", "d")]),
    ({"cd": 1, "ab": 1}, [("a", "b"), ("c", "d")]),  # the order words come in does not matter
    ({"cd": 2, "ab": 1}, [("c", "d"), ("a", "b")]),  # frequency first
    ({"abab": 1, "ba": 1}, [("a", "b"), ("ab", "ab"), ("b", "a")]),  # (a, b) and (b, a) tie at 2, then
    # (ab, ab) and (b, a) at 1
    ({"aaa": 1}, [("a", "a"), ("aa", "a")]),  # overlapping pairs merge left to right
])
def test_ties_go_to_the_smallest_pair(words, merges):
    vocab, learned = learn_bpe(words, vocab_size=100)
    assert learned == merges
    assert list(vocab)[-len(merges):] == [a + b for a, b in merges]


def test_trainers_break_ties_by_the_smallest_pair():
    # "cd ab": every pair occurs once; ("a", "b") is the smallest, before ("c", "d") and ("Ġ", "a").
    one_merge = len(SPECIAL) + 256 + 1
    assert _merges(byte_level_bpe(["cd ab"], SPECIAL, one_merge)) == [["a", "b"]]
    # CLIP adds the word-final "b</w>" and "d</w>" before merging.
    clip = train_clip_tokenizer(["cd ab"], 2 + 256 + 2 + 1)
    assert _merges(clip.backend_tokenizer) == [["a", "b" + EOW]]


def test_vocabulary_order_is_special_then_code_points():
    vocab, _ = learn_bpe({"ba": 3}, vocab_size=0, special=("<s>",), alphabet=byte_alphabet(), end_of_word_suffix=EOW)
    tokens = list(vocab)
    assert tokens[0] == "<s>" and tokens[1:257] == byte_alphabet() and tokens[257:] == ["a" + EOW]


def _merges(tokenizer) -> list:
    return json.loads(tokenizer.to_str())["model"]["merges"]
