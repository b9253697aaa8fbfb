"""Where commands write: never over the user's files or an input, and a swap a kill cuts short loses nothing."""

import json
import os
import shutil

import pytest

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


# --- every command that writes, against a folder of the user's files (issue 25) --------------------------------

SENTINELS = {"MY-NOTES.txt": b"mine", "drafts/thesis.tex": b"years of work", "report.md.bak": b"old report"}


def _sentinels(folder):
    for rel, data in SENTINELS.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)


def _sentinels_intact(folder):
    return all((folder / rel).read_bytes() == data for rel, data in SENTINELS.items())


TINY_CLIP_ARGS = ["--max-steps", "2", "--batch-size", "8", "--vision-layers", "1", "--vision-width", "16",
                  "--text-layers", "1", "--text-width", "16", "--heads", "2", "--projection-dim", "8",
                  "--vocab-size", "200", "--context-length", "16", "--save-every", "1"]


def _command(kind, tmp_path, clip_dir, mllm_dir, data, pipe):
    return {
        "data synth": ["data", "synth", "--n-train", "4", "--n-val", "2", "--n-test", "2", "--cir-train", "0",
                       "--cir-val", "0", "--cir-test", "2"],
        "train clip": ["train", "clip", "--data", str(data), *TINY_CLIP_ARGS],
        "train rewriter": ["train", "rewriter", "--task", "chat", "--data", str(data), "--base", str(mllm_dir),
                           "--max-steps", "1", "--batch-size", "4", "--rounds", "1", "--eval-triplets", "0",
                           "--save-every", "1"],
        "index build": ["index", "build", str(clip_dir), "--data", str(data)],
        "eval": ["eval", str(pipe), "--data", str(data)],
    }[kind]


@pytest.fixture(scope="module")
def small_pipe(tmp_path_factory, clip_dir, world_dir):
    out = tmp_path_factory.mktemp("outputs") / "pipe"
    assert main(["-q", "index", "build", str(clip_dir), "--data", str(world_dir), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("kind", ["data synth", "train clip", "train rewriter", "index build", "eval"])
def test_every_writing_command_refuses_the_users_folder_and_keeps_it_with_overwrite(kind, tmp_path, clip_dir,
                                                                                    mllm_dir, data, small_pipe, capsys):
    from genret._io import verify

    out = tmp_path / "out"
    _sentinels(out)
    argv = ["-q", *_command(kind, tmp_path, clip_dir, mllm_dir, data, small_pipe), "--out" if kind != "data synth"
            else None, str(out)]
    argv = [a for a in argv if a is not None]
    if kind == "data synth":
        argv = ["-q", "data", "synth", str(out), *argv[3:-1]]
    assert main(argv) == 2
    assert "files genret did not write there" in capsys.readouterr().err
    assert _sentinels_intact(out) and sorted(p.name for p in out.iterdir()) == ["MY-NOTES.txt", "drafts",
                                                                                "report.md.bak"]
    assert main([*argv, "--overwrite"]) == 0
    assert _sentinels_intact(out)
    records = verify(out)
    assert records and all(r["error"] is None for r in records), records
    assert not [p for p in tmp_path.iterdir() if ".genret-" in p.name]


def test_index_build_refuses_an_output_holding_the_encoder_its_pipeline_file_names(tmp_path, clip_dir, data, capsys):
    """`index build cfg.toml --out t/mm --overwrite` with the file's encoder at t/mm/clip deleted the encoder."""
    from genret.config import write_config_file

    (tmp_path / "t" / "mm").mkdir(parents=True)
    shutil.copytree(clip_dir, tmp_path / "t" / "mm" / "clip")
    write_config_file(tmp_path / "cfg.toml", {"encoder": {"model": "t/mm/clip"}, "stages": [{"type": "prefilter"}]})
    before = _tree(tmp_path / "t")
    for extra in ([], ["--overwrite"]):
        assert main(["-q", "index", "build", str(tmp_path / "cfg.toml"), "--data", str(data), "--out",
                     str(tmp_path / "t" / "mm"), *extra]) == 2
        assert "holds an input of this command" in capsys.readouterr().err
    assert _tree(tmp_path / "t") == before


def test_an_output_holding_what_a_saved_pipeline_names_is_refused(tmp_path, clip_dir, data, capsys):
    """The encoder a saved pipeline names is an input of every command reading that pipeline."""
    shutil.copytree(clip_dir, tmp_path / "t" / "clip")
    pipe = tmp_path / "pipe"
    assert main(["-q", "index", "build", str(tmp_path / "t" / "clip"), "--data", str(data), "--out", str(pipe)]) == 0
    before = _tree(tmp_path / "t")
    assert main(["-q", "index", "build", str(pipe), "--data", str(data), "--out", str(tmp_path / "t"),
                 "--overwrite"]) == 2
    assert "holds an input of this command" in capsys.readouterr().err and _tree(tmp_path / "t") == before


def test_eval_checks_its_output_before_evaluating(tmp_path, small_pipe, data, capsys):
    """`eval --out FILE` ran the whole evaluation, then failed; `eval --out DIR` overwrote the user's report.md."""
    (tmp_path / "file").write_text("keep")
    assert main(["-q", "eval", str(small_pipe), "--data", str(data), "--out", str(tmp_path / "file")]) == 2
    captured = capsys.readouterr()
    assert "is a file, not a folder" in captured.err and captured.out == ""  # no report: refused before evaluating
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my report")
    assert main(["-q", "eval", str(small_pipe), "--data", str(data), "--out", str(mine)]) == 2
    assert (mine / "report.md").read_text() == "my report" and capsys.readouterr().out == ""
    assert main(["-q", "eval", str(small_pipe), "--data", str(data), "--out", str(tmp_path / "r")]) == 0
    assert main(["-q", "eval", str(small_pipe), "--data", str(data), "--out", str(tmp_path / "r")]) == 0  # its own kind
    assert {p.name for p in (tmp_path / "r").iterdir()} >= {"report.json", "report.md", "manifest.json"}


def test_index_tune_changes_the_pipeline_as_a_whole_and_keeps_the_users_files(tmp_path, clip_dir, data, capsys):
    from genret._io import verify
    from genret.pipeline import RetrievalPipeline

    pipe = tmp_path / "pipe"
    assert main(["-q", "index", "build", str(clip_dir), "--data", str(data), "--out", str(pipe), "--factory",
                 "HNSW8"]) == 0
    _sentinels(pipe)
    assert main(["-q", "index", "tune", str(pipe), "--recall", "0.5", "--queries", "20", "-k", "3"]) == 0
    assert _sentinels_intact(pipe) and all(r["error"] is None for r in verify(pipe))
    tuned = json.loads((pipe / "gallery" / "images" / "manifest.json").read_text())
    assert tuned["search_params"].startswith("efSearch=") and "tuning" in tuned
    RetrievalPipeline.load(pipe)


def test_a_real_build_killed_at_random_instants_leaves_a_whole_pipeline_and_the_users_files(tmp_path, clip_dir, data):
    """`genret index build --overwrite` into a pipeline folder with the user's files, SIGKILLed at random instants:
    each time the folder holds the old pipeline or the new one, whole, and the user's files unchanged."""
    import random
    import signal
    import subprocess
    import sys
    import time

    from genret._io import verify

    pipe = tmp_path / "pipe"
    assert main(["-q", "index", "build", str(clip_dir), "--data", str(data), "--out", str(pipe)]) == 0
    _sentinels(pipe)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "genret.cli", "-q", "index", "build", str(clip_dir), "--data", str(data), "--out",
            str(pipe), "--overwrite"]
    start = time.perf_counter()
    assert subprocess.run(argv, env=env, capture_output=True, timeout=300).returncode == 0
    whole = time.perf_counter() - start
    rng = random.Random(25)
    for delay in sorted(rng.uniform(0.3, 1.0) * whole for _ in range(3)):
        build = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        build.send_signal(signal.SIGKILL)
        build.wait(timeout=60)
        assert _sentinels_intact(pipe)
        assert [r["error"] for r in verify(pipe)] == [None] * len(verify(pipe)) and verify(pipe)


def test_the_demo_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    out = tmp_path / "mine"
    _sentinels(out)
    assert main(["-q", "demo", "--out", str(out)]) == 2
    assert "is not a folder genret demo made" in capsys.readouterr().err
    assert _sentinels_intact(out) and len(list(out.rglob("*"))) == 4


def test_an_output_inside_an_input_artefact_or_over_the_data_images_is_refused(tmp_path, small_pipe, clip_dir, data,
                                                                              capsys):
    """`eval P --out P/gallery/images --overwrite` would have replaced P's index; `--data subset.jsonl --out world`
    where the data names world/images/... would have replaced the images it indexes."""
    before = _tree(small_pipe)
    assert main(["-q", "eval", str(small_pipe), "--data", str(data), "--out", str(small_pipe / "gallery" / "images"),
                 "--overwrite"]) == 2
    assert "is inside an input of this command" in capsys.readouterr().err and _tree(small_pipe) == before
    record = json.loads((data / "dataset_synth.json").read_text())["images"][0]
    subset = tmp_path / "subset.jsonl"
    subset.write_text(json.dumps({"image": str(data / "images" / record["filename"]), "captions": ["a shape"],
                                  "split": "test"}) + "\n")
    before = _tree(data)
    assert main(["-q", "index", "build", str(clip_dir), "--data", str(subset), "--out", str(data), "--overwrite"]) == 2
    assert "holds an input of this command" in capsys.readouterr().err and _tree(data) == before
