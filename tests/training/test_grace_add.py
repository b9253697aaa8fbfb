"""Adding images to a trained GRACE adapter: new ids per scheme, a short pass with replay, forgetting measured."""

import hashlib
import json

import numpy as np
import pytest

from genret._io import seal

from genret.identifiers import Identifiers, make_identifiers
from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline
from genret.training.grace import GraceTrainConfig, train_grace
from genret.training.grace_add import GraceAddConfig, add_images, extend_identifiers
from genret.types import Query

# With replay, old items lose at most this many points of image -> id top-1 (percent); the parent is near 100.
MAX_DROP = 15.0


def _given(world, *splits):
    """The tiny base captions nothing: each image's first caption stands in for its pseudo-query."""
    return {r.id: r.captions[:1] for r in world.split(*splits).records}


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def parent(tmp_path_factory, world, mllm_dir, clip_dir):
    """An atomic adapter over the 24 test images."""
    out = tmp_path_factory.mktemp("grace") / "atomic"
    config = GraceTrainConfig(scheme="atomic", max_steps=800, batch_size=16, lr=3e-3, token_lr=1e-2, warmup=0.0,
                              caption_tokens=2, eval_queries=4, num_beams=3, log_every=40, threads=1)
    train_grace(mllm_dir, world, out, config, prefilter=clip_dir, queries=_given(world, "test"), progress=False)
    return out


@pytest.fixture(scope="module")
def grown(tmp_path_factory, parent, world, clip_dir):
    """The parent with the 8 val images added; the parent's bytes before, to check it is left alone."""
    before = _digest(parent)
    out = tmp_path_factory.mktemp("grown") / "atomic+val"
    config = GraceAddConfig(new_splits="val", replay=0.75, max_steps=200, batch_size=16, lr=5e-3, token_lr=1e-2,
                            warmup=0.0, caption_tokens=2, eval_queries=24, num_beams=3, threads=1)
    manifest = add_images(parent, world, out, config, prefilter=clip_dir, queries=_given(world, "test", "val"),
                          progress=False)
    return out, manifest, before


def test_new_images_are_retrievable_by_the_generate_stage(grown, world, encoder):
    out, manifest, _ = grown
    pipe = RetrievalPipeline(PipelineConfig(name="g", encoder=EncoderConfig(model="x"), stages=(
        {"type": "generate", "name": "grace", "adapter": str(out), "num_beams": 3, "k": 3},)), encoder=encoder)
    pipe.index(world.split("test", "val"), modalities=("image",), progress=False)
    new = world.split("val").records
    [(_, rankings)] = pipe.run([Query(id=r.id, text=r.captions[0]) for r in new])
    top1 = sum(r.ids[0] == rec.id for r, rec in zip(rankings, new)) / len(new)
    assert top1 >= 0.5, (top1, manifest["forgetting"])  # chance: 1/32


def test_old_items_stay_memorised_and_forgetting_is_reported(grown):
    _, manifest, _ = grown
    f = manifest["forgetting"]
    old, new = f["old"], f["new"]
    assert old["before"]["images"] == 24 and old["before"]["texts"] == 24
    assert old["before"]["image_to_id_top1"] >= 60.0, f  # the parent memorised: the check means something
    assert old["after"]["image_to_id_top1"] >= old["before"]["image_to_id_top1"] - MAX_DROP, f
    assert new["after"]["image_to_id_top1"] >= 50.0, f
    assert new["after"]["image_to_id_top1"] > new["before"]["image_to_id_top1"], f
    assert old["drop"]["image_to_id_top1"] == pytest.approx(
        old["before"]["image_to_id_top1"] - old["after"]["image_to_id_top1"])
    assert manifest["replay"]["fraction"] == 0.75 and manifest["replay"]["rows_per_step"]["old_memorise"] == 6
    print("forgetting:", json.dumps(f))


def test_without_replay_the_old_items_are_forgotten(parent, world, clip_dir, tmp_path):
    """The control: the same pass with no old rows loses most of the old items; the report shows it."""
    config = GraceAddConfig(new_splits="val", replay=0.0, max_steps=200, batch_size=16, lr=5e-3, token_lr=1e-2,
                            warmup=0.0, caption_tokens=2, eval_queries=24, num_beams=3, threads=1)
    f = add_images(parent, world, tmp_path / "noreplay", config, prefilter=clip_dir,
                   queries=_given(world, "test", "val"), progress=False)["forgetting"]
    print("forgetting without replay:", json.dumps({k: f[k] for k in ("old", "new")}))
    assert f["old"]["drop"]["image_to_id_top1"] > 2 * MAX_DROP, f


def test_new_folder_reloads_and_the_parent_is_unchanged(grown, parent, world):
    out, manifest, before = grown
    assert _digest(parent) == before
    ids, old = Identifiers.load(out), Identifiers.load(parent)
    assert ids.identifiers[:len(old)] == old.identifiers and ids.item_ids[:len(old)] == old.item_ids
    assert list(ids.item_ids[len(old):]) == [r.id for r in world.split("val").records]
    assert ids.new_tokens[len(old):] == ("<id_000024>",) + tuple(f"<id_0000{n}>" for n in range(25, 32))
    saved = json.loads((out / "genret.json").read_text())
    assert saved["parent"]["path"] == str(parent) and saved["added"]["images"] == 8
    assert saved["task"] == "grace" and saved["gallery"]["images"] == 32 and saved["tokens"]["new_tokens"] == 32
    assert saved["forgetting"] == manifest["forgetting"]


@pytest.mark.parametrize("scheme,kw,expect", [
    ("string", {}, ["3", "4"]),
    ("numeric", {"width": 2}, ["0 3", "0 4"]),
    ("semantic", {}, ["a red cat #2", "blue"]),
    ("atomic", {}, ["<id_000003>", "<id_000004>"]),
])
def test_each_scheme_extends_without_changing_old_ids(scheme, kw, expect):
    old_items = ["a", "b", "c"]
    if scheme == "semantic":
        old = make_identifiers("semantic", old_items, texts={"a": ["a red cat"], "b": ["b"], "c": ["c"]})
        grown = extend_identifiers(old, ["d", "e"], texts={"d": ["a red cat"], "e": ["blue"]})
    else:
        old = make_identifiers(scheme, old_items, **kw)
        grown = extend_identifiers(old, ["d", "e"])
    assert grown.identifiers[:3] == old.identifiers and list(grown.identifiers[3:]) == expect
    assert grown.item_ids == ("a", "b", "c", "d", "e")


def test_structured_joins_the_nearest_leaf_and_grows_a_full_one():
    rng = np.random.default_rng(0)
    emb = np.concatenate([rng.normal(0, 0.01, (4, 8)) + 5 * np.eye(8)[0], rng.normal(0, 0.01, (3, 8)) + 5 * np.eye(8)[1]])
    old = make_identifiers("structured", [f"o{i}" for i in range(7)], embeddings=emb, k=2, leaf_size=4)
    new = np.stack([5 * np.eye(8)[1], 5 * np.eye(8)[0]])
    grown = extend_identifiers(old, ["n0", "n1"], embeddings=new, old_embeddings=emb)
    leaf = lambda s: s.rsplit("<p_", 1)[0]  # noqa: E731
    assert leaf(grown.identifier("n0")) == leaf(old.identifier("o4")) and grown.identifier("n0").endswith("<p_03>")
    # o0..o3 fill their leaf (4 = leaf_size): n1 gets a fifth position token, a new token.
    assert leaf(grown.identifier("n1")) == leaf(old.identifier("o0")) and grown.identifier("n1").endswith("<p_04>")
    assert grown.new_tokens == old.new_tokens + ("<p_04>",)


def test_bad_input_is_refused(parent, world, mllm_dir, tmp_path):
    with pytest.raises(ValueError, match=r"already have identifiers .*e\.g\. '"):
        add_images(parent, world, tmp_path / "x", GraceAddConfig(new_splits="test"), progress=False)
    with pytest.raises(ValueError, match="cannot add 3 images to 8: numeric ids of width 1 hold at most 10 .*width is fixed"):
        extend_identifiers(make_identifiers("numeric", [str(i) for i in range(8)], width=1), ["x", "y", "z"])
    with pytest.raises(ValueError, match="already have identifiers"):
        extend_identifiers(make_identifiers("atomic", ["a", "b"]), ["c", "a"])
    with pytest.raises(ValueError, match="write the grown adapter elsewhere"):
        add_images(parent, world, parent, GraceAddConfig(new_splits="val"), progress=False)
    rerank = tmp_path / "rerank"
    rerank.mkdir()
    for f in parent.iterdir():
        if f.is_file():
            (rerank / f.name).write_bytes(f.read_bytes())
    m = json.loads((rerank / "genret.json").read_text())
    seal(rerank, "genret.json", {**m, "task": "rerank"})  # saved so: a rerank adapter
    with pytest.raises(ValueError, match="not a GRACE one"):
        add_images(rerank, world, tmp_path / "y", GraceAddConfig(new_splits="val"), progress=False)
    with pytest.raises(ValueError, match="replay must be in"):
        GraceAddConfig(new_splits="val", replay=1.0)


@pytest.mark.parametrize("scheme", ["structured", "numeric"])
def test_other_schemes_grow_and_reload(scheme, world, mllm_dir, clip_dir, tmp_path):
    """Mechanics: structured (new images in existing leaves, new position tokens) and numeric (no new token)."""
    from genret.mllm import MLLM, MLLMConfig
    from genret.stages.generate import attach_grace

    given = _given(world, "test", "val")
    train_grace(mllm_dir, world, tmp_path / "p", GraceTrainConfig(scheme=scheme, max_steps=2, batch_size=8, k=4,
                leaf_size=4, caption_tokens=2, eval_queries=2, num_beams=2), prefilter=clip_dir,
                queries={i: t for i, t in given.items() if i in {r.id for r in world.split("test").records}},
                progress=False)
    manifest = add_images(tmp_path / "p", world, tmp_path / "g", GraceAddConfig(new_splits="val", max_steps=2,
                          batch_size=8, caption_tokens=2, eval_queries=4, num_beams=2), prefilter=clip_dir,
                          queries=given, progress=False)
    ids = attach_grace(MLLM.load(MLLMConfig(model=str(mllm_dir))), tmp_path / "g")
    assert len(ids) == 32 and ids.identifiers[:24] == Identifiers.load(tmp_path / "p").identifiers
    assert manifest["tokens"]["new_tokens"] == len(ids.new_tokens) and bool(ids.new_tokens) == (scheme == "structured")
    if scheme == "structured":
        leaves = {s.rsplit("<p_", 1)[0] for s in ids.identifiers[:24]}
        assert all(s.rsplit("<p_", 1)[0] in leaves for s in ids.identifiers[24:])


def test_cli_adds_and_prints_the_forgetting_figures(parent, world_dir, clip_dir, tmp_path, capsys):
    from genret.cli import main

    out = tmp_path / "cli"
    assert main(["--quiet", "train", "grace-add", "--data", str(world_dir), "--adapter", str(parent), "--clip", str(clip_dir),
                 "--out", str(out), "--new-splits", "val", "--max-steps", "2", "--retrieve-ratio", "0", "--caption-tokens", "2",
                 "--eval-queries", "4", "--num-beams", "2"]) == 0
    text = capsys.readouterr().out
    assert "8 images added" in text and "old, before" in text and "new, after" in text, text
    assert json.loads((out / "genret.json").read_text())["added"]["splits"] == "val"
    assert main(["--quiet", "train", "grace-add", "--data", str(world_dir), "--adapter", str(parent), "--out", str(tmp_path / "e"),
                 "--new-splits", "test"]) == 2
    assert "already have identifiers" in capsys.readouterr().err


def test_the_summary_record_shows_what_the_old_images_keep(grown):
    from genret.training.summary import TrainSummary

    out, manifest, _ = grown
    s = TrainSummary.from_manifest(manifest)
    assert s.task == "grace-add" and s.figures["forgetting, old, after"] == {
        k: v for k, v in manifest["forgetting"]["old"]["after"].items() if isinstance(v, (int, float))}
    assert "forgetting, new, after: " in s.render(str(out))
