"""Who answers the questions of a chat: the MLLM looking at the target, a person, or a registered simulated user.

Simulated users that read a data set's own ground truth are plug-ins: the miniature world registers ``facts``
(:mod:`genret.world.answerers`), which reads the target's scene.

Every answerer follows :class:`Answerer`: one answer per query and question, as a
:class:`~genret.mllm.rewriter.Rewrite` (the text used, what was said, and why it was not used, if so).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Protocol, Sequence, runtime_checkable

from genret.registry import Registry
from genret.mllm.rewriter import Rewrite
from genret.stages.dialog import UNKNOWN, Target, dialog_text
from genret.types import Query

if TYPE_CHECKING:
    from genret.mllm.backend import MLLM

logger = logging.getLogger(__name__)


@runtime_checkable
class Answerer(Protocol):
    """Answers one question per query about the image that query looks for.

    ``queries[i].meta["target"]`` holds the target (a :class:`Target` as a dict) where ground truth is known;
    a person answering needs none. Each answer is a :class:`~genret.mllm.rewriter.Rewrite`: the text used,
    what was said, and why it was not used (``fallback``), if so.
    """

    name: str

    def answer(self, queries: Sequence[Query], questions: Sequence[str]) -> list[Rewrite]: ...


# Simulated users and people, by the name a chat stage's ``answerer`` setting gives: each entry builds one for
# a stage (``factory(stage) -> Answerer``). A data set with its own ground truth registers its own.
ANSWERERS: Registry[Callable[..., "Answerer"]] = Registry("answerer")


def require_target(query: Query, user: str, need: str) -> Target:
    """The query's target (``meta["target"]``), where it knows ``need`` (``image`` or a metadata key such as
    ``scene``), else a ``ValueError`` that names the query and what to do."""
    target = Target.from_meta(query.meta.get("target"))
    if target is None or target.known(need) is None:
        shape = "'image': ..." if need == "image" else f"'meta': {{'{need}': ...}}"
        raise ValueError(f"query {query.id!r}: the {user} answerer needs the target's {need} "
                         f"(meta['target'] = {{'id': ..., {shape}}}); a person can answer instead "
                         "(answerer = 'human')")
    return target


class HumanAnswerer:
    """A person answers: each question is shown with the dialog so far, the answer is read back.

    Args:
        ask: shows a prompt and returns what the person typed (default :func:`input`).
    """

    name = "human"

    def __init__(self, ask: Callable[[str], str] = input) -> None:
        self.ask = ask

    def answer(self, queries: Sequence[Query], questions: Sequence[str]) -> list[Rewrite]:
        """Ask the person each question in turn; an empty reply counts as "I don't know"."""
        out = []
        for q, question in zip(queries, questions, strict=True):
            said = self.ask(f"[{q.id}] {dialog_text(q)}\nQ: {question}\nA: ")
            out.append(Rewrite(said.strip(), said) if said.strip() else Rewrite(UNKNOWN, said, "empty"))
        return out


# --- the MLLM answerer --------------------------------------------------------------------------------------------


class MLLMAnswerer:
    """The MLLM sees the target image and answers (prompt table ``[answer]``: one ``{image}``, ``{question}``).

    Answers are cached (:class:`~genret.mllm.textcache.TextCache`, kind ``answers``) by model, adapters,
    prompt version and decoding settings, per image content and rendered question.

    Args:
        mllm: the model (its active adapters count in the cache key).
        prompt: a prompt name/path or a loaded :class:`~genret.prompts.Prompt`.
        max_new_tokens: the longest answer; one that does not end within it is a runaway ("I don't know").
        num_beams: 1 for greedy decoding.
        batch_size: images per ``generate`` call.
        cache_dir: where answers persist (``None``: memory only).
    """

    name = "mllm"

    def __init__(self, mllm: "MLLM", prompt="chat", *, max_new_tokens: int = 16, num_beams: int = 1,
                 batch_size: int = 16, cache_dir=None) -> None:
        from genret.mllm.textcache import TextCache, model_key
        from genret.prompts import Prompt, PromptError, load_prompt

        self.mllm = mllm
        needs = {"answer": {"user": ("{question}",)}}
        self.prompt = prompt if isinstance(prompt, Prompt) else load_prompt(prompt, needs)
        self.template = self.prompt.section("answer")["user"]
        if self.template.count("{image}") != 1:
            raise PromptError(f"{self.prompt.path}: [answer].user must hold exactly one {{image}} (the target)")
        self.max_new_tokens, self.num_beams, self.batch_size = max_new_tokens, num_beams, batch_size
        self.cache = TextCache(cache_dir, "answers", {**model_key(mllm), "prompt": self.prompt.key, "section": "answer",
                                                      "max_new_tokens": max_new_tokens, "num_beams": num_beams})
        self.generated = 0

    def answer(self, queries: Sequence[Query], questions: Sequence[str]) -> list[Rewrite]:
        """Answer each question looking at its query's target image (generated once per image and question)."""
        from genret.mllm import scoring
        from genret.mllm.textcache import file_digest

        images = [require_target(q, self.name, "image").image for q in queries]
        texts = [scoring.render(self.mllm, scoring.user_message(self.template, question=x)) for x in questions]
        keys = [f"{file_digest(im)}\n{t}" for im, t in zip(images, texts, strict=True)]
        todo = {k: (im, t) for k, im, t in zip(keys, images, texts) if self.cache.get(k) is None}
        pending = list(todo.items())
        for s in range(0, len(pending), self.batch_size):
            chunk = pending[s:s + self.batch_size]
            said = self._generate([t for _, (_, t) in chunk], [im for _, (im, _) in chunk])
            self.cache.put({k: {"text": a, "ended": e} for (k, _), (a, e) in zip(chunk, said)})
        self.generated += len(todo)
        out = []
        for k in keys:
            hit = self.cache.get(k)
            reason = "empty" if not hit["text"].strip() else None if hit["ended"] else "runaway"
            out.append(Rewrite(UNKNOWN if reason else hit["text"].strip(), hit["text"], reason, k not in todo))
        return out

    def _generate(self, texts: list[str], images: list[str]) -> list[tuple[str, bool]]:
        import torch

        from genret.data.images import load_image
        from genret.mllm.context import check_lengths
        from genret.mllm.rewriter import _stop_ids

        tok = self.mllm.tokenizer
        side, tok.padding_side = tok.padding_side, "left"
        try:
            inputs = self.mllm.processor(text=texts, padding=True, return_tensors="pt",
                                         images=self.mllm.family.processor_images([[load_image(p)] for p in images]))
        finally:
            tok.padding_side = side
        check_lengths(self.mllm, inputs["attention_mask"].sum(dim=1).tolist(),
                      [f"the answer about {p}" for p in images], new_tokens=self.max_new_tokens,
                      advice="ask a shorter question, or bound the image size (processor_options)")
        inputs = {k: v.to(self.mllm.device) for k, v in self.mllm.family.generate_inputs(self.mllm.model, inputs).items()}
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with torch.inference_mode():
            gen = self.mllm.model.generate(**inputs, do_sample=False, num_beams=self.num_beams,
                                           max_new_tokens=self.max_new_tokens, pad_token_id=pad)
        stops = _stop_ids(self.mllm)
        rows = gen[:, inputs["input_ids"].shape[1]:].tolist()
        return [(tok.decode(r, skip_special_tokens=True), any(t in stops for t in r) or len(r) < self.max_new_tokens)
                for r in rows]


def _mllm_answerer(stage) -> "MLLMAnswerer":
    """The MLLM looks at the target: the plain model, so that the questioner's LoRA stays out of it."""
    c = stage.config
    if c.adapter:
        from genret.mllm import MLLM

        mllm = MLLM.load(c.mllm_config(c.model))
    else:
        mllm = stage._load_mllm()
    return MLLMAnswerer(mllm, c.prompt, max_new_tokens=c.answer_tokens, num_beams=c.num_beams,
                        batch_size=c.batch_size, cache_dir=c.cache_dir or None)


ANSWERERS.register("human")(lambda stage: HumanAnswerer())
ANSWERERS.register("mllm")(_mllm_answerer)
