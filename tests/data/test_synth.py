"""The miniature world: determinism, Karpathy layout, true captions, twins, unseen test scenes, config checks."""

import json
import random
import re
from dataclasses import asdict, replace

import numpy as np
import pytest
from PIL import Image

import genret.world.synth as synth
from genret.data import load_dataset
from genret.world.scene import COLOURS, INVERSE, MAX_CAPTIONS, SHAPES, Scene, SceneObject, questions
from genret.world.synth import SynthConfig, generate_world, render, sample_scene

SMALL = SynthConfig(n_train=60, n_val=10, n_test=30, seed=3)
_MENTION = re.compile(rf"\b(?:(small|large) )?({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b")
_RELATION_WORDS = {"left": "left of", "right": "right of", "above": "above", "over": "above", "top": "above",
                   "below": "below", "under": "below", "bottom": "below"}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    path = generate_world(out, SMALL, progress=False)
    return out, json.loads(path.read_text())


def _holds(a: SceneObject, relation: str, b: SceneObject, image_size: int = 64) -> bool:
    """Whether ``a`` is clearly ``relation`` ``b`` in the picture (y grows downwards)."""
    dx, dy = b.x - a.x, b.y - a.y
    along, across = (dx, dy) if relation in ("left of", "right of") else (dy, dx)
    sign = 1 if relation in ("left of", "above") else -1
    return sign * along > image_size / 4 and abs(across) < abs(along) / 2


def _true_of(caption: str, scene: Scene) -> bool:
    """A reader's check of a caption against a scene, independent of the templates.

    The caption names two objects (optionally with size) and a relation word; the first relation word
    tells where the first-named object is relative to the second ("on the left and ... on the right").
    """
    mentions = _MENTION.findall(caption)
    assert len(mentions) == 2, caption
    found = []
    for size, colour, shape in mentions:
        match = [o for o in scene.objects if (o.colour, o.shape) == (colour, shape) and size in ("", o.size)]
        if not match:
            return False
        found.append(match[0])
    word = next(w for w in caption.replace(",", " ").split() if w in _RELATION_WORDS)
    return _holds(found[0], _RELATION_WORDS[word], found[1])


def _scenes(data: dict, split: str) -> list[Scene]:
    return [Scene.from_dict(i["scene"]) for i in data["images"] if i["split"] == split]


def test_same_seed_gives_byte_identical_files(small, tmp_path):
    out, data = small
    generate_world(tmp_path, SMALL, progress=False)
    assert (tmp_path / "dataset_synth.json").read_bytes() == (out / "dataset_synth.json").read_bytes()
    for entry in data["images"]:
        name = entry["filename"]
        assert (tmp_path / "images" / name).read_bytes() == (out / "images" / name).read_bytes(), name


def test_triplets_leave_the_karpathy_world_as_it_was(small, tmp_path):
    # The shipped models were trained on the Karpathy part: composed-retrieval triplets must not change it.
    out, data = small
    config = replace(SMALL, cir_train=0, cir_val=0, cir_test=0)
    other = json.loads(generate_world(tmp_path, config, progress=False).read_text())
    assert not (tmp_path / "cirr").exists() and (out / "cirr").is_dir()
    assert other["images"] == data["images"]
    assert all((tmp_path / "images" / i["filename"]).read_bytes() == (out / "images" / i["filename"]).read_bytes()
               for i in data["images"])


def test_other_seed_gives_other_world(small, tmp_path):
    out, data = small
    other = json.loads(generate_world(tmp_path, replace(SMALL, seed=4), progress=False).read_text())
    assert [i["scene"] for i in other["images"]] != [i["scene"] for i in data["images"]]
    differ = [(tmp_path / "images" / n).read_bytes() != (out / "images" / n).read_bytes()
              for n in ("000000.png", "000065.png", "000099.png")]
    assert all(differ)


@pytest.mark.parametrize("config,splits,twins", [
    (SMALL, (60, 10, 30), (6, 16)),  # 30 * 0.5 = 15 images, rounded up to whole pairs; val 10 * 0.5 = 5 likewise
    (SynthConfig(n_train=5, n_val=0, n_test=7, twin_fraction=1.0, seed=1), (5, 0, 7), (0, 6)),
    (SynthConfig(n_train=5, n_val=3, n_test=10, twin_fraction=0.0, val_twin_fraction=0.0, seed=1), (5, 3, 10),
     (0, 0)),
    (SynthConfig(n_train=5, n_val=4, n_test=10, twin_fraction=0.0, val_twin_fraction=1.0, seed=1), (5, 4, 10),
     (4, 0)),
    (SynthConfig(n_train=0, n_val=0, n_test=1, twin_fraction=1.0, seed=1), (0, 0, 1), (0, 0)),
])
def test_split_counts_and_twin_pairs(tmp_path, config, splits, twins):
    data = json.loads(generate_world(tmp_path, config, progress=False).read_text())
    assert tuple(sum(i["split"] == s for i in data["images"]) for s in ("train", "val", "test")) == splits
    assert tuple(sum("twin_of" in i and i["split"] == s for i in data["images"]) for s in ("val", "test")) == twins


def test_val_twins_change_neither_train_nor_test(small, tmp_path):
    """Val's twins come from their own random stream: train and test are those of a world without them, and val
    keeps the first image of each pair; each twin's scene occurs in no other split."""
    out, data = small
    plain = json.loads(generate_world(tmp_path, replace(SMALL, val_twin_fraction=0.0), progress=False).read_text())
    assert "twin_of" not in json.dumps([i for i in plain["images"] if i["split"] == "val"])
    for a, b in zip(data["images"], plain["images"]):
        if a["split"] != "val" or "twin_of" not in a or a["twin_of"] > a["imgid"]:
            assert a["sentences"] == b["sentences"] and a["scene"] == b["scene"], a["filename"]
            assert (out / "images" / a["filename"]).read_bytes() == (tmp_path / "images" / b["filename"]).read_bytes()
    sig = lambda d, split: [s.signature() for s in _scenes(d, split)]  # noqa: E731
    val = sig(data, "val")
    assert len(set(val)) == len(val) and not set(val) & (set(sig(data, "train")) | set(sig(data, "test")))


def test_karpathy_layout_that_genret_and_others_can_read(small):
    out, data = small
    assert data["dataset"] == "synth"
    assert data["genret"] == {"generator": "genret.world.synth", "version": 4, "config": asdict(SMALL)}
    sentids = [s["sentid"] for i in data["images"] for s in i["sentences"]]
    assert sentids == list(range(len(sentids)))
    for k, entry in enumerate(data["images"]):
        assert entry["imgid"] == k and entry["filepath"] == "images" and entry["split"] in ("train", "val", "test")
        assert entry["sentids"] == [s["sentid"] for s in entry["sentences"]]
        for s in entry["sentences"]:
            assert s["imgid"] == k and s["tokens"] == s["raw"].replace(",", " ").split()
        with Image.open(out / entry["filepath"] / entry["filename"]) as img:
            assert img.size == (64, 64) and img.mode == "RGB" and img.format == "PNG"
    world = load_dataset(out)
    assert [len(world.split(s)) for s in ("train", "val", "test")] == [60, 10, 30]
    assert world.by_id()["0"].captions == tuple(s["raw"] for s in data["images"][0]["sentences"])


def test_captions_are_distinct_plain_and_true_of_their_image(small):
    _, data = small
    for entry in data["images"]:
        scene = Scene.from_dict(entry["scene"])
        raws = [s["raw"] for s in entry["sentences"]]
        assert len(raws) == SMALL.captions_per_image == len(set(raws))
        for raw in raws:
            assert raw and raw == raw.lower() and raw.isascii() and raw == raw.strip()
            assert all(o.noun() in raw for o in scene.objects), raw
            assert _true_of(raw, scene), raw


@pytest.mark.parametrize("relation", ["left of", "right of", "above", "below"])
def test_every_scene_offers_max_captions_all_true_and_twins_share_none(relation):
    rng = random.Random(relation)
    scenes = (sample_scene(rng, distinct=True) for _ in range(1000))
    for scene in [s for s in scenes if s.relation == relation][:60]:
        caps = scene.all_captions()
        assert len(caps) == MAX_CAPTIONS and all(_true_of(c, scene) for c in caps)
        for twin in (scene.binding_twin(), scene.relation_twin()):
            assert not any(_true_of(c, twin) for c in caps)
            assert not set(caps) & set(twin.all_captions())


def test_twins_differ_only_in_binding_or_relation(small):
    out, data = small
    images = data["images"]
    twins = [i for i in images if "twin_of" in i]
    assert {i["twin_kind"] for i in twins} == {"binding", "relation"}
    for entry in twins:
        other = images[entry["twin_of"]]
        assert entry["split"] == other["split"] in ("val", "test")
        assert other["twin_of"] == entry["imgid"] and other["twin_kind"] == entry["twin_kind"]
        a, b = Scene.from_dict(entry["scene"]), Scene.from_dict(other["scene"])
        places = lambda s: [(o.x, o.y) for o in s.objects]  # noqa: E731
        if entry["twin_kind"] == "binding":
            assert [(o.shape, o.size) for o in a.objects] == [(o.shape, o.size) for o in b.objects]
            assert places(a) == places(b) and a.relation == b.relation
            assert [o.colour for o in a.objects] == [o.colour for o in b.objects][::-1]
            assert a.objects[0].colour != a.objects[1].colour
        else:
            assert [o.kind() for o in a.objects] == [o.kind() for o in b.objects]
            assert places(a) == places(b)[::-1] and b.relation == INVERSE[a.relation]
        raws = lambda e: {s["raw"] for s in e["sentences"]}  # noqa: E731
        assert not raws(entry) & raws(other)
        assert not any(_true_of(raw, b) for raw in raws(entry))


def test_twin_pictures_differ_only_where_the_objects_are(small):
    out, data = small
    for entry in (i for i in data["images"] if "twin_of" in i):
        pix = lambda e: np.asarray(Image.open(out / "images" / e["filename"]), dtype=int)  # noqa: E731
        changed = np.argwhere((pix(entry) != pix(data["images"][entry["twin_of"]])).any(axis=2))
        assert len(changed), entry["filename"]
        centres = np.array([(o["y"], o["x"]) for o in entry["scene"]["objects"]])
        nearest = np.linalg.norm(changed[:, None, :] - centres[None], axis=2).min(axis=1)
        assert nearest.max() <= 1.2 * 12 + 2  # the largest shape's reach


def test_test_scenes_never_occur_in_train_or_val(small):
    _, data = small
    sig = lambda split: {s.signature() for s in _scenes(data, split)}  # noqa: E731
    assert not sig("test") & (sig("train") | sig("val"))
    assert not sig("val") & sig("train")


def test_at_default_size_test_scenes_stay_unseen():
    # A small world rarely samples a test signature for training by chance; the default one would (~150 times).
    plan = synth._plan(SynthConfig(), random.Random(0))
    sig = lambda split: {p.scene.signature() for p in plan if p.split == split}  # noqa: E731
    assert not sig("test") & (sig("train") | sig("val")) and not sig("val") & sig("train")
    assert sum(p.twin_of is not None for p in plan if p.split == "test") == 250
    assert sum(p.twin_of is not None for p in plan if p.split == "val") == 90  # of 100: 5 pairs' twins are taken


@pytest.mark.parametrize("image_size", [32, 64, 96])
def test_pictures_show_their_scene_whole(tmp_path, image_size):
    config = SynthConfig(n_train=12, n_val=0, n_test=12, image_size=image_size, seed=5)
    data = json.loads(generate_world(tmp_path, config, progress=False).read_text())
    for entry in data["images"]:
        scene = Scene.from_dict(entry["scene"])
        assert _holds(scene.objects[0], scene.relation, scene.objects[1], image_size)
        pix = np.asarray(Image.open(tmp_path / "images" / entry["filename"]), dtype=int)
        assert pix.shape == (image_size, image_size, 3)
        border = np.concatenate([pix[0], pix[-1], pix[:, 0], pix[:, -1]])
        assert (border.max(axis=1) == border.min(axis=1)).all() and border.max() <= 46  # plain grey: nothing clipped
        for o in scene.objects:
            fill = COLOURS[o.colour]
            assert tuple(pix[round(o.y), round(o.x)]) in (fill, tuple(int(c * 0.55) for c in fill)), o


def test_test_split_is_drawn_unlike_training(small):
    out, data = small
    scene = Scene.from_dict(data["images"][0]["scene"])
    train_look, test_look = (np.asarray(render(scene, 64, seed=1, style=s)) for s in ("train", "test"))
    assert (train_look != test_look).any()
    for o in scene.objects:  # test shapes carry a darker outline that training never shows
        dark = np.array([int(c * 0.55) for c in COLOURS[o.colour]])
        assert not (train_look == dark).all(axis=2).any() and (test_look == dark).all(axis=2).any()
    train_png = {(out / "images" / i["filename"]).read_bytes() for i in data["images"] if i["split"] == "train"}
    assert not any((out / "images" / i["filename"]).read_bytes() in train_png
                   for i in data["images"] if i["split"] == "test")


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_an_interrupted_run_leaves_the_previous_world_whole(tmp_path, monkeypatch):
    """The world is one artefact: a run cut short leaves the previous world as it was (never a JSON pointing at
    half-drawn images), and no temporary files."""
    config = SynthConfig(n_train=6, n_val=0, n_test=2, seed=2)
    generate_world(tmp_path, config, progress=False)
    before = _files(tmp_path)
    calls = []

    def failing_render(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return render(*args, **kwargs)

    monkeypatch.setattr(synth, "render", failing_render)
    with pytest.raises(KeyboardInterrupt):
        generate_world(tmp_path, replace(config, seed=3), progress=False)
    assert _files(tmp_path) == before
    assert [p.name for p in tmp_path.parent.rglob("*") if ".genret-" in p.name] == []  # no temporary files left


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_train=-1), "n_train must not be negative"),
    (dict(n_val=-1), "n_val must not be negative"),
    (dict(n_test=-5), "n_test must not be negative"),
    (dict(n_train=2.5), "n_train must be an integer"),
    (dict(image_size=16), "image_size must be at least 32"),
    (dict(captions_per_image=0), "captions_per_image must be in 1.."),
    (dict(captions_per_image=MAX_CAPTIONS + 1), f"captions_per_image must be in 1..{MAX_CAPTIONS}"),
    (dict(twin_fraction=1.5), r"twin_fraction must be in \[0, 1\]"),
    (dict(twin_fraction=-0.1), r"twin_fraction must be in \[0, 1\]"),
    (dict(val_twin_fraction=2), r"val_twin_fraction must be in \[0, 1\]"),
    (dict(n_train=0, n_val=0, n_test=0), "nothing to generate"),
])
def test_config_validation_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SynthConfig(**kwargs)


def test_the_most_captions_the_config_allows_are_all_distinct(tmp_path):
    config = SynthConfig(n_train=3, n_val=0, n_test=2, captions_per_image=MAX_CAPTIONS, seed=1)
    data = json.loads(generate_world(tmp_path, config, progress=False).read_text())
    assert all(len({s["raw"] for s in i["sentences"]}) == MAX_CAPTIONS for i in data["images"])


@pytest.mark.parametrize("relation,facts", [
    ("left of", {"left object": "small red circle", "right object": "large blue square"}),
    ("right of", {"left object": "large blue square", "right object": "small red circle"}),
    ("above", {"top object": "small red circle", "bottom object": "large blue square"}),
    ("below", {"top object": "large blue square", "bottom object": "small red circle"}),
])
def test_scene_facts_name_objects_by_place(relation, facts):
    scene = Scene((SceneObject("circle", "red", "small", 20, 20), SceneObject("square", "blue", "large", 40, 40)),
                  relation)
    assert scene.facts().items() >= facts.items()
    assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene


@pytest.mark.parametrize("objects,relation,match", [
    ((("circle", "red", "small"), ("circle", "red", "large")), "left of", "both objects are a red circle"),
    ((("circle", "red", "small"), ("square", "red", "large")), "beside", "unknown relation"),
    ((("circle", "pink", "small"), ("square", "red", "large")), "above", "unknown colour 'pink'"),
    ((("blob", "red", "small"), ("square", "red", "large")), "above", "unknown shape 'blob'"),
])
def test_invalid_scenes_are_refused(objects, relation, match):
    with pytest.raises(ValueError, match=match):
        Scene(tuple(SceneObject(*o, 10.0, 10.0) for o in objects), relation)


def test_questions_have_true_answers_and_balanced_yes_no(small):
    _, data = small
    answers = []
    for entry in data["images"]:
        scene = Scene.from_dict(entry["scene"])
        a, b = scene.objects
        for q, ans in questions(scene, random.Random(entry["imgid"])):
            answers.append(ans)
            if q == f"Is the {a.noun()} {scene.relation} the {b.noun()}?":
                assert ans == "yes"
            if q.startswith("Is there a "):
                named = q.removeprefix("Is there a ").rstrip("?")
                assert (ans == "yes") == (named in (a.noun(), b.noun()))
    yes, no = answers.count("yes"), answers.count("no")
    assert no > 0.3 * (yes + no)  # "no" is common enough that always answering "yes" fails
