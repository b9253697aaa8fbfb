"""MonoQwen2-VL's scoring as its model card gives it, re-implemented for genret's parity tests.

Source: the usage example of https://huggingface.co/lightonai/MonoQwen2-VL-v0.1 (model card; Apache-2.0; revision
c8db55c, per docs/notes/issue-26-sources.md). The card's page could not be fetched from this workplace; its example
was read in several independent copies of it in public repositories (find_string ids 28185276821, 28291640542,
16082609700, 15979580683: the same lines and comments). Written here for genret, step by step as the example runs
(not its text):

1. the processor of Qwen/Qwen2-VL-2B-Instruct; the model loaded with ``Qwen2VLForConditionalGeneration
   .from_pretrained`` on the adapter repository (transformers' PEFT integration loads the base and the LoRA);
2. one user turn: the image, then the text :data:`PROMPT` with the query; the chat template applied with the
   generation prompt, untokenized; the processor called on that text and the image, PyTorch tensors;
3. one forward; the logits at the last position; the vocabulary ids of ``True`` and ``False``
   (``convert_tokens_to_ids``); the softmax over those two logits; the first entry, P(True), is the score.

Two things differ from the card, for this machine only: the processor object is passed in (without torchvision,
``AutoProcessor`` on a Qwen2-VL folder returns the bare tokenizer, so the test builds the same processor class from
the same files), and the model path is the shrunk adapter's. The model loads as the card loads it: transformers'
own PEFT integration reads the adapter folder, loads its base and applies the LoRA unmerged.
"""

from __future__ import annotations

import torch

PROMPT = ("Assert the relevance of the previous image document to the following query, "
          "answer True or False. The query is: {query}")


def load_model(adapter_dir: str):
    """The model as the card loads it: ``Qwen2VLForConditionalGeneration.from_pretrained(<the adapter>)``."""
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(adapter_dir, dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def card_score(model, processor, query: str, image) -> float:
    """P(True) for one (query, image document) pair, line by line as the card computes it."""
    prompt = PROMPT.format(query=query)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=text, images=image, return_tensors="pt")
    outputs = model(**inputs)
    logits_for_last_token = outputs.logits[:, -1, :]
    true_token_id = processor.tokenizer.convert_tokens_to_ids("True")
    false_token_id = processor.tokenizer.convert_tokens_to_ids("False")
    relevance_score = torch.softmax(logits_for_last_token[:, [true_token_id, false_token_id]], dim=-1)
    return relevance_score[0, 0].item()
