"""Two training processes (torchrun, gloo on CPU) train what one process does with the same global batch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
pytestmark = pytest.mark.skipif(TORCHRUN is None, reason="torchrun (torch's launcher) not found")


def _genret(processes: int, out: Path, *args: str):
    """``genret --quiet <args>`` in one process, or under torchrun in several; returns stdout and the manifest."""
    genret = [sys.executable, "-m", "genret.cli"]
    launch = [TORCHRUN, "--standalone", "--nproc_per_node", str(processes), "-m", "genret.cli"] if processes > 1 else genret
    cmd = launch + ["--quiet", *args, "--out", str(out), "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, json.loads((out / "genret.json").read_text())


def _grace(world_dir, mllm_dir, clip_dir, out, processes: int, batch_size: int, *extra: str):
    return _genret(processes, out, "train", "grace", "--data", str(world_dir), "--base", str(mllm_dir), "--clip",
                   str(clip_dir), "--gallery-splits", "train", "--scheme", "atomic", "--max-steps", "12",
                   "--batch-size", str(batch_size), "--lr", "3e-3", "--token-lr", "1e-2", "--warmup", "0",
                   "--caption-tokens", "4", "--eval-queries", "8", "--log-every", "4", "--save-every", "0", *extra)


def _same_weights(a: Path, b: Path) -> bool:
    w1, w2 = (load_file(str(d / "adapter_model.safetensors")) for d in (a, b))
    assert w1.keys() == w2.keys()
    return all(torch.allclose(w1[n], w2[n], atol=1e-5, rtol=1e-4) for n in w1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, world_dir, mllm_dir, clip_dir):
    root = tmp_path_factory.mktemp("ddp")
    one = _grace(world_dir, mllm_dir, clip_dir, root / "one", 1, 16)
    two = _grace(world_dir, mllm_dir, clip_dir, root / "two", 2, 8)
    return root, one, two


def test_two_processes_train_the_same_adapter_as_one(runs):
    root, (_, one), (stdout, two) = runs
    assert two["speed"]["processes"] == 2 and two["speed"]["rows_per_step"] == 16
    assert one["speed"]["processes"] == 1 and one["speed"]["rows_per_step"] == 16
    assert stdout.count("saved") == 1, stdout  # only the main process reports
    # Same rows per step, DDP-averaged gradients (atomic ids: every row has 2 target tokens, so the mean of
    # the two halves' losses is the loss of the whole batch): the same losses and weights, up to float order.
    loss1 = [h["loss"] for h in one["history"] if "loss" in h]
    loss2 = [h["loss"] for h in two["history"] if "loss" in h]
    assert loss1 == pytest.approx(loss2, abs=2e-3), (loss1, loss2)
    assert _same_weights(root / "one", root / "two")
    assert json.loads((root / "two" / "pseudo_queries.json").read_text())["queries"] == \
        json.loads((root / "one" / "pseudo_queries.json").read_text())["queries"]


def test_helpers_share_the_main_result_and_average_the_loss(tmp_path):
    script = tmp_path / "helpers.py"
    script.write_text(
        "import json, torch\n"
        "from accelerate import Accelerator\n"
        "from genret.training.distributed import close_process_group, on_main, step_loss\n"
        "acc = Accelerator(cpu=True)\n"
        "got = on_main(acc, lambda: {'rank': acc.process_index, 'text': 'caf\\u00e9 \\u2713'})\n"
        "row = {'rank': acc.process_index, 'got': got,\n"
        "       'loss': step_loss(acc, torch.tensor(float(acc.process_index)))}\n"
        f"open({str(tmp_path)!r} + f'/rank{{acc.process_index}}.json', 'w').write(json.dumps(row))\n"
        "close_process_group()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", str(script)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert [r["rank"] for r in rows] == [0, 1]
    assert all(r["got"] == {"rank": 0, "text": "caf\u00e9 \u2713"} for r in rows)  # main's result, on both
    assert [r["loss"] for r in rows] == [0.5, 0.5]


def test_another_batch_gives_other_weights(runs, tmp_path, world_dir, mllm_dir, clip_dir):
    """The comparison above can fail: two processes with another seed train other weights."""
    root = runs[0]
    _grace(world_dir, mllm_dir, clip_dir, tmp_path / "seed1", 2, 8, "--seed", "1")
    assert not _same_weights(root / "one", tmp_path / "seed1")


def test_adding_images_in_two_processes_matches_one(runs, tmp_path, world_dir, clip_dir):
    root = runs[0]
    grown = {}
    for procs, batch in ((1, 16), (2, 8)):
        grown[procs] = _genret(procs, tmp_path / f"add{procs}", "train", "grace-add", "--data", str(world_dir),
                               "--adapter", str(root / "one"), "--clip", str(clip_dir), "--new-splits", "val",
                               "--replay", "0.5", "--retrieve-ratio", "0", "--max-steps", "8", "--batch-size", str(batch), "--warmup", "0",
                               "--caption-tokens", "4", "--eval-queries", "8", "--log-every", "4")
    (out1, one), (out2, two) = grown[1], grown[2]
    assert two["speed"]["processes"] == 2 and out2.count("saved") == 1, out2
    assert one["replay"]["rows_per_step"] == {k: 2 * v for k, v in two["replay"]["rows_per_step"].items()}
    assert one["forgetting"]["old"]["before"] == two["forgetting"]["old"]["before"]  # measured once, on the main process
    assert [h["loss"] for h in one["history"]] == pytest.approx([h["loss"] for h in two["history"]], abs=2e-3)
    assert _same_weights(tmp_path / "add1", tmp_path / "add2")


@pytest.mark.parametrize("mode", ["pointwise", "generative"])
def test_rerank_training_in_two_processes_matches_one(tmp_path, world_dir, mllm_dir, clip_dir, mode):
    for procs, batch in ((1, 8), (2, 4)):
        _genret(procs, tmp_path / f"r{procs}", "train", "rerank", "--data", str(world_dir), "--base", str(mllm_dir),
                "--clip", str(clip_dir), "--mode", mode, "--max-steps", "6", "--batch-size", str(batch),
                "--negatives", "3", "--mine-k", "8", "--warmup", "0", "--eval-every", "0", "--log-every", "2")
    one, two = (json.loads((tmp_path / f"r{p}" / "genret.json").read_text()) for p in (1, 2))
    assert two["speed"]["processes"] == 2
    assert [h["loss"] for h in one["history"] if "loss" in h] == \
        pytest.approx([h["loss"] for h in two["history"] if "loss" in h], abs=2e-3)
    assert _same_weights(tmp_path / "r1", tmp_path / "r2")
