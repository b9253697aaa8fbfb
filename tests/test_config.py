"""Every number a config reads is checked where it is read: type, finiteness and declared range, named by file and
key (a file), by field (Python), or by flag (the command line)."""

import dataclasses
import json
import math
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genret.cli import main, to_json
from genret.config import ConfigError, Range, _bound, _number_kind, check_fields, from_dict
from genret.pipeline import EncoderConfig, IndexConfig, build_stages, load_config
from genret.stages import STAGES

BASE = {"prefilter": {}, "rerank": {"model": "m"}, "generate": {"adapter": "a"}, "cirevl": {"model": "m"},
        "eiirwqr": {"model": "m"}, "chat": {"model": "m"}}
CONFIGS = [(name, STAGES.get(name).config_class, base) for name, base in BASE.items()] + [
    ("encoder", EncoderConfig, {}), ("index", IndexConfig, {})]
NUMBER_FIELDS = [(name, cls, base, f) for name, cls, base in CONFIGS for f in dataclasses.fields(cls)
                 if _number_kind(typing.get_type_hints(cls)[f.name])]
IDS = [f"{name}.{f.name}" for name, _, _, f in NUMBER_FIELDS]
WHERE = "p.toml: stages[0]"
SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def test_every_number_field_is_covered():
    assert "rerank.fusion_weight" in IDS and "generate.fusion_weight" in IDS and "prefilter.k" in IDS
    assert "encoder.batch_size" in IDS and "index.chunk_size" in IDS


def _bad(kind: type, rng: Range | None):
    """Values no field of ``kind`` and ``rng`` may take."""
    wrong = st.one_of(st.sampled_from([math.nan, math.inf, -math.inf]), st.booleans(), st.text(max_size=3),
                      st.lists(st.integers(), max_size=2))
    if kind is int:
        wrong = st.one_of(wrong, st.floats(allow_nan=False, allow_infinity=False))
    if rng is not None and rng.lo is not None:
        below = st.integers(max_value=math.ceil(rng.lo) - 1) if kind is int else \
            st.floats(max_value=rng.lo, exclude_max=not rng.lo_open, allow_nan=False, allow_infinity=False)
        wrong = st.one_of(wrong, below)
    return wrong


@SETTINGS
@pytest.mark.parametrize("name,cls,base,f", NUMBER_FIELDS, ids=IDS)
@given(data=st.data())
def test_a_wrong_number_is_named_by_file_and_key(name, cls, base, f, data):
    kind = _number_kind(typing.get_type_hints(cls)[f.name])
    value = data.draw(_bad(kind, _bound(f.metadata)))
    with pytest.raises(ConfigError) as err:
        from_dict(cls, {**base, f.name: value}, where=WHERE)
    assert str(err.value).startswith(f"{WHERE}.{f.name}: "), str(err.value)


@SETTINGS
@pytest.mark.parametrize("name,cls,base,f", NUMBER_FIELDS, ids=IDS)
@given(data=st.data())
def test_a_number_in_range_passes_its_own_check(name, cls, base, f, data):
    kind = _number_kind(typing.get_type_hints(cls)[f.name])
    rng = _bound(f.metadata) or Range()
    lo = -10**6 if rng.lo is None else rng.lo
    value = data.draw(st.integers(math.floor(lo) + (1 if rng.lo_open else 0), math.floor(lo) + 10**6) if kind is int
                      else st.floats(lo, lo + 1e6, exclude_min=rng.lo_open))
    try:
        config = from_dict(cls, {**base, f.name: value}, where=WHERE)
    except ConfigError as err:  # another field's rule (generate: k <= num_beams), never this field's own check
        assert f"{f.name}: must" not in str(err) and "expected" not in str(err)
    else:
        assert getattr(config, f.name) == value and type(getattr(config, f.name)) is kind


@pytest.mark.parametrize("cls,kwargs,match", [
    (STAGES.get("rerank").config_class, {"model": "m", "fusion_weight": math.nan}, "fusion_weight: must be a finite"),
    (STAGES.get("rerank").config_class, {"model": "m", "fusion_weight": -math.inf}, "fusion_weight: must be a finite"),
    (STAGES.get("rerank").config_class, {"model": "m", "timeout": 0.0}, "timeout: must be above 0"),
    (STAGES.get("generate").config_class, {"adapter": "a", "fusion_weight": math.inf}, "fusion_weight: must be"),
    (STAGES.get("prefilter").config_class, {"image_weight": math.nan}, "image_weight: must be a finite number"),
    (STAGES.get("prefilter").config_class, {"k": True}, "k: expected a whole number, got True"),
    (EncoderConfig, {"model": "m", "batch_size": 0}, "batch_size: must be at least 1"),
    (IndexConfig, {"chunk_size": 2.0}, "chunk_size: expected a whole number"),
])
def test_configs_built_in_python_are_checked_too(cls, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("line,match", [
    ("fusion_weight = nan", r"p\.toml: stages\[1\]\.fusion_weight: must be a finite number, got nan"),
    ("fusion_weight = -inf", r"p\.toml: stages\[1\]\.fusion_weight: must be a finite number, got -inf"),
    ("k = -1", r"p\.toml: stages\[1\]\.k: must be at least 1, got -1"),
    ("k = 2.5", r"p\.toml: stages\[1\]\.k: expected a whole number, got 2\.5"),
    ("batch_size = true", r"p\.toml: stages\[1\]\.batch_size: expected a whole number, got True"),
    ("processor_options = {max_pixels = nan}", r"stages\[1\]\.processor_options\.max_pixels: must be a finite"),
])
def test_a_pipeline_file_names_the_bad_value(tmp_path, line, match):
    path = tmp_path / "p.toml"
    path.write_text(f'[encoder]\nmodel = "m"\n[[stages]]\ntype = "prefilter"\n[[stages]]\ntype = "rerank"\n'
                    f'model = "m"\n{line}\n')
    with pytest.raises(ConfigError, match=match):
        build_stages(load_config(path))


def test_a_yaml_nan_is_refused_too(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("encoder: {model: m, batch_size: .nan}\n")
    with pytest.raises(ConfigError, match=r"p\.yaml: encoder\.batch_size: expected a whole number, got nan"):
        load_config(path)


def test_a_config_file_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "p.toml"
    path.write_bytes(b'name = "x"\n[encoder]\nmodel = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=r"p\.toml: line 3: not UTF-8"):
        load_config(path)


@pytest.mark.parametrize("argv,flag,match", [
    (["search", "p", "x", "-k", "-1"], "-k/--k", "must be at least 1, got -1"),
    (["search", "p", "x", "-k", "2.5"], "-k/--k", "expected a whole number, got '2.5'"),
    (["eval", "p", "--data", "d", "--limit", "0"], "--limit", "must be at least 1, got 0"),
    (["eval", "p", "--data", "d", "--hits-k", "nan"], "--hits-k", "expected a whole number"),
    (["index", "tune", "p", "--recall", "nan"], "--recall", "must be a finite number, got nan"),
    (["index", "tune", "p", "--confidence", "1"], "--confidence", "must be at least 0.5 and below 1"),
    (["index", "build", "p", "--data", "d", "--out", "o", "--shards", "0"], "--shards", "must be at least 1"),
    (["train", "rerank", "--data", "d", "--base", "b", "--clip", "c", "--out", "o", "--lr", "inf"], "--lr",
     "must be a finite number, got inf"),
    (["train", "rerank", "--data", "d", "--base", "b", "--clip", "c", "--out", "o", "--epochs", "true"], "--epochs",
     "expected a whole number"),
])
def test_command_line_numbers_are_checked_as_they_are_read(capsys, argv, flag, match):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {match}" in err and "Traceback" not in err


def test_json_output_never_holds_a_bare_nan():
    from genret.types import Hit, Query, SearchResult

    result = SearchResult(Query(id="q", text="x"), (Hit(1, "a", 0.5, {"prefilter": 0.5}),
                                                     Hit(2, "b", math.nan, {"prefilter": math.nan})))
    with pytest.raises(ValueError, match=r"holds nan at \.results\[1\]\.score.*fusion_weight"):
        to_json(result.to_dict())
    assert json.loads(to_json({"score": 0.5})) == {"score": 0.5}
