"""Scoring (query, candidate) pairs with an MLLM: one forward pass each, no sampling.

- :func:`pointwise_scores`: log P(yes) − log P(no) at the first answer position.
- :func:`generative_scores`: mean log P(text | image) over the text's tokens.
- :func:`listwise_scores`: the k candidates numbered in one prompt; each candidate's score is the
  log-probability of its number as the answer (so the output ranks all k, not just one pick).

Prompts are :class:`genret.prompts.Prompt` tables; ``{image}`` marks where an image goes.
"""

from __future__ import annotations

from typing import Sequence

import torch

from genret.mllm.backend import MLLM


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


def _render(mllm: MLLM, messages: list[dict]) -> str:
    return mllm.processor.apply_chat_template(messages, add_generation_prompt=True)


def _inputs(mllm: MLLM, texts: list[str], images: list[list]) -> dict[str, torch.Tensor]:
    """Right-padded model inputs; images are PIL images, or cached features (tensors) of each image.

    With cached features the vision tower does not run: the prompt's image placeholders are expanded
    to as many tokens as the features have, and the features are written into the embeddings.
    """
    flat = [im for ims in images for im in ims]
    cached = bool(flat) and all(isinstance(im, torch.Tensor) for im in flat)
    if cached:
        texts = [mllm.family.expand_image_tokens(mllm.processor, t, [len(f) for f in ims]) for t, ims in zip(texts, images)]
    kwargs = {"images": flat} if flat and not cached else {}
    tok = mllm.processor.tokenizer
    side, tok.padding_side = tok.padding_side, "right"
    try:
        # The same tokenizer call the processor makes, without the image work.
        inputs = tok(texts, padding=True, return_tensors="pt") if cached \
            else mllm.processor(text=texts, padding=True, return_tensors="pt", **kwargs)
    finally:
        tok.padding_side = side
    inputs = {k: v.to(mllm.device) for k, v in inputs.items() if k != "token_type_ids"}
    if cached:
        ids = inputs["input_ids"]
        embeds = mllm.model.get_input_embeddings()(ids)
        mask = ids == mllm.family.image_token_id(mllm.model)
        embeds[mask] = torch.cat(flat).to(embeds.device, embeds.dtype)
        inputs["inputs_embeds"] = embeds
    return inputs


def _forward(mllm: MLLM, inputs: dict[str, torch.Tensor], **kwargs):
    if "inputs_embeds" in inputs:
        return mllm.model(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"], **kwargs)
    return mllm.model(**inputs, **kwargs)


@torch.inference_mode()
def image_features(mllm: MLLM, images: Sequence, batch_size: int = 32) -> list[torch.Tensor]:
    """Per image, the projected features the language model sees: compute once, score many times."""
    out: list[torch.Tensor] = []
    for s in range(0, len(images), batch_size):
        inputs = mllm.family.image_inputs(mllm.processor, list(images[s:s + batch_size]))
        inputs = {k: v.to(mllm.device) for k, v in inputs.items()}
        out += [f.detach().cpu() for f in mllm.family.image_features(mllm.model, inputs)]
    return out


def _first_token(mllm: MLLM, word: str) -> int:
    ids = mllm.tokenizer(word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"the answer word {word!r} encodes to no token")
    return ids[0]


@torch.inference_mode()
def pointwise_scores(mllm: MLLM, template: str, texts: Sequence[str], images: Sequence, yes: str = "yes",
                     no: str = "no", batch_size: int = 16) -> list[float]:
    """log P(yes) − log P(no) for each (text, image) pair, at the first answer position."""
    yes_id, no_id = _first_token(mllm, yes), _first_token(mllm, no)
    out: list[float] = []
    for s in range(0, len(texts), batch_size):
        prompts = [_render(mllm, user_message(template, text=t)) for t in texts[s:s + batch_size]]
        inputs = _inputs(mllm, prompts, [[im] for im in images[s:s + batch_size]])
        logits = _forward(mllm, inputs).logits
        last = inputs["attention_mask"].sum(dim=1) - 1
        rows = logits[torch.arange(len(prompts)), last].float().log_softmax(-1)
        out += (rows[:, yes_id] - rows[:, no_id]).tolist()
    return out


@torch.inference_mode()
def generative_scores(mllm: MLLM, user_template: str, texts: Sequence[str], images: Sequence,
                      batch_size: int = 16) -> list[float]:
    """Mean log P(text | image) over the text's tokens (and the end-of-turn token)."""
    eos = mllm.tokenizer.eos_token or ""
    out: list[float] = []
    for s in range(0, len(texts), batch_size):
        chunk, ims = list(texts[s:s + batch_size]), [[im] for im in images[s:s + batch_size]]
        prompt = _render(mllm, user_message(user_template))
        starts = _inputs(mllm, [prompt] * len(chunk), ims)["attention_mask"].sum(dim=1)
        inputs = _inputs(mllm, [prompt + t + eos for t in chunk], ims)
        logp = _forward(mllm, inputs).logits[:, :-1].float().log_softmax(-1)
        target = inputs["input_ids"][:, 1:]
        token_logp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        pos = torch.arange(target.shape[1], device=target.device).unsqueeze(0)
        ends = inputs["attention_mask"].sum(dim=1)
        mask = (pos >= (starts - 1).unsqueeze(1)) & (pos < (ends - 1).unsqueeze(1))
        out += ((token_logp * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()
    return out


@torch.inference_mode()
def listwise_scores(mllm: MLLM, user_template: str, item_template: str, query: dict[str, object],
                    candidates: Sequence[object], candidate_key: str) -> list[float]:
    """The log-probability of each candidate's number as the answer to one numbered prompt.

    The prompt is run once; its KV cache is repeated for the k answers, which are scored together.

    Args:
        user_template: with ``{candidates}`` and the query's placeholder.
        item_template: one line per candidate, with ``{number}`` and ``{image}`` or ``{text}``.
        query: ``{"text": ...}`` or ``{"image": PIL image}``.
        candidates: PIL images (``candidate_key="image"``) or texts (``"text"``).
    """
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
    prompt = _render(mllm, user_message(user_template, **values))
    inputs = _inputs(mllm, [prompt], [images])
    out = _forward(mllm, inputs, use_cache=True)
    tok = mllm.tokenizer
    answers = [tok(str(n) + (tok.eos_token or ""), add_special_tokens=False)["input_ids"]
               for n in range(1, len(candidates) + 1)]
    k, width = len(answers), max(len(a) for a in answers)
    first = out.logits[0, -1].float().log_softmax(-1)
    scores = torch.tensor([first[a[0]].item() for a in answers])
    if width > 1:
        ids = torch.full((k, width - 1), tok.pad_token_id or 0, dtype=torch.long, device=mllm.device)
        for i, a in enumerate(answers):
            ids[i, :len(a) - 1] = torch.tensor(a[:-1])
        cache = out.past_key_values
        cache.batch_repeat_interleave(k)
        length = inputs["input_ids"].shape[1]
        mask = torch.ones((k, length + width - 1), dtype=torch.long, device=mllm.device)
        position_ids = torch.arange(length, length + width - 1, device=mllm.device).expand(k, -1)
        logits = mllm.model(input_ids=ids, attention_mask=mask, past_key_values=cache, position_ids=position_ids).logits
        logp = logits.float().log_softmax(-1)
        for i, a in enumerate(answers):
            for j in range(1, len(a)):
                scores[i] += logp[i, j - 1, a[j]].item()
    return scores.tolist()
