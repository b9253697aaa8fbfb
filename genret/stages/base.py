"""The stage contract: ranking stages return candidates, rewriting stages return queries.

A pipeline runs its rewrite stages on the queries, then its rank stages in order, each receiving
the previous rank stage's rankings (``None`` for the first).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from genret.registry import Registry
from genret.types import Query, Ranking

if TYPE_CHECKING:
    from genret.encoders.base import DualEncoder
    from genret.index.gallery import Gallery


@dataclass
class StageContext:
    """What stages share: the dual encoder and the gallery."""

    encoder: "DualEncoder"
    gallery: "Gallery"


class Stage(ABC):
    """A named step of a pipeline, built from its config dataclass."""

    kind: ClassVar[str]
    config_class: ClassVar[type]

    def __init__(self, config: Any, name: str) -> None:
        self.config = config
        self.name = name


class RankStage(Stage):
    """Maps queries (and upstream rankings) to rankings."""

    kind = "rank"

    @property
    def reranks_upstream(self) -> bool:
        """Whether, given upstream rankings, the stage scores exactly those candidates.

        False for a stage that retrieves over the whole gallery whatever came before it (the generate
        stage with ``restrict = "none"``): the twin check, which hands every stage an image and its twin
        to choose between, leaves such a stage out.
        """
        return True

    @abstractmethod
    def rank(self, queries: Sequence[Query], upstream: Sequence[Ranking] | None, ctx: StageContext,
             k: int | None = None) -> list[Ranking]:
        """Rank gallery items for each query.

        Args:
            queries: the queries, each with its ``target`` modality.
            upstream: the previous rank stage's rankings, one per query, or ``None``. A stage given
                upstream rankings scores exactly those candidates, unless :attr:`reranks_upstream` is False.
            ctx: the encoder and gallery.
            k: how many candidates to return; default the stage's own ``k``.
        """


class RewriteStage(Stage):
    """Maps queries to queries."""

    kind = "rewrite"

    @abstractmethod
    def rewrite(self, queries: Sequence[Query], ctx: StageContext) -> list[Query]:
        """Rewrite each query."""


STAGES: Registry[type[Stage]] = Registry("stage type")
