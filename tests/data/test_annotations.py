"""Records' structured annotations reach the library only through registered plug-ins."""

import dataclasses

import pytest

from genret.data.annotations import ANNOTATIONS, annotation_of, require_annotation
from genret.stages.dialog import Target, initial_query
from genret.stages.eiirwqr import JUDGES, EIIRwQRConfig
from genret.training.negatives import content_key
from genret.world.scene import Scene


class Colours:
    """A plug-in for a kind the library has never heard of: ``{"colours": [...]}``."""

    def signature(self, value):
        return tuple(sorted(value))

    def mention(self, value, rng):
        return f"something {rng.choice(value)}"


@pytest.fixture
def colours(monkeypatch):
    monkeypatch.setitem(ANNOTATIONS._entries, "colours", Colours())


def test_the_world_registers_its_scenes_through_the_entry_point(world):
    record = world.split("train").records[0]
    key, kind, value = annotation_of(record.meta)
    assert key == "scene" and "scene" in ANNOTATIONS.names()
    assert kind.signature(value) == Scene.from_dict(value).signature()
    assert content_key(record) == ("scene", Scene.from_dict(value).signature())
    assert initial_query(record.meta, record.captions, record.id).startswith("a ")


def test_without_a_known_annotation_the_callers_fall_back_or_say_why(world):
    record = world.split("train").records[0]
    assert annotation_of({"twin_of": "x", "scene": None}) is None
    assert content_key(dataclasses.replace(record, id="a", meta={})) == ("id", "a")
    assert initial_query({"twin_of": "x"}, ["the first caption"], "a") == "the first caption"
    with pytest.raises(ValueError, match="image 'a' has neither an annotation nor a caption"):
        initial_query({}, [], "a")
    with pytest.raises(ValueError, match="the products' attributes needs a plug-in that knows the 'attrs' annotation"):
        require_annotation("attrs", "the products' attributes")


def test_a_new_plug_in_serves_the_library_unchanged(colours, world):
    record = world.split("train").records[0]
    record = dataclasses.replace(record, id="z", meta={"colours": ["red", "blue"]})
    assert content_key(record) == ("colours", ("blue", "red"))
    assert initial_query(record.meta, record.captions, "z") in {"something red", "something blue"}
    assert initial_query(record.meta, record.captions, "z") == initial_query(record.meta, record.captions, "z")


def test_targets_carry_metadata_and_read_the_old_form():
    old = Target.from_meta({"id": "a", "image": "a.png", "scene": {"k": 1}})
    assert old.meta == {"scene": {"k": 1}} and old.known("scene") == {"k": 1} and old.known("image") == "a.png"
    assert Target.from_meta(old.to_dict()) == old and old.known("colours") is None


def test_relevance_judges_are_a_registry(monkeypatch):
    with pytest.raises(ValueError, match=r"relevance must be a registered judge \(facts, target\)"):
        EIIRwQRConfig(model="m", relevance="nearby")

    class Everything:
        def check(self, config):
            pass

        def __call__(self, target, ids, metadata, config):
            return list(ids)

    monkeypatch.setitem(JUDGES._entries, "everything", Everything())
    assert EIIRwQRConfig(model="m", relevance="everything").relevance == "everything"
    facts = JUDGES.get("facts")
    with pytest.raises(ValueError, match="needs the target's scene"):
        facts(Target(id="a"), ["a"], {}, EIIRwQRConfig(model="m"))
    scene = Scene.from_dict({"objects": [{"shape": "circle", "colour": "red", "size": "small", "x": 10, "y": 30},
                                         {"shape": "square", "colour": "blue", "size": "large", "x": 40, "y": 30}],
                             "relation": "left of"})
    target = Target(id="a", meta={"scene": scene.to_dict()})
    same = {"b": {"scene": scene.to_dict()}, "c": {}}
    assert facts(target, ["a", "b", "c"], same, EIIRwQRConfig(model="m")) == ["a", "b"]
