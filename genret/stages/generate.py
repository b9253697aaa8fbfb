"""The generative stage (GRACE): an MLLM that memorised the gallery decodes image identifiers under a trie.

Text queries only: the identifiers name images, so an image query (image → text) is refused with an
error, or, with ``image_queries = "pass"``, handed on with the upstream ranking unchanged.

``restrict = "upstream"`` decodes only within each query's upstream candidates (the prefilter's top
``upstream_k``: one subset trie per query); ``fusion_weight`` w ranks by ``upstream + w · log P(id)``
(items the upstream did not list get its lowest score). Each candidate keeps this stage's own score,
the identifier's log-probability. With ``restrict = "upstream"`` the stage keeps what it was handed: the
upstream candidates (of the first ``upstream_k``) that no beam reached follow the decoded ones, in the upstream's
order, without a score of this stage (their ranking score sits below every decoded one's), so the stage returns up
to ``k`` candidates whatever ``num_beams`` is and never loses the upstream's recall.

Example pipeline table::

    [[stages]]
    type = "generate"
    name = "grace"
    adapter = "runs/grace-atomic"
    restrict = "upstream"
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from genret.stages.base import STAGES, RankStage, StageContext
from genret.types import Candidate, Query, Ranking
from genret.mllm.answers import answer_context
from genret.config import at_least, check_fields
from genret.mllm.backend import MLLMLoadConfig

if TYPE_CHECKING:
    from genret.identifiers import Identifiers, Trie
    from genret.index.gallery import Gallery
    from genret.mllm.backend import MLLM

logger = logging.getLogger(__name__)
RESTRICT = ("none", "upstream")
# What a GRACE prompt must hold: memorise (image -> id), retrieve (text -> id), caption (pseudo-queries).
PROMPT_NEEDS = {"memorise": {"user": ("{image}",)}, "retrieve": {"user": ("{text}",)}, "caption": {"user": ("{image}",)}}


@dataclass
class GenerateConfig(MLLMLoadConfig):
    """Settings of the generative (GRACE) stage."""

    adapter: str = field(default="", metadata={"path": "adapter", "help": "GRACE adapter folder (genret train grace)"})
    model: str = field(default="", metadata={"path": "model",
                                             "help": "base MLLM id or directory (default: the adapter's base_model)"})
    num_beams: int = field(default=10, metadata={"range": at_least(1),
                                                 "help": "beam width: at most this many images per query"})
    k: int = field(default=10, metadata={"range": at_least(1),
                                         "help": "candidates returned per query (at most num_beams, unless "
                                                 "restrict=upstream: the beams' misses follow)"})
    restrict: str = field(default="none", metadata={"help": "none (whole gallery) or upstream (the upstream's candidates)"})
    upstream_k: int = field(default=100, metadata={"range": at_least(1),
                                                   "help": "restrict=upstream: upstream candidates decoded within"})
    fusion_weight: float | None = field(default=None, metadata={"help": "final = upstream + w * log P(id); unset: generate only"})
    image_queries: str = field(default="error", metadata={"help": "image queries: error, or pass (upstream unchanged)"})
    batch_size: int = field(default=16, metadata={"range": at_least(1), "help": "queries per generate call"})

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.adapter:
            raise ValueError("adapter is required (a folder written by genret train grace)")
        if self.restrict not in RESTRICT:
            raise ValueError(f"restrict must be one of {', '.join(RESTRICT)}, got {self.restrict!r}")
        if self.image_queries not in ("error", "pass"):
            raise ValueError(f"image_queries must be error or pass, got {self.image_queries!r}")
        if self.k > self.num_beams and self.restrict != "upstream":
            raise ValueError(f"k ({self.k}) must not exceed num_beams ({self.num_beams}): beam search returns at most "
                             "num_beams identifiers (with restrict = 'upstream' the beams' misses fill the rest)")


def attach_grace(mllm: "MLLM", path: str | Path, prompt=None) -> "Identifiers":
    """Load a GRACE adapter onto ``mllm``: its tokens added, embeddings resized, every piece checked.

    Args:
        mllm: the base model the adapter was trained on.
        path: the adapter folder (``genret.json``, peft files, ``identifiers.json``).
        prompt: the prompt it will be used with (checked against the manifest when given).

    Returns:
        The adapter's identifiers.

    Raises:
        AdapterMismatchError: an adapter of another task, base model, family or prompt.
        ValueError: the model's vocabulary with the scheme's tokens added differs from the training one.
    """
    from genret.identifiers import Identifiers, add_tokens
    from genret.mllm.adapters import check_adapter, read_adapter_manifest

    manifest = read_adapter_manifest(path)
    check_adapter(manifest, path, mllm, task="grace")
    ids = Identifiers.load(path)
    add_tokens(ids, mllm.tokenizer, mllm.model)
    want = manifest.get("tokens", {})
    have_ids = mllm.tokenizer.convert_tokens_to_ids(list(ids.new_tokens))
    have = {"vocab_size": len(mllm.tokenizer), "new_tokens": len(have_ids),
            "new_token_ids": [int(t) for t in have_ids[:1] + have_ids[-1:]]}
    diff = [f"{k} {want[k]} at training, {have[k]} now" for k in have if k in want and want[k] != have[k]]
    if ids.scheme != manifest["mode"]:
        diff.append(f"identifiers.json holds {ids.scheme!r} ids, the adapter was trained on {manifest['mode']!r}")
    saved = _saved_vocab(Path(path))
    if saved is not None:
        moved = [t for t, i in zip(ids.new_tokens, have_ids) if saved.get(t) != i]
        if moved:
            diff.append(f"{len(moved)} of the scheme's tokens (e.g. {moved[0]!r}) are not where the adapter's saved "
                        f"tokenizer has them")
    if diff:
        what = "; ".join(diff)
        raise ValueError(f"{path}: scheme and model vocabulary do not match ({what}); the adapter's identifiers.json "
                         f"or the base tokenizer changed since training: retrain with genret train grace")
    mllm.attach_adapter(str(path), task="grace", mode=ids.scheme, prompt=prompt)
    return ids


def _saved_vocab(folder: Path) -> dict[str, int] | None:
    """The vocabulary of the tokenizer saved with the adapter (None when there is none)."""
    if not (folder / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)).get_vocab()


@STAGES.register("generate")
class GenerateStage(RankStage):
    """Rank gallery images by decoding their identifiers with a GRACE-trained MLLM (trie beam search)."""

    config_class = GenerateConfig

    def __init__(self, config: GenerateConfig, name: str) -> None:
        from genret.mllm.adapters import read_adapter_manifest
        from genret.prompts import load_prompt

        super().__init__(config, name)
        self.manifest = read_adapter_manifest(config.adapter)
        made = self.manifest["prompt"]
        self.prompt = load_prompt(made.get("name", "grace"), required={"retrieve": PROMPT_NEEDS["retrieve"]})
        self._mllm: "MLLM | None" = None
        self.identifiers: "Identifiers | None" = None
        self._full: "Trie | None" = None
        self.trie: "Trie | None" = None
        self._images: set[str] = set()

    def check(self, where: str = "") -> None:
        """:meth:`Stage.check`, the base MLLM being the adapter's ``base_model`` where ``model`` is not set."""
        from genret.stages.base import check_adapter_base, check_reference

        super().check(where)
        if not self.config.model:
            where = f"{where or f'stage {self.name!r}'}.adapter"
            check_reference(self.config, "model", self.manifest["base_model"], f"{where} (its base_model)")
            check_adapter_base(self.config.adapter, self.config, self.manifest["base_model"], where,
                               **self.adapter_use("adapter"))

    def adapter_use(self, field: str) -> dict:
        return {"task": "grace", "prompt": self.prompt}

    @property
    def reranks_upstream(self) -> bool:
        """Only with ``restrict = "upstream"``; otherwise it decodes over the whole gallery."""
        return self.config.restrict == "upstream"

    @property
    def mllm(self) -> "MLLM":
        """The base MLLM with the adapter, loaded on first use."""
        if self._mllm is None:
            from genret.identifiers import Trie
            from genret.mllm import MLLM

            mllm = MLLM.load(self.config.mllm_config(self.config.model or self.manifest["base_model"]))
            self.identifiers = attach_grace(mllm, self.config.adapter, self.prompt)
            self._full = Trie.from_identifiers(self.identifiers, mllm.tokenizer, *answer_context(mllm))
            self._mllm = mllm
        return self._mllm

    def index_gallery(self, gallery: "Gallery", progress: bool = False) -> None:
        """Build the trie over the gallery's images (a subset of the adapter's identifiers).

        Raises:
            ValueError: gallery images the adapter has no identifier for, with their count.
        """
        self.mllm  # noqa: B018 - loads the identifiers
        images = list(gallery.items.get("image", {}))
        if not images:
            return
        known = set(self.identifiers.item_ids)
        missing = [i for i in images if i not in known]
        if missing:
            raise ValueError(
                f"stage {self.name!r}: {len(missing)} of the gallery's {len(images)} images (e.g. {missing[0]!r}) have "
                f"no identifier in {self.config.adapter} (it memorised {len(known)} images of "
                f"{self.manifest.get('gallery', {}).get('splits', '?')}); index the split it was trained on, or train "
                f"it on this gallery: genret train grace --gallery-splits <split>")
        self._images = set(images)
        self.trie = self._full if len(images) == len(known) else self._full.subset(images)
        if len(images) < len(known):
            logger.info("%s: decoding within the gallery's %d of the adapter's %d identifiers", self.name, len(images),
                        len(known))

    def rank(self, queries: Sequence[Query], upstream: Sequence[Ranking] | None, ctx: StageContext,
             k: int | None = None) -> list[Ranking]:
        if self.trie is None:
            self.index_gallery(ctx.gallery)
        restrict = self.config.restrict == "upstream"
        k = k or self.config.k if restrict else min(k or self.config.k, self.config.num_beams)
        if (restrict or self.config.fusion_weight is not None) and upstream is None:
            raise ValueError(f"stage {self.name!r}: restrict=upstream and fusion_weight need a stage before it "
                             "(e.g. the prefilter)")
        out: list[Ranking | None] = [None] * len(queries)
        todo = []
        for q, query in enumerate(queries):
            if query.target != "image" or query.image is not None:
                if self.config.image_queries == "pass" and upstream is not None:
                    out[q] = upstream[q]
                    continue
                raise ValueError(f"stage {self.name!r} ranks images for text queries; query {query.id!r} is an "
                                 f"{query.modality} query for {query.target}s (GRACE identifiers name images): evaluate "
                                 "with --directions t2i, or set image_queries = 'pass' after a prefilter")
            todo.append(q)
        for s in range(0, len(todo), self.config.batch_size):
            chunk = todo[s:s + self.config.batch_size]
            hits = self._decode([queries[q] for q in chunk], [upstream[q] for q in chunk] if restrict else None)
            for q, found in zip(chunk, hits):
                out[q] = self._ranking(queries[q], found, upstream[q] if upstream is not None else None, k)
        return out  # type: ignore[return-value]

    def _decode(self, queries: Sequence[Query], upstream: Sequence[Ranking] | None):
        from genret.identifiers import constrained_beam_search
        from genret.mllm import scoring
        from genret.mllm.context import check_lengths

        mllm = self.mllm
        template = self.prompt.section("retrieve")["user"]
        texts = [scoring.render(mllm, scoring.user_message(template, text=q.text or " ".join(q.dialog)))
                 for q in queries]
        tries = self.trie
        if upstream is not None:
            tries = [self.trie.subset([c.item_id for c in r.candidates[: self.config.upstream_k]
                                       if c.item_id in self._images]) for r in upstream]
        tok = mllm.tokenizer
        side, tok.padding_side = tok.padding_side, "left"
        try:
            inputs = tok(texts, padding=True, return_tensors="pt")  # as the processor tokenized them in training
        finally:
            tok.padding_side = side
        longest = max(t.max_length for t in (tries if isinstance(tries, list) else [tries]))  # an identifier's tokens
        check_lengths(mllm, inputs["attention_mask"].sum(dim=1).tolist(),
                      [f"stage {self.name!r}: query {q.id!r}" for q in queries], new_tokens=longest)
        inputs = {k: v.to(mllm.device) for k, v in inputs.items() if k != "token_type_ids"}
        return constrained_beam_search(mllm.model, inputs, tries, num_beams=self.config.num_beams,
                                       pad_token_id=tok.pad_token_id)

    def _ranking(self, query: Query, found, upstream: Ranking | None, k: int) -> Ranking:
        w = self.config.fusion_weight
        prior = {c.item_id: c for c in upstream.candidates} if upstream is not None else {}
        floor = min((c.score for c in prior.values()), default=0.0)
        cands = []
        for hit in found:
            before = prior.get(hit.item_id, Candidate(hit.item_id, floor))
            cands.append(before.rescored(self.name, hit.score, None if w is None else before.score + w * hit.score))
        cands.sort(key=lambda c: -c.score)
        if self.config.restrict == "upstream" and upstream is not None:
            cands += _misses(upstream, {c.item_id for c in cands}, self.config.upstream_k,
                             min((c.score for c in cands), default=0.0))
        return Ranking(query=query, candidates=tuple(cands[:k]), stage=self.name)


def _misses(upstream: Ranking, decoded: set[str], upstream_k: int, floor: float) -> list[Candidate]:
    """The upstream's first ``upstream_k`` candidates that were not decoded, in its order, each ranked below ``floor``
    (the last decoded score) by its place: ``floor - 1``, ``floor - 2``, ... (their upstream scores stay in
    ``scores``)."""
    missed = [c for c in upstream.candidates[:upstream_k] if c.item_id not in decoded]
    return [replace(c, score=floor - i) for i, c in enumerate(missed, start=1)]
