"""The instruction mixture of the mini MLLM's pretraining: what every stage asks of an MLLM zero-shot.

A real MLLM is instruction-tuned on describing images, answering questions, judging and comparing, rewriting and
asking, so a stage's prompt works without a task LoRA. The mini MLLM learns the same from its training images, in
the stages' own prompts (``prompts/*.toml``, rendered as the stages render them):

- ``describe``: an image → one of its captions (``caption``, ``rerank_generative``);
- ``answer``: an image and a question about it → the true answer (the chat stage's ``[answer]``, and bare);
- ``judge``: a text and an image → yes or no (``rerank_pointwise``, both directions), the no's on near misses the
  prefilter mined (the images and captions it ranks highest that do not match);
- ``pick``: a query and numbered candidates (the right one among near misses) → its number (``rerank_listwise``);
- ``rewrite``: a description and an edit instruction, text only → the edited description (``cirevl``);
- ``ask``: a dialog so far, text only → the question the scripted questioner asks next (``chat``'s ``[question]``).

``answer``, ``rewrite`` and ``ask`` need the records' annotation plug-in (the world's scenes) and are left out where
the records carry none; the others need captions only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from genret.data.annotations import annotation_of, eligible_twins, not_held_out
from genret.mllm.scoring import listwise_prompt, user_message
from genret.prompts import load_prompt

TASKS = ("describe", "answer", "judge", "pick", "rewrite", "ask")
DESCRIBE = ("{image}\nDescribe the image.", "{image}\nWhat does the image show?", "{image}\nWrite a caption for this image.")


@dataclass(frozen=True)
class Example:
    """One training turn: the training images it shows (indices, in order), the user turn, the answer."""

    task: str
    images: tuple[int, ...]
    messages: tuple
    answer: str

    @property
    def key(self) -> str:
        """What the token ids depend on (the cache key of their encoding)."""
        return repr((self.messages, self.answer))


def prompt_texts() -> list[str]:
    """Every template's words (placeholders dropped), for the tokenizer to learn."""
    out = [t.replace("{image}", "") for t in DESCRIBE]
    for name in ("rerank_pointwise", "rerank_listwise", "cirevl", "chat", "caption"):
        prompt = load_prompt(name)
        for section in prompt.sections.values():
            out += [v for v in section.values() if isinstance(v, str)]
    return [t.replace("{", " ").replace("}", " ") for t in out]


def message(template: str, **values: str) -> tuple:
    """A user turn of ``template`` (``{image}`` markers as image parts), hashable (what :class:`Example` holds)."""
    return _frozen(user_message(template, **values))


def as_messages(message: tuple) -> list[dict]:
    """The chat messages an :class:`Example` holds (hashable there)."""
    return [{"role": role, "content": [dict(p) for p in parts]} for role, parts in message]


class Mixture:
    """Draws the examples of one epoch.

    Args:
        records: the training images.
        groups: the prefilter's query groups on them (:func:`genret.training.negatives.mine_negatives`) for judge and
            pick; empty leaves those tasks out.
        texts: the caption table of the groups (index -> caption).
        tasks: the tasks drawn, per image and epoch ``{task: count}`` (``describe`` counts captions: all of them).
        candidates: numbered candidates of a pick example.
        chat_rounds: rounds of the oracle dialogs the ``ask`` examples come from.
        random_negatives: share of judge and pick negatives (of those not twins) drawn at random from the other
            images (or their captions) instead of the prefilter's near misses: easy pairs, which differ in most
            attributes.
        twin_negatives: share of judge negatives (and of pick rows, one candidate each) that are the image's *twin*
            (the records' annotation plug-in's :meth:`~genret.data.annotations.Annotation.twins`: the same words
            bound or placed otherwise), drawn anew as an image (listed in :attr:`drawn`, numbered after the records;
            a new drawing of the twin scene, not a pixel-aligned copy) or written as its caption: what the test
            split's twins ask, which near misses mined from the training images rarely are.
        avoid: annotation signatures never drawn as twins nor given as a rewrite's target (the held-out splits', so
            no held-out scene is shown or learnt as an answer).
    """

    def __init__(self, records: Sequence, groups: Sequence, texts: Sequence[str], tasks: dict[str, int],
                 candidates: int = 4, chat_rounds: int = 5, seed: int = 0, random_negatives: float = 0.0,
                 twin_negatives: float = 0.0, avoid: frozenset = frozenset()) -> None:
        self.records, self.texts, self.tasks, self.candidates = records, texts, tasks, candidates
        self.random_negatives, self.twin_negatives, self.avoid = random_negatives, twin_negatives, avoid
        self.drawn: list = []  # twins drawn as images: (annotation kind, value); image index len(records) + k
        self._drawn_at: dict[tuple[int, int], int] = {}
        self.by_query = {(g.direction, g.query): g for g in groups}
        self.t2i = {}  # image -> its caption queries' groups
        for g in groups:
            if g.direction == "t2i":
                self.t2i.setdefault(g.positives[0], []).append(g)
        self.prompts = {n: load_prompt(n) for n in ("rerank_pointwise", "rerank_listwise", "cirevl", "chat")}
        self.annotated = [annotation_of(r.meta) for r in records]
        self.asks: dict[int, list[tuple[str, str]]] = {}
        if tasks.get("ask") and all(self.annotated):
            from genret.training.rewriter import oracle_turns

            index = {r.id: i for i, r in enumerate(records)}
            for image, dialog, question in oracle_turns(records, chat_rounds, seed):
                self.asks.setdefault(index[image], []).append((dialog, question))

    def epoch(self, rng: random.Random) -> list[Example]:
        """Every image's examples for one epoch, shuffled."""
        out: list[Example] = []
        for i, rec in enumerate(self.records):
            for task, count in self.tasks.items():
                for _ in range(count if task != "describe" else 0):
                    ex = getattr(self, f"_{task}")(i, rng)
                    if ex is not None:
                        out.append(ex)
            if self.tasks.get("describe"):
                out += [Example("describe", (i,), message(rng.choice(DESCRIBE)), c) for c in rec.captions]
        rng.shuffle(out)
        return out

    def _answer(self, i: int, rng: random.Random) -> Example | None:
        found = self.annotated[i]
        if found is None:
            return None
        question, answer = rng.choice(found[1].questions(found[2], rng))
        template = self.prompts["chat"].section("answer")["user"] if rng.random() < 0.5 else "{image}\n{question}"
        return Example("answer", (i,), message(template, question=question), answer)

    def _twin(self, i: int, rng: random.Random) -> tuple[int, object, object] | None:
        """One of image ``i``'s twins not in :attr:`avoid`, as ``(which, kind, value)``; ``None`` where it has none."""
        found = self.annotated[i]
        if found is None or not self.twin_negatives or rng.random() >= self.twin_negatives:
            return None
        twins = eligible_twins(found, self.avoid)  # none: the other negatives
        if not twins:
            return None
        which, twin = rng.choice(twins)
        return which, found[1], twin

    def _twin_image(self, i: int, rng: random.Random) -> int | None:
        """Image ``i``'s twin drawn anew (its index: after the records), or ``None``."""
        found = self._twin(i, rng)
        if found is None:
            return None
        which, kind, twin = found
        if (i, which) not in self._drawn_at:
            self._drawn_at[i, which] = len(self.records) + len(self.drawn)
            self.drawn.append((kind, twin))
        return self._drawn_at[i, which]

    def _twin_text(self, i: int, rng: random.Random) -> str | None:
        """A caption of image ``i``'s twin (the same words, another binding), or ``None``."""
        found = self._twin(i, rng)
        return None if found is None else found[1].captions(found[2], rng, 1)[0]

    def _other_image(self, i: int, rng: random.Random) -> int:
        j = rng.randrange(len(self.records) - 1)
        return j + (j >= i)

    def _negative_image(self, i: int, mined: Sequence[int], rng: random.Random, text: str = "",
                        taken: Sequence[int] = ()) -> int:
        """A training image that is not ``i`` (nor in ``taken``): a near miss the prefilter mined, or a random one
        that no caption ``text`` of it describes."""
        if self.random_negatives and rng.random() < self.random_negatives:
            for _ in range(8):
                j = self._other_image(i, rng)
                if j not in taken and text not in self.records[j].captions:
                    return j
        return rng.choice([m for m in mined if m not in taken] or list(mined))

    def _negative_text(self, i: int, mined: Sequence[int], rng: random.Random) -> str:
        """A caption of another image, none of ``i``'s: a near miss the prefilter mined, or a random image's."""
        if self.random_negatives and rng.random() < self.random_negatives:
            text = rng.choice(self.records[self._other_image(i, rng)].captions)
            if text not in self.records[i].captions:
                return text
        return self.texts[rng.choice(mined)]

    def _judge(self, i: int, rng: random.Random) -> Example | None:
        prompt = self.prompts["rerank_pointwise"]
        yes, no = prompt.settings.get("yes", "yes"), prompt.settings.get("no", "no")
        match = rng.random() < 0.5
        if rng.random() < 0.5 and ("i2t", i) in self.by_query:  # the image is the query, a caption the candidate
            g = self.by_query[("i2t", i)]
            match = match or not g.negatives
            text = self.texts[rng.choice(g.positives)] if match else \
                self._twin_text(i, rng) or self._negative_text(i, g.negatives[:self.candidates], rng)
            return Example("judge", (i,), message(prompt.section("i2t")["user"], text=text), yes if match else no)
        groups = self.t2i.get(i)
        if not groups:
            return None
        g = rng.choice(groups)
        match = match or not g.negatives
        image = i if match else self._twin_image(i, rng) or \
            self._negative_image(i, g.negatives[:self.candidates], rng, self.texts[g.query])
        return Example("judge", (image,), message(prompt.section("t2i")["user"], text=self.texts[g.query]),
                       yes if match else no)

    def _pick(self, i: int, rng: random.Random) -> Example | None:
        prompt, n = self.prompts["rerank_listwise"], self.candidates
        if rng.random() < 0.5 and ("i2t", i) in self.by_query:
            g = self.by_query[("i2t", i)]
            if len(g.negatives) < n - 1:
                return None
            negatives = list(g.negatives[:n - 1])
            twin = self._twin_text(i, rng)
            cands = [self.texts[rng.choice(g.positives)]] + [
                self._negative_text(i, [c], rng) for c in negatives[:n - 1 - bool(twin)]] + ([twin] if twin else [])
            order = list(range(n))
            rng.shuffle(order)
            right = order.index(0) + 1
            section = prompt.section("i2t")
            messages, images = listwise_prompt(section["user"], section["item"], {"image": i},
                                               [cands[j] for j in order], "text")
        else:
            groups = self.t2i.get(i)
            if not groups:
                return None
            g = rng.choice(groups)
            if len(g.negatives) < n - 1:
                return None
            cands = [i]
            twin = self._twin_image(i, rng)
            for c in g.negatives[:n - 1 - (twin is not None)]:  # distinct, a random one standing in for a near miss
                cands.append(self._negative_image(i, [c], rng, self.texts[g.query], taken=cands))
            cands += [twin] if twin is not None else []
            rng.shuffle(cands)
            right = cands.index(i) + 1
            section = prompt.section("t2i")
            messages, images = listwise_prompt(section["user"], section["item"], {"text": self.texts[g.query]},
                                               cands, "image")
        return Example("pick", tuple(images), _frozen(messages), str(right))

    def _rewrite(self, i: int, rng: random.Random) -> Example | None:
        from genret.training.rewriter import closest_text

        found = self.annotated[i]
        if found is None:
            return None
        _, kind, value = found
        text, targets = kind.edit(value, rng)
        targets = not_held_out(kind, targets, self.avoid)
        if not targets:  # each scene the edit leads to is held out: its description is not learnt as an answer
            return None
        caption = rng.choice(kind.descriptions(value))
        target = closest_text(caption, kind.descriptions(rng.choice(targets)))
        template = self.prompts["cirevl"].section("rewrite")["user"]
        return Example("rewrite", (), message(template, caption=caption, modification=text), target)

    def _ask(self, i: int, rng: random.Random) -> Example | None:
        if not self.asks.get(i):
            return None
        dialog, question = rng.choice(self.asks[i])
        return Example("ask", (), message(self.prompts["chat"].section("question")["user"], dialog=dialog), question)


def _frozen(messages: list[dict]) -> tuple:
    return tuple((m["role"], tuple(tuple(sorted(p.items())) for p in m["content"])) for m in messages)
