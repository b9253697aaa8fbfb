"""The GPU test's comparison (tests/score_compare.py), checked here on the CPU: bf16 against float32 passes, and the
candidates' features reversed fail, on a shrunk real checkpoint run in bf16 on the CPU (the GPU's stand-in)."""

import pytest
import torch

from conftest import score_query
from score_compare import Uninformative, check_scores, tolerance


def test_scores_within_the_tolerance_pass_and_a_reversed_order_fails():
    want = [0.0, 1.0, 2.0, 3.0]
    check_scores([w + 0.03 for w in want], want, want[::-1])
    with pytest.raises(AssertionError, match="candidate 0: 3.0000 against 0.0000"):
        check_scores(want[::-1], want, want[::-1])
    assert tolerance(want) == pytest.approx(0.07)


def test_scores_that_cannot_tell_the_order_are_reported_not_passed():
    want = [0.70, 0.72, 0.71, 0.73]  # spread 0.03: bf16's rounding is as large
    with pytest.raises(Uninformative, match="cannot see order"):
        check_scores(want[::-1], want, want[::-1])


@pytest.mark.parametrize("mode, direction", [("listwise", "t2i"),
                                             pytest.param("generative", "i2t", marks=pytest.mark.slow),
                                             pytest.param("pointwise", "t2i", marks=pytest.mark.slow)])
def test_bf16_passes_and_reversed_features_fail_on_a_real_checkpoint(real_dirs, images, mode, direction):
    """As tests/gpu/test_cuda.py compares, with SmolVLM in bf16 on the CPU standing in for the GPU."""
    from genret.mllm import MLLM
    from genret.mllm.scoring import image_features

    path = str(real_dirs["smolvlm-256m-instruct"])
    cpu, half = MLLM.load(path, dtype="float32", device_map="cpu"), MLLM.load(path, dtype="bfloat16", device_map="cpu")
    assert half.model.dtype == torch.bfloat16
    for mllm in (cpu, half):
        mllm.family.prepare_feature_cache(mllm.processor)
    images = images[:3]
    several = mode == "listwise" and direction == "t2i"
    cpu_feats, half_feats = image_features(cpu, images, several=several), image_features(half, images, several=several)
    want = score_query(cpu, mode, direction, cpu_feats)
    reversed_want = score_query(cpu, mode, direction, cpu_feats[::-1])
    check_scores(score_query(half, mode, direction, half_feats), want, reversed_want)
    with pytest.raises(AssertionError, match="scores differ by more than"):
        check_scores(score_query(half, mode, direction, half_feats[::-1]), want, reversed_want)
