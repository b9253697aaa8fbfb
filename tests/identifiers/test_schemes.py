"""Identifier schemes: what each assigns, the errors a user meets, and identifiers.json on disk."""

import json

import numpy as np
import pytest

from genret._io import ManifestError
from genret.identifiers import SCHEMES, Identifiers, make_identifiers

ITEMS = [f"img{i:04d}" for i in range(1000)]


def _blobs(n_per: int, centers: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    """``centers`` well-separated clusters of ``n_per`` points each, rows grouped by cluster."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(centers, dim)) * 20
    return np.concatenate([m + rng.normal(size=(n_per, dim)) for m in means]).astype(np.float32)


def _kwargs(scheme: str, items: list[str]) -> dict:
    if scheme == "semantic":
        return {"texts": {i: [f"a photo of {i}"] for i in items}}
    if scheme == "structured":
        return {"embeddings": np.random.default_rng(0).normal(size=(len(items), 8))}
    return {}


@pytest.mark.parametrize("scheme, kwargs, item_417, new_tokens", [
    ("string", {}, "417", 0),
    ("numeric", {}, "4 1 7", 0),
    ("numeric", {"width": 5}, "0 0 4 1 7", 0),
    ("numeric", {"separator": "-"}, "4-1-7", 0),
    ("atomic", {}, "<id_000417>", 1000),
    ("semantic", {"texts": {i: [f"a photo of {i}"] for i in ITEMS}}, "a photo of img0417", 0),
])
def test_each_scheme_names_item_417_as_documented(scheme, kwargs, item_417, new_tokens):
    ids = make_identifiers(scheme, ITEMS, **kwargs)
    assert ids.scheme == scheme and ids.item_ids == tuple(ITEMS)
    assert ids.identifier("img0417") == item_417
    assert len(set(ids.identifiers)) == len(ITEMS)
    assert len(ids.new_tokens) == new_tokens


def test_registry_lists_the_five_schemes():
    assert SCHEMES.names() == ["atomic", "numeric", "semantic", "string", "structured"]
    with pytest.raises(KeyError, match="known: atomic, numeric"):
        make_identifiers("hashed", ITEMS)


def test_semantic_takes_the_first_free_candidate_then_a_suffix():
    texts = {"a": ["a red  circle", "a circle"], "b": ["a red circle", "a red shape"], "c": "a red circle",
             "d": ["a red circle", "a red shape"], "e": ["  ", "a red circle"]}
    ids = make_identifiers("semantic", list(texts), texts=texts)
    assert ids.identifiers == ("a red circle", "a red shape", "a red circle #2", "a red circle #3",
                               "a red circle #4")
    with pytest.raises(KeyError):
        ids.identifier("z")


def test_structured_paths_follow_the_clusters():
    x = _blobs(n_per=50, centers=4)
    ids = make_identifiers("structured", ITEMS[:200], embeddings=x, k=4, leaf_size=8, seed=3)
    first = [i.split(">")[0] for i in ids.identifiers]
    # Every well-separated blob is one top-level cluster: its items share their first token, no other blob does.
    assert [len(set(first[b * 50:(b + 1) * 50])) for b in range(4)] == [1, 1, 1, 1]
    assert len(set(first)) == 4
    tokens = set(ids.new_tokens)
    for ident in ids.identifiers:  # every piece of every identifier is one of the new tokens
        parts = [p + ">" for p in ident.split(">")[:-1]]
        assert parts and set(parts) <= tokens and parts[-1].startswith("<p_")
        assert len(parts) <= ids.parameters["depth"] + 1
    assert "<s1_03>" in tokens and "<p_07>" in tokens and "<p_08>" not in tokens


def test_structured_is_deterministic_given_the_seed():
    x = np.random.default_rng(1).normal(size=(300, 16))
    a = make_identifiers("structured", ITEMS[:300], embeddings=x, k=5, leaf_size=10, seed=0)
    b = make_identifiers("structured", ITEMS[:300], embeddings=x, k=5, leaf_size=10, seed=0)
    c = make_identifiers("structured", ITEMS[:300], embeddings=x, k=5, leaf_size=10, seed=1)
    assert a.identifiers == b.identifiers
    assert a.identifiers != c.identifiers


def test_structured_splits_identical_embeddings_evenly():
    ids = make_identifiers("structured", ITEMS[:100], embeddings=np.ones((100, 4)), k=4, leaf_size=10)
    assert len(set(ids.identifiers)) == 100
    assert ids.parameters["depth"] <= 3


@pytest.mark.parametrize("scheme", ["string", "numeric", "semantic", "structured", "atomic"])
def test_empty_and_duplicate_galleries_are_refused(scheme):
    with pytest.raises(ValueError, match="gallery is empty"):
        make_identifiers(scheme, [], **_kwargs(scheme, []))
    dup = ["a", "b", "a"]
    with pytest.raises(ValueError, match="duplicate item ids.*'a'"):
        make_identifiers(scheme, dup, **_kwargs(scheme, dup))


@pytest.mark.parametrize("scheme, n, kwargs, message", [
    ("numeric", 101, {"width": 2}, "width 2 hold at most 100 items, the gallery has 101: raise width to 3"),
    ("numeric", 100, {"width": 0}, "width must be at least 1"),
    ("structured", 200, {"k": 2, "leaf_size": 10, "max_depth": 3}, "hold at most 80 items, the gallery has 200"),
    ("structured", 50, {"embeddings": np.zeros((49, 4))}, r"shape \(49, 4\), expected one row per item \(50"),
    ("structured", 50, {"embeddings": np.zeros(50)}, "expected one row per item"),
    ("structured", 50, {"k": 1}, "k >= 2"),
    ("semantic", 3, {"texts": {"img0000": ["x"], "img0001": [""]}}, "2 items have no candidate text"),
])
def test_bad_input_says_what_to_do(scheme, n, kwargs, message):
    kwargs = {**_kwargs(scheme, ITEMS[:n]), **kwargs}
    with pytest.raises(ValueError, match=message):
        make_identifiers(scheme, ITEMS[:n], **kwargs)


def test_structured_depth_limit_reached_by_an_uneven_split():
    # 90 points on one spot and 10 spread out: within 80 = 2**3 * 10 items' capacity in count, not in shape.
    x = np.concatenate([np.zeros((90, 2)), np.random.default_rng(0).normal(size=(10, 2)) * 100])
    with pytest.raises(ValueError, match="still larger than leaf_size=30"):
        make_identifiers("structured", ITEMS[:100], embeddings=x, k=2, leaf_size=30, max_depth=2)


def test_identifiers_refuse_colliding_strings():
    with pytest.raises(ValueError, match="identifiers collide: 'x'"):
        Identifiers("string", {}, ("a", "b"), ("x", "x"))


@pytest.mark.parametrize("scheme", ["string", "numeric", "semantic", "structured", "atomic"])
def test_save_load_round_trip(tmp_path, scheme):
    ids = make_identifiers(scheme, ITEMS[:50], **_kwargs(scheme, ITEMS[:50]))
    path = ids.save(tmp_path / "run")
    assert path == tmp_path / "run" / "identifiers.json"
    assert [p.name for p in path.parent.iterdir()] == ["identifiers.json"]  # no temporary file left
    data = json.loads(path.read_text())
    assert data["format"] == "genret.identifiers" and data["version"] == 1 and data["scheme"] == scheme
    assert data["items"]["img0007"] == ids.identifier("img0007")
    for where in (path, path.parent):
        back = Identifiers.load(where)
        assert back == ids and back.parameters == ids.parameters


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(format="genret.index"), "not genret identifiers \\(format 'genret.index'"),
    (lambda d: d.update(version=2), "identifiers format version 2, this genret reads 1"),
    (lambda d: d.update(scheme="hashed"), "unknown identifier scheme 'hashed'"),
    (lambda d: d.update(items=[]), "'items' must map each item id"),
    (lambda d: d.update(items={"a": "x", "b": "x"}), "identifiers collide"),
    (lambda d: d.update(new_tokens="<a>"), "'new_tokens' must be a list"),
])
def test_load_names_the_file_and_what_is_wrong(tmp_path, edit, message):
    path = make_identifiers("atomic", ITEMS[:5]).save(tmp_path)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=message) as err:
        Identifiers.load(path)
    assert str(path) in str(err.value)


def test_load_malformed_or_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="identifiers not found"):
        Identifiers.load(tmp_path)
    (tmp_path / "identifiers.json").write_text("{not json")
    with pytest.raises(ValueError, match="identifiers.json: line 1"):
        Identifiers.load(tmp_path)


def test_a_scheme_is_an_object_that_makes_and_extends_and_says_what_it_needs():
    """Trainers ask a scheme what it needs instead of branching on its name; a new scheme plugs in."""
    from genret.identifiers.schemes import Scheme, extend_identifiers

    assert SCHEMES.get("structured").needs == ("embeddings",) and SCHEMES.get("structured").options == ("k", "leaf_size")
    assert SCHEMES.get("semantic").needs == ("texts",) and SCHEMES.get("atomic").needs == ()

    def make(items):
        return Identifiers("letters", {}, tuple(items), tuple(f"L{i}" for i in range(len(items))), ())

    def extend(old, new_items, **_):
        return make(old.item_ids + tuple(new_items))

    SCHEMES.register("letters")(Scheme("letters", make, extend))
    try:
        ids = make_identifiers("letters", ["a", "b"])
        grown = extend_identifiers(ids, ["c"])
    finally:
        SCHEMES._entries.pop("letters")  # the registry lists the five shipped schemes again
    assert grown.identifiers == ("L0", "L1", "L2") and grown.identifiers[:2] == ids.identifiers
