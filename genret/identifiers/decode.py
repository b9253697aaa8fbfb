"""Trie-constrained beam search: an MLLM's ranked list of items, every one a valid identifier.

Hugging Face ``generate`` runs the beam search; a ``prefix_allowed_tokens_fn`` lets each beam extend
only with the tokens :meth:`Trie.allowed` gives for what it has generated so far, so every finished
beam is an identifier of the trie. The cost of a query grows with the identifier length and the beam
width, not with the gallery size.

Example::

    messages = [{"role": "user", "content": [{"type": "text", "text": "a red circle left of a blue square"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt], return_tensors="pt")
    [hits] = constrained_beam_search(model, inputs, trie, num_beams=10)
    hits[0].item_id, hits[0].score   # the best item and its log-probability
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from genret.identifiers.trie import Trie


# Every generation setting that could reshape a beam's log-probabilities, set to what leaves them alone.
# ``generate`` fills any setting it is not given from the checkpoint's generation_config.json, and real
# checkpoints ship such settings (Qwen2.5-VL: repetition_penalty 1.05 moves beam scores by over a nat).
NEUTRAL_GENERATION = {
    "do_sample": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "typical_p": 1.0, "min_p": None,
    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "renormalize_logits": False,
    "diversity_penalty": 0.0, "min_length": 0, "min_new_tokens": 0, "suppress_tokens": [],
    "begin_suppress_tokens": [], "exponential_decay_length_penalty": None, "guidance_scale": None,
}


@dataclass(frozen=True)
class Decoded:
    """One returned beam.

    Attributes:
        item_id: the item whose identifier the beam spells, or None (unconstrained decoding off the trie).
        score: ``log P(identifier | prompt)`` under the model (the sum of its tokens' log-probabilities with
            the default ``length_penalty=0``), not renormalised over the trie's allowed tokens.
        tokens: the generated token ids, eos included when the beam ended on it.
    """

    item_id: str | None
    score: float
    tokens: tuple[int, ...]


def _tries_per_row(trie: Trie | Sequence[Trie] | None, batch: int) -> list[Trie | None]:
    if trie is None or isinstance(trie, Trie):
        return [trie] * batch
    tries = list(trie)
    if len(tries) != batch:
        raise ValueError(f"{len(tries)} tries for {batch} prompts: give one trie, or one per prompt")
    return tries


@torch.inference_mode()
def constrained_beam_search(model, inputs: Mapping[str, Any], trie: Trie | Sequence[Trie] | None,
                            num_beams: int = 10, num_return_sequences: int | None = None, constrain: bool = True,
                            length_penalty: float = 0.0, max_new_tokens: int | None = None,
                            eos_token_id: int | None = None, **generate_kwargs) -> list[list[Decoded]]:
    """Beam search whose every returned sequence is an identifier of ``trie``, ranked best first.

    Args:
        model: a transformers model with ``generate`` (image-text-to-text or causal LM, peft-wrapped or not).
        inputs: the prompt's model inputs (a processor's or tokenizer's output: ``input_ids``,
            ``attention_mask``, ``pixel_values``, ...), one row per query. Rows of different lengths must be
            padded on the left, as generation needs.
        trie: the identifiers to decode (one trie, or one per query row, e.g. each query's prefilter top-k
            via :meth:`Trie.subset`); ``None`` decodes unconstrained and returns every item id as None.
        num_beams: the beam width.
        num_return_sequences: how many beams to return per query (at most ``num_beams``, default all).
        constrain: False decodes unconstrained but still maps the sequences that are identifiers to their
            items (the others get None): what constraining costs and buys.
        length_penalty: the beam score's length normalisation; 0 ranks by the identifier's total log-probability.
        max_new_tokens: defaults to the longest identifier's length; required when ``trie`` is None.
        eos_token_id: the token that ends an identifier; defaults to the trie's, else the model's.
        **generate_kwargs: passed on to ``model.generate``. Settings the checkpoint's generation config
            would add (repetition penalty, sampling, minimum lengths) are neutralised
            (:data:`NEUTRAL_GENERATION`), so a beam's score is its identifier's log-probability.

    Returns:
        Per query, the decoded items, best first, each item once; beams the constraint left no valid
        continuation (fewer identifiers than beams) are dropped, so a list may be shorter than requested.
    """
    inputs = dict(inputs)
    if "attention_mask" in inputs and not bool(inputs["attention_mask"][:, -1].all()):
        raise ValueError("the prompts are right-padded: pad them on the left for generation "
                         "(tokenizer.padding_side = 'left')")
    if "input_ids" not in inputs and "inputs_embeds" not in inputs:
        raise ValueError(f"the inputs hold no input_ids or inputs_embeds (keys: {', '.join(inputs)})")
    batch = int((inputs["input_ids"] if "input_ids" in inputs else inputs["inputs_embeds"]).shape[0])
    tries = _tries_per_row(trie, batch)
    known = [t for t in tries if t is not None]
    if max_new_tokens is None:
        if not known:
            raise ValueError("unconstrained decoding without a trie needs max_new_tokens")
        max_new_tokens = max(t.max_length for t in known)
    if eos_token_id is None:
        eos_token_id = next((t.eos for t in known if t.eos is not None), None)
    if eos_token_id is None:
        eos_token_id = model.generation_config.eos_token_id
    if isinstance(eos_token_id, (list, tuple)):
        eos_token_id = eos_token_id[0]
    num_return_sequences = num_return_sequences or num_beams
    if num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences ({num_return_sequences}) must not exceed num_beams ({num_beams})")
    # Decoder-only models return the prompt too; with inputs_embeds alone they return only new tokens.
    prompt_len = int(inputs["input_ids"].shape[1]) if "input_ids" in inputs else 0
    cache: list[dict[tuple[int, ...], torch.Tensor]] = [{} for _ in tries]
    dead_end = torch.tensor([eos_token_id])

    def allowed(batch_id: int, sent: torch.Tensor) -> torch.Tensor:
        prefix = tuple(sent[prompt_len:].tolist())
        found = cache[batch_id].get(prefix)
        if found is None:
            tokens = tries[batch_id].allowed(prefix)
            # A beam off the trie (its score is already -inf: fewer identifiers than beams) must still get a token.
            found = torch.from_numpy(tokens.astype("int64")) if len(tokens) else dead_end
            cache[batch_id][prefix] = found
        return found

    constrained = constrain and known
    if constrained and any(t is None for t in tries):
        raise ValueError("constrained decoding needs a trie for every prompt")
    settings = {**NEUTRAL_GENERATION, **generate_kwargs}
    out = model.generate(**inputs, num_beams=num_beams, num_return_sequences=num_return_sequences,
                         prefix_allowed_tokens_fn=allowed if constrained else None,
                         max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, length_penalty=length_penalty,
                         output_scores=True, return_dict_in_generate=True, **settings)
    generated = out.sequences[:, prompt_len:].tolist()
    scores = out.sequences_scores.tolist()
    results: list[list[Decoded]] = []
    for q in range(batch):
        seen: set = set()
        hits = []
        for r in range(q * num_return_sequences, (q + 1) * num_return_sequences):
            tokens = generated[r]
            if eos_token_id in tokens:
                tokens = tokens[: tokens.index(eos_token_id) + 1]
            item = tries[q].lookup(tokens) if tries[q] is not None else None
            # -1e9 and below: beams HF keeps alive but never completed (scores start there), or masked ones.
            if (constrained and item is None) or not scores[r] > -1e9:
                continue
            key = item if item is not None else tuple(tokens)
            if key not in seen:
                seen.add(key)
                hits.append(Decoded(item, float(scores[r]), tuple(tokens)))
        results.append(sorted(hits, key=lambda h: -h.score))
    return results
