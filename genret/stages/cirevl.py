"""CIReVL: training-free composed image retrieval by rewriting the query.

A composed query is a reference image plus a modification text ("make the circle green"). The stage
captions the reference with an MLLM (:class:`~genret.mllm.captioner.Captioner`), has a rewriter (an
LLM, or the MLLM on text only; optionally with a LoRA from ``genret train rewriter``) recompose
caption and modification into a description of the target image (prompt ``cirevl``), and hands the
next stage (the prefilter) that description as a plain text query for images.

``mode`` also gives the baselines through the same stage, so one command compares them: ``text`` (the
modification text alone), ``image`` (the reference image alone, image → image), ``caption`` (the
reference's caption alone), ``sum`` (image and text embeddings added: the prefilter's late fusion of an
image + text query). ``keep_reference`` keeps the reference in the rewritten query, so the prefilter
fuses the description with the image (``image_weight`` of the prefilter). Queries that are not composed
(a text or an image) pass through unchanged.

Every rewritten query keeps in ``meta`` the original modification, the reference, the caption, the
rewriter's raw answer and, when the answer was empty or ran past ``max_new_tokens``, that it fell back
to the original modification text — evaluation reports show them. Captions and rewrites are cached on
disk under ``cache_dir`` (keyed by model, adapter, prompt version, settings and input).

Example pipeline file::

    [encoder]
    model = "adapters/mini-world/clip"

    [[stages]]
    type = "cirevl"
    model = "adapters/mini-world/mllm"
    rewriter_adapter = "adapters/mini-world/rewriter"   # optional: a genret train rewriter LoRA
    cache_dir = "cache/cirevl"

    [[stages]]
    type = "prefilter"
    k = 50
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from genret.stages.base import STAGES, RewriteStage, StageContext
from genret.config import at_least, check_fields
from genret.types import Query
from genret.mllm.backend import MLLMLoadConfig

if TYPE_CHECKING:
    from genret.mllm.backend import MLLM

logger = logging.getLogger(__name__)
MODES = ("compose", "text", "image", "caption", "sum")


@dataclass
class CIReVLConfig(MLLMLoadConfig):
    """Settings of the CIReVL rewrite stage."""

    model: str = field(default="", metadata={"path": "model",
                                             "help": "the MLLM that captions the reference (and rewrites, by default)"})
    mode: str = field(default="compose", metadata={"help": "compose, or a baseline: text, image, caption, sum"})
    keep_reference: bool = field(default=False, metadata={"help": "compose: keep the reference image in the query "
                                                                  "(the prefilter fuses it with the description)"})
    rewriter_model: str = field(default="", metadata={"path": "model",
                                                      "help": "the rewriter (default: model, used on text only)"})
    rewriter_adapter: str = field(default="", metadata={"path": "adapter",
                                                        "help": "a LoRA from genret train rewriter (optional)"})
    caption_prompt: str = field(default="caption", metadata={"path": "prompt", "help": "prompt of the captioner"})
    rewrite_prompt: str = field(default="cirevl", metadata={"path": "prompt",
                                                            "help": "prompt of the rewriter ([rewrite] table)"})
    caption_tokens: int = field(default=48, metadata={"range": at_least(1), "help": "longest caption, in tokens"})
    max_new_tokens: int = field(default=48, metadata={"range": at_least(1),
                                                      "help": "longest rewrite; longer is a runaway (fallback)"})
    num_beams: int = field(default=1, metadata={"range": at_least(1), "help": "beam width of both (1: greedy)"})
    batch_size: int = field(default=16, metadata={"range": at_least(1), "help": "images or prompts per generate call"})
    cache_dir: str = field(default="", metadata={"path": "dir",
                                                 "help": "where captions and rewrites persist ('' : memory only)"})
    rewriter_processor_options: dict = field(default_factory=dict, metadata={
        "help": "image processor settings of rewriter_model when it is another model than model (processor_options "
                "are model's: a Qwen captioner's max_pixels is no setting of a LLaVA rewriter)"})

    def __post_init__(self) -> None:
        check_fields(self)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode in ("compose", "caption") and not self.model:
            raise ValueError(f"mode {self.mode!r} needs model (the captioning MLLM)")
        if self.rewriter_processor_options and not self._own_rewriter():
            raise ValueError("rewriter_processor_options are the settings of rewriter_model, another model than "
                             "model: set rewriter_model, or put the settings in processor_options")

    def _own_rewriter(self) -> bool:
        return bool(self.rewriter_model) and self.rewriter_model != self.model

    def mllm_config(self, model: str):
        """The load settings of ``model``: each model its own ``processor_options`` (the captioner's are
        ``processor_options``, another rewriter's ``rewriter_processor_options``)."""
        config = super().mllm_config(model)
        if self._own_rewriter() and model == self.rewriter_model:
            config.processor_options = dict(self.rewriter_processor_options)
        return config


def check_composed(query: Query) -> None:
    """Refuse a composed query that cannot be used: no reference file, or an empty modification."""
    if query.image is None:
        raise ValueError(f"query {query.id!r}: a composed query needs its reference image; it has only the text "
                         f"{query.text!r}")
    if not Path(query.image).is_file():
        raise FileNotFoundError(f"query {query.id!r}: reference image not found: {query.image}")
    if not (query.text or "").strip():
        raise ValueError(f"query {query.id!r}: the modification text is empty; give what should change in the "
                         f"reference image {query.image}")


@STAGES.register("cirevl")
class CIReVLStage(RewriteStage):
    """Caption the reference, recompose with the modification, retrieve with the description."""

    config_class = CIReVLConfig

    def __init__(self, config: CIReVLConfig, name: str) -> None:
        super().__init__(config, name)
        self._mllm: "MLLM | None" = None
        self._rewriter_mllm: "MLLM | None" = None
        self._captioner = None
        self._rewriter = None
        self.seconds = {"caption": 0.0, "rewrite": 0.0}

    def adapter_use(self, field: str) -> dict:
        return {"task": "rewriter", "mode": "rewrite"}

    def _load(self) -> None:
        from genret.mllm import MLLM
        from genret.mllm.captioner import Captioner
        from genret.mllm.rewriter import Rewriter

        c = self.config
        cache = c.cache_dir or None
        if self._captioner is None and c.mode in ("compose", "caption"):
            self._mllm = MLLM.load(c.mllm_config(c.model))
            self._captioner = Captioner(self._mllm, c.caption_prompt, max_new_tokens=c.caption_tokens,
                                        batch_size=c.batch_size, cache_dir=cache, num_beams=c.num_beams)
        if self._rewriter is None and c.mode == "compose":
            if c.rewriter_model and c.rewriter_model != c.model or c.rewriter_adapter:
                # A LoRA rewriter gets its own copy of the base: the captioner keeps the plain model.
                self._rewriter_mllm = MLLM.load(c.mllm_config(c.rewriter_model or c.model))
                if c.rewriter_adapter:
                    self._rewriter_mllm.attach_adapter(c.rewriter_adapter, task="rewriter", mode="rewrite")
            else:
                self._rewriter_mllm = self._mllm
            self._rewriter = Rewriter(self._rewriter_mllm, c.rewrite_prompt, max_new_tokens=c.max_new_tokens,
                                      num_beams=c.num_beams, batch_size=c.batch_size, cache_dir=cache)

    def rewrite(self, queries: Sequence[Query], ctx: StageContext) -> list[Query]:
        import time

        composed = [i for i, q in enumerate(queries) if q.modality == "image+text"]
        for i in composed:
            check_composed(queries[i])
        out = list(queries)
        if not composed:
            return out
        mode = self.config.mode
        if mode == "text":
            for i in composed:
                q = queries[i]
                out[i] = Query(id=q.id, text=q.text, target="image", meta=self._meta(q))
            return out
        if mode == "sum":  # the composed query as it is: the prefilter fuses image and text embeddings
            for i in composed:
                q = queries[i]
                out[i] = Query(id=q.id, text=q.text, image=q.image, target="image", meta=self._meta(q))
            return out
        if mode == "image":
            for i in composed:
                q = queries[i]
                out[i] = Query(id=q.id, image=q.image, target="image", meta=self._meta(q))
            return out
        self._load()
        tick = time.perf_counter()
        captions = self._captioner.caption([queries[i].image for i in composed])
        self.seconds["caption"] += time.perf_counter() - tick
        if mode == "caption":
            for i, cap in zip(composed, captions):
                q = queries[i]
                out[i] = Query(id=q.id, text=cap or q.text, target="image", meta=self._meta(q, caption=cap))
            return out
        tick = time.perf_counter()
        rows = [{"caption": cap, "modification": queries[i].text} for i, cap in zip(composed, captions)]
        done = self._rewriter.rewrite(rows, [queries[i].text for i in composed],
                                      labels=[f"stage {self.name!r}: query {queries[i].id!r}" for i in composed])
        self.seconds["rewrite"] += time.perf_counter() - tick
        for i, cap, r in zip(composed, captions, done):
            q = queries[i]
            out[i] = Query(id=q.id, text=r.text, image=q.image if self.config.keep_reference else None, target="image",
                           meta=self._meta(q, caption=cap, rewrite=r.raw, fallback=r.fallback))
        return out

    def _meta(self, q: Query, **more) -> dict:
        return {"stage": self.name, "mode": self.config.mode, "original_text": q.text, "reference": q.image,
                **{k: v for k, v in more.items()}}
