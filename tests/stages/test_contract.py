"""The stage contract: every stage answers the pipeline's and evaluators' calls, with defaults that do nothing."""

from dataclasses import dataclass

from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline
from genret.stages.base import STAGES, RankStage
from genret.types import Query


@dataclass
class _PassConfig:
    k: int = 3


@STAGES.register("contract_pass")
class _Pass(RankStage):
    """A rank stage that defines only ``rank``: it must index, save, load and report like any other."""

    config_class = _PassConfig

    def rank(self, queries, upstream, ctx, k=None):
        return list(upstream)


def test_a_stage_defining_only_rank_goes_through_index_save_load(encoder, world, tmp_path):
    stages = ({"type": "prefilter", "k": 3}, {"type": "contract_pass", "name": "pass"})
    pipe = RetrievalPipeline(PipelineConfig(name="c", encoder=EncoderConfig(model="x"), stages=stages), encoder=encoder)
    pipe.index(world.split("test"), progress=False)
    pipe.save(tmp_path / "p")
    loaded = RetrievalPipeline.load(tmp_path / "p", encoder=encoder)
    ranking = loaded.search(Query(id="q", text="a red circle"), k=3)[0]
    assert ranking.stage == "prefilter" and len(ranking.candidates) == 3
    stage = loaded.stages[1]
    assert stage.describe() == {"type": "_Pass", "name": "pass", "config": {"k": 3}}
    stage.seconds = {"x": 2.0}
    stage.reset_seconds()
    assert stage.seconds == {"x": 0.0}
    stage.set_metadata({"a": {}})  # a stage without a simulated user takes them and ignores them

