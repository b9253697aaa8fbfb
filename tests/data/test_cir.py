"""Composed retrieval: the miniature world's edits and CIRR-layout triplets, and the CIRR / CIRCO loaders."""

import json
import random
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

import genret.world.synth as synth
from genret.data import CIRSet, DatasetError, load_cir
from genret.world.scene import COLOURS, EDIT_KINDS, INVERSE, Scene, SceneObject, edits, sample_edit
from genret.world.synth import SynthConfig, fits, generate_world, sample_scene

TINY_SPLITS = {"train": 96, "val": 8, "test": 24}  # tests/conftest.py's TINY_WORLD; the cir_* defaults are capped


def _diff(a: Scene, b: Scene) -> set:
    """What differs between two scenes whose objects correspond by index."""
    out = {(i, attr) for i, (p, q) in enumerate(zip(a.objects, b.objects))
           for attr in ("shape", "colour", "size") if getattr(p, attr) != getattr(q, attr)}
    return out | ({("relation",)} if a.relation != b.relation else set())


def _places(scene: Scene) -> list:
    return [(o.x, o.y) for o in scene.objects]


def _check_edit(reference: Scene, kind: str, target: Scene, same_layout: bool = True) -> None:
    """The target differs from the reference in exactly what the edit kind allows, and nothing else.

    Without ``same_layout`` (another image of the target scene), the target may name its objects the other
    way round and stand elsewhere.
    """
    if not same_layout:
        flipped = Scene(target.objects[::-1], INVERSE[target.relation])
        target = min((target, flipped), key=lambda t: len(_diff(reference, t)))
    d = _diff(reference, target)
    if kind == "relation":
        assert d == {("relation",)}
    else:
        attr = {"colour": "colour", "open_colour": "colour", "shape": "shape", "size": "size"}[kind]
        assert len(d) == 1 and next(iter(d))[1] == attr, (kind, d)
        if kind != "size" and same_layout:  # a size edit may need a new layout to fit the larger object
            assert _places(target) == _places(reference)
    assert target.signature() != reference.signature()
    a, b = target.objects
    assert (a.shape, a.colour) != (b.shape, b.colour)


def _scenes(n: int, seed: int) -> list[Scene]:
    rng = random.Random(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    # the cases that need care: shared shape, shared colour
    a = SceneObject("circle", "red", "small", 20.0, 32.0)
    return scenes + [Scene((a, replace(a, colour="blue", x=44.0)), "left of"),
                     Scene((a, replace(a, shape="star", x=44.0)), "left of")]


# --- edits of a scene ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_every_edit_changes_the_scene_and_its_targets_satisfy_it(seed):
    for scene in _scenes(40, seed):
        found = edits(scene, random.Random(seed))
        assert {e.kind for e in found} == set(EDIT_KINDS)
        for e in found:
            assert e.text == e.text.strip().lower() and e.text.isascii()
            for target in e.targets:
                _check_edit(scene, e.kind, target)
                assert e.accepts(target) and not e.accepts(scene)
            assert e.target_captions == tuple(t.all_captions()[0] for t in e.targets)
            if e.kind == "open_colour":
                (i, _), = _diff(scene, e.targets[0])
                assert all(_diff(scene, t) == {(i, "colour")} for t in e.targets)
                other = scene.objects[1 - i]
                conflicts = other.shape == scene.objects[i].shape and other.colour != scene.objects[i].colour
                assert len(e.targets) == len(COLOURS) - 1 - conflicts
            else:
                assert len(e.targets) == 1


@pytest.mark.parametrize("seed", [2, 3])
def test_edit_texts_name_the_edited_object_unambiguously_and_the_new_value(seed):
    for scene in _scenes(40, seed):
        for e in edits(scene, random.Random(seed)):
            for i, obj in enumerate(scene.objects):
                other = scene.objects[1 - i]
                if other.shape == obj.shape:  # "the circle" would fit both
                    assert f"the {obj.shape}" not in e.text
            if e.kind == "relation":
                continue
            (i, attr), = _diff(scene, e.targets[0])
            obj, other = scene.objects[i], scene.objects[1 - i]
            assert f"the {obj.noun()}" in e.text or (f"the {obj.shape}" in e.text and other.shape != obj.shape), e.text
            if e.kind in ("colour", "shape"):
                assert getattr(e.targets[0].objects[i], attr) in e.text.split()
            if e.kind == "size":
                assert {"large", "bigger"} & set(e.text.split()) if obj.size == "small" else \
                    {"small", "smaller"} & set(e.text.split())


def test_relation_edits_say_where_the_objects_end_up():
    words = {"to the left of": "left of", "to the right of": "right of", "above": "above", "below": "below"}
    for scene in _scenes(60, 4):
        for e in (e for e in edits(scene, random.Random(4)) if e.kind == "relation"):
            target = e.targets[0]
            assert target.relation != scene.relation and fits(target, 64), e.text
            if e.text.startswith("swap") or "trade places" in e.text:
                assert _places(target) == _places(scene)[::-1]
                continue
            phrase = next(p for p in words if f" {p} the " in e.text)
            first, second = e.text.split(f" {phrase} ")
            names = [o for o in target.objects if first.endswith(f"the {o.noun()}") or first.endswith(f"the {o.shape}")]
            assert len(names) == 1, e.text
            said = words[phrase] if names[0] is target.objects[0] else INVERSE[words[phrase]]
            assert said == target.relation, e.text


def test_sampled_edits_cover_every_kind():
    rng = random.Random(5)
    kinds = [sample_edit(sample_scene(rng), rng).kind for _ in range(500)]
    assert all(kinds.count(k) > 60 for k in EDIT_KINDS), {k: kinds.count(k) for k in EDIT_KINDS}
    assert {sample_edit(sample_scene(rng), rng, kinds=("size",)).kind for _ in range(20)} == {"size"}
    with pytest.raises(ValueError, match="kinds must be some of"):
        sample_edit(sample_scene(rng), rng, kinds=("texture",))


def test_a_size_edit_that_no_longer_fits_is_laid_out_anew():
    a = SceneObject("circle", "red", "small", 9.5, 32.0)
    b = SceneObject("square", "blue", "small", 30.0, 32.0)
    scene = Scene((a, b), "left of")
    assert fits(scene, 64)
    grown = Scene((replace(a, size="large"), b), "left of")
    assert not fits(grown, 64)
    fitted = synth.fit(grown, random.Random(0), 64)
    assert fits(fitted, 64) and fitted.signature() == grown.signature()


# --- the world's cirr/ folder -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cir(world_dir):
    return {split: load_cir(world_dir, split) for split in TINY_SPLITS}


def test_the_world_writes_every_split_in_the_cirr_layout(world_dir, cir):
    folder = world_dir / "cirr"
    for split, n in TINY_SPLITS.items():
        assert (folder / "captions" / f"cap.rc2.{split}.json").is_file()
        assert (folder / "image_splits" / f"split.rc2.{split}.json").is_file()
        c = cir[split]
        assert c.format == "cirr" and c.split == split and len(c) == n  # capped at one per image
        assert len({t.reference for t in c.triplets}) == n
    raw = json.loads((folder / "captions" / "cap.rc2.val.json").read_text())
    for entry in raw:
        assert set(entry) == {"pairid", "reference", "target_hard", "target_soft", "caption", "img_set", "edit_kind",
                              "target_caption"}
        members = entry["img_set"]["members"]
        assert members[entry["img_set"]["reference_rank"]] == entry["reference"]
        assert members[entry["img_set"]["target_rank"]] == entry["target_hard"]
        assert set(entry["target_soft"].values()) == {1.0} and entry["target_hard"] in entry["target_soft"]
    pairids = [e["pairid"] for s in TINY_SPLITS for e in
               json.loads((folder / "captions" / f"cap.rc2.{s}.json").read_text())]
    assert len(set(pairids)) == len(pairids)


def test_references_are_world_images_and_every_image_is_in_the_gallery(world, cir):
    records = world.by_id()
    for split, c in cir.items():
        assert all(p.is_file() for p in c.images.values())
        assert set(c.scenes) == set(c.images)  # scenes.json covers every gallery image
        world_ids = {r.id for r in world.split(split).records}
        assert world_ids <= set(c.images)
        for t in c.triplets:
            assert t.reference in world_ids and c.images[t.reference] == records[t.reference].path
            assert c.scenes[t.reference] == records[t.reference].meta["scene"]
            assert {t.reference, *t.targets, *t.subset} <= set(c.images)
        queries, relevant = c.queries()
        assert [q.modality for q in queries] == ["image+text"] * len(c) and relevant == [set(t.targets) for t in
                                                                                        c.triplets]
        assert {i.id for i in c.gallery_items()} == set(c.images)


def test_targets_show_the_edit_and_near_misses_do_not(cir):
    kinds, moved, drawn = set(), 0, 0
    for c in cir.values():
        gallery_by_signature = {}
        for name, scene in c.scenes.items():
            gallery_by_signature.setdefault(Scene.from_dict(scene).signature(), set()).add(name)
        for t in c.triplets:
            reference = Scene.from_dict(c.scenes[t.reference])
            hard = Scene.from_dict(c.scenes[t.meta["target_hard"]])
            kinds.add(t.meta["edit_kind"])
            assert t.meta["target_caption"] == hard.all_captions()[0]
            targets = [Scene.from_dict(c.scenes[x]) for x in t.targets]
            for name, target in zip(t.targets, targets):  # drawn for this triplet, or another image of its scene
                _check_edit(reference, t.meta["edit_kind"], target, same_layout=False)
                if name.startswith(f"{c.split}-{t.id:0>6}-t"):  # a new picture: laid out anew, not the reference's
                    moved += _places(target) != _places(reference)
                    drawn += 1
            if t.meta["edit_kind"] != "open_colour":
                assert {x.signature() for x in targets} == {hard.signature()}
            else:
                assert len({x.signature() for x in targets}) >= 2  # 2-3 of the valid colours drawn
            # target_soft holds every gallery image that shows a valid target scene
            assert set().union(*(gallery_by_signature[x.signature()] for x in targets)) == set(t.targets)
            near = set(t.subset) - {t.reference} - set(t.targets)
            assert len(near) == 2
            for name in near:
                miss = Scene.from_dict(c.scenes[name])
                assert miss.signature() not in {x.signature() for x in targets} | {reference.signature()}
                assert len(_diff(hard, miss)) >= 1
    assert kinds == set(EDIT_KINDS)
    assert moved == drawn > 0


def test_rendered_images_show_their_scene_in_their_split_style(cir):
    for split, c in cir.items():
        rendered = [n for n in c.images if not n.isdigit()]
        assert rendered and all(c.images[n].parent.name == split for n in rendered)
        for name in rendered[:12]:
            scene = Scene.from_dict(c.scenes[name])
            assert fits(scene, 64)
            pix = np.asarray(Image.open(c.images[name]), dtype=int)
            for o in scene.objects:
                fill = COLOURS[o.colour]
                outline = tuple(int(v * 0.55) for v in fill)
                assert tuple(pix[round(o.y), round(o.x)]) in (fill, outline)
            dark = [tuple(int(v * 0.55) for v in COLOURS[o.colour]) for o in scene.objects]
            has_outline = any((pix == d).all(axis=2).any() for d in dark)
            assert has_outline == (split != "train"), name


def test_same_config_gives_byte_identical_cirr_files(world_dir, tmp_path):
    from conftest import TINY_WORLD

    generate_world(tmp_path, TINY_WORLD, progress=False)
    ours = sorted(p.relative_to(world_dir) for p in (world_dir / "cirr").rglob("*") if p.is_file())
    again = sorted(p.relative_to(tmp_path) for p in (tmp_path / "cirr").rglob("*") if p.is_file())
    assert ours == again and len(ours) > 100
    assert all((world_dir / p).read_bytes() == (tmp_path / p).read_bytes() for p in ours)
    generate_world(tmp_path, replace(TINY_WORLD, seed=8), progress=False)
    assert (tmp_path / "cirr" / "scenes.json").read_bytes() != (world_dir / "cirr" / "scenes.json").read_bytes()


def test_counts_are_capped_with_a_log_and_zero_leaves_cirr_out(tmp_path, caplog):
    config = SynthConfig(n_train=10, n_val=0, n_test=6, cir_train=3, cir_test=50, seed=1)
    with caplog.at_level("INFO", logger="genret.world.synth"):
        generate_world(tmp_path, config, progress=False)
    assert "cir_test: 6 triplets, not 50" in caplog.text
    assert len(load_cir(tmp_path, "train")) == 3 and len(load_cir(tmp_path, "test")) == 6
    assert not (tmp_path / "cirr" / "captions" / "cap.rc2.val.json").exists()
    generate_world(tmp_path, replace(config, cir_train=0, cir_test=0), progress=False)
    assert not (tmp_path / "cirr").exists()  # the old triplets pointed at images that were redrawn


def test_an_interrupted_cirr_leaves_the_previous_world_and_no_partial_folder(tmp_path, monkeypatch):
    config = SynthConfig(n_train=6, n_val=0, n_test=4, seed=2)
    generate_world(tmp_path, config, progress=False)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    calls, render = [], synth.render

    def failing_render(*args, **kwargs):
        calls.append(1)
        if len(calls) == 10 + 3:  # the world's 10 images drew, then the third cirr image fails
            raise KeyboardInterrupt
        return render(*args, **kwargs)

    monkeypatch.setattr(synth, "render", failing_render)
    with pytest.raises(KeyboardInterrupt):
        generate_world(tmp_path, replace(config, seed=3), progress=False)
    assert {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.parent.rglob("*") if ".genret-" in p.name] == []


@pytest.mark.parametrize("kwargs,match", [
    (dict(cir_train=-1), "cir_train must not be negative"),
    (dict(cir_val=1.5), "cir_val must be an integer"),
    (dict(cir_test=True), "cir_test must be an integer"),
])
def test_cir_config_validation_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SynthConfig(**kwargs)


# --- CIRR and CIRCO as downloaded ---------------------------------------------------------------------------------

def _png(path, colour=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def cirr_folder(tmp_path, entries, split="val", layout="official", names=("r0", "t0", "t1", "x0", "x1")):
    """A CIRR folder as downloaded: official (img_raw/<folder>/) or CLIP4Cir's (images beside cirr/)."""
    folder = tmp_path / "cirr"
    sub = {"val": "dev", "test1": "test1", "train": "train"}[split]
    image_root = folder / "img_raw" if layout == "official" else tmp_path
    for n in names:
        _png(image_root / sub / f"{n}.png")
    (folder / "image_splits").mkdir(parents=True)
    (folder / "captions").mkdir()
    (folder / "image_splits" / f"split.rc2.{split}.json").write_text(
        json.dumps({n: f"./{sub}/{n}.png" for n in names}))
    (folder / "captions" / f"cap.rc2.{split}.json").write_text(json.dumps(entries))
    return folder if layout == "official" else tmp_path


def _entry(pairid=1, **over):
    entry = {"pairid": pairid, "reference": "r0", "target_hard": "t0",
             "target_soft": {"t0": 1.0, "t1": 0.5, "x0": -1.0}, "caption": "has two dogs", "img_set": {"id": 3, "members": ["r0", "t0", "t1", "x0", "x1"]}}
    entry.update(over)
    return {k: v for k, v in entry.items() if v is not None}


@pytest.mark.parametrize("layout", ["official", "clip4cir"])
def test_cirr_as_downloaded(tmp_path, layout):
    folder = cirr_folder(tmp_path, [_entry(1), _entry(2, target_soft={"t0": 1.0, "t1": 1.0})], layout=layout)
    c = load_cir(folder, "val")
    assert isinstance(c, CIRSet) and c.format == "cirr" and len(c.images) == 5
    first, second = c.triplets
    assert first.targets == ("t0",) and second.targets == ("t0", "t1")  # soft 0.5 and -1 are not targets
    assert first.meta["target_hard"] == "t0" and first.subset == ("r0", "t0", "t1", "x0", "x1")
    assert c.subsets()[0] == {"t0", "t1", "x0", "x1"}
    queries, relevant = c.queries()
    assert queries[0].image == str(c.images["r0"]) and queries[0].text == "has two dogs" and relevant[1] == {"t0", "t1"}
    assert c.scenes == {}


def test_cirr_test1_loads_without_targets(tmp_path):
    entries = [{"pairid": 7, "reference": "r0", "caption": "is black", "img_set": {"id": 1, "members": ["r0", "t0"]}}]
    folder = cirr_folder(tmp_path, entries, split="test1")
    c = load_cir(folder, "test")  # "test" finds CIRR's test1
    assert c.split == "test1" and c.triplets[0].targets == () and c.queries()[1] == [set()]


def _circo(tmp_path, with_info=True):
    folder = tmp_path / "CIRCO"
    ids = [9761, 85932, 489535, 57541, 12]
    for i in ids:
        path = folder / "COCO2017_unlabeled" / "unlabeled2017" / f"{i:012d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i % 255, 40, 90)).save(path, format="JPEG")
    if with_info:
        info = {"images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": 8, "height": 8} for i in ids]}
        (folder / "COCO2017_unlabeled" / "annotations").mkdir()
        (folder / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json").write_text(json.dumps(info))
    (folder / "annotations").mkdir()
    val = [{"reference_img_id": 85932, "target_img_id": 9761, "relative_caption": "is held by a little girl",
            "shared_concept": "a teddy bear", "gt_img_ids": [9761, 489535, 57541], "id": 0}]
    test = [{"reference_img_id": 12, "relative_caption": "is blue", "shared_concept": "a bus", "id": 0}]
    (folder / "annotations" / "val.json").write_text(json.dumps(val))
    (folder / "annotations" / "test.json").write_text(json.dumps(test))
    return folder


@pytest.mark.parametrize("with_info", [True, False])
def test_circo_as_downloaded(tmp_path, with_info):
    folder = _circo(tmp_path, with_info)
    c = load_cir(folder, "val")
    assert c.format == "circo" and len(c.images) == 5
    t = c.triplets[0]
    assert (t.id, t.reference, t.targets) == ("0", "85932", ("9761", "489535", "57541"))
    assert t.meta == {"shared_concept": "a teddy bear", "target_hard": "9761"}
    assert c.images["85932"].name == "000000085932.jpg" and c.subsets() == [set()]
    test = load_cir(folder, "test")
    assert test.triplets[0].targets == () and test.queries()[0][0].image == str(c.images["12"])


@pytest.mark.parametrize("change,match", [
    (lambda f: (f / "captions" / "cap.rc2.val.json").unlink(), r"expected one cap\.\*\.val\.json file, found none"),
    (lambda f: (f / "captions" / "cap.rc2.val.json").write_text("[{"), "malformed JSON"),
    (lambda f: (f / "captions" / "cap.rc2.val.json").write_text('{"a": 1}'), "expected a list of triplets"),
    (lambda f: (f / "img_raw" / "dev" / "t1.png").unlink(), "image 't1': file not found"),
    (lambda f: (f / "image_splits" / "split.rc2.val.json").write_text("[]"), "mapping image names"),
])
def test_bad_cirr_files_are_named(tmp_path, change, match):
    folder = cirr_folder(tmp_path, [_entry(1)])
    change(folder)
    with pytest.raises((DatasetError, FileNotFoundError, ValueError), match=match) as err:
        load_cir(folder, "val")
    assert str(folder) in str(err.value)


@pytest.mark.parametrize("bad,match", [
    (_entry(5, caption=None), r"cap\.rc2\.val\.json: entry 1 \(id 5\): missing 'caption'"),
    (_entry(5, caption="  "), r"entry 1 \(id 5\): 'caption' is empty"),
    (_entry(5, reference="nope"), r"entry 1 \(id 5\): reference 'nope' is not in the split's gallery \(.*split\.rc2"),
    (_entry(5, target_hard="gone"), r"entry 1 \(id 5\): target 'gone' is not in the split's gallery"),
    (_entry(5, target_soft={"t0": "yes"}), r"entry 1 \(id 5\): 'target_soft' score 'yes' is not a number"),
    (_entry(1), r"entry 1 \(id 1\): query id '1' appears more than once"),
    ("x", r"entry 1: expected an object"),
])
def test_bad_triplets_raise_or_are_skipped(tmp_path, bad, match, caplog):
    folder = cirr_folder(tmp_path, [_entry(1), bad])
    with pytest.raises(DatasetError, match=match):
        load_cir(folder, "val")
    with caplog.at_level("WARNING"):
        c = load_cir(folder, "val", on_error="skip")
    assert [t.id for t in c.triplets] == ["1"] and "skipped 1 bad entries" in caplog.text


@pytest.mark.parametrize("make,match", [
    (lambda p: p, "not a CIR data set folder"),
    (lambda p: p / "missing", "CIR data set folder not found"),
])
def test_a_folder_that_is_not_a_cir_data_set(tmp_path, make, match):
    with pytest.raises(FileNotFoundError, match=match):
        load_cir(make(tmp_path))


def test_circo_errors_name_what_is_expected_where(tmp_path):
    folder = _circo(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"annotations/train\.json \(splits here: test, val\)"):
        load_cir(folder, "train")
    with pytest.raises(FileNotFoundError, match="image root not found"):
        load_cir(folder, "val", image_root=tmp_path / "nowhere")
    (folder / "annotations" / "val.json").write_text(json.dumps([{"id": 3, "reference_img_id": 1,
                                                                   "relative_caption": "x"}]))
    with pytest.raises(DatasetError, match=r"val\.json: entry 0 \(id 3\): reference '1' is not in the split's gallery"):
        load_cir(folder, "val")
    with pytest.raises(DatasetError, match="no usable triplets"):
        load_cir(folder, "val", on_error="skip")
    with pytest.raises(ValueError, match="on_error must be"):
        load_cir(folder, "val", on_error="ignore")
