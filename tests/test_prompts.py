"""Prompt files: every key known and of its type, or a PromptError naming the file and the key."""

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genret.prompts import PROMPT_DIR, PromptError, load_prompt

GOOD = {"name": "p", "version": 1, "yes": "yes", "no": "no",
        "t2i": {"user": "Text: {text}\n{image}\nMatch?"}, "i2t": {"user": "{image}\nText: {text}\nMatch?"}}
NEEDS = {"t2i": {"user": ("{text}", "{image}")}, "i2t": {"user": ("{text}", "{image}")}}
TOML_VALUES = st.one_of(st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False), st.text(max_size=5),
                        st.lists(st.integers(), max_size=2), st.dictionaries(st.sampled_from("ab"), st.integers(),
                                                                               max_size=1))


def _write(tmp_path, data, name="p.toml"):
    path = tmp_path / name
    path.write_text(tomli_w.dumps(data))
    return path


@pytest.mark.parametrize("name", sorted(p.stem for p in PROMPT_DIR.glob("*.toml")))
def test_every_shipped_prompt_passes_the_schema(name):
    assert load_prompt(name).version >= 1


@pytest.mark.parametrize("change,match", [
    ({"temperature": 0.2}, r"unknown key 'temperature' \(a prompt file holds name, version, yes, no"),
    ({"t2i": {"usr": "{text}{image}", "user": "{text}{image}"}}, r"\[t2i\]\.usr is not a template genret reads"),
    ({"t2i": {"user": 42}}, r"\[t2i\]\.user must be text, got a number \(42\)"),
    ({"t2i": {"user": True}}, r"\[t2i\]\.user must be text, got true/false"),
    ({"t2i": {"user": ["{text}", "{image}"]}}, r"\[t2i\]\.user must be text, got an array"),
    ({"t2i": {"user": {"text": "x"}}}, r"\[t2i\]\.user must be text, got a table"),
    ({"name": 3}, r"'name' must be non-empty text, got a number"),
    ({"name": ""}, r"'name' must be non-empty text"),
    ({"version": "1"}, r"'version' must be a whole number from 1, got text"),
    ({"version": True}, r"'version' must be a whole number from 1, got true/false"),
    ({"version": 0}, r"'version' must be a whole number from 1, got a number \(0\)"),
    ({"version": 1.5}, r"'version' must be a whole number from 1"),
    ({"yes": 1}, r"'yes' must be non-empty text, got a number"),
    ({"no": ["no"]}, r"'no' must be non-empty text, got an array"),
    ({"t2x": {"user": "{text}{image}"}}, r"unknown table \[t2x\]; this stage reads \[t2i\], \[i2t\]"),
])
def test_unknown_keys_and_wrong_types_are_named(tmp_path, change, match):
    path = _write(tmp_path, {**GOOD, **change})
    with pytest.raises(PromptError, match=match) as err:
        load_prompt(str(path), required=NEEDS, exact=True)
    assert str(path) in str(err.value)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["name", "version", "yes", "no", "t2i.user", "i2t.user", "t2i.assistant", "extra"]),
       value=TOML_VALUES)
def test_any_wrong_value_is_refused_naming_the_key(tmp_path, key, value):
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in GOOD.items()}
    if "." in key:
        table, name = key.split(".")
        data[table][name] = value
    else:
        data[key] = value
    path = _write(tmp_path, data)
    valid = {"name": isinstance(value, str) and value.strip(), "yes": isinstance(value, str) and value.strip(),
             "no": isinstance(value, str) and value.strip(),
             "version": isinstance(value, int) and not isinstance(value, bool) and value >= 1}.get(key, False)
    if "." in key and isinstance(value, str):
        valid = True  # a text template: the placeholder check decides
    if key == "extra" and value == {}:
        valid = True  # an empty table of templates (only a stage reading exactly its tables refuses another)
    try:
        load_prompt(str(path))
    except PromptError as err:
        assert not valid or "{" in str(err)
        assert str(path) in str(err) and key.split(".")[-1] in str(err)
    else:
        assert valid, f"{key} = {value!r} was accepted"


def test_a_prompt_file_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "p.toml"
    path.write_bytes(b'name = "p"\nversion = 1\n[t2i]\nuser = "caf\xe9 {text}{image}"\n')
    with pytest.raises(PromptError, match=r"p\.toml: line 4: not UTF-8"):
        load_prompt(str(path))
