"""The real-checkpoint fixtures on a CUDA GPU in bf16: every stage's scores against the CPU float32 path, and
4-bit QLoRA training steps. Marked ``gpu``: deselected by default, skipped where no CUDA device exists.

    python -m pytest -m gpu tests/gpu
"""

import pytest
import torch
from PIL import Image

from conftest import score_query
from score_compare import Uninformative, check_scores
from genret.mllm.scoring import image_features

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

MODES = ("pointwise", "generative", "listwise")


@pytest.fixture(scope="module")
def images(world):
    return [Image.open(r.path).convert("RGB") for r in world.split("test").records[:4]]


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["qwen2-vl-2b-instruct", "qwen2.5-vl-3b-instruct", "llava-1.5-7b-hf",
                                  "smolvlm-256m-instruct", "llava-onevision-qwen2-0.5b-ov-hf", "qwen3-vl-2b-instruct", "gemma-3-4b-it",
                                  "qwen3.5-0.8b"])
def test_bf16_on_cuda_scores_like_float32_on_the_cpu(real_dirs, images, name, mode, direction):
    from genret.mllm import MLLM

    gpu = MLLM.load(str(real_dirs[name]))  # the defaults: the GPU, the checkpoint's half precision
    cpu = MLLM.load(str(real_dirs[name]), dtype="float32", device_map="cpu")
    assert gpu.device.type == "cuda" and gpu.model.dtype in (torch.bfloat16, torch.float16)
    for mllm in (gpu, cpu):
        mllm.family.prepare_feature_cache(mllm.processor)
    several = mode == "listwise" and direction == "t2i"  # the candidates share one prompt (LLaVA-OneVision's layout)
    cpu_feats = image_features(cpu, images, several=several)
    want = score_query(cpu, mode, direction, cpu_feats)
    got = score_query(gpu, mode, direction, image_features(gpu, images, several=several))
    # Score by score within bf16's rounding, and able to fail: the candidates' features reversed must score apart
    # (a case whose scores cannot tell the order is skipped by name, not passed); tests/test_score_compare.py.
    try:
        check_scores(got, want, score_query(cpu, mode, direction, cpu_feats[::-1]))
    except Uninformative as why:
        pytest.skip(str(why))


def test_a_rerank_pipeline_on_the_gpu_ranks_as_on_the_cpu(encoder, world, real_dirs):
    from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline
    from genret.types import Query

    path = str(real_dirs["qwen2-vl-2b-instruct"])
    rankings = {}
    for where, extra in (("gpu", {}), ("cpu", {"dtype": "float32", "device_map": "cpu"})):
        stages = ({"type": "prefilter", "k": 5}, {"type": "rerank", "mode": "generative", "model": path, "k": 5, **extra})
        pipe = RetrievalPipeline(PipelineConfig(name=where, encoder=EncoderConfig(model="x"), stages=stages),
                                 encoder=encoder)
        pipe.index(world.split("test"), progress=False)
        rankings[where] = pipe.search(Query(id="q", text=world.split("test").records[0].captions[0]), k=5)[0]
    assert rankings["gpu"].candidates[0].item_id == rankings["cpu"].candidates[0].item_id


@pytest.mark.parametrize("name, mode", [("qwen2-vl-2b-instruct", "pointwise"),
                                        ("qwen3.5-0.8b", "listwise")])  # 4-bit Gated-DeltaNet projections, no cache
def test_qlora_trains_in_4bit_on_cuda(real_dirs, world, clip_dir, tmp_path, name, mode):
    from dataclasses import replace

    from genret.training.rerank import RerankTrainConfig, train_rerank

    train = world.split("train")
    small = replace(train, records=train.records[:8])
    config = RerankTrainConfig(mode=mode, negatives=3, mine_k=4, batch_size=4, max_steps=4, eval_every=0,
                               save_every=0, load_in_4bit=True, dtype="bfloat16", log_every=1)
    summary = train_rerank(str(real_dirs[name]), small, tmp_path / "qlora", config,
                           prefilter=str(clip_dir), progress=False)
    assert summary["steps"] == 4 and summary["speed"]["device"].startswith("cuda")
    assert (tmp_path / "qlora" / "adapter_model.safetensors").is_file()
