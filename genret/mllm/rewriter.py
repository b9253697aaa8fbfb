"""Text rewriting with a (multimodal) LLM: a prompt's ``[rewrite]`` template in, a new query out.

Deterministic decoding (greedy, or beam search with ``num_beams``), batched, with guards: an empty
answer, or one that runs to ``max_new_tokens`` without ending (a *runaway*), is not used — the
caller's fallback text (the original query) takes its place and the result says why. Every rewrite
is cached (:class:`~genret.mllm.textcache.TextCache`), keyed by model, adapter, prompt version,
decoding settings and the rendered prompt, so a rerun reproduces it without the model.

Example::

    rewriter = Rewriter(MLLM.load("adapters/mini-world/mllm"), "cirevl", cache_dir="cache/rewrites")
    out = rewriter.rewrite([{"caption": "a red circle left of a blue square", "modification": "make the circle green"}],
                           fallbacks=["make the circle green"])
    out[0].text, out[0].fallback
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from genret.mllm import scoring
from genret.mllm.context import check_lengths, context_size
from genret.mllm.textcache import TextCache, model_key

if TYPE_CHECKING:
    from genret.mllm.backend import MLLM
    from genret.prompts import Prompt

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rewrite:
    """One rewrite: the text to use, what the model said, and why it was not used (if not)."""

    text: str
    raw: str
    fallback: str | None = None  # "empty" or "runaway": the fallback text was used instead
    cached: bool = False


class Rewriter:
    """Fill a prompt's text template, generate, and guard the answer.

    Args:
        mllm: the model (an MLLM used on text only; an adapter attached to it counts in the cache key).
        prompt: a prompt name/path or a loaded :class:`~genret.prompts.Prompt`.
        section: the prompt table whose ``user`` template is filled (placeholders are the row keys).
        max_new_tokens: the longest answer; one that does not end within it is a runaway.
        num_beams: 1 for greedy decoding.
        batch_size: prompts per ``generate`` call.
        cache_dir: where rewrites persist (``None``: in memory only, for this object's life).
        max_prompt_tokens: refuse prompts longer than this (default: the model's context size).
    """

    def __init__(self, mllm: "MLLM", prompt: "str | Prompt" = "cirevl", section: str = "rewrite", *,
                 max_new_tokens: int = 48, num_beams: int = 1, batch_size: int = 16,
                 cache_dir: str | os.PathLike | None = None, max_prompt_tokens: int | None = None) -> None:
        from genret.prompts import Prompt, load_prompt

        if max_new_tokens < 1 or num_beams < 1 or batch_size < 1:
            raise ValueError("max_new_tokens, num_beams and batch_size must be at least 1")
        self.mllm = mllm
        self.prompt = prompt if isinstance(prompt, Prompt) else load_prompt(prompt, required={section: {"user": ()}})
        self.template = self.prompt.section(section)["user"]
        if "{image}" in self.template:
            raise ValueError(f"{self.prompt.path}: [{section}].user holds {{image}}; the rewriter reads text only")
        self.section, self.max_new_tokens, self.num_beams, self.batch_size = section, max_new_tokens, num_beams, batch_size
        self.max_prompt_tokens = max_prompt_tokens or context_size(mllm) or 4096
        self._limit_source = "max_prompt_tokens" if max_prompt_tokens else f"{mllm.model_id}'s context"
        self.key = {**model_key(mllm), "prompt": self.prompt.key, "section": section,
                    "max_new_tokens": max_new_tokens, "num_beams": num_beams}
        self.cache = TextCache(cache_dir, "rewrites", self.key)

    def render(self, values: Mapping[str, str]) -> str:
        """The chat-formatted prompt for one row (every placeholder of the template must be given)."""
        missing = [k for k in _placeholders(self.template) if k not in values]
        if missing:
            raise ValueError(f"{self.prompt.path}: [{self.section}].user needs {', '.join(missing)}; not given")
        return scoring.render(self.mllm, scoring.user_message(self.template, **{k: str(v) for k, v in values.items()}))

    def rewrite(self, rows: Sequence[Mapping[str, str]], fallbacks: Sequence[str], progress: bool = False,
                labels: Sequence[str] | None = None) -> list[Rewrite]:
        """Rewrite every row; where the answer is empty or runaway, use the row's fallback and say so.

        Args:
            labels: what each row is, for an error (``"query 'q3'"``; default ``rewrite row N``).

        Raises:
            PromptTooLongError: a prompt that with ``max_new_tokens`` is longer than ``max_prompt_tokens`` (e.g. a
                dialog grown past the model's context), naming the row.
        """
        if len(rows) != len(fallbacks):
            raise ValueError(f"{len(rows)} rows but {len(fallbacks)} fallbacks")
        texts = [self.render(r) for r in rows]
        lengths = [len(ids) for ids in self.mllm.tokenizer(texts)["input_ids"]] if texts else []
        check_lengths(self.mllm, lengths,
                      labels or [f"rewrite row {i}" for i in range(len(texts))], new_tokens=self.max_new_tokens,
                      limit=self.max_prompt_tokens, source=self._limit_source,
                      advice="shorten it (fewer dialog rounds or captions)")
        raw: dict[str, tuple[str, bool]] = {}
        todo = []
        for t in dict.fromkeys(texts):
            hit = self.cache.get(t)
            if hit is None:
                todo.append(t)
            else:
                raw[t] = (hit["text"], hit["ended"])
        hits = len(texts) - len(todo)
        for s in tqdm(range(0, len(todo), self.batch_size), desc="rewrite", unit="batch", disable=not progress):
            chunk = todo[s:s + self.batch_size]
            for t, out in zip(chunk, self._generate(chunk)):
                raw[t] = out
            self.cache.put({t: {"text": raw[t][0], "ended": raw[t][1]} for t in chunk})
        out = []
        for t, fallback in zip(texts, fallbacks):
            said, ended = raw[t]
            reason = "empty" if not said.strip() else None if ended else "runaway"
            if reason:
                logger.debug("rewrite %s (%r...): falling back to the original query %r", reason, said[:40], fallback)
            out.append(Rewrite(fallback if reason else said.strip(), said, reason, cached=t not in todo))
        logger.debug("rewrites: %d cached, %d generated", hits, len(todo))
        fell = [r.fallback for r in out if r.fallback]
        if fell:
            logger.warning("%d of %d rewrites were not used (%d empty, %d runaway past %d tokens): the original queries "
                           "stand in for them", len(fell), len(out), fell.count("empty"), fell.count("runaway"),
                           self.max_new_tokens)
        return out

    @torch.inference_mode()
    def _generate(self, texts: list[str]) -> list[tuple[str, bool]]:
        """(answer, ended): ``ended`` is False when the answer used all ``max_new_tokens`` without an end token."""
        tok = self.mllm.tokenizer
        side, tok.padding_side = tok.padding_side, "left"
        try:
            inputs = tok(texts, padding=True, return_tensors="pt")
        finally:
            tok.padding_side = side
        inputs = {k: v.to(self.mllm.device) for k, v in inputs.items() if k != "token_type_ids"}
        gen = self.mllm.model.generate(**inputs, do_sample=False, num_beams=self.num_beams,
                                       max_new_tokens=self.max_new_tokens, pad_token_id=tok.pad_token_id)
        new = gen[:, inputs["input_ids"].shape[1]:]
        stops = _stop_ids(self.mllm)
        out = []
        for row in new.tolist():
            ended = any(t in stops for t in row)
            out.append((tok.decode(row, skip_special_tokens=True), ended or len(row) < self.max_new_tokens))
        return out


def _placeholders(template: str) -> list[str]:
    import re

    return [m for m in re.findall(r"\{(\w+)\}", template) if m != "image"]


def _stop_ids(mllm: "MLLM") -> set[int]:
    ids = getattr(mllm.model.generation_config, "eos_token_id", None) or mllm.tokenizer.eos_token_id
    ids = ids if isinstance(ids, (list, tuple)) else [ids]
    return {int(i) for i in ids if i is not None}


