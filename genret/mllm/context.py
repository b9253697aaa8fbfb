"""The language model's context, and prompts that do not fit it.

A prompt past the context is not truncated by the model, nor refused: its positions run past the ones the model was
trained on and the scores (or generations) are silently meaningless. Every place genret tokenises a prompt for an
MLLM (scoring, captioning, rewriting, answering, identifier decoding) checks the lengths here, after the processor
has expanded the images, and raises :class:`PromptTooLongError` naming the prompt, its length and the limit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from genret.mllm.backend import MLLM

_NO_LIMIT = 1_000_000  # transformers' "no length recorded" is int(1e30); anything this large says nothing


class PromptTooLongError(ValueError):
    """A prompt longer than the model's context; ``label`` names the query (and candidate), ``length`` and ``limit``
    are in tokens (``limit`` less the new tokens a generation asks for)."""

    def __init__(self, message: str, label: str = "", length: int = 0, limit: int = 0) -> None:
        super().__init__(message)
        self.label, self.length, self.limit = label, length, limit


def context_size(mllm: "MLLM") -> int | None:
    """The language model's context in tokens: its text config's ``max_position_embeddings``, else the tokenizer's
    ``model_max_length`` where one is recorded; ``None`` where neither says."""
    config = mllm.model.config
    text = getattr(config, "text_config", None) or config
    size = getattr(text, "max_position_embeddings", None)
    if isinstance(size, int) and 0 < size < _NO_LIMIT:
        return size
    size = getattr(getattr(mllm, "tokenizer", None), "model_max_length", None)
    return int(size) if isinstance(size, int) and 0 < size < _NO_LIMIT else None


def check_lengths(mllm: "MLLM", lengths: Sequence[int], labels: Sequence[str] | None = None, new_tokens: int = 0,
                  limit: int | None = None, source: str = "", advice: str = "") -> None:
    """Refuse the first prompt longer than the context (less ``new_tokens`` a generation adds).

    Args:
        lengths: each prompt's tokens, images expanded (a padded batch's attention mask summed per row).
        labels: what each prompt is (``"query 'q1', candidate 'img7'"``); default its position.
        new_tokens: tokens the caller will generate after the prompt.
        limit: the tokens a prompt may hold (default :func:`context_size`; nothing is checked where it is unknown).
        source: where ``limit`` comes from, for the message (default: the model's context).
        advice: what to do about it, where the caller knows better than "shorten the text".

    Raises:
        PromptTooLongError: naming the prompt, its length, the limit and the model.
    """
    context = limit if limit is not None else context_size(mllm)
    if not context:
        return
    room = context - new_tokens
    for i, length in enumerate(int(n) for n in lengths):
        if length > room:
            label = labels[i] if labels is not None else f"prompt {i}"
            new = f" and {new_tokens:,} new ones" if new_tokens else ""
            raise PromptTooLongError(
                f"{label}: the prompt is {length:,} tokens{new}, more than the {context:,} that "
                f"{source or f'{mllm.model_id} reads (its context)'} allows: past it the model reads positions it "
                f"never learned and its output means nothing; {advice or 'shorten the text'}",
                label=label, length=length, limit=room)
