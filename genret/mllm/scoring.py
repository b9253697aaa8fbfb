"""Scoring (query, candidate) pairs with an MLLM: one forward pass each, no sampling.

- :func:`pointwise_scores`: log P(yes) − log P(no) at the first answer position.
- :func:`generative_scores`: mean log P(text | image) over the text's tokens.
- :func:`listwise_scores`: the k candidates numbered in one prompt; each candidate's score is the
  log-probability of its number as the answer (so the output ranks all k, not just one pick).

Prompts are :class:`genret.prompts.Prompt` tables; ``{image}`` marks where an image goes.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from genret.mllm.answers import answer_format, answer_token_ids, continuation_ids
from genret.mllm.backend import MLLM
from genret.mllm.context import PromptTooLongError, check_lengths, context_size


def user_message(template: str, **values: str) -> list[dict]:
    """A chat ``user`` turn from a template: text around ``{image}`` markers becomes text parts."""
    filled = template
    for key, value in values.items():
        filled = filled.replace("{" + key + "}", value)
    content: list[dict] = []
    for i, part in enumerate(filled.split("{image}")):
        if i:
            content.append({"type": "image"})
        if part:
            content.append({"type": "text", "text": part})
    return [{"role": "user", "content": content}]


def render(mllm: MLLM, messages: list[dict]) -> str:
    """The chat prompt of ``messages`` through the model's own template, with the generation prompt.

    Text and images stay in the order the prompt file gives them. A template that moves every image
    before the text (llava-1.5's renders all ``<image>`` first) would cut each listwise number off from
    its image and move the query out of the shared prefix; for such a template the image placeholders
    are written into the text where they belong, which the processor expands the same way.
    """
    if not keeps_image_order(mllm):
        messages = [_inline_images(mllm, m) for m in messages]
    return without_template_bos(mllm, mllm.family.apply_chat_template(mllm.processor, messages, add_generation_prompt=True))


def without_template_bos(mllm: MLLM, text: str) -> str:
    """``text`` without the bos token a template writes (Gemma 3's ``<bos>``) where the tokenizer adds one itself.

    transformers tokenizes a rendered chat that starts with the bos without special tokens, so the model sees one
    bos; genret's prompts are tokenized with them (as the processor does by default), so the template's goes.
    """
    bos = mllm.tokenizer.bos_token
    if not bos or not text.startswith(bos):
        return text
    adds = getattr(mllm, "_tokenizer_adds_bos", None)
    if adds is None:
        adds = mllm.tokenizer("a")["input_ids"][:1] == [mllm.tokenizer.bos_token_id]
        mllm._tokenizer_adds_bos = adds
    return text[len(bos):] if adds else text



def keeps_image_order(mllm: MLLM) -> bool:
    """Whether the chat template writes text and images in the order of the message's parts."""
    cached = getattr(mllm, "_keeps_image_order", None)
    if cached is None:
        probe = [{"role": "user", "content": [{"type": "text", "text": "GENRETA"}, {"type": "image"},
                                              {"type": "text", "text": "GENRETB"}]}]
        text = mllm.family.apply_chat_template(mllm.processor, probe, add_generation_prompt=True)
        token = mllm.family.image_token(mllm.processor)
        cached = text.find("GENRETA") < text.find(token) < text.find("GENRETB")
        mllm._keeps_image_order = cached
    return cached


def _inline_images(mllm: MLLM, message: dict) -> dict:
    """``message`` with its parts joined into one text part, each image as the placeholder the processor expands."""
    if isinstance(message["content"], str) or not any(c["type"] == "image" for c in message["content"]):
        return message
    token = mllm.family.inline_image(mllm.processor)
    text = "".join(token if c["type"] == "image" else c.get("text", "") for c in message["content"])
    return {**message, "content": [{"type": "text", "text": text}]}


def _inputs(mllm: MLLM, texts: list[str], images: list[list], labels: Sequence[str] | None = None,
            check: bool = True) -> dict[str, torch.Tensor]:
    """Right-padded model inputs; images are PIL images, or cached features (tensors) of each image.

    With cached features the vision tower does not run: the prompt's image placeholders are expanded
    to as many tokens as the features have, the features are written into the embeddings, and the
    family's :meth:`~genret.mllm.families.Family.feature_inputs` (e.g. Qwen's grids) join the inputs.
    Each row is checked against the model's context (images expanded), named by ``labels`` when it does not fit.

    Raises:
        PromptTooLongError: a row longer than the model's context.
    """
    flat = [im for ims in images for im in ims]
    cached = bool(flat) and all(isinstance(im, torch.Tensor) for im in flat)
    if cached:
        texts = [mllm.family.expand_image_tokens(mllm.processor, t, [len(mllm.family.feature_embeds(f)) for f in ims])
                 for t, ims in zip(texts, images)]
    kwargs = {"images": mllm.family.processor_images(images)} if flat and not cached else {}
    tok = mllm.processor.tokenizer
    side, tok.padding_side = tok.padding_side, "right"
    try:
        # The same tokenizer call the processor makes, without the image work.
        inputs = tok(texts, padding=True, return_tensors="pt") if cached \
            else mllm.processor(text=texts, padding=True, return_tensors="pt", **kwargs)
    finally:
        tok.padding_side = side
    if check:
        check_lengths(mllm, inputs["attention_mask"].sum(dim=1).tolist(), labels)
    inputs = {k: v.to(mllm.device) for k, v in inputs.items() if k != "token_type_ids"}
    if cached:
        ids = inputs["input_ids"]
        embeds = mllm.model.get_input_embeddings()(ids)
        mask = ids == mllm.family.image_token_id(mllm.model)
        values = torch.cat([mllm.family.feature_embeds(f) for f in flat])
        if int(mask.sum()) != len(values):
            raise ValueError(f"the prompts hold {int(mask.sum())} image tokens for {len(values)} feature vectors")
        if not mllm.family.model_writes_features:  # else the forward writes them (family.feature_kwargs)
            embeds[mask] = values.to(embeds.device, embeds.dtype)
        inputs["inputs_embeds"] = embeds
        inputs.update({k: v.to(mllm.device) for k, v in mllm.family.feature_inputs(mllm.model, flat).items()})
    return inputs


_TEXT_KEYS = ("input_ids", "attention_mask", "inputs_embeds")


def keeps_cache(model) -> bool:
    """Whether a forward of ``model`` now keeps its KV cache.

    transformers drops the cache (``use_cache=False``, ``cache=None``) in a forward that checkpoints its layers:
    gradient checkpointing, in training mode, with gradients on, because the backward pass replays each layer and
    would write the cache twice. The scoring paths that reuse a cache (a shared prefix, an answer continued after
    its prompt) take their no-cache path then.
    """
    if not torch.is_grad_enabled():
        return True
    return not any(getattr(m, "gradient_checkpointing", False) and m.training for m in model.modules())


def _forward(mllm: MLLM, inputs: dict[str, torch.Tensor], **kwargs):
    """One forward over :func:`_inputs`, with the family's extra arguments (explicit ``kwargs`` win)."""
    image_inputs = {k: v for k, v in inputs.items() if k not in _TEXT_KEYS}
    extra = mllm.family.forward_kwargs(mllm.model, inputs["input_ids"], image_inputs or None, inputs["attention_mask"])
    if "inputs_embeds" in inputs:  # cached features: the embeddings already hold them
        args = {"inputs_embeds": inputs["inputs_embeds"], "attention_mask": inputs["attention_mask"]}
    else:
        args = dict(inputs)
    return mllm.model(**{**args, **extra, **kwargs})


@torch.inference_mode()
def image_features(mllm: MLLM, images: Sequence, batch_size: int = 32, several: bool = False) -> list[torch.Tensor]:
    """Per image, the projected features the language model sees: compute once, score many times.

    Args:
        several: the images will sit in prompts that hold several images (a listwise prompt of candidate images),
            which a family may lay out otherwise than an image alone (LLaVA-OneVision: one view, not anyres tiles).
    """
    out: list[torch.Tensor] = []
    for s in range(0, len(images), batch_size):
        chunk = list(images[s:s + batch_size])
        inputs = mllm.family.several_image_inputs(mllm.processor, chunk) if several else None
        if inputs is None:
            inputs = mllm.family.image_inputs(mllm.processor, chunk)
        inputs = {k: v.to(mllm.device) for k, v in inputs.items()}
        out += [f.detach().cpu() for f in mllm.family.image_features(mllm.model, inputs)]
    return out


def yes_no_ids(mllm: MLLM, prompt: str, yes: str, no: str, tokens: str = "in_context") -> tuple[list[int], list[int]]:
    """The first tokens of the yes and of the no answer after ``prompt``: with ``tokens="in_context"`` each casing
    the tokenizer writes as one token in context (see :func:`genret.mllm.answers.answer_token_ids`); with
    ``"vocabulary"`` the word's own vocabulary entry, as a reranker checkpoint's authors read it
    (``tokenizer.convert_tokens_to_ids("yes")``).

    Raises:
        ValueError: when yes and no share a token, so the two answers cannot be told apart, or a vocabulary word
            that is no single token.
    """
    if tokens == "vocabulary":
        yes_ids, no_ids = [_vocabulary_id(mllm, yes)], [_vocabulary_id(mllm, no)]
    else:
        yes_ids, no_ids = answer_token_ids(mllm, prompt, yes), answer_token_ids(mllm, prompt, no)
    if set(yes_ids) & set(no_ids):
        raise ValueError(f"the answers {yes!r} and {no!r} start with the same token after the prompt; "
                         "choose answer words that start differently")
    return yes_ids, no_ids


def _vocabulary_id(mllm: MLLM, word: str) -> int:
    vocab = mllm.tokenizer.get_vocab()
    if word not in vocab:
        raise ValueError(f"the answer word {word!r} is not one token of {mllm.model_id}'s vocabulary; use "
                         "answer_tokens = 'in_context' or a word the vocabulary holds")
    return int(vocab[word])


def pointwise_messages(template: str, text: str, system: str | None = None,
                       fill: Mapping[str, str] | None = None) -> list[dict]:
    """A pointwise pair's chat: the ``system`` turn where the prompt has one, then the user turn of ``template``
    with ``{text}`` and each of ``fill`` (``{instruction}``) filled."""
    user = user_message(template, text=text, **dict(fill or {}))
    if system is None:
        return user
    return [{"role": "system", "content": [{"type": "text", "text": system}]}, *user]


def yes_no_score(logits: torch.Tensor, yes_ids: Sequence[int], no_ids: Sequence[int]) -> torch.Tensor:
    """log P(yes) − log P(no) from answer-position ``logits`` (..., vocab), each summed over its tokens."""
    lp = logits.float().log_softmax(-1)
    return lp[..., list(yes_ids)].logsumexp(-1) - lp[..., list(no_ids)].logsumexp(-1)


def _same_images(images: Sequence[Sequence]) -> bool:
    """Whether every row carries the very same images (so image tokens may sit in a shared prefix)."""
    first = list(images[0])
    return all(len(row) == len(first) and all(a is b for a, b in zip(row, first)) for row in images[1:])


def shared_prefix_length(inputs: dict[str, torch.Tensor], images: Sequence[Sequence], image_token_id: int,
                         limit: int | None = None) -> int:
    """How many leading tokens all rows share, leaving each row at least one token of its own.

    Image tokens count as shared only where every row carries the same image objects: the ids of
    two different images' tokens are equal, their features are not.
    """
    ids, lengths = inputs["input_ids"], inputs["attention_mask"].sum(dim=1)
    cap = int(lengths.min()) - 1
    if limit is not None:
        cap = min(cap, limit)
    if cap <= 0 or len(ids) < 2:
        return 0
    differs = (ids[:, :cap] != ids[:1, :cap]).any(dim=0)
    if not _same_images(images):
        differs |= ids[0, :cap] == image_token_id
    hits = differs.nonzero()
    return int(hits[0]) if len(hits) else cap


def _positions(mllm: MLLM, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Position ids of every token, ``(batch, length)`` or the family's own shape (Qwen: ``(3, batch, length)``),
    or None where the family needs forward inputs that cannot be split at a prefix."""
    family_positions = getattr(mllm.family, "position_ids", None)
    if family_positions is not None:
        return family_positions(mllm.model, inputs)
    if mllm.family.forward_kwargs(mllm.model, inputs["input_ids"], None):
        return None
    ids = inputs["input_ids"]
    return torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)


def _prefix_forward(mllm: MLLM, inputs: dict[str, torch.Tensor], prefix: int, positions: torch.Tensor,
                    batch_size: int, keep: Callable[[slice, int], torch.Tensor], owners: Sequence[int] | None = None):
    """Logits of the positions ``keep`` asks for, per batch of rows, running each shared prefix once.

    The prefix's KV cache is computed once and given to each batch of suffixes, which carry their explicit
    position ids; the result equals a full forward of each row (the tests check 1e-4). With ``owners`` the
    rows share their first ``prefix`` tokens only group by group (rows with the same owner carry the same image:
    text queries ranking images, many queries in one call): each batch runs the prefixes of the owners it holds
    (one row each) and selects every row's cache from them, so an image several queries share is prefixed once
    per batch, and sorting the rows by owner makes that once in all. Only the logits asked for are computed
    (``logits_to_keep``): memory grows with the tokens scored, not with the prompt times the vocabulary (152k
    for Qwen).

    Args:
        keep: ``keep(rows, width)`` gives the suffix positions (0 is the first token after the prefix)
            whose logits the caller reads, for rows of suffixes up to ``width``.
        owners: each row's group (default: one group, every row shares the prefix).

    Yields:
        ``(rows, last, logits)``: each row's last prefix position's logits ``(rows, 1, vocab)`` and those of the
        kept positions, ``(rows, len(kept), vocab)``.
    """
    import copy

    embeds = inputs.get("inputs_embeds")
    if embeds is None:
        embeds = mllm.model.get_input_embeddings()(inputs["input_ids"])
    mask = inputs["attention_mask"]
    owners = torch.zeros(len(embeds), dtype=torch.long) if owners is None else torch.as_tensor(owners)
    head, head_for = None, None
    for s in range(0, len(embeds), batch_size):
        rows = slice(s, s + batch_size)
        distinct, local = torch.unique(owners[rows], return_inverse=True)
        if head_for is None or not torch.equal(distinct, head_for):
            first = [s + int((owners[rows] == u).nonzero()[0]) for u in distinct]
            head = mllm.model(inputs_embeds=embeds[first, :prefix], attention_mask=mask[first, :prefix],
                              position_ids=positions[..., first, :prefix], use_cache=True, logits_to_keep=1,
                              **mllm.family.prefix_kwargs(mllm.model, inputs["input_ids"][first, :prefix]),
                              **mllm.family.feature_kwargs(mllm.model, inputs, first, 0, prefix))
            head_for = distinct
        width = int(mask[rows].sum(dim=1).max())
        cache = copy.deepcopy(head.cache)
        take_cache_rows(cache, local.to(embeds.device))
        out = mllm.model(inputs_embeds=embeds[rows, prefix:width], attention_mask=mask[rows, :width],
                         cache=cache, position_ids=positions[..., rows, prefix:width], use_cache=True,
                         logits_to_keep=keep(rows, width - prefix).to(embeds.device),
                         **mllm.family.prefix_kwargs(mllm.model, inputs["input_ids"][rows, :width]),
                         **mllm.family.feature_kwargs(mllm.model, inputs, rows, prefix, width))
        yield rows, head.logits[local.to(head.logits.device)], out.logits


def take_cache_rows(cache, rows: torch.Tensor) -> None:
    """Make ``cache``'s batch the rows ``rows`` of it (indices, repeats allowed), in every kind of layer.

    Beam search's ``reorder_cache`` selects rows of attention keys and values and of linear-attention layers'
    convolution and recurrent states alike; ``batch_select_indices`` and ``batch_repeat_interleave`` miss the
    latter in transformers 5.24 (Qwen3.5's Gated DeltaNet layers raise, hybrid layers would keep stale states).
    """
    cache.reorder_cache(rows)


def _shared_prefix(mllm: MLLM, inputs: dict[str, torch.Tensor], images: Sequence[Sequence], min_prefix: int,
                   limit: int | None = None) -> tuple[int, torch.Tensor | None]:
    """The prefix to share and every token's positions, or ``(0, None)`` where sharing does not pay or
    the family cannot split its inputs."""
    if not keeps_cache(mllm.model):  # the prefix's cache would not be kept
        return 0, None
    prefix = shared_prefix_length(inputs, images, mllm.family.image_token_id(mllm.model), limit)
    positions = _positions(mllm, inputs) if prefix >= min_prefix else None
    return (prefix, positions) if positions is not None else (0, None)


@torch.inference_mode()
def pointwise_scores(mllm: MLLM, template: str, texts: Sequence[str], images: Sequence, yes: str = "yes",
                     no: str = "no", batch_size: int = 16, shared_prefix: bool = True, min_prefix: int = 16,
                     labels: Sequence[str] | None = None, *, system: str | None = None,
                     fills: Sequence[Mapping[str, str]] | None = None, answer_tokens: str = "in_context",
                     score: str = "log_odds", answer_ids: tuple[int, int] | None = None) -> list[float]:
    """log P(yes) − log P(no) for each (text, image) pair, at the first answer position.

    A pair whose prompt does not fit the model's context raises :class:`PromptTooLongError`, named by ``labels``
    (one per pair; default ``pair N``).

    The answer tokens are read from the tokenizer in context (:func:`yes_no_ids`): ``Yes`` and ``yes`` with
    whatever space the template puts before the answer, each casing's probability summed.

    With ``shared_prefix`` and cached image features, the tokens every prompt shares (the query
    part: the prompt files put it first) run once and their KV cache serves all candidates.

    A reranker checkpoint is scored by its own conventions (:mod:`genret.mllm.checkpoints`): a ``system`` turn,
    per-pair ``fills`` of the template's other placeholders (``{instruction}``), ``answer_tokens="vocabulary"``
    (the words' own tokens, no casings summed) or explicit ``answer_ids`` (yes, no), and ``score="sigmoid"``:
    P(yes) / (P(yes) + P(no)), the sigmoid of the log-odds, which is the softmax over the two answers' logits.
    """
    rows = [[im] for im in images]
    labels = _labels(labels, len(texts))
    fills = [{}] * len(texts) if fills is None else list(fills)
    prompts = [render(mllm, pointwise_messages(template, t, system, f)) for t, f in zip(texts, fills)]
    if answer_ids is not None:
        yes_ids, no_ids = [int(answer_ids[0])], [int(answer_ids[1])]
    else:
        yes_ids, no_ids = yes_no_ids(mllm, prompts[0], yes, no, answer_tokens)
    if score not in ("log_odds", "sigmoid"):
        raise ValueError(f"score must be 'log_odds' or 'sigmoid', got {score!r}")
    finish = torch.sigmoid if score == "sigmoid" else (lambda x: x)
    if shared_prefix and _all_cached(rows) and len(prompts) > 1:
        inputs = _inputs(mllm, prompts, rows, labels)
        prefix, positions = _shared_prefix(mllm, inputs, rows, min_prefix)
        if prefix:
            out = torch.empty(len(prompts))
            answer = inputs["attention_mask"].sum(dim=1) - 1 - prefix  # each row's answer position in its suffix
            for sel, _, logits in _prefix_forward(mllm, inputs, prefix, positions, batch_size,
                                                  keep=lambda rows, _: answer[rows].unique()):
                where = torch.searchsorted(answer[sel].unique(), answer[sel])
                out[sel] = yes_no_score(logits[torch.arange(len(where)), where], yes_ids, no_ids).cpu()
            return finish(out).tolist()
    out_list: list[float] = []
    for s in range(0, len(texts), batch_size):
        inputs = _inputs(mllm, prompts[s:s + batch_size], rows[s:s + batch_size], labels[s:s + batch_size])
        last = inputs["attention_mask"].sum(dim=1) - 1
        keep, where = last.unique(return_inverse=True)  # only the answer positions reach the vocabulary head
        logits = _forward(mllm, inputs, logits_to_keep=keep).logits
        out_list += finish(yes_no_score(logits[torch.arange(len(last)), where], yes_ids, no_ids)).tolist()
    return out_list


def _labels(labels: Sequence[str] | None, n: int) -> list[str]:
    """What each of ``n`` pairs is called in an error (the caller's names, or ``pair N``)."""
    if labels is None:
        return [f"pair {i}" for i in range(n)]
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} pairs")
    return list(labels)


def _all_cached(rows: Sequence[Sequence]) -> bool:
    flat = [im for row in rows for im in row]
    return bool(flat) and all(isinstance(im, torch.Tensor) for im in flat)


def _mean_token_logprob(logits: torch.Tensor, target: torch.Tensor, first: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Mean log-prob of ``target[b, j]`` for ``first[b] <= j < end[b]``; ``logits[b, j]`` predicts ``target[b, j]``."""
    logp = logits.float().log_softmax(-1)
    token_logp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    pos = torch.arange(target.shape[1], device=target.device).unsqueeze(0)
    mask = (pos >= first.unsqueeze(1)) & (pos < end.unsqueeze(1))
    return (token_logp * mask).sum(1) / mask.sum(1).clamp(min=1)


@torch.inference_mode()
def generative_scores(mllm: MLLM, user_template: str, texts: Sequence[str], images: Sequence,
                      batch_size: int = 16, shared_prefix: bool = True, min_prefix: int = 16,
                      labels: Sequence[str] | None = None) -> list[float]:
    """Mean log P(text | image) over the text's tokens (and the end-of-turn token).

    A pair whose prompt and text do not fit the model's context raises :class:`PromptTooLongError`, named by
    ``labels`` (one per pair; default ``pair N``).

    The text is written as the model writes an answer (:func:`genret.mllm.answers.answer_format`: llava-1.5's
    ``ASSISTANT: a red circle</s>``, Qwen's ``assistant\na red circle<|im_end|>``), so its tokens are the
    ones the model would produce.

    With ``shared_prefix`` and cached features, a prompt every candidate shares (one image and
    its instruction, when ranking captions for an image) runs once for all candidates; over several images
    (the images of many text queries, scored together), each image's prompt runs once for all the texts scored
    against it (the same tensor object is the same image).
    """
    fmt = answer_format(mllm)
    rows = [[im] for im in images]
    labels = _labels(labels, len(texts))
    prompt = render(mllm, user_message(user_template))
    full = [prompt + fmt.text(t) for t in texts]
    if shared_prefix and _all_cached(rows) and len(full) > 1:
        if not _same_images(rows):  # many texts over several images: share each image's prefix between its rows
            return _grouped_generative(mllm, prompt, full, rows, batch_size, min_prefix, labels)
        inputs = _inputs(mllm, full, rows, labels)
        start = int(_inputs(mllm, [prompt], rows[:1])["attention_mask"].sum())
        prefix, positions = _shared_prefix(mllm, inputs, rows, min_prefix, limit=start)
        if prefix:
            return _generative_after_prefix(mllm, inputs, start, prefix, positions, batch_size).tolist()
    return _plain_generative(mllm, prompt, full, rows, batch_size, labels)


def _plain_generative(mllm: MLLM, prompt: str, full: list[str], rows: list[list], batch_size: int,
                      labels: list[str]) -> list[float]:
    """:func:`generative_scores` in plain batches: every row's whole prompt runs."""
    out_list: list[float] = []
    for s in range(0, len(full), batch_size):
        chunk_rows = rows[s:s + batch_size]
        starts = _inputs(mllm, [prompt] * len(chunk_rows), chunk_rows)["attention_mask"].sum(dim=1)
        inputs = _inputs(mllm, full[s:s + batch_size], chunk_rows, labels[s:s + batch_size])
        lo, length = int(starts.min()) - 1, inputs["input_ids"].shape[1]
        # Only the text's positions reach the vocabulary head, not the prompt's and images'.
        logits = _forward(mllm, inputs, logits_to_keep=torch.arange(lo, length - 1, device=mllm.device)).logits
        ends = inputs["attention_mask"].sum(dim=1)
        out_list += _mean_token_logprob(logits, inputs["input_ids"][:, lo + 1:], starts - 1 - lo, ends - 1 - lo).tolist()
    return out_list


def _generative_after_prefix(mllm: MLLM, inputs: dict[str, torch.Tensor], start: int, prefix: int,
                             positions: torch.Tensor, batch_size: int, owners: Sequence[int] | None = None) -> torch.Tensor:
    """Mean log P(text) of each row whose text starts at ``start``, its first ``prefix`` tokens run once (per owner)."""
    out = torch.empty(len(inputs["input_ids"]))
    lo = start - 1  # the first position whose logits are read: it predicts the text's first token
    for sel, last, logits in _prefix_forward(mllm, inputs, prefix, positions, batch_size,
                                             keep=lambda rows, width: torch.arange(max(lo - prefix, 0), width - 1),
                                             owners=owners):
        if lo == prefix - 1:  # the text starts right after the prefix: its first token is predicted there
            logits = torch.cat([last, logits], dim=1)
        # logits[:, j] sits at position lo + j and predicts the token after it.
        target = inputs["input_ids"][sel, lo + 1:lo + 1 + logits.shape[1]]
        ends = inputs["attention_mask"][sel].sum(dim=1) - 1 - lo
        out[sel] = _mean_token_logprob(logits, target, torch.zeros_like(ends), ends).cpu()
    return out


def _grouped_generative(mllm: MLLM, prompt: str, full: list[str], rows: list[list], batch_size: int,
                        min_prefix: int, labels: list[str]) -> list[float]:
    """:func:`generative_scores` of rows over several images (the same image object = the same image): rows are
    sorted by image, and each image's prompt and image tokens run once for all its rows (:func:`_prefix_forward`
    with owners). Where the prompts' image tokens differ in number (Qwen's grids), the plain batches are used."""
    owner_of: dict[int, int] = {}
    owners = [owner_of.setdefault(id(r[0]), len(owner_of)) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: owners[i])
    inputs = _inputs(mllm, [full[i] for i in order], [rows[i] for i in order], [labels[i] for i in order])
    starts = _inputs(mllm, [prompt] * len(order), [rows[i] for i in order])["attention_mask"].sum(dim=1)
    start = int(starts[0])
    positions = _positions(mllm, inputs) if bool((starts == start).all()) and start - 1 >= min_prefix else None
    if positions is None:
        return _plain_generative(mllm, prompt, full, rows, batch_size, labels)
    scores = _generative_after_prefix(mllm, inputs, start, start - 1, positions, batch_size,
                                      owners=[owners[i] for i in order])
    out = [0.0] * len(rows)
    for pos, i in enumerate(order):
        out[i] = float(scores[pos])
    return out


def number_answers(mllm: MLLM, prompt: str, k: int) -> list[list[int]]:
    """Token ids of the answers ``1``..``k`` after ``prompt``, as the model writes them (prefix, end of turn)."""
    fmt = answer_format(mllm)
    return continuation_ids(mllm, prompt, [fmt.text(str(n)) for n in range(1, k + 1)])


def number_logprobs(mllm: MLLM, call: Callable, model, prompt: str, images: list, k: int,
                    inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """log P(``n`` | prompt) for each candidate number ``n`` = 1..k, every token of the answer as the model writes it.

    The prompt runs once and its KV cache is continued with the answers (:func:`answer_logprobs`); where ``model``
    keeps no cache (:func:`keeps_cache`: gradient checkpointing in training), or with gradients where the family's
    cache is written in place (Qwen3.5), each answer runs after the whole prompt instead
    (:func:`whole_answer_logprobs`): the same numbers, k prompts' compute.

    Args:
        call: ``call(inputs, **kwargs)``, the forward of :func:`_inputs` (the stage's, or the trainer's, which
            detaches frozen embeddings); ``model``: the model it runs (peft-wrapped or plain).
        inputs: the prompt's :func:`_inputs`, where the caller has them already.
    """
    fmt = answer_format(mllm)
    texts = [fmt.text(str(n)) for n in range(1, k + 1)]
    if not keeps_cache(model) or (torch.is_grad_enabled() and mllm.family.cache_written_in_place):
        return whole_answer_logprobs(mllm, call, prompt, images, texts)
    if inputs is None:
        with torch.no_grad():  # frozen embeddings and image features: no graph before the model's layers
            inputs = _inputs(mllm, [prompt], [images])
    out = call(inputs, use_cache=True, logits_to_keep=1)
    return answer_logprobs(mllm, model, inputs, out, continuation_ids(mllm, prompt, texts))


def whole_answer_logprobs(mllm: MLLM, call: Callable, prompt: str, images: list, texts: Sequence[str]) -> torch.Tensor:
    """log P(text | prompt) of each of ``texts`` (answers as the model writes them), each run after the whole prompt:
    no KV cache, so it holds under gradient checkpointing (one row per answer, the prompt and its images repeated).

    Raises:
        ValueError: where a row's tokens are not the prompt's followed by the answer's (the tokenizer merges them).
    """
    answers = continuation_ids(mllm, prompt, texts)
    with torch.no_grad():
        inputs = _inputs(mllm, [prompt + t for t in texts], [images] * len(texts))
    lengths = inputs["attention_mask"].sum(dim=1)
    start = int(lengths[0]) - len(answers[0])  # the prompt's tokens, the same in every row
    for i, a in enumerate(answers):
        if int(lengths[i]) - len(a) != start or inputs["input_ids"][i, start:start + len(a)].tolist() != a:
            raise ValueError(f"the answer {texts[i]!r} does not tokenize apart from the prompt")
    width = max(len(a) for a in answers)
    keep = torch.arange(start - 1, start - 1 + width, device=lengths.device)  # each predicts the answer's next token
    logp = call(inputs, use_cache=False, logits_to_keep=keep).logits.float().log_softmax(-1)
    return torch.stack([sum((logp[i, j, a[j]] for j in range(1, len(a))), logp[i, 0, a[0]])
                        for i, a in enumerate(answers)])


def answer_logprobs(mllm: MLLM, model, inputs: dict[str, torch.Tensor], out, answers: list[list[int]]) -> torch.Tensor:
    """log P(answer | prompt) of each of ``answers`` (token ids), from the prompt's forward ``out``.

    ``out`` holds the prompt's last-position logits and its KV cache (``use_cache=True``); the cache is
    repeated for the answers, whose tokens after the first run together in one more forward of ``model``
    (the peft-wrapped or the plain model). Differentiable: the rerank trainer's listwise loss is taken on it.
    """
    k, width = len(answers), max(len(a) for a in answers)
    first = out.logits[0, -1].float().log_softmax(-1)
    scores = first[torch.tensor([a[0] for a in answers], device=first.device)]
    if width == 1:
        return scores
    if out.cache is None:
        raise RuntimeError("the prompt's forward kept no KV cache (transformers drops it under gradient "
                           "checkpointing in training): score through number_logprobs, which runs without one")
    device = inputs["input_ids"].device
    ids = torch.full((k, width - 1), mllm.tokenizer.pad_token_id or 0, dtype=torch.long, device=device)
    for i, a in enumerate(answers):
        ids[i, :len(a) - 1] = torch.tensor(a[:-1])
    cache = out.cache
    take_cache_rows(cache, torch.zeros(k, dtype=torch.long, device=device))  # the prompt's one row, k times
    mask = torch.ones((k, inputs["input_ids"].shape[1] + width - 1), dtype=torch.long, device=device)
    positions = mllm.family.next_position_ids(mllm.model, inputs, width - 1).repeat_interleave(k, dim=-2)
    logp = model(input_ids=ids, attention_mask=mask, cache=cache, position_ids=positions,
                 use_cache=False).logits.float().log_softmax(-1)
    rest = torch.stack([sum((logp[i, j - 1, a[j]] for j in range(1, len(a))), logp.new_zeros(()))
                        for i, a in enumerate(answers)])
    return scores + rest


def listwise_prompt(user_template: str, item_template: str, query: dict[str, object], candidates: Sequence[object],
                    candidate_key: str) -> tuple[list[dict], list]:
    """The numbered prompt's messages and its images (the query's, then the candidates')."""
    lines, images = [], []
    if "image" in query:
        images.append(query["image"])
    for n, cand in enumerate(candidates, start=1):
        if candidate_key == "image":
            lines.append(item_template.replace("{number}", str(n)))
            images.append(cand)
        else:
            lines.append(item_template.replace("{number}", str(n)).replace("{text}", str(cand)))
    values = {"candidates": "".join(lines)}
    if "text" in query:
        values["text"] = str(query["text"])
    return user_message(user_template, **values), images


def check_listwise_length(mllm: MLLM, length: int, k: int, base: int, label: str = "the query") -> None:
    """Refuse a listwise prompt longer than the context, saying how many candidates fit.

    Args:
        length: the prompt's tokens with ``k`` candidates; ``base``: with none (the query and instructions alone; a
            prompt of one candidate image would not do: LLaVA-OneVision lays an image alone out otherwise than one
            among several).
        label: what the prompt is, for the message (``"query 'q1' with its 20 candidates"``).

    Raises:
        PromptTooLongError: naming the prompt, its length, the limit and the k that fits.
    """
    limit = context_size(mllm)
    if limit is None or length + 8 <= limit:
        return
    per = (length - base) / max(k, 1)
    fits = max(int((limit - 8 - base) // per), 0) if per > 0 else 0
    raise PromptTooLongError(
        f"{label}: a listwise prompt of {k} candidates is {length:,} tokens, more than {mllm.model_id}'s context of "
        f"{limit:,} (max_position_embeddings; ~{per:,.0f} tokens per candidate): at most k = {fits} fit; lower the "
        "stage's k, or bound the image size (processor_options)", label=label, length=length, limit=limit - 8)


@torch.inference_mode()
def listwise_scores(mllm: MLLM, user_template: str, item_template: str, query: dict[str, object],
                    candidates: Sequence[object], candidate_key: str, label: str = "the query") -> list[float]:
    """The log-probability of each candidate's number as the answer to one numbered prompt.

    The prompt is run once; its KV cache is repeated for the k answers, which are scored together.
    Every number is written as the model writes an answer (``ASSISTANT: 12</s>`` is ``▁``, ``1``, ``2``,
    ``</s>`` for llava-1.5) and scored on all its tokens. A prompt longer than the model's context is
    refused, naming the k that fits.

    Args:
        user_template: with ``{candidates}`` and the query's placeholder.
        item_template: one line per candidate, with ``{number}`` and ``{image}`` or ``{text}``.
        query: ``{"text": ...}`` or ``{"image": PIL image}``.
        candidates: PIL images (``candidate_key="image"``) or texts (``"text"``).
        label: what the query is, for an error (``"query 'q1'"``).

    Raises:
        PromptTooLongError: the numbered prompt does not fit the model's context (the message says which k does).
    """
    messages, images = listwise_prompt(user_template, item_template, query, candidates, candidate_key)
    prompt = render(mllm, messages)
    inputs = _inputs(mllm, [prompt], [images], check=False)  # checked here, with the k that fits
    length = inputs["input_ids"].shape[1]
    if length + 8 > (context_size(mllm) or length + 8):
        none_messages, none_images = listwise_prompt(user_template, item_template, query, [], candidate_key)
        base = _inputs(mllm, [render(mllm, none_messages)], [none_images], check=False)["input_ids"].shape[1]
        check_listwise_length(mllm, length, len(candidates), base, label)
    return number_logprobs(mllm, lambda x, **kw: _forward(mllm, x, **kw), mllm.model, prompt, images, len(candidates),
                           inputs).tolist()
