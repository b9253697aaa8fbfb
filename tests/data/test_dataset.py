import json

import pytest
from PIL import Image

from genret.data import DatasetError, load_dataset


def _img(path, size=(16, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 10, 10)).save(path)


def karpathy(tmp_path, images, layout="flickr"):
    """Write a Karpathy file in the layout of a real download."""
    entries = []
    for i, (name, split, caps) in enumerate(images):
        entry = {"filename": name, "imgid": i, "split": split, "sentids": list(range(i * 5, i * 5 + len(caps))),
                 "sentences": [{"raw": c, "imgid": i, "sentid": i * 5 + j} for j, c in enumerate(caps)]}
        if layout == "coco":
            entry["filepath"] = "val2014"
            entry["cocoid"] = 1000 + i
            _img(tmp_path / "val2014" / name)
        else:
            _img(tmp_path / "flickr30k-images" / name)
        entries.append(entry)
    path = tmp_path / f"dataset_{layout}.json"
    path.write_text(json.dumps({"images": entries, "dataset": layout}))
    return path


CAPS = ["a dog runs", "a brown dog on grass"]


@pytest.mark.parametrize("layout", ["flickr", "coco"])
def test_real_layouts_load_without_conversion(tmp_path, layout):
    path = karpathy(tmp_path, [("1.jpg", "train", CAPS), ("2.jpg", "test", CAPS), ("3.jpg", "restval", CAPS)], layout)
    ds = load_dataset(tmp_path)  # a folder holding the file works too
    assert ds.name == layout and len(ds) == 3
    assert all(r.path.is_file() for r in ds.records)
    assert len(ds.split("train")) == 2  # train + restval
    test = ds.split("test")
    queries, relevant = test.text_queries()
    assert [q.text for q in queries] == CAPS and relevant == [{"1"}, {"1"}]
    iq, irel = test.image_queries()
    assert iq[0].target == "text" and irel == [{"1#0", "1#1"}]
    assert load_dataset(path).records[0].captions == tuple(CAPS)


def test_jsonl_with_relative_and_absolute_images(tmp_path):
    _img(tmp_path / "a.png")
    _img(tmp_path / "sub" / "b.png")
    lines = [{"image": "a.png", "captions": ["one"], "split": "test"},
             {"image": str(tmp_path / "sub" / "b.png"), "captions": "two", "split": "test", "id": "bee"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    ds = load_dataset(tmp_path / "d.jsonl")
    assert [r.id for r in ds.records] == ["a.png", "bee"]
    assert ds.records[1].captions == ("two",)


@pytest.mark.parametrize("content,match", [
    ("", "malformed JSON"),
    ("{\"images\": []}", "'images' list is empty"),
    ("[1, 2]", "not a Karpathy-format file"),
    ("{\"images\": [{\"imgid\": 0, \"sentences\": []}]}", r"images\[0\]: missing 'filename'"),
])
def test_malformed_karpathy_files_are_named(tmp_path, content, match):
    path = tmp_path / "dataset_x.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as err:
        load_dataset(path)
    assert "dataset_x.json" in str(err.value)


@pytest.mark.parametrize("caps,match", [
    ([""], "caption 0 is empty"),
    (["ok", 5], r"caption 1 is a number \(5\), not text"),
    ([], "has no captions"),
])
def test_bad_captions_raise_or_skip(tmp_path, caps, match, caplog):
    path = karpathy(tmp_path, [("1.jpg", "test", CAPS), ("2.jpg", "test", caps)])
    with pytest.raises(DatasetError, match=match):
        load_dataset(path)
    ds = load_dataset(path, on_error="skip")
    assert [r.id for r in ds.records] == ["0"]
    assert "skipped 1 bad entries" in caplog.text


def test_missing_image_file_raise_or_skip(tmp_path, caplog):
    path = karpathy(tmp_path, [("1.jpg", "test", CAPS), ("2.jpg", "test", CAPS)])
    (tmp_path / "flickr30k-images" / "2.jpg").unlink()
    with pytest.raises(DatasetError, match=r"images\[1\]: image file not found: 2.jpg"):
        load_dataset(path)
    assert len(load_dataset(path, on_error="skip")) == 1
    assert "skipped 1" in caplog.text


def test_jsonl_errors_name_the_line(tmp_path):
    _img(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "a.png", "captions": ["x"]}) + "\n{oops\n")
    with pytest.raises(DatasetError, match="d.jsonl: line 2: malformed JSON"):
        load_dataset(tmp_path / "d.jsonl")


def test_missing_paths_and_splits(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset not found"):
        load_dataset(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="expected one dataset_"):
        load_dataset(tmp_path)
    path = karpathy(tmp_path, [("1.jpg", "train", CAPS)])
    with pytest.raises(DatasetError, match="no images in split test; splits present: \\['train'\\]"):
        load_dataset(path).split("test")


@pytest.mark.parametrize("sentences, match", [
    ("a dog runs", r"images\[0\]: 'sentences' is str, not a list"),
    ({"raw": "a dog"}, r"images\[0\]: 'sentences' is dict, not a list"),
    (None, r"images\[0\]: 'sentences' is null, not a list"),
    ([{"tokens": ["a"]}], r"images\[0\]: sentences\[0\] has no 'raw' text"),
    ("MISSING", r"images\[0\]: missing 'sentences'"),
])
def test_karpathy_sentences_that_are_not_a_list_of_raw_texts_are_named(tmp_path, sentences, match):
    """A string was read as one-letter captions, a dict as its keys, null as a TypeError; a missing list as
    "missing 'image'"."""
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    entry = {"filename": "a.png", "split": "test"}
    if sentences != "MISSING":
        entry["sentences"] = sentences
    (tmp_path / "dataset_x.json").write_text(json.dumps({"images": [entry]}))
    with pytest.raises(DatasetError, match=match):
        load_dataset(tmp_path)


def test_a_broken_jsonl_line_can_be_skipped_and_every_skip_is_named(tmp_path, caplog):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    lines = [json.dumps({"image": "a.png", "captions": ["a dog"]}), "{not json", json.dumps({"image": "gone.png",
                                                                                             "captions": ["x"]})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match="line 2: malformed JSON"):
        load_dataset(tmp_path / "d.jsonl")
    with caplog.at_level("WARNING"):
        data = load_dataset(tmp_path / "d.jsonl", on_error="skip")
    assert len(data) == 1
    assert "skipped 2 bad entries" in caplog.text and "line 2: malformed JSON" in caplog.text and "gone.png" in caplog.text


def test_skip_drops_an_unreadable_image_with_its_captions_and_names_it(tmp_path, caplog):
    """A file that exists but does not decode: eval and train clip used to stop on it despite --on-error skip,
    and a skip left its captions behind as queries with nothing to find."""
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    entries = [{"image": "good.png", "captions": ["a good image"]}, {"image": "broken.png", "captions": ["lost"]}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    with caplog.at_level("WARNING"):
        data = load_dataset(tmp_path / "d.jsonl", on_error="skip")
    assert [r.id for r in data.records] == ["good.png"]
    assert all("lost" not in r.captions for r in data.records)
    assert "broken.png: not a readable image" in caplog.text
    assert len(load_dataset(tmp_path / "d.jsonl").records) == 2  # raise mode: the index step names it instead
