"""Hand-computed checks for genret.eval.metrics."""

from __future__ import annotations

import math

import pytest

from genret.eval.metrics import (
    average_precision_at_k,
    first_relevant_rank,
    hits_at_k_per_round,
    map_at_k,
    mrr,
    ndcg_at_k,
    recall_at_k,
    recall_at_ks,
    recall_subset_at_k,
    rsum,
)

RANKED = ["a", "b", "c", "d", "e"]
LOG3 = math.log2(3)


@pytest.mark.parametrize(
    ("ranked", "relevant", "expected"),
    [
        (RANKED, {"a"}, 1),
        (RANKED, {"e", "c"}, 3),  # the earlier of the two
        (RANKED, {"z"}, None),  # nothing retrieved
        ([], {"a"}, None),
        (["a", "a", "b"], {"b"}, 2),  # the repeated "a" counts once
    ],
)
def test_first_relevant_rank(ranked, relevant, expected):
    assert first_relevant_rank(ranked, relevant) == expected


@pytest.mark.parametrize(
    ("relevant", "k", "expected"),
    [
        ([{"c"}], 3, 1.0),  # relevant at rank exactly k
        ([{"d"}], 3, 0.0),  # relevant at rank k + 1
        ([{"z"}], 5, 0.0),  # never retrieved
        ([{"z", "e"}], 5, 1.0),  # image->text: any one of several captions is a hit
        ([set()], 5, 0.0),  # no relevant ids at all is a miss
    ],
)
def test_recall_at_k_single_query(relevant, k, expected):
    assert recall_at_k([RANKED], relevant, k) == expected


def test_recall_at_k_averages_queries():
    # hits: q1 (a@1), q2 (b@2), q3 misses (c@3 > k=2), q4 misses -> 2/4
    rankings = [RANKED, RANKED, RANKED, RANKED]
    assert recall_at_k(rankings, [{"a"}, {"b"}, {"c"}, {"z"}], k=2) == pytest.approx(0.5)


def test_recall_at_k_duplicates_count_once():
    # dedup gives ["a", "b"]: b is at rank 2, inside k=2; without dedup it would sit at rank 3
    assert recall_at_k([["a", "a", "b"]], [{"b"}], k=2) == 1.0


def test_recall_at_ks_keys_and_values():
    # first relevant at rank 3 for q1, rank 7 for q2 (of a 12-long list), q3 never
    long = [f"i{n}" for n in range(1, 13)]
    got = recall_at_ks([long, long, long], [{"i3"}, {"i7"}, {"x"}])
    # R@1: 0/3; R@5: q1 -> 1/3; R@10: q1, q2 -> 2/3
    assert list(got) == ["R@1", "R@5", "R@10"]
    assert got == pytest.approx({"R@1": 0.0, "R@5": 1 / 3, "R@10": 2 / 3})


def test_rsum():
    # (0.1 + 0.2 + 0.3) + (0.4 + 0.5 + 0.6) = 2.1; extra keys are ignored
    t2i = {"R@1": 0.1, "R@5": 0.2, "R@10": 0.3, "R@50": 0.9}
    i2t = {"R@1": 0.4, "R@5": 0.5, "R@10": 0.6}
    assert rsum(t2i, i2t) == pytest.approx(2.1)


@pytest.mark.parametrize(
    ("relevant", "k", "expected"),
    [
        ([{"a"}, {"c"}, {"z"}], None, (1 + 1 / 3 + 0) / 3),  # ranks 1, 3, none
        ([{"a"}, {"c"}, {"z"}], 2, (1 + 0 + 0) / 3),  # rank 3 falls outside k=2
        ([{"b"}, {"e"}], 5, (1 / 2 + 1 / 5) / 2),  # rank exactly k still counts
        ([{"b", "d"}], None, 1 / 2),  # only the first relevant counts
    ],
)
def test_mrr(relevant, k, expected):
    assert mrr([RANKED] * len(relevant), relevant, k=k) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("ranked", "relevant", "k", "expected"),
    [
        # hits at 1 and 3: (1/1 + 2/3) / min(5, 2)
        (RANKED, {"a", "c"}, 5, (1 + 2 / 3) / 2),
        # fewer than K relevant, one missed: hit at 2 only -> (1/2) / min(5, 3)
        (RANKED, {"b", "y", "z"}, 5, (1 / 2) / 3),
        # more relevant than K: hits at 1, 2 -> (1 + 1) / min(2, 4)
        (RANKED, {"a", "b", "c", "d"}, 2, 1.0),
        # relevant at k + 1 is ignored: hit at 1 only -> 1 / min(2, 2)
        (RANKED, {"a", "c"}, 2, 1 / 2),
        (RANKED, {"z"}, 5, 0.0),
        (RANKED, set(), 5, 0.0),
        # duplicates count once: dedup ["a", "b"] -> (1 + 2/2) / 2, not (1 + 2/2 + 3/3) / 2
        (["a", "a", "b"], {"a", "b"}, 3, 1.0),
    ],
)
def test_average_precision_at_k(ranked, relevant, k, expected):
    assert average_precision_at_k(ranked, relevant, k) == pytest.approx(expected)


def test_map_at_k_multi_target():
    # q1: hits at 1, 3 -> (1 + 2/3) / 2 = 5/6; q2: hit at 4 of 1 relevant -> (1/4) / 1; mean = (5/6 + 1/4) / 2
    got = map_at_k([RANKED, RANKED], [{"a", "c"}, {"d"}], k=5)
    assert got == pytest.approx((5 / 6 + 1 / 4) / 2)


@pytest.mark.parametrize(
    ("ranked", "relevance", "k", "expected"),
    [
        # binary, hit at 2: (1 / log2 3) / (1 / log2 2)
        (["x", "a"], {"a"}, 2, 1 / LOG3),
        # binary, 2 relevant, hits at 1 and 3: (1 + 1/2) / (1 + 1/log2 3)
        (["a", "x", "b"], {"a", "b"}, 3, 1.5 / (1 + 1 / LOG3)),
        # relevant at k + 1 contributes nothing
        (["x", "a"], {"a"}, 1, 0.0),
        # graded, ideal order reversed: gains b=2^1-1=1, a=2^2-1=3 -> (1 + 3/log2 3) / (3 + 1/log2 3)
        (["b", "a"], {"a": 2, "b": 1}, 2, (1 + 3 / LOG3) / (3 + 1 / LOG3)),
        # graded, ideal from judgements not from the list: c=7 never retrieved -> 3 / (7 + 3/log2 3)
        (["a", "x"], {"a": 2, "c": 3}, 2, 3 / (7 + 3 / LOG3)),
        # grade 0 has gain 0, so no positive judgement -> 0
        (["a"], {"a": 0}, 1, 0.0),
        (["a"], set(), 1, 0.0),
    ],
)
def test_ndcg_at_k(ranked, relevance, k, expected):
    assert ndcg_at_k([ranked], [relevance], k) == pytest.approx(expected)


def test_ndcg_at_k_averages_queries():
    # q1 perfect (1.0), q2 no relevant (0.0) -> 0.5
    assert ndcg_at_k([["a"], ["a"]], [{"a"}, set()], k=1) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("subset", "k", "expected"),
    [
        ({"b", "d", "e"}, 2, 1.0),  # filtered to [b, d, e]: d rises from rank 4 to 2
        ({"b", "c", "d"}, 2, 0.0),  # filtered to [b, c, d]: d at rank 3 = k + 1
        ({"a", "b"}, 2, 0.0),  # the target is not in the subset
    ],
)
def test_recall_subset_at_k(subset, k, expected):
    assert recall_subset_at_k([RANKED], [{"d"}], [subset], k) == expected
    # without filtering, d sits at rank 4 and is a miss at k=2
    assert recall_at_k([RANKED], [{"d"}], k) == 0.0


def test_hits_at_k_per_round_is_cumulative():
    # k=1; q1 hit at round 0 then lost at round 1; q2 hit only at round 1; q3 hit only at round 2
    rounds = [
        [["t1", "x"], ["x", "t2"], ["x", "t3"]],  # hits: q1 -> 1/3
        [["x", "t1"], ["t2"], ["x"]],  # q1 kept from round 0, q2 new -> 2/3
        [["x"], ["x"], ["t3"]],  # q3 new -> 3/3
    ]
    got = hits_at_k_per_round(rounds, [{"t1"}, {"t2"}, {"t3"}], k=1)
    assert got == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert all(a <= b for a, b in zip(got, got[1:]))


def test_hits_at_k_per_round_default_k_is_10():
    # target at rank 10 is a hit with the default k, rank 11 is not
    at_10 = [f"x{n}" for n in range(9)] + ["t"]
    at_11 = [f"x{n}" for n in range(10)] + ["t"]
    assert hits_at_k_per_round([[at_10, at_11]], [{"t"}, {"t"}]) == [0.5]


@pytest.mark.parametrize(
    ("call", "names"),
    [
        (lambda: recall_at_k([], [], 1), "rankings"),
        (lambda: recall_at_k([["a"]], [{"a"}, {"b"}], 1), "relevant"),
        (lambda: recall_at_k([["a"]], [{"a"}], 0), "k"),
        (lambda: recall_at_k(["a", "b"], [{"a"}, {"b"}], 1), "rankings"),  # a flat list, not one per query
        (lambda: recall_at_k([["a"]], ["a"], 1), "relevant"),  # a bare id, not a collection
        (lambda: recall_at_ks([["a"]], [{"a"}], ks=()), "ks"),
        (lambda: recall_at_ks([["a"]], [{"a"}], ks=(1, 0)), "k"),
        (lambda: rsum({"R@1": 1, "R@5": 1}, {"R@1": 1, "R@5": 1, "R@10": 1}), "t2i"),
        (lambda: rsum({"R@1": 1, "R@5": 1, "R@10": 1}, {}), "i2t"),
        (lambda: mrr([["a"]], [], None), "relevant"),
        (lambda: mrr([["a"]], [{"a"}], 0), "k"),
        (lambda: average_precision_at_k(["a"], {"a"}, 0), "k"),
        (lambda: map_at_k([], [], 5), "rankings"),
        (lambda: ndcg_at_k([["a"]], [{"a"}], -1), "k"),
        (lambda: ndcg_at_k([["a"]], [{"a": -1}], 1), "relevance"),
        (lambda: ndcg_at_k([["a"], ["b"]], [{"a"}], 1), "relevance"),
        (lambda: recall_subset_at_k([["a"]], [{"a"}], [], 1), "subsets"),
        (lambda: recall_subset_at_k([], [], [], 1), "rankings"),
        (lambda: hits_at_k_per_round([], [{"a"}]), "rankings_per_round"),
        (lambda: hits_at_k_per_round([[["a"]]], []), "relevant"),
        (lambda: hits_at_k_per_round([[["a"]], [["a"], ["b"]]], [{"a"}]), r"rankings_per_round\[1\]"),
        (lambda: hits_at_k_per_round([[["a"]]], [{"a"}], k=0), "k"),
    ],
)
def test_invalid_arguments_raise(call, names):
    with pytest.raises(ValueError, match=names):
        call()
