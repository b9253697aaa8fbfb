"""Where commands write: never over the user's files or an input, and a swap a kill cuts short loses nothing."""

import os
import shutil

import pytest

from genret._io import OutputError, atomic_dir
from genret.cli import main


def _tree(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def data(tmp_path, world_dir):
    copy = tmp_path / "data"
    shutil.copytree(world_dir, copy)
    return copy


def _debris(folder):
    return [p.name for p in folder.iterdir() if ".genret-" in p.name]


def test_index_build_into_its_own_dataset_is_refused_and_the_data_kept(clip_dir, data, capsys):
    before = _tree(data)
    assert main(["-q", "index", "build", str(clip_dir), "--data", str(data), "--out", str(data)]) == 2
    assert "holds an input of this command" in capsys.readouterr().err
    assert _tree(data) == before and not _debris(data.parent)
    # --overwrite does not lift it: the output would still destroy the input
    assert main(["-q", "index", "build", str(clip_dir), "--data", str(data), "--out", str(data), "--overwrite"]) == 2
    assert _tree(data) == before


def test_a_folder_of_the_users_files_is_refused_unless_overwrite(clip_dir, data, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert main(["-q", "index", "build", str(clip_dir), "--data", str(data), "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert "exists and is not a genret artefact with 1 files genret did not write there (e.g. 'thesis.tex')" in err
    assert "--overwrite" in err
    assert (mine / "thesis.tex").read_text() == "years of work" and not _debris(tmp_path)
    pipe = tmp_path / "pipe"
    assert main(["-q", "index", "build", str(clip_dir), "--data", str(data), "--out", str(pipe)]) == 0
    assert main(["-q", "index", "build", str(clip_dir), "--data", str(data), "--out", str(pipe)]) == 0  # its own kind
    assert main(["-q", "index", "build", str(clip_dir), "--data", str(data), "--out", str(mine), "--overwrite"]) == 0
    # --overwrite writes the pipeline beside the user's file, which stays as it was
    assert (mine / "thesis.tex").read_text() == "years of work" and (mine / "manifest.json").is_file()


@pytest.mark.parametrize("target", [".", "file"])
def test_out_dot_or_a_file_is_a_clear_error_without_debris(clip_dir, data, tmp_path, monkeypatch, capsys, target):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("keep me")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["-q", "index", "build", str(clip_dir), "--data", str(data), "--out", target]) == 2
    err = capsys.readouterr().err
    assert ("is the working folder" in err) if target == "." else ("is a file, not a folder" in err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before and (tmp_path / "file").read_text() == "keep me"


def test_another_kind_of_artefact_is_not_replaced(clip_dir, data, tmp_path, capsys):
    """A trained CLIP is a genret artefact too, but not a pipeline: index build must not replace it."""
    model = tmp_path / "clip"
    shutil.copytree(clip_dir, model)
    assert main(["-q", "index", "build", str(clip_dir), "--data", str(data), "--out", str(model)]) == 2
    assert "is a 'genret.clip' artefact" in capsys.readouterr().err


def test_data_synth_refuses_a_folder_of_other_files(tmp_path, capsys):
    mine = tmp_path / "photos"
    (mine / "images").mkdir(parents=True)
    (mine / "images" / "000000.png").write_bytes(b"my holiday")
    assert main(["-q", "data", "synth", str(mine), "--n-train", "4", "--n-val", "2", "--n-test", "2"]) == 2
    assert "not a genret artefact" in capsys.readouterr().err
    assert (mine / "images" / "000000.png").read_bytes() == b"my holiday"
