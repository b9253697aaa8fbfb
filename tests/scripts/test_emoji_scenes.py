"""The third data set's maker (scripts/make_emoji_scenes.py), on Debian's Noto Color Emoji (./run test installs it)."""

import json

import numpy as np
import pytest
from PIL import Image

from genret.data import load_dataset
from genret.eval.evaluator import twin_pairs


@pytest.fixture(scope="module")
def maker():
    from conftest import load_script

    return load_script("make_emoji_scenes")


def test_the_data_set_has_its_splits_twins_unseen_drawings_and_true_captions(maker, tmp_path):
    config = maker.EmojiConfig(n_train=40, n_val=8, n_test=16)
    out = maker.make(tmp_path / "e", config=config)
    data = load_dataset(out)
    assert {s: len(data.split(s)) for s in ("train", "val", "test")} == {"train": 40, "val": 8, "test": 16}
    for split, n in (("val", 2), ("test", 4)):
        pairs = twin_pairs(data.split(split))
        assert len(pairs) == n
        records = {r.id: r for r in data.split(split).records}
        assert {records[a].meta["twin_kind"] for a, _ in pairs} == {"binding", "relation"}
        for a, b in pairs:
            ea, eb = records[a].meta["emoji"], records[b].meta["emoji"]
            if records[a].meta["twin_kind"] == "binding":  # the same things in their places, the sizes swapped
                assert ea["things"] == eb["things"] and ea["sizes"] == eb["sizes"][::-1]
            else:  # the things (with their sizes) change places
                assert ea["things"] == eb["things"][::-1] and ea["sizes"] == eb["sizes"][::-1]
            assert set(records[a].captions).isdisjoint(records[b].captions)
            pa, pb = (np.asarray(Image.open(records[x].path), dtype=int) for x in (a, b))
            assert (pa != pb).any() and (pa == pb).mean() > 0.5  # one noise: they differ where the things are
    for r in data.records:
        e = r.meta["emoji"]
        assert len(r.captions) == 5 and e["things"][0] != e["things"][1] and set(e["sizes"]) == {"small", "large"}
        for cap in r.captions:
            assert all(f"{s} {t}" in cap for s, t in zip(e["sizes"], e["things"]))
        drawing = {t: maker.THINGS[t][r.split != "train"] for t in e["things"]}
        assert e["drawings"] == [f"U+{drawing[t]:X}" for t in e["things"]]  # held-out splits: the other drawing
    said = lambda split: {maker.Scene(tuple(r.meta["emoji"]["things"]), tuple(r.meta["emoji"]["sizes"]),  # noqa: E731
                                      r.meta["emoji"]["relation"] == "left of", (0, 0, 0, 0), (0, 0), (0, 0)).signature()
                          for r in data.split(split).records}
    assert not said("train") & (said("val") | said("test")) and not said("val") & said("test")
    manifest = json.loads((out / "genret.json").read_text())
    assert manifest["format"] == "genret.emoji_scenes" and len(manifest["font"]["sha256"]) == 64
    again = maker.make(tmp_path / "again", config=config)
    assert (out / "dataset_emoji.json").read_text() == (again / "dataset_emoji.json").read_text()
    assert all((out / "images" / p.name).read_bytes() == p.read_bytes() for p in (again / "images").iterdir())


def test_a_missing_or_wrong_font_is_named_and_leaves_the_last_data_set_whole(maker, tmp_path, capsys):
    config = maker.EmojiConfig(n_train=8, n_val=4, n_test=4)
    out = maker.make(tmp_path / "e", config=config)
    before = (out / "dataset_emoji.json").read_text()
    assert maker.main([str(out), "--font", str(tmp_path / "none.ttf")]) == 2
    assert "none.ttf: missing; install Debian's fonts-noto-color-emoji" in capsys.readouterr().err
    bad = tmp_path / "bad.ttf"
    bad.write_bytes(b"not a font")
    assert maker.main([str(out), "--font", str(bad), "--n-train", "8", "--n-val", "4", "--n-test", "4"]) == 2
    assert "bad.ttf: not a font Pillow can read" in capsys.readouterr().err
    assert (out / "dataset_emoji.json").read_text() == before and len(load_dataset(out).split("test")) == 4
