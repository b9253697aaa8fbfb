"""Index builds in chunks and across processes: the same index as one process adding everything at once."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from genret.config import write_config_file
from genret.index.build import Share, read_parts, write_parts
from genret.pipeline import RetrievalPipeline

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _pipeline_file(tmp_path, clip_dir, mllm_dir, **index):
    config = tmp_path / "p.toml"
    write_config_file(config, {"name": "build", "encoder": {"model": str(clip_dir)}, "index": index, "stages": [
        {"type": "prefilter", "k": 8}, {"type": "rerank", "model": str(mllm_dir), "k": 4}]})
    return config


def _build(config, world_dir, out, processes=1, *extra):
    genret = [sys.executable, "-m", "genret.cli"]
    launch = [TORCHRUN, "--standalone", "--nproc_per_node", str(processes), "-m", "genret.cli"] if processes > 1 else genret
    done = subprocess.run(launch + ["--quiet", "index", "build", str(config), "--data", str(world_dir), "--split", "test",
                                    "--out", str(out), *extra], capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_chunks_build_the_index_one_batch_builds(world, _encoder, clip_dir):
    from genret.pipeline import EncoderConfig, IndexConfig, PipelineConfig

    def build(chunk):
        cfg = PipelineConfig(encoder=EncoderConfig(model=str(clip_dir)), index=IndexConfig(chunk_size=chunk))
        pipe = RetrievalPipeline(cfg, encoder=_encoder)
        pipe.index(world.split("test"), progress=False)
        return pipe.gallery

    whole, chunked = build(65536), build(7)
    for modality in ("image", "text"):
        a, b = whole.index(modality), chunked.index(modality)
        assert a.ids == b.ids and list(whole.items[modality]) == list(chunked.items[modality])
        assert np.allclose(a.reconstruct(a.ids), b.reconstruct(b.ids), atol=1e-6)


def test_a_share_is_contiguous_and_parts_come_back_in_order(tmp_path):
    from genret.types import Item

    items = [Item(id=str(i), modality="text", text=f"t{i}") for i in range(10)]
    shares = [Share(r, 3, work=tmp_path).of(items) for r in range(3)]
    assert [[it.id for it in s] for s in shares] == [["0", "1", "2"], ["3", "4", "5"], ["6", "7", "8", "9"]]
    for rank in (2, 0):  # written in any order
        chunks = ((shares[rank][i:i + 2], np.full((len(shares[rank][i:i + 2]), 4), rank, "float32"))
                  for i in range(0, len(shares[rank]), 2))
        write_parts(tmp_path, rank, chunks)
    with pytest.raises(FileNotFoundError, match=r"process\(es\) \[1\] did not finish"):
        list(read_parts(tmp_path, 3))
    write_parts(tmp_path, 1, iter([(shares[1], np.ones((3, 4), "float32"))]))
    ids = [i for part, _ in read_parts(tmp_path, 3) for i in part]
    assert ids == [str(i) for i in range(10)]
    with pytest.raises(ValueError, match="shared work folder"):
        Share(1, 2)


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun (torch's launcher) not found")
def test_two_processes_build_the_index_one_process_builds(tmp_path, world_dir, clip_dir, mllm_dir):
    config = _pipeline_file(tmp_path, clip_dir, mllm_dir)
    (tmp_path / "two.parts").mkdir()  # a user's folder named like the work folder of old
    (tmp_path / "two.parts" / "mine.txt").write_text("mine")
    out1 = _build(config, world_dir, tmp_path / "one")
    out2 = _build(config, world_dir, tmp_path / "two", 2)
    assert "1 process(es)" in out1 and out2.count("saved") == 1 and "2 process(es)" in out2, out2
    assert not list(tmp_path.glob(".two.genret-parts-*"))  # the work folder is cleared
    assert (tmp_path / "two.parts" / "mine.txt").read_text() == "mine"
    one, two = RetrievalPipeline.load(tmp_path / "one"), RetrievalPipeline.load(tmp_path / "two")
    for modality in ("image", "text"):
        a, b = one.gallery.index(modality), two.gallery.index(modality)
        assert a.ids == b.ids and list(one.gallery.items[modality]) == list(two.gallery.items[modality])
        assert np.allclose(a.reconstruct(a.ids), b.reconstruct(b.ids), atol=1e-5)
    f1, f2 = one.stages[1].features, two.stages[1].features  # the rerank stage's MLLM features, merged
    assert sorted(f1) == sorted(f2) == sorted(one.gallery.index("image").ids)
    assert all(np.allclose(f1[i].float().numpy(), f2[i].float().numpy(), atol=1e-4) for i in list(f1)[:20])
    from genret.types import Query

    queries = [Query(id=str(n), text=t) for n, t in enumerate(["a red circle", "two blue squares", "a small triangle"])]
    r1, r2 = one.search(queries, k=4), two.search(queries, k=4)
    assert [r.ids for r in r1] == [r.ids for r in r2]


def test_a_build_killed_midway_leaves_the_previous_index_intact(tmp_path, world_dir, clip_dir, mllm_dir):
    config = _pipeline_file(tmp_path, clip_dir, mllm_dir)
    _build(config, world_dir, tmp_path / "pipe")
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "pipe").rglob("*") if p.is_file()}
    build = subprocess.Popen([sys.executable, "-m", "genret.cli", "index", "build", str(config), "--data",
                              str(world_dir), "--split", "test", "--out", str(tmp_path / "pipe"), "--chunk-size", "8"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    for line in build.stdout:  # kill it while it embeds, with its first chunks added
        if "index images" in line or "encode" in line:
            break
    time.sleep(0.5)
    build.send_signal(signal.SIGKILL)
    assert build.wait(timeout=30) == -signal.SIGKILL  # killed, not finished
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "pipe").rglob("*") if p.is_file()}
    if after != before:  # killed after its swap (the process was still closing): the new pipeline is whole
        from genret._io import verify

        assert "chunk_size = 8" in (tmp_path / "pipe/pipeline.toml").read_text()
        assert all(r["error"] is None for r in verify(tmp_path / "pipe"))
    pipe = RetrievalPipeline.load(tmp_path / "pipe")
    assert len(pipe.gallery.index("image")) == json.loads((tmp_path / "pipe/gallery/images/manifest.json").read_text())["count"]
