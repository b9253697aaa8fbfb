"""The stage contract: ranking stages return candidates, rewriting stages return queries.

A pipeline runs its rewrite stages on the queries, then its rank stages in order, each receiving
the previous rank stage's rankings (``None`` for the first).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Protocol, Sequence, runtime_checkable

from genret.registry import Registry
from genret.types import Query, Ranking

if TYPE_CHECKING:
    from genret.encoders.base import DualEncoder
    from genret.index.gallery import Gallery
    from genret.stages.dialog import Target


@dataclass
class StageContext:
    """What stages share: the dual encoder and the gallery."""

    encoder: "DualEncoder"
    gallery: "Gallery"


class Stage(ABC):
    """A named step of a pipeline, built from its config dataclass.

    Beside what it does to queries, every stage answers the same calls, with defaults that do nothing,
    so the pipeline and the evaluators never probe for them:

    - :meth:`index_gallery`: prepare per-gallery state when the pipeline indexes (cached features, a trie);
    - :meth:`save_state` / :meth:`load_state`: persist that state in the pipeline folder;
    - :meth:`describe`: what a report says about the stage;
    - :attr:`seconds`: time spent per part (``{"caption": 1.2}``), reset with :meth:`reset_seconds`;
    - :meth:`set_metadata`: the gallery's ground truth a simulated user reads (ignored by stages without one).
    """

    kind: ClassVar[str]
    config_class: ClassVar[type]

    def __init__(self, config: Any, name: str) -> None:
        self.config = config
        self.name = name
        self.seconds: dict[str, float] = {}

    #: whether :meth:`index_gallery` computes per-image state that processes can split between them (an index
    #: build under torchrun: each computes its share, saves it with :meth:`save_state`, the main one merges).
    splits_gallery: ClassVar[bool] = False

    def index_gallery(self, gallery: "Gallery", progress: bool = False) -> None:
        """Compute what the stage keeps per gallery (default: nothing)."""

    def merge_states(self, folders: "Sequence[Path]", gallery: "Gallery") -> None:
        """Take up what :meth:`save_state` wrote in each folder, each for a share of ``gallery``'s images (a stage
        with :attr:`splits_gallery` must implement it)."""
        raise NotImplementedError(f"{type(self).__name__} splits its gallery state but cannot merge it")

    def save_state(self, folder: Path) -> None:
        """Save per-gallery state under ``folder`` (default: nothing to save)."""

    def load_state(self, folder: Path) -> None:
        """Load what :meth:`save_state` wrote (a missing folder means nothing was saved)."""

    def check_state(self, gallery: "Gallery", folder: Path) -> None:
        """After :meth:`load_state`: raise when the loaded state is not of ``gallery`` (another pipeline's or split's),
        naming the file in ``folder`` (default: no state, nothing to check)."""

    def check(self, where: str = "") -> None:
        """Refuse, before any gallery is encoded, settings that would fail when the stage first runs: each model,
        adapter and prompt file its config names (the fields marked ``metadata["path"]``) must be there, an MLLM's
        family known and its processor options taken, an adapter made for the base model beside it. Reads
        manifests and ``config.json`` files, no weights. Stages with more to check extend it.

        Args:
            where: how errors name the stage's table (``"p.toml: stages[1]"``; default the stage's name).
        """
        from genret.config import path_fields

        where = where or f"stage {self.name!r}"
        fields = path_fields(type(self.config))
        for name, kind in fields.items():
            value = getattr(self.config, name)
            if value and kind in ("model", "adapter", "prompt"):
                check_reference(self.config, kind, value, f"{where}.{name}")
        for name in (n for n, kind in fields.items() if kind == "adapter" and getattr(self.config, n)):
            model = getattr(self.config, name.replace("adapter", "model"), "") or getattr(self.config, "model", "")
            if model:  # the adapter beside its base: made for that model (family, weights) and for this use
                check_adapter_base(getattr(self.config, name), self.config, model, f"{where}.{name}",
                                   **self.adapter_use(name))

    def adapter_use(self, field: str) -> dict:
        """What the adapter the config's ``field`` names will be attached for (``task``, ``mode``, ``prompt``), each
        checked against its manifest by :meth:`check` (default: nothing beyond its base)."""
        return {}

    def describe(self) -> dict:
        """What a report records about the stage: its type, name and settings."""
        from dataclasses import asdict, is_dataclass

        settings = asdict(self.config) if is_dataclass(self.config) else {}
        return {"type": type(self).__name__, "name": self.name, "config": settings}

    def reset_seconds(self) -> None:
        """Zero the per-part timings."""
        self.seconds = {part: 0.0 for part in self.seconds}

    def set_metadata(self, metadata: "Mapping[str, Mapping]") -> None:
        """Hand over per-image ground truth (each record's ``meta``) for a simulated user (default: none read)."""


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


@runtime_checkable
class RoundStage(Protocol):
    """A stage that changes the queries between retrieval rounds (chat; later EIIRwQR's feedback loop)."""

    name: str
    rounds: int
    seconds: dict[str, float]

    def start(self, queries: Sequence[Query], truth: Sequence["Target | None"] | None = None) -> list[Query]:
        """Round 0's queries, told each query's target (what a simulated user knows)."""

    def next_round(self, queries: Sequence[Query], rankings: Sequence[Ranking] | None = None) -> list[Query]:
        """The next round's queries, given this round's and what retrieval returned for them."""

    def describe(self) -> dict:
        """Model, prompt and settings, for the report."""


def check_reference(config: Any, kind: str, value: str, where: str) -> None:
    """That the model, adapter or prompt file ``value`` (a setting of ``config``, of path kind ``kind``) is there;
    an MLLM stage's model is read as far as its ``config.json`` (:func:`genret.mllm.backend.check_mllm`).

    Raises:
        FileNotFoundError, ValueError: naming ``where`` (file and key) and what is wrong.
    """
    try:
        if kind == "model":
            from genret.mllm.backend import MLLMLoadConfig, check_mllm

            if isinstance(config, MLLMLoadConfig):
                check_mllm(config.mllm_config(value), where, files=False)
            else:
                from genret._hub import check_model_ref

                check_model_ref(value, where, files=False)
        elif kind == "adapter":
            from genret.mllm.adapters import read_adapter_manifest

            read_adapter_manifest(value)
        elif kind == "prompt":
            from genret.prompts import load_prompt

            load_prompt(value)
    except (OSError, ValueError) as err:
        raise _named(err, where) from None


def check_adapter_base(adapter: str, config: Any, model: str, where: str, **expected: Any) -> None:
    """That the adapter folder ``adapter`` was made for the base ``model`` (its family and weights' fingerprint, and
    each ``expected`` task / mode / prompt), before either is loaded."""
    from genret.mllm.adapters import check_adapter, read_adapter_manifest
    from genret.mllm.backend import BaseModel

    try:
        check_adapter(read_adapter_manifest(adapter), adapter, BaseModel.of(config.mllm_config(model), where),
                      **expected)
    except (OSError, ValueError) as err:
        raise _named(err, where) from None


def _named(err: Exception, where: str) -> Exception:
    """``err`` with ``where`` in front of its message (same type where it takes one message)."""
    message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    if message.startswith(where):
        return err
    try:
        return type(err)(f"{where}: {message}")
    except Exception:  # noqa: BLE001 - an exception type that does not take a message
        return ValueError(f"{where}: {message}")


STAGES: Registry[type[Stage]] = Registry("stage type")
