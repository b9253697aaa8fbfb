"""Training a reranker on SmolVLM as shipped (``do_image_splitting`` on), through the trainer.

SmolVLM-256M's processor splits every image larger than 512 px (a 64 px world image too: it is resized to 2048 px
first) into 4 x 4 tiles plus a global view. Cached features need one tile, so the trainer does what the rerank stage
does: it turns splitting off for cached features and says so; without the cache it trains on the checkpoint's tiles.
"""

from dataclasses import replace

import pytest

from genret.training.rerank import RerankTrainConfig, train_rerank

NAME = "smolvlm-256m-instruct"


def _config(**overrides) -> RerankTrainConfig:
    settings = dict(mode="pointwise", negatives=1, mine_k=2, batch_size=2, directions="i2t", max_steps=1, warmup=0.0,
                    log_every=1, eval_every=0, save_every=0)
    return RerankTrainConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def few(world):
    train = world.split("train")
    return replace(train, records=train.records[:3])


def test_training_on_smolvlm_as_shipped_caches_unsplit_features_and_says_so(real_dirs, few, clip_dir, tmp_path,
                                                                            caplog):
    with caplog.at_level("WARNING"):
        summary = train_rerank(str(real_dirs[NAME]), few, tmp_path / "a", _config(), prefilter=str(clip_dir),
                               progress=False)
    assert summary["steps"] == 1
    assert "for the training images' cached features: do_image_splitting turned off" in caplog.text
    assert "--no-cache-features (cache_features = false) trains on the checkpoint's own layout" in caplog.text


@pytest.mark.slow
def test_training_on_smolvlm_without_the_cache_keeps_the_tiles(real_dirs, few, clip_dir, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        summary = train_rerank(str(real_dirs[NAME]), few, tmp_path / "b", _config(cache_features=False),
                               prefilter=str(clip_dir), progress=False)
    assert summary["steps"] == 1 and "do_image_splitting turned off" not in caplog.text
