"""One path rule: every path a config file names is relative to that file, whatever the working folder; hub ids
stay hub ids, prompt names stay names."""

import argparse
import dataclasses
import os
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genret.config import ConfigError, merge_arguments, path_fields
from genret.pipeline import EncoderConfig, load_config
from genret.stages import STAGES

BASE = {"rerank": {"model": "hub-org/some-mllm"}, "generate": {"adapter": "A"}, "cirevl": {"model": "hub-org/m"},
        "eiirwqr": {"model": "hub-org/m"}, "chat": {"model": "hub-org/m"}}
FIELDS = [("encoder", EncoderConfig, name, kind) for name, kind in path_fields(EncoderConfig).items()] + [
    (stage, STAGES.get(stage).config_class, name, kind) for stage in BASE
    for name, kind in path_fields(STAGES.get(stage).config_class).items()]


def test_the_path_fields_are_marked():
    names = {(t, n) for t, _, n, _ in FIELDS}
    assert {("encoder", "model"), ("encoder", "cache_dir"), ("rerank", "model"), ("rerank", "adapter"),
            ("rerank", "prompt"), ("cirevl", "rewriter_adapter"), ("eiirwqr", "caption_prompt"),
            ("generate", "adapter"), ("chat", "cache_dir")} <= names


def _write(folder, table_name, name, value):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "p.toml"
    encoder = {"model": "hub-org/clip"}
    stages = [{"type": "prefilter"}]
    if table_name == "encoder":
        encoder[name] = value
    else:
        stages.append({"type": table_name, **BASE[table_name], name: value})
    lines = ["[encoder]"] + [f'{k} = "{v}"' for k, v in encoder.items()]
    for table in stages:
        lines += ["[[stages]]"] + [f'{k} = "{v}"' for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _value(config, table_name, name):
    return getattr(config.encoder, name) if table_name == "encoder" else config.stages[1][name]


@pytest.mark.parametrize("table_name,cls,name,kind", FIELDS, ids=[f"{t}.{n}" for t, _, n, _ in FIELDS])
def test_every_path_field_resolves_beside_the_file_from_any_working_folder(tmp_path, monkeypatch, table_name, cls,
                                                                           name, kind):
    configs, elsewhere = tmp_path / "configs", tmp_path / "elsewhere"
    relative = "../shared/thing.toml" if kind == "prompt" else "models/thing"
    target = (configs / relative).resolve()
    if kind == "prompt":
        target.parent.mkdir(parents=True)
        target.write_text('name = "p"\nversion = 1\n')
    elif kind != "dir":  # a cache folder need not exist yet
        target.mkdir(parents=True)
    path = _write(configs, table_name, name, relative)
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert _value(load_config(path), table_name, name) == str(target)
    monkeypatch.chdir(configs)  # the same from the file's own folder
    assert _value(load_config(path), table_name, name) == str(target)


@pytest.mark.parametrize("table_name,name,value", [
    ("encoder", "model", "openai/clip-vit-base-patch32"),
    ("rerank", "model", "llava-hf/llava-1.5-7b-hf"),
    ("rerank", "prompt", "rerank_pointwise"),
    ("cirevl", "rewriter_model", "Qwen/Qwen2-VL-2B-Instruct"),
    ("eiirwqr", "caption_prompt", "caption"),
])
def test_hub_ids_and_prompt_names_stay_as_written(tmp_path, monkeypatch, table_name, name, value):
    monkeypatch.chdir(tmp_path)
    assert _value(load_config(_write(tmp_path / "configs", table_name, name, value)), table_name, name) == value


@pytest.mark.parametrize("value", ["./clip", "../models/clip", "models/sub/clip", "~/no-such-genret-model-dir"])
def test_what_reads_as_a_path_is_a_path_beside_the_file_even_when_missing(tmp_path, value):
    config = load_config(_write(tmp_path / "configs", "encoder", "model", value))
    expected = os.path.expanduser(value) if value.startswith("~") else str((tmp_path / "configs" / value).resolve())
    assert config.encoder.model == expected


def test_a_name_under_a_folder_beside_the_file_is_local(tmp_path):
    (tmp_path / "configs" / "runs").mkdir(parents=True)  # runs/ exists: runs/clip is a path, not a hub id
    config = load_config(_write(tmp_path / "configs", "rerank", "model", "runs/clip"))
    assert config.stages[1]["model"] == str(tmp_path / "configs" / "runs" / "clip")


@pytest.mark.parametrize("table_name,name", [("encoder", "model"), ("rerank", "adapter"), ("encoder", "cache_dir")])
def test_a_path_found_only_in_the_working_folder_is_refused_with_the_path_to_write(tmp_path, monkeypatch,
                                                                                  table_name, name):
    """Stage paths used to be read from the working folder, the encoder's from the file's: the same file meant two
    things. Now a path there but not beside the file says what to write instead."""
    (tmp_path / "runs" / "lora").mkdir(parents=True)
    path = _write(tmp_path / "configs", table_name, name, "runs/lora")
    monkeypatch.chdir(tmp_path)
    table = "encoder" if table_name == "encoder" else r"stages\[1\]"
    with pytest.raises(ConfigError, match=rf"p\.toml: {table}\.{name}: 'runs/lora' is not beside the file .* write "
                                          r"'\.\./runs/lora'"):
        load_config(path)


SEGMENT = st.text(alphabet="abcdefghij_-", min_size=1, max_size=6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(SEGMENT, min_size=1, max_size=3), up=st.integers(0, 2), depth=st.integers(1, 3))
def test_any_relative_layout_resolves_against_the_file(tmp_path_factory, parts, up, depth):
    root = tmp_path_factory.mktemp("layout")
    folder = root.joinpath(*[f"d{i}" for i in range(depth)])
    relative = "/".join([".."] * min(up, depth) + parts)
    target = (folder / relative).resolve()
    target.mkdir(parents=True, exist_ok=True)
    config = load_config(_write(folder, "rerank", "adapter", relative))
    assert config.stages[1]["adapter"] == str(target)


def test_a_saved_pipeline_writes_paths_that_resolve_back(tmp_path, monkeypatch):
    from genret.pipeline import portable_paths

    (tmp_path / "models" / "mllm").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    table = {"type": "rerank", "model": "models/mllm", "adapter": str(tmp_path / "lora"), "prompt": "rerank_pointwise"}
    out = portable_paths(table, tmp_path / "runs" / "pipe")
    assert out == {**table, "model": "../../models/mllm", "adapter": "../../lora"}
    encoder = portable_paths({"model": "openai/clip-vit-base-patch32", "cache_dir": "cache"}, tmp_path / "runs" / "pipe")
    assert encoder == {"model": "openai/clip-vit-base-patch32", "cache_dir": "../../cache"}


@dataclass
class _Train:
    adapter: str = field(default="", metadata={"path": "adapter", "help": "an adapter"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})


def test_a_config_files_paths_are_relative_to_it_and_flags_to_the_working_folder(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "t.toml").write_text('adapter = "lora"\n')
    monkeypatch.chdir(tmp_path)
    config = merge_arguments(_Train, argparse.Namespace(adapter=None, lr=None), "configs/t.toml")
    assert config.adapter == str(tmp_path / "configs" / "lora")
    flagged = merge_arguments(_Train, argparse.Namespace(adapter="lora", lr=None), "configs/t.toml")
    assert flagged.adapter == "lora"  # a flag is read relative to the working folder, as typed
    assert dataclasses.asdict(flagged)["lr"] == 1e-3
