"""Qwen3-VL-Reranker's reference scoring procedure, step by step, for the parity tests.

Written for genret from the authors' ``Qwen3VLReranker`` (QwenLM/Qwen3-VL-Embedding, Apache-2.0,
``src/models/qwen3_vl_reranker.py`` at commit 8ce3aab1fbcc7b7143b094f0b2005dd89e7246b9: ``__init__``,
``get_binary_linear``, ``compute_scores``, ``tokenize``, ``format_mm_content``, ``format_mm_instruction``,
``process``) and the image half of ``qwen_vl_utils.vision_process`` it calls (through
:mod:`reference.qwen3_vl_embedding`'s ``fetch_image``: the reranker uses the same factor 32 and the same 4,096 /
1,843,200 pixel bounds). Not the authors' text (their file stays out of the repository, and ``qwen_vl_utils``
imports torchvision); each step names what it follows. Images and texts only (no video), one pair per forward as
``process`` runs them.

Two departures, neither changing a number: the processor is asked for tensors (``return_tensors="pt"``; the
authors' call returns lists, which ``tokenize`` pads into tensors), and the truncation to ``MAX_LENGTH`` is checked
to be a no-op rather than run (every test prompt is far shorter than 10,240 tokens).

Run once against the authors' own file (``Qwen3VLReranker.process`` on the same shrunk checkpoint and inputs,
outside the repository, with ``qwen_vl_utils``' image functions and genret's torchvision-free processor loader):
see docs/real-checkpoints.md, "Reranker checkpoints as shipped".
"""

from __future__ import annotations

import torch

from reference.qwen3_vl_embedding import fetch_image

MAX_LENGTH = 10240  # MAX_LENGTH
SYSTEM = ('Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
          'Note that the answer can only be "yes" or "no".')  # format_mm_instruction's system turn
DEFAULT_INSTRUCTION = "Given a search query, retrieve relevant candidates that answer the query."


def content(text: str | None, image, prefix: str) -> list[dict]:
    """``format_mm_content``: the prefix, then the side's image, then its text; an empty side is ``NULL``."""
    parts = [{"type": "text", "text": prefix}]
    if text is None and image is None:
        return parts + [{"type": "text", "text": "NULL"}]
    if image is not None:
        parts.append({"type": "image", "image": image})
    if text is not None:
        parts.append({"type": "text", "text": text})
    return parts


def conversation(query: dict, document: dict, instruction: str | None) -> list[dict]:
    """``format_mm_instruction``: the fixed system turn; the user turn ``<Instruct>: ...``, the query after
    ``<Query>:``, the document after ``\\n<Document>:``. ``query``/``document``: dicts with ``text``, ``image``."""
    user = [{"type": "text", "text": "<Instruct>: " + (instruction or DEFAULT_INSTRUCTION)}]
    user += content(query.get("text"), query.get("image"), "<Query>:")
    user += content(document.get("text"), document.get("image"), "\n<Document>:")
    return [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]}, {"role": "user", "content": user}]


@torch.no_grad()
def scores(lm, processor, query: dict, documents: list[dict], instruction: str | None = None) -> list[float]:
    """``process``: one forward per (query, document) pair; ``compute_scores`` takes the base model's last hidden
    state at the last position through the yes-minus-no linear layer, then a sigmoid.

    Args:
        lm: ``Qwen3VLForConditionalGeneration`` (float32); the authors keep ``lm.model`` and the LM head's two rows.
        processor: the checkpoint's processor; the authors load it with ``padding_side='left'``.
    """
    vocab = processor.tokenizer.get_vocab()
    weight = lm.lm_head.weight.data[vocab["yes"]] - lm.lm_head.weight.data[vocab["no"]]
    out = []
    for document in documents:
        pair = conversation(query, document, instruction)
        text = processor.apply_chat_template([pair], tokenize=False, add_generation_prompt=True)  # tokenize
        images = [fetch_image(c["image"]) for turn in pair for c in turn["content"] if c["type"] == "image"]
        inputs = processor(text=text, images=images or None, truncation=False, padding=False, do_resize=False,
                           return_tensors="pt")
        assert inputs["input_ids"].shape[1] <= MAX_LENGTH  # truncate_tokens_optimized would change nothing
        hidden = lm.model(**inputs).last_hidden_state[:, -1]
        out.append(torch.sigmoid(hidden @ weight).item())
    return out
