"""Pipeline stages: prefilter, rerank, rewrite, generative."""

from genret.stages.base import STAGES, RankStage, RewriteStage, Stage, StageContext
from genret.stages.chat import ChatConfig, ChatStage
from genret.stages.cirevl import CIReVLConfig, CIReVLStage
from genret.stages.eiirwqr import EIIRwQRConfig, EIIRwQRStage
from genret.stages.generate import GenerateConfig, GenerateStage
from genret.stages.prefilter import PrefilterConfig, PrefilterStage
from genret.stages.rerank import RerankConfig, RerankStage

__all__ = ["STAGES", "ChatConfig", "ChatStage", "CIReVLConfig", "CIReVLStage", "EIIRwQRConfig",
           "EIIRwQRStage", "GenerateConfig", "GenerateStage",
           "PrefilterConfig", "PrefilterStage", "RankStage", "RerankConfig", "RerankStage", "RewriteStage", "Stage",
           "StageContext"]
