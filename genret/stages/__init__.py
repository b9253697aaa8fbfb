"""Pipeline stages: prefilter, rerank, rewrite, generative."""

from genret.stages.base import STAGES, RankStage, RewriteStage, Stage, StageContext
from genret.stages.prefilter import PrefilterConfig, PrefilterStage
from genret.stages.rerank import RerankConfig, RerankStage

__all__ = ["STAGES", "PrefilterConfig", "PrefilterStage", "RankStage", "RerankConfig", "RerankStage", "RewriteStage", "Stage", "StageContext"]
