"""What genret reads is what it saved: a swapped, edited or cut-short file is named, never used in silence."""

from __future__ import annotations

import json
import shutil
import sqlite3

import pytest

from genret._io import ArtefactError, ManifestError, seal
from genret.data.images import ImageLoadError
from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline
from genret.types import Query

STAGES = ({"type": "prefilter", "k": 4}, {"type": "rerank", "mode": "pointwise", "k": 3})


@pytest.fixture(scope="module")
def saved(tmp_path_factory, world_dir, clip_dir, mllm_dir, _encoder):
    """Two pipelines (prefilter + rerank with cached MLLM features) over a copy of the world: the test split and
    the val split."""
    from genret.data import load_dataset

    root = tmp_path_factory.mktemp("loading")
    shutil.copytree(world_dir, root / "world")
    world = load_dataset(root / "world")
    stages = tuple({**s, "model": str(mllm_dir)} if s["type"] == "rerank" else s for s in STAGES)
    out = {}
    for split in ("test", "val"):
        pipe = RetrievalPipeline(PipelineConfig(name=split, encoder=EncoderConfig(model=str(clip_dir)), stages=stages),
                                 encoder=_encoder)
        pipe.index(world.split(split), progress=False)
        out[split] = pipe.save(root / split)
    return root, out


@pytest.fixture
def pipe_copy(saved, tmp_path):
    root, pipes = saved
    copy = root / f"copy-{tmp_path.name}"
    shutil.copytree(pipes["test"], copy)
    yield copy, pipes["val"]
    shutil.rmtree(copy)


def _reseal(folder):
    """Re-seal every manifest under ``folder``, innermost first: a hand edit that also fixes the file lists. The
    checks of content against content must still catch it."""
    for manifest in sorted(folder.rglob("manifest.json"), key=lambda p: -len(p.parts)):
        seal(manifest.parent, "manifest.json")


def _edit_first_item(folder, encoder, **changes):
    """Change the first image item's record in items.sqlite and re-seal (a deliberate edit); returns its id."""
    db = sqlite3.connect(folder / "gallery" / "images" / "items.sqlite")
    row, text = db.execute("SELECT row, item FROM items ORDER BY row LIMIT 1").fetchone()
    db.execute("UPDATE items SET item = ? WHERE row = ?", (json.dumps({**json.loads(text), **changes}), row))
    db.commit()
    db.close()
    _reseal(folder)
    return json.loads(text)["id"]


def _load(folder, encoder):
    return RetrievalPipeline.load(folder, encoder=encoder)


def test_the_saved_pipeline_loads_and_ranks(pipe_copy, encoder):
    pipe = _load(pipe_copy[0], encoder)
    assert len(pipe.search([Query(id="q", text="a red circle")], k=3)[0].candidates) == 3


def test_an_edited_metric_is_named_and_caught_by_the_faiss_file_after_a_reseal(pipe_copy, encoder):
    folder, _ = pipe_copy
    path = folder / "gallery" / "images" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["metric"] = "l2"
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtefactError, match="gallery/images/manifest.json: "):
        _load(folder, encoder)
    _reseal(folder)
    with pytest.raises(ManifestError, match="manifest.json says metric 'l2', the faiss file was built with the other"):
        _load(folder, encoder)


def test_two_swapped_ids_are_named_and_caught_by_the_items_after_a_reseal(pipe_copy, encoder):
    folder, _ = pipe_copy
    path = folder / "gallery" / "images" / "ids.json"
    ids = json.loads(path.read_text())
    ids[0], ids[1] = ids[1], ids[0]
    path.write_text(json.dumps(ids, indent=2) + "\n")
    with pytest.raises(ArtefactError, match="images/ids.json: its content is not what the manifest"):
        _load(folder, encoder)
    _reseal(folder)
    with pytest.raises(ArtefactError, match="images/items.sqlite: its items are not those of the index beside it"):
        _load(folder, encoder)


@pytest.mark.parametrize("rel", ["gallery/images/index.faiss", "gallery/images/items.sqlite",
                                 "gallery/texts/ids.json", "stages/rerank/features.safetensors",
                                 "stages/rerank/manifest.json"])
def test_a_file_taken_from_another_pipeline_or_split_is_named(pipe_copy, encoder, rel):
    folder, other = pipe_copy
    shutil.copyfile(other / rel, folder / rel)
    with pytest.raises(ArtefactError, match=rel.replace(".", r"\.") + ": "):
        _load(folder, encoder)


def test_features_of_another_split_are_refused_even_after_a_reseal(pipe_copy, encoder):
    folder, other = pipe_copy
    for name in ("features.safetensors", "manifest.json"):
        shutil.copyfile(other / "stages" / "rerank" / name, folder / "stages" / "rerank" / name)
    _reseal(folder)
    with pytest.raises(ArtefactError, match=r"features.safetensors: features of \d+ images that are not in the gallery"):
        _load(folder, encoder)


@pytest.mark.parametrize("image", ["/etc/passwd", "../../../../../../etc/passwd", "../world/dataset_synth.json/.."])
def test_an_item_path_leading_outside_the_gallery_images_is_refused(pipe_copy, encoder, image):
    folder, _ = pipe_copy
    first = _edit_first_item(folder, encoder, image=image)
    with pytest.raises(ArtefactError, match=f"items.sqlite: item '{first}' names the image .*outside the gallery"):
        _load(folder, encoder).gallery.item("image", first)


def test_a_gallery_image_changed_or_deleted_after_indexing_is_named_not_used(pipe_copy, encoder):
    from genret.index.items import item_image

    folder, _ = pipe_copy
    pipe = _load(folder, encoder)
    ids = list(pipe.gallery.items["image"])
    a, b = pipe.gallery.item("image", ids[0]), pipe.gallery.item("image", ids[1])
    original = open(a.image, "rb").read()
    try:
        shutil.copyfile(b.image, a.image)  # another scene's picture under the same name
        with pytest.raises(ImageLoadError, match=f"gallery item '{ids[0]}': its image .* has changed since"):
            item_image(a)
        with pytest.raises(ImageLoadError, match="has changed since the gallery was indexed"):
            pipe.stages[1]._image_features([ids[0]], [a], cache=False)  # the rerank stage reading the image itself
        import os

        os.unlink(a.image)
        with pytest.raises(ImageLoadError, match=f"gallery item '{ids[0]}': its image .* is gone"):
            item_image(a)
    finally:
        open(a.image, "wb").write(original)
    assert item_image(a) == a.image


def test_a_cut_short_encoder_or_mllm_is_named_before_loading(tmp_path, clip_dir, mllm_dir):
    """Truncated safetensors gave raw tracebacks: the genret-made CLIP (its manifest lists the file) and a plain
    transformers folder (the file's own header says its size) are both named."""
    from genret.encoders.hf import HFDualEncoder
    from genret.mllm import MLLM

    for src, load in ((clip_dir, lambda p: HFDualEncoder(str(p), device="cpu")), (mllm_dir, lambda p: MLLM.load(str(p)))):
        copy = tmp_path / src.name
        shutil.copytree(src, copy)
        weights = copy / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) - 1000])
        with pytest.raises(ArtefactError, match=f"{copy.name}/model.safetensors: "):
            load(copy)
        weights.write_bytes(data[:5])
        with pytest.raises(ArtefactError, match="model.safetensors: "):
            load(copy)


def test_a_cut_short_or_edited_adapter_is_named(tmp_path, mllm_dir):
    """An adapter cut short, and one whose LoRA rank was edited in adapter_config.json: named, not a traceback."""
    from conftest import make_adapter
    from genret.mllm import MLLM
    from genret.mllm.adapters import attach_adapter

    make_adapter(mllm_dir, tmp_path / "ad", 0)
    mllm = MLLM.load(str(mllm_dir))
    config = tmp_path / "ad" / "adapter_config.json"
    edited = json.loads(config.read_text())
    edited["r"] = 8
    config.write_text(json.dumps(edited))
    with pytest.raises(ArtefactError, match="ad/adapter_config.json: "):
        attach_adapter(mllm, tmp_path / "ad", mode="pointwise")
    seal(tmp_path / "ad", "genret.json")  # the manifest fixed too: peft's own refusal is named
    with pytest.raises(ManifestError, match="ad: peft cannot load this adapter"):
        attach_adapter(mllm, tmp_path / "ad", mode="pointwise")
    weights = tmp_path / "ad" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    seal(tmp_path / "ad", "genret.json")
    with pytest.raises(ArtefactError, match="adapter_model.safetensors: "):
        attach_adapter(MLLM.load(str(mllm_dir)), tmp_path / "ad", mode="pointwise")


def test_a_cut_short_training_checkpoint_is_named(tmp_path):
    import torch

    from genret.training.checkpoint import load_checkpoint, save_checkpoint

    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    folder = save_checkpoint(tmp_path / "run", 1, model, optimizer, {"history": []})
    weights = folder / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(ArtefactError, match="trainable.safetensors: "):
        load_checkpoint(folder, model, optimizer)


def test_an_item_without_its_content_hash_is_refused(pipe_copy, encoder):
    """Every image is saved with its hash: an item stripped of it (to point at a file that cannot be checked) is not
    served."""
    folder, _ = pipe_copy
    first = _edit_first_item(folder, encoder, digest=None)
    with pytest.raises(ArtefactError, match=f"item '{first}' has no content hash"):
        _load(folder, encoder).gallery.item("image", first)
