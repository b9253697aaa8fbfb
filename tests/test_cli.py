import json

import pytest

from genret.cli import main


@pytest.fixture(scope="module")
def built(tmp_path_factory, clip_dir, world_dir):
    out = tmp_path_factory.mktemp("cli") / "pipe"
    assert main(["-q", "index", "build", str(clip_dir), "--data", str(world_dir), "--out", str(out)]) == 0
    return out


def test_search_text_and_image_as_json(built, world, capsys):
    rec = world.split("test").records[0]
    assert main(["-q", "search", str(built), rec.captions[0], "--k", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["target"] == "image" and [r["rank"] for r in out["results"]] == [1, 2, 3]
    assert all(r["image"].endswith(".png") and "prefilter" in r["scores"] for r in out["results"])
    assert main(["-q", "search", str(built), "--image", str(rec.path), "--k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].lstrip().startswith("1")


def test_eval_json_has_both_directions(built, world_dir, tmp_path, capsys):
    assert main(["-q", "eval", str(built), "--data", str(world_dir), "--json", "--out", str(tmp_path / "r")]) == 0
    report = json.loads(capsys.readouterr().out)
    for d in ("t2i", "i2t"):
        assert set(report["stages"]["prefilter"][d]) >= {"R@1", "R@5", "R@10"}
    assert (tmp_path / "r" / "report.md").is_file()
    assert main(["-q", "eval", str(built), "--data", str(world_dir)]) == 0
    text = capsys.readouterr().out
    assert "t2i R@1" in text and "twins" in text


@pytest.mark.parametrize("argv,match", [
    (["search", "{built}", "--image", "{bad}"], "bad.png: not a readable image"),
    (["search", "{built}", "a circle", "--k", "999"], "k=999 is larger than the image gallery"),
    (["search", "{built}"], "give either a text query or --image"),
    (["search", "{tmp}/nowhere", "x"], "encoder model directory not found"),
    (["eval", "{built}", "--data", "{tmp}/missing.json"], "dataset not found"),
    (["eval", "{built}", "--data", "{world}", "--split", "nope"], "no images in split nope"),
    (["index", "build", "{tmp}/p.toml", "--data", "{world}", "--out", "{tmp}/o"], "pipeline file not found"),
])
def test_user_errors_exit_2_with_a_message(built, world_dir, tmp_path, capsys, argv, match):
    (tmp_path / "bad.png").write_text("not an image")
    argv = [a.format(built=built, bad=tmp_path / "bad.png", tmp=tmp_path, world=world_dir) for a in argv]
    assert main(["-q"] + argv) == 2
    assert match in capsys.readouterr().err


def test_data_synth_and_train_clip(tmp_path, capsys):
    assert main(["-q", "data", "synth", str(tmp_path / "w"), "--n-train", "40", "--n-val", "4", "--n-test", "8"]) == 0
    assert (tmp_path / "w" / "dataset_synth.json").is_file()
    argv = ["-q", "train", "clip", "--data", str(tmp_path / "w"), "--out", str(tmp_path / "c"), "--epochs", "1",
            "--vision-layers", "1", "--text-layers", "1", "--vision-width", "32", "--text-width", "32",
            "--heads", "2", "--projection-dim", "16", "--batch-size", "16"]
    assert main(argv) == 0
    assert "saved" in capsys.readouterr().out
    assert (tmp_path / "c" / "model.safetensors").is_file()
    assert main(["-q", "train", "clip", "--data", str(tmp_path / "w"), "--out", str(tmp_path / "c2"),
                 "--heads", "3"]) == 2
    assert "heads" in capsys.readouterr().err and not (tmp_path / "c2").exists()


def test_demo_prefilter_only_on_a_tiny_world(tmp_path, monkeypatch, capsys):
    import genret.world.demo as demo
    from conftest import TINY_CLIP, TINY_WORLD

    monkeypatch.setattr(demo, "DEMO_WORLD", TINY_WORLD)
    monkeypatch.setattr(demo, "DEMO_CLIP", TINY_CLIP)
    assert main(["-q", "demo", "--no-rerank", "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "t2i R@1" in out and "prefilter" in out
    report = json.loads((tmp_path / "d" / "report" / "report.json").read_text())
    assert report["stages"]["prefilter"]["t2i"]["R@10"] > 0
    mtime = (tmp_path / "d" / "clip" / "model.safetensors").stat().st_mtime
    assert main(["-q", "demo", "--no-rerank", "--out", str(tmp_path / "d")]) == 0  # reuses the trained CLIP
    assert (tmp_path / "d" / "clip" / "model.safetensors").stat().st_mtime == mtime


def test_demo_with_shipped_models_trains_a_lora_and_reports_every_stage(tmp_path, monkeypatch, capsys,
                                                                        world_dir, clip_dir, mllm_dir):
    import dataclasses

    import genret.world.demo as demo
    import genret.world.shipped as shipped
    from conftest import TINY_WORLD
    from genret.eval.report import rewriting_tables

    run = tmp_path / "run"
    run.mkdir()
    for name, src in (("world", world_dir), ("clip", clip_dir), ("mllm", mllm_dir)):
        (run / name).symlink_to(src, target_is_directory=True)
    monkeypatch.setattr(shipped, "MINI_WORLD", shipped.ship(run, tmp_path / "mini-world"))
    monkeypatch.setattr(demo, "DEMO_WORLD", TINY_WORLD)
    tiny = dataclasses.replace(demo.demo_rerank_config(), max_steps=2, batch_size=2, negatives=2, mine_k=4,
                               eval_queries=4)
    monkeypatch.setattr(demo, "demo_rerank_config", lambda: tiny)
    import genret.world.demo_rewrite as rewrite

    small = dataclasses.replace(rewrite.demo_rewriter_config(), max_steps=2, batch_size=4)
    monkeypatch.setattr(rewrite, "demo_rewriter_config", lambda: small)
    for name, value in (("TRIPLETS", 6), ("DIALOG_QUERIES", 4), ("DIALOG_ROUNDS", 1)):
        monkeypatch.setattr(rewrite, name, value)
    assert main(["-q", "demo", "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "zero-shot" in out and "lora" in out and "CIReVL + LoRA" in out and "chat, oracle questioner" in out
    report = json.loads((tmp_path / "d" / "report" / "report.json").read_text())
    assert set(report["stages"]) == {"prefilter", "zero-shot", "lora"}
    assert set(report["twins"]) >= {"prefilter", "zero-shot", "lora"}
    rows = report["rewriting"]
    assert [r["variant"] for r in rows["composed"]["rows"]] == ["text alone", "image alone", "CIReVL zero-shot",
                                                                "CIReVL + LoRA", "CIReVL + LoRA → MLLM rerank"]
    assert all(len(r["hits@10"]) == 2 for r in rows["interactive"]["rows"])
    assert "Query rewriting" in (tmp_path / "d" / "report" / "report.md").read_text()
    assert (tmp_path / "d" / "report-cir" / "report.json").is_file()
    adapters = [tmp_path / "d" / "rerank-lora", tmp_path / "d" / "rewriter-lora"]
    assert json.loads((adapters[0] / "genret.json").read_text())["base_model"] == str((tmp_path / "mini-world" / "mllm").resolve())
    mtimes = [(a / "genret.json").stat().st_mtime for a in adapters]
    assert main(["-q", "demo", "--out", str(tmp_path / "d")]) == 0  # reuses both adapters
    assert [(a / "genret.json").stat().st_mtime for a in adapters] == mtimes
    assert rows["composed"]["rewriter"] == {"adapter": str(adapters[1]), "shipped": False, "steps": 2}
    assert [r["variant"] for r in rows["interactive"]["rows"]] == [
        "chat, oracle questioner", "chat, MLLM questioner (zero-shot)", "EIIRwQR, MLLM rewriter (zero-shot)"]
    # Shipped LoRAs are used as they are: nothing is trained, and the tables say which served.
    from genret.data import load_dataset
    from genret.training.rewriter import RewriterTrainConfig, train_rewriter

    questioner = tmp_path / "questioner"
    config = RewriterTrainConfig(task="chat", rounds=1, max_steps=2, batch_size=4, eval_triplets=0, threads=1)
    train_rewriter(tmp_path / "mini-world" / "mllm", load_dataset(world_dir), questioner, config, progress=False)
    summary = rewrite.run_rewrite_demo(tmp_path / "d2", tmp_path / "d" / "world", tmp_path / "mini-world" / "clip",
                                       tmp_path / "mini-world" / "mllm", progress=False,
                                       adapters={"rewriter": adapters[1], "questioner": questioner})
    assert summary["composed"]["rewriter"]["shipped"] and not (tmp_path / "d2" / "rewriter-lora").exists()
    assert [(a / "genret.json").stat().st_mtime for a in adapters] == mtimes
    assert "rewriter LoRA: shipped, 2 steps" in rewriting_tables(summary)
    assert [r["variant"] for r in summary["interactive"]["rows"]][1:] == [
        "chat, MLLM questioner + shipped LoRA", "EIIRwQR, MLLM rewriter (zero-shot)"]
    # A shipped rerank LoRA serves the demo's LoRA stage (in its mode, the zero-shot stage's too): none is trained.
    (run / "rerank").symlink_to(adapters[0], target_is_directory=True)
    monkeypatch.setattr(shipped, "MINI_WORLD", shipped.ship(run, tmp_path / "mini-world-2"))
    report = demo.run_demo(tmp_path / "d3", progress=False, rewrite=False)
    assert not (tmp_path / "d3" / "rerank-lora").exists() and set(report["stages"]) == {"prefilter", "zero-shot", "lora"}
    shipped_lora = str((tmp_path / "mini-world-2" / "rerank").resolve())
    assert [s.get("adapter") or None for s in report["config"]["stages"][1:]] == [None, shipped_lora]
    assert {s["mode"] for s in report["config"]["stages"][1:]} == {"pointwise"}


def test_demo_without_shipped_models_says_how_to_make_them(tmp_path, monkeypatch, capsys):
    import genret.world.demo as demo
    import genret.world.shipped as shipped
    from conftest import TINY_WORLD

    monkeypatch.setattr(shipped, "MINI_WORLD", tmp_path / "nothing")
    monkeypatch.setattr(demo, "DEMO_WORLD", TINY_WORLD)
    assert main(["-q", "demo", "--out", str(tmp_path / "d")]) != 0
    assert "make_mini_world_models.sh" in capsys.readouterr().err


def test_any_karpathy_dataset_flickr_layout(tmp_path, world, mllm_dir, capsys):
    """The same commands train (CLIP and a rerank LoRA), index and evaluate a data set laid out like Flickr30K."""
    from PIL import Image

    images = []
    (tmp_path / "flickr30k-images").mkdir()
    for i, rec in enumerate(world.records):
        name = f"{1000 + i}.jpg"
        Image.open(rec.path).save(tmp_path / "flickr30k-images" / name, quality=95)
        images.append({"filename": name, "imgid": i, "split": rec.split, "sentids": [],
                       "sentences": [{"raw": c, "imgid": i} for c in rec.captions]})
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"dataset": "flickr30k", "images": images}))
    tiny = ["--epochs", "1", "--vision-layers", "1", "--text-layers", "1", "--vision-width", "32",
            "--text-width", "32", "--heads", "2", "--projection-dim", "16", "--batch-size", "32"]
    assert main(["-q", "train", "clip", "--data", str(tmp_path), "--out", str(tmp_path / "clip")] + tiny) == 0
    assert main(["-q", "index", "build", str(tmp_path / "clip"), "--data", str(tmp_path / "dataset_flickr30k.json"),
                 "--out", str(tmp_path / "pipe"), "--factory", "HNSW16"]) == 0
    capsys.readouterr()
    assert main(["-q", "eval", str(tmp_path / "pipe"), "--data", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dataset"]["name"] == "flickr30k" and report["dataset"]["images"] == len(world.split("test"))
    assert report["config"]["index"]["factory"] == "HNSW16"
    assert "R@10" in report["stages"]["prefilter"]["i2t"]

    assert main(["-q", "train", "rerank", "--data", str(tmp_path), "--base", str(mllm_dir), "--clip", str(tmp_path / "clip"),
                 "--out", str(tmp_path / "lora"), "--max-steps", "2", "--batch-size", "2", "--negatives", "2",
                 "--mine-k", "4", "--eval-queries", "2", "--eval-k", "3", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["data"]["source"].endswith("dataset_flickr30k.json") and summary["steps"] == 2
    (tmp_path / "p.toml").write_text(
        f'[encoder]\nmodel = "{tmp_path / "clip"}"\n[[stages]]\ntype = "prefilter"\nk = 5\n'
        f'[[stages]]\ntype = "rerank"\nmodel = "{mllm_dir}"\nmode = "pointwise"\nk = 5\nadapter = "{tmp_path / "lora"}"\n')
    assert main(["-q", "index", "build", str(tmp_path / "p.toml"), "--data", str(tmp_path), "--out",
                 str(tmp_path / "pipe2")]) == 0
    capsys.readouterr()
    assert main(["-q", "eval", str(tmp_path / "pipe2"), "--data", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["stages"]) == {"prefilter", "rerank"} and report["dataset"]["name"] == "flickr30k"


def _subcommands():
    import argparse

    from genret.cli import build_parser

    def walk(parser, path):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield path
        for action in subs:
            for name, child in action.choices.items():
                yield from walk(child, [*path, name])

    return list(walk(build_parser(), []))


@pytest.mark.parametrize("path", _subcommands(), ids=" ".join)
def test_every_subcommand_renders_its_help(path, capsys):
    """A '%' in a help text (train rerank's "~10%") crashed argparse's help."""
    with pytest.raises(SystemExit) as done:
        main([*path, "--help"])
    assert done.value.code == 0 and "usage: genret" in capsys.readouterr().out


def test_search_says_when_the_last_stage_keeps_fewer_than_k(tmp_path, clip_dir, world_dir, capsys):
    from genret.config import write_config_file

    config = tmp_path / "p.toml"
    write_config_file(config, {"name": "few", "encoder": {"model": str(clip_dir)}, "stages": [{"type": "prefilter", "k": 5}]})
    assert main(["-q", "index", "build", str(config), "--data", str(world_dir), "--out", str(tmp_path / "pipe")]) == 0
    capsys.readouterr()
    assert main(["-q", "search", str(tmp_path / "pipe"), "a red circle", "-k", "8", "--json"]) == 0
    done = capsys.readouterr()
    assert "5 results, not 8: stage 'prefilter' keeps only its top 5" in done.err
    assert len(json.loads(done.out)["results"]) == 5 and "note" in json.loads(done.out)


def test_ctrl_c_prints_one_line_not_a_traceback(monkeypatch, capsys):
    import genret.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, ("search", None), interrupted)
    assert main(["-q", "search", "x", "y"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("genret: interrupted") and "Traceback" not in err


def test_a_hand_edited_pipeline_folder_is_refused_by_its_manifest(built, tmp_path, capsys):
    import shutil

    edited = tmp_path / "edited"
    shutil.copytree(built, edited)
    from genret.config import read_config_file, write_config_file

    table = read_config_file(edited / "pipeline.toml")
    table["stages"][0]["name"] = "renamed"
    write_config_file(edited / "pipeline.toml", table)
    assert main(["-q", "search", str(edited), "a red circle"]) == 2
    assert "edited/pipeline.toml: " in capsys.readouterr().err  # its content is not what the manifest lists
    manifest = json.loads((edited / "manifest.json").read_text())
    del manifest["files"], manifest["digest"], manifest["owner"]  # as saved by a genret before content manifests: the stage names still disagree
    (edited / "manifest.json").write_text(json.dumps(manifest))
    assert main(["-q", "search", str(edited), "a red circle"]) == 2
    assert "pipeline.toml names the stages ['renamed'], its manifest ['prefilter']" in capsys.readouterr().err


def test_a_stage_config_error_names_the_pipeline_file(tmp_path, clip_dir, world_dir, capsys):
    from genret.config import write_config_file

    config = tmp_path / "bad.toml"
    write_config_file(config, {"name": "b", "encoder": {"model": str(clip_dir)},
                               "stages": [{"type": "prefilter"}, {"type": "rerank", "mode": "sideways", "model": "m"}]})
    assert main(["-q", "index", "build", str(config), "--data", str(world_dir), "--out", str(tmp_path / "o")]) == 2
    assert f"{config}: stages[1]" in capsys.readouterr().err


def test_search_instruction_needs_a_stage_that_takes_one(built, world, capsys):
    """--instruction reaches the pipeline as the query's instruction: a prefilter alone takes none, and says so."""
    rec = world.split("test").records[0]
    assert main(["-q", "search", str(built), rec.captions[0], "--instruction", "Find the photo."]) == 2
    assert "no stage of this pipeline takes one" in capsys.readouterr().err
