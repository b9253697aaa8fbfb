"""Request texts against the context of each model that reads them, checked in the request (not in the model's
thread): the dual encoder's text tower, and each local rerank stage's MLLM, less what the stage's own prompt and one
image take. Each model's tokenizer is a private copy, used only here (a tokenizer is not safe to share between
threads, and the worker thread changes its padding side)."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from genret.serve.errors import RequestError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenLimit:
    """At most ``limit`` tokens of ``tokenizer`` for a text ``who`` reads (``what`` says where the limit comes from;
    ``prompt``, for a rerank stage, the tokens of its prompt per direction with an empty text and one image)."""

    who: str
    tokenizer: Any
    limit: int
    what: str
    prompt: Mapping[str, int] = field(default_factory=dict)

    def check(self, texts: Sequence[tuple[str, str]]) -> list[int]:
        """Raise 400 naming the first (field, text) pair above the limit; else each text's token count."""
        if not texts:
            return []
        counts = [len(ids) for ids in self.tokenizer([t for _, t in texts], truncation=False, verbose=False)["input_ids"]]
        for (where, _), n in zip(texts, counts):
            if n > self.limit:
                raise RequestError(400, f"{where}: {n:,} tokens, more than {self.who} reads ({self.limit:,} tokens: "
                                        f"{self.what}); send a shorter text")
        return counts


def encoder_limit(encoder, name: str) -> TokenLimit | None:
    """The dual encoder's text limit (its tokenizer's length, or the family's fixed one), if it has a tokenizer."""
    tokenizer = getattr(getattr(encoder, "processor", None), "tokenizer", None)
    if tokenizer is None:
        return None
    from genret.encoders.hf import TEXT_KWARGS

    limit = TEXT_KWARGS.get(getattr(encoder, "model_type", ""), {}).get("max_length") or tokenizer.model_max_length
    if not limit or limit >= 1_000_000:  # no length recorded: the model says nothing to check against
        return None
    return TokenLimit(f"the encoder {name!r}", copy.deepcopy(tokenizer), int(limit), "its text context")


def rerank_limit(stage, image) -> TokenLimit | None:
    """A local rerank stage's text limit: its MLLM's context less its longest prompt (both directions; a listwise
    prompt with one candidate) holding an empty text and ``image``, measured once through the stage's processor."""
    from genret.mllm import scoring
    from genret.mllm.answers import answer_format

    if stage.config.backend != "local":
        return None
    mllm = stage.mllm
    context = scoring.context_size(mllm)
    if not context:
        return None
    sizes: dict[str, int] = {}
    try:
        for direction in ("t2i", "i2t"):
            section = stage.prompt.section(direction)
            item = section.get("item", "").replace("{number}", "1").replace("{text}", "")
            user = section["user"].replace("{candidates}", item)
            fill = {"instruction": stage.default_instruction or ""} if stage.takes_instruction else None
            # as scoring writes it: the checkpoint's system turn and the stage's instruction (pointwise_messages)
            text = scoring.render(mllm, scoring.pointwise_messages(user, "", section.get("system"), fill))
            if "assistant" in section:  # written as scoring writes an answer (its prefix and end-of-turn token)
                text += answer_format(mllm).text(section["assistant"].replace("{text}", ""))
            images = [image] * user.count("{image}")
            inputs = mllm.processor(text=[text], images=images or None, return_tensors="pt")
            sizes[direction] = int(inputs["input_ids"].shape[1])
    except Exception as err:  # an unusual processor: the context alone bounds the text, the library the rest
        logger.warning("stage %r: could not measure its prompt (%s); texts are checked against the whole context",
                       stage.name, err)
        sizes = {}
    prompt = max(sizes.values(), default=0)
    return TokenLimit(f"stage {stage.name!r}", copy.deepcopy(mllm.tokenizer), max(context - prompt, 1),
                      f"the model's context of {context:,} less {prompt:,} for the stage's prompt and one image", sizes)
