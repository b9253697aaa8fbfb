"""How a model writes its answer: read from its own chat template and tokenizer, never assumed.

After the generation prompt a template may write a space before the answer (llava-1.5's ``ASSISTANT:``
and SmolVLM's ``Assistant:`` are followed by ``" Yes"``), or nothing (Qwen2-VL's ``assistant\\n``), and it
ends the turn with its own token (``<|im_end|>``, ``<end_of_utterance>``) or with none at all (llava-1.5:
then the tokenizer's eos, ``</s>``, is what the model was trained to emit). And a tokenizer writes the
same word differently by context: sentencepiece's ``"yes"`` alone is ``▁yes``, after ``ASSISTANT:`` it is
``yes``, after ``ASSISTANT: `` it is ``▁yes``; byte-level BPE writes ``" Yes"`` as ``ĠYes``.

So every answer genret scores or trains on — a caption, a yes/no word, a list number, an image identifier —
is tokenized *in context*: the rendered prompt, then :func:`answer_format`'s prefix, the answer and its
suffix, keeping the tokens after the prompt's own.

Example::

    fmt = answer_format(mllm)                  # llava-1.5: AnswerFormat(prefix=' ', suffix='</s>')
    ids = continuation_ids(mllm, prompt, [fmt.text("a red circle")])[0]   # ▁a ▁red ▁circle </s>
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from genret.mllm.backend import MLLM

_PROBE = "GENRETANSWERPROBE"


@dataclass(frozen=True)
class AnswerFormat:
    """What the template writes around an assistant answer.

    Attributes:
        prefix: between the generation prompt and the answer text (``" "`` for llava-1.5 and SmolVLM).
        suffix: what ends the answer: the template's end-of-turn token, else the tokenizer's eos.
    """

    prefix: str
    suffix: str

    def text(self, answer: str) -> str:
        """``answer`` as the model writes it after the generation prompt, end of turn included."""
        return self.prefix + answer + self.suffix


def answer_format(mllm: "MLLM") -> AnswerFormat:
    """The model's answer format, from rendering a user turn and an assistant turn with its chat template.

    Computed once per model. Where the template renders no assistant turn after its generation
    prompt (an unusual template), the answer follows the prompt directly and ends with the eos token.
    """
    cached = getattr(mllm, "_answer_format", None)
    if cached is not None:
        return cached
    processor, eos = mllm.processor, mllm.tokenizer.eos_token or ""
    user = [{"role": "user", "content": [{"type": "text", "text": "q"}]}]
    turn = [*user, {"role": "assistant", "content": [{"type": "text", "text": _PROBE}]}]
    fmt = AnswerFormat("", eos)
    try:
        prompt = mllm.family.apply_chat_template(processor, user, add_generation_prompt=True)
        full = mllm.family.apply_chat_template(processor, turn, add_generation_prompt=False)
    except Exception:  # noqa: BLE001 - a template that cannot render an assistant turn: the plain format
        prompt = full = ""
    if full.startswith(prompt) and _PROBE in full[len(prompt):]:
        prefix, _, after = full[len(prompt):].partition(_PROBE)
        end = after.strip()
        fmt = AnswerFormat(prefix, end if end and (eos and eos in end or _stops_generation(mllm, end)) else eos)
    mllm._answer_format = fmt
    return fmt


def _stops_generation(mllm: "MLLM", token: str) -> bool:
    """Whether ``token`` is one token that ends generation (the generation config's eos ids): Gemma 3's template
    ends a turn with ``<end_of_turn>`` (id 106), its tokenizer's eos is ``<eos>``, its generation config stops on both."""
    ids = mllm.tokenizer(token, add_special_tokens=False)["input_ids"]
    stops = getattr(getattr(mllm.model, "generation_config", None), "eos_token_id", None)
    stops = stops if isinstance(stops, list) else [stops]
    return len(ids) == 1 and ids[0] in stops


def continuation_ids(mllm: "MLLM", prompt: str, texts: Sequence[str]) -> list[list[int]]:
    """The token ids each of ``texts`` gets when written right after ``prompt`` (a rendered chat prompt).

    Raises:
        ValueError: where the tokenizer merges the prompt's last token with the text's first, so
            no token boundary separates them (the answer could not be scored on its own tokens).
    """
    tok = mllm.tokenizer
    head = tok(prompt, add_special_tokens=False)["input_ids"]
    rows = tok([prompt + t for t in texts], add_special_tokens=False)["input_ids"]
    out = []
    for text, ids in zip(texts, rows):
        if ids[:len(head)] != head:
            raise ValueError(f"the tokenizer merges the end of the prompt with the answer {text!r}: "
                             f"{prompt[-20:]!r} + {text[:20]!r} has no token boundary between them")
        out.append(list(ids[len(head):]))
    return out


def answer_token_ids(mllm: "MLLM", prompt: str, word: str) -> list[int]:
    """The tokens a one-word answer (``yes``) can start with after ``prompt``: each casing that is one token.

    ``word``, its lower-case and its capitalised form, each written with the template's prefix; every one
    that is a single token in context counts (the model may answer ``Yes`` or ``yes``); where none is,
    the first token of ``word`` stands for it.
    """
    fmt = answer_format(mllm)
    variants = list(dict.fromkeys([word, word.lower(), word.capitalize()]))
    rows = continuation_ids(mllm, prompt, [fmt.prefix + v for v in variants])
    single = list(dict.fromkeys(ids[0] for ids in rows if len(ids) == 1))
    if single:
        return single
    if not rows[0]:
        raise ValueError(f"the answer word {word!r} encodes to no token")
    return [rows[0][0]]


def answer_context(mllm: "MLLM") -> tuple[str, str, str]:
    """``(prompt, prefix, end)``: a rendered generation prompt, what the template writes before an answer and
    what ends it (:attr:`AnswerFormat.suffix`: Gemma 3's ``<end_of_turn>``, which is not its tokenizer's eos).

    The prompt's ending is what every prompt of the model ends with, so an answer tokenized after it with
    the prefix (an image identifier, :func:`genret.identifiers.tokenize`) gets the tokens the model writes
    after any prompt. The prefix is kept apart: a prompt ending in a space tokenizes differently.
    """
    from genret.mllm.scoring import render, user_message

    fmt = answer_format(mllm)
    return render(mllm, user_message("q")), fmt.prefix, fmt.suffix
