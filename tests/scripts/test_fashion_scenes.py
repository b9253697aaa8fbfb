"""The second data set's maker (scripts/make_fashion_scenes.py), on IDX files written here in Fashion-MNIST's format."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from genret.data import load_dataset
from genret.eval.evaluator import twin_pairs


@pytest.fixture(scope="module")
def maker():
    from conftest import load_script

    return load_script("make_fashion_scenes")


def _idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def source(tmp_path_factory, maker):
    folder = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("test", 40)):
        images, labels = maker.FILES[split]
        _idx(folder / images, rng.integers(0, 256, (n, 28, 28)))
        _idx(folder / labels, np.arange(n) % 10)
    return folder


def test_the_data_set_has_its_splits_twins_and_captions(maker, source, tmp_path):
    config = maker.FashionConfig(n_train=20, n_val=4, n_test=8)
    out = maker.make(tmp_path / "f", source, config)
    data = load_dataset(out)
    assert {s: len(data.split(s)) for s in ("train", "val", "test")} == {"train": 20, "val": 4, "test": 8}
    pairs = twin_pairs(data.split("test"))
    assert len(pairs) == 2
    records = {r.id: r for r in data.split("test").records}
    kinds = {records[a].meta["twin_kind"] for a, _ in pairs}
    assert kinds == {"binding", "relation"}
    for a, b in pairs:
        fa, fb = records[a].meta["fashion"], records[b].meta["fashion"]
        if records[a].meta["twin_kind"] == "binding":  # the same items, their colours swapped
            assert fa["items"] == fb["items"] and fa["colours"] == fb["colours"][::-1]
        else:  # the items (with their colours) change places
            assert fa["items"] == fb["items"][::-1] and fa["colours"] == fb["colours"][::-1]
        assert set(records[a].captions).isdisjoint(records[b].captions)
    for r in data.records:
        f = r.meta["fashion"]
        assert len(r.captions) == 5 and f["classes"][0] != f["classes"][1] and f["colours"][0] != f["colours"][1]
        for cap in r.captions:
            assert all(f"{c} {k}" in cap for c, k in zip(f["colours"], f["classes"]))
    held = {i for s in ("val", "test") for r in data.split(s).records for i in r.meta["fashion"]["items"]}
    val = {i for r in data.split("val").records for i in r.meta["fashion"]["items"]}
    test = {i for r in data.split("test").records for i in r.meta["fashion"]["items"]}
    assert held and not (val & test)  # val and test draw from disjoint halves of the source's test images
    manifest = json.loads((out / "genret.json").read_text())
    assert manifest["format"] == "genret.fashion_scenes" and len(manifest["source"]) == 4
    again = maker.make(tmp_path / "g", source, config)
    assert (out / "dataset_fashion.json").read_text() == (again / "dataset_fashion.json").read_text()


def test_bad_sources_are_named_and_leave_the_last_data_set_whole(maker, source, tmp_path, capsys):
    config = maker.FashionConfig(n_train=8, n_val=2, n_test=4)
    out = maker.make(tmp_path / "f", source, config)
    before = (out / "dataset_fashion.json").read_text()
    assert maker.main([str(out), "--source", str(tmp_path / "none")]) == 2
    assert "train-images-idx3-ubyte.gz: missing; install Debian's dataset-fashion-mnist" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in source.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    with gzip.open(broken / maker.FILES["test"][0], "wb") as fh:
        fh.write(b"PK\x03\x04 not idx")
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz: not an IDX file of unsigned bytes"):
        maker.make(out, broken, config)
    assert (out / "dataset_fashion.json").read_text() == before and len(load_dataset(out).split("test")) == 4
