"""Data set files and entries, every format alike: wrong field types, bad bytes and symlink loops are named (file and
entry or line) as a DatasetError, never a raw traceback or a silently wrong id."""

import json
import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from genret.data import DatasetError, load_cir, load_dataset

NOT_AN_ID = st.one_of(st.booleans(), st.floats(allow_nan=True), st.none(),
                      st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                      st.just(""), st.just("   "))
AN_ID = st.one_of(st.integers(-10**12, 10**12), st.text(min_size=1, max_size=12).filter(lambda s: s.strip()))
NOT_TEXT = st.one_of(st.booleans(), st.integers(), st.floats(), st.none(), st.lists(st.text(max_size=3), max_size=2),
                     st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2), st.just(""), st.just("  "))
NO_HEALTH = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (30, 60, 90)).save(path)


# --- the formats, each written with one field of its first entry replaced -------------------------------------------

def _karpathy(folder, **over):
    _png(folder / "a.png")
    entry = {"filename": "a.png", "imgid": 0, "split": "test", "sentences": [{"raw": "a dog"}], **over}
    entry = {k: v for k, v in entry.items() if v is not _DROP}
    (folder / "dataset_x.json").write_text(json.dumps({"images": [entry]}))
    return lambda: load_dataset(folder), "dataset_x.json: images[0]"


def _jsonl(folder, **over):
    _png(folder / "a.png")
    entry = {k: v for k, v in {"image": "a.png", "id": "a", "captions": ["a dog"], "split": "test", **over}.items()
             if v is not _DROP}
    (folder / "d.jsonl").write_text(json.dumps(entry) + "\n")
    return lambda: load_dataset(folder / "d.jsonl"), "d.jsonl: line 1"


def _cirr(folder, **over):
    for n in ("r0", "t0", "t1"):
        _png(folder / "img_raw" / "dev" / f"{n}.png")
    (folder / "image_splits").mkdir(parents=True)
    (folder / "captions").mkdir()
    (folder / "image_splits" / "split.rc2.val.json").write_text(json.dumps({n: f"./dev/{n}.png" for n in
                                                                             ("r0", "t0", "t1")}))
    entry = {"pairid": 1, "reference": "r0", "target_hard": "t0", "target_soft": {"t1": 1.0}, "caption": "is red",
             "img_set": {"id": 1, "members": ["r0", "t0", "t1"]}}
    entry.update(over)
    entry = {k: v for k, v in entry.items() if v is not _DROP}
    (folder / "captions" / "cap.rc2.val.json").write_text(json.dumps([entry]))
    return lambda: load_cir(folder, "val"), "cap.rc2.val.json: entry 0"


def _circo(folder, info_id=None, **over):
    ids = [11, 22, 33]
    for i in ids:
        _png(folder / "COCO2017_unlabeled" / "unlabeled2017" / f"{i:012d}.jpg")
    info = {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids]}
    if info_id is not None:
        info["images"][0]["id"] = info_id
    (folder / "COCO2017_unlabeled" / "annotations").mkdir()
    (folder / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json").write_text(json.dumps(info))
    entry = {"id": 0, "reference_img_id": 11, "target_img_id": 22, "relative_caption": "is blue",
             "gt_img_ids": [22, 33], **over}
    entry = {k: v for k, v in entry.items() if v is not _DROP}
    (folder / "annotations").mkdir()
    (folder / "annotations" / "val.json").write_text(json.dumps([entry]))
    return lambda: load_cir(folder, "val"), "val.json: entry 0"


_DROP = object()

# (format, field, how the value is placed): every id field of every format
ID_FIELDS = [
    (_karpathy, "imgid", lambda v: {"imgid": v}),
    (_karpathy, "cocoid", lambda v: {"imgid": _DROP, "cocoid": v}),
    (_jsonl, "id", lambda v: {"id": v}),
    (_cirr, "pairid", lambda v: {"pairid": v}),
    (_cirr, "reference", lambda v: {"reference": v}),
    (_cirr, "target_hard", lambda v: {"target_hard": v}),
    (_cirr, "img_set.members[0]", lambda v: {"img_set": {"members": [v]}}),
    (_circo, "id", lambda v: {"id": v}),
    (_circo, "reference_img_id", lambda v: {"reference_img_id": v}),
    (_circo, "target_img_id", lambda v: {"target_img_id": v}),
    (_circo, "gt_img_ids[0]", lambda v: {"gt_img_ids": [v]}),
]
NULL_ALLOWED = {"target_hard", "target_img_id"}  # CIRR test1 / CIRCO test: no target


@NO_HEALTH
@pytest.mark.parametrize("fmt,field,place", ID_FIELDS, ids=[f"{f.__name__[1:]}.{n}" for f, n, _ in ID_FIELDS])
@given(value=NOT_AN_ID)
def test_an_id_that_is_not_a_string_or_whole_number_is_named(tmp_path_factory, fmt, field, place, value):
    if value is None and field in NULL_ALLOWED:
        return
    load, where = fmt(tmp_path_factory.mktemp("d"), **place(value))
    with pytest.raises(DatasetError) as err:
        load()
    message = str(err.value)
    assert where.split(": ")[0] in message and where.split(": ")[1] in message
    if value is not None:  # null in a required list reads as "must be an id", a missing key as "missing"
        assert field in message and "id" in message


def test_the_coco_image_list_ids_are_checked_too(tmp_path):
    load, _ = _circo(tmp_path, info_id=[1, 2])
    with pytest.raises(DatasetError, match=r"image_info_unlabeled2017\.json: images\[0\]: 'id' must be an id .*a list"):
        load()


@NO_HEALTH
@given(value=AN_ID)
def test_ids_that_are_strings_or_whole_numbers_load_as_strings(tmp_path_factory, value):
    load, _ = _jsonl(tmp_path_factory.mktemp("d"), id=value)
    assert load().records[0].id == str(value)
    load, _ = _karpathy(tmp_path_factory.mktemp("d"), imgid=value)
    assert load().records[0].id == str(value)


TEXT_FIELDS = [
    (_karpathy, "sentences", lambda v: {"sentences": [{"raw": v}]}),
    (_karpathy, "sentences (bare)", lambda v: {"sentences": [v]}),
    (_jsonl, "captions", lambda v: {"captions": [v]}),
    (_cirr, "caption", lambda v: {"caption": v}),
    (_circo, "relative_caption", lambda v: {"relative_caption": v}),
]


@NO_HEALTH
@pytest.mark.parametrize("fmt,field,place", TEXT_FIELDS, ids=[f"{f.__name__[1:]}.{n}" for f, n, _ in TEXT_FIELDS])
@given(value=NOT_TEXT)
def test_a_text_field_that_is_not_text_is_named(tmp_path_factory, fmt, field, place, value):
    load, where = fmt(tmp_path_factory.mktemp("d"), **place(value))
    with pytest.raises(DatasetError) as err:
        load()
    assert where.split(": ")[0] in str(err.value) and where.split(": ")[1] in str(err.value)


@pytest.mark.parametrize("fmt,over,match", [
    (_karpathy, {"filename": 3}, r"'filename' must be a non-empty string, got a number"),
    (_karpathy, {"filepath": ["val2014"]}, r"'filepath' must be a non-empty string, got a list"),
    (_karpathy, {"split": {"name": "test"}}, r"'split' must be a non-empty string, got an object"),
    (_jsonl, {"image": None}, r"'image' must be a non-empty string, got null"),
    (_jsonl, {"captions": {"a": "dog"}}, r"'captions' must be a list of strings, got an object"),
    (_jsonl, {"split": 1}, r"'split' must be a non-empty string"),
    (_cirr, {"target_soft": ["t1"]}, r"'target_soft' must be an object, got a list"),
    (_cirr, {"img_set": [1]}, r"'img_set' must be an object, got a list"),
    (_cirr, {"img_set": {"members": "r0"}}, r"'img_set.members' must be a list of ids, got a string"),
    (_circo, {"gt_img_ids": 22}, r"'gt_img_ids' must be a list of ids, got a number"),
])
def test_every_other_wrongly_typed_field_is_named(tmp_path, fmt, over, match):
    load, where = fmt(tmp_path, **over)
    with pytest.raises(DatasetError, match=match) as err:
        load()
    assert where in str(err.value)


# --- bytes and files ------------------------------------------------------------------------------------------------

def test_a_jsonl_line_that_is_not_utf8_is_named_by_file_and_line(tmp_path, caplog):
    _png(tmp_path / "a.png")
    good = json.dumps({"image": "a.png", "captions": ["a dog"]}).encode()
    (tmp_path / "d.jsonl").write_bytes(good + b"\n" + b'{"image": "a.png", "captions": ["caf\xe9"]}\n')
    with pytest.raises(DatasetError, match=r"d\.jsonl: line 2, column 37: not UTF-8 text \(byte 0xe9\); save the file as UTF-8"):
        load_dataset(tmp_path / "d.jsonl")
    with caplog.at_level(logging.WARNING):
        assert len(load_dataset(tmp_path / "d.jsonl", on_error="skip")) == 1
    assert "line 2, column 37: not UTF-8" in caplog.text


@pytest.mark.parametrize("name", ["dataset_x.json", "cap"])
def test_a_json_file_that_is_not_utf8_names_the_line(tmp_path, name):
    if name == "cap":
        load, _ = _cirr(tmp_path)
        path = tmp_path / "captions" / "cap.rc2.val.json"
    else:
        load, _ = _karpathy(tmp_path)
        path = tmp_path / name
    path.write_bytes(b'[\n{"caption": "\xff"}]' if name == "cap" else b'{"images":\n\n [{"filename": "\xff"}]}')
    with pytest.raises(DatasetError, match=rf"{path.name}: line (2|3), column \d+: not UTF-8"):
        load()


def test_a_utf8_bom_is_read(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"image": "a.png", "captions": ["x"]}).encode())
    assert len(load_dataset(tmp_path / "d.jsonl")) == 1


def test_a_symlink_loop_beside_the_data_file_is_skipped_with_a_warning(tmp_path, caplog):
    load, _ = _jsonl(tmp_path)
    (tmp_path / "loop.jsonl").symlink_to("loop.jsonl")
    with caplog.at_level(logging.WARNING):
        assert len(load_dataset(tmp_path)) == 1
    assert "loop.jsonl is a symlink loop" in caplog.text


def test_a_data_file_that_is_a_symlink_loop_is_named(tmp_path):
    (tmp_path / "d.jsonl").symlink_to("d.jsonl")
    for target in (tmp_path, tmp_path / "d.jsonl"):  # the folder (once a raw OSError) and the file itself
        with pytest.raises((DatasetError, FileNotFoundError), match="d.jsonl"):
            load_dataset(target)


def test_an_image_that_is_a_symlink_loop_is_named(tmp_path):
    _png(tmp_path / "b.png")
    (tmp_path / "a.png").symlink_to("a.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "a.png", "captions": ["x"]}) + "\n")
    with pytest.raises(DatasetError, match=r"d\.jsonl: line 1: image a\.png: .*a\.png is a symlink loop"):
        load_dataset(tmp_path / "d.jsonl")


def test_cir_files_and_images_that_are_symlink_loops_are_named(tmp_path):
    load, _ = _cirr(tmp_path)
    image = tmp_path / "img_raw" / "dev" / "t1.png"
    image.unlink()
    image.symlink_to("t1.png")
    with pytest.raises(DatasetError, match=r"image 't1': .*t1\.png is a symlink loop"):
        load()
    image.unlink()
    _png(image)
    captions = tmp_path / "captions" / "cap.rc2.val.json"
    captions.unlink()
    captions.symlink_to("cap.rc2.val.json")
    with pytest.raises(DatasetError, match=r"cap\.rc2\.val\.json is a symlink loop"):
        load()


@pytest.mark.parametrize("scene,match", [
    (5, r"'scene' is not a valid scene annotation"),
    ({"objects": [], "relation": "left of"}, r"'scene' is not a valid scene annotation \(ValueError"),
    ({"objects": [{"shape": "circle"}, {"shape": "star"}], "relation": "left of"}, r"'scene' is not a valid scene"),
])
def test_a_malformed_annotation_is_named_as_the_data_loads(tmp_path, world, scene, match):
    """A record's annotation (the world's scene) is read once at load: a bad one once failed deep in a stage."""
    good = world.records[0].meta["scene"]
    load, where = _jsonl(tmp_path, scene=good)
    assert load().records[0].meta["scene"] == good
    load, where = _jsonl(tmp_path, scene=scene)
    with pytest.raises(DatasetError, match=match) as err:
        load()
    assert where in str(err.value)


def test_a_malformed_scene_in_a_cirr_scenes_file_is_named(tmp_path):
    load, _ = _cirr(tmp_path)
    (tmp_path / "scenes.json").write_text(json.dumps({"r0": {"objects": "two", "relation": 3}}))
    with pytest.raises(DatasetError, match=r"scenes\.json: 'r0': 'scene' is not a valid scene annotation"):
        load()
