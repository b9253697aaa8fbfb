"""GME-Qwen2-VL's reference embedding procedure, step by step, for the parity tests.

Written for genret from ``GmeQwen2VL`` in ``gme_inference.py`` (Alibaba-NLP/gme-Qwen2-VL-2B-Instruct, Apache-2.0;
read in the copy TIGER-AI-Lab/VLM2Vec ``src/model/baseline_backbone/gme/gme_inference.py`` @ 6e1e1d4 and a second
copy of the hub file: ``embed``, ``forward``, ``_fetch_image`` / ``_smart_resize``). Not their text (fetched code
stays out of commits here). That code requires transformers < 4.52; on 5.24 two names moved, and only those are
changed: ``base.visual`` is ``base.model.visual`` and the text decoder ``base.model`` (called with
``inputs_embeds`` and no position ids, so 1-D positions) is ``base.model.language_model``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DEFAULT_INSTRUCTION = "You are a helpful assistant."
MAX_LENGTH = 1800


def _smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 4 * 28 * 28,
                  max_pixels: int = 16384 * 28 * 28) -> tuple[int, int]:
    """``GmeQwen2VL._smart_resize`` (aspect ratios over 200 are not in the tests)."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _fetch_image(image):
    image = image.convert("RGB")
    width, height = image.size
    h, w = _smart_resize(height, width)
    return image.resize((w, h))


@torch.no_grad()
def embed(model, processor, texts: list, images: list, is_query: bool = True, instruction: str | None = None,
          stock_positions: bool = False):
    """``GmeQwen2VL.embed`` then ``forward`` (normalised). ``processor`` is loaded with GME's
    ``min_pixels = 256*28*28``, ``max_pixels = 1280*28*28``; ``stock_positions`` runs the stock multimodal forward
    instead (3-D M-RoPE positions), to show the difference."""
    processor.tokenizer.padding_side = "right"
    input_texts, input_images = [], []
    for t, i in zip(texts, images):
        if not is_query or instruction is None:
            instruction = DEFAULT_INSTRUCTION
        input_str = ""
        if i is None:
            input_images = None
        else:
            input_str += "<|vision_start|><|image_pad|><|vision_end|>"
            input_images.append(_fetch_image(i))
        if t is not None:
            input_str += t
        input_texts.append(f"<|im_start|>system\n{instruction}<|im_end|>\n<|im_start|>user\n{input_str}<|im_end|>\n"
                           "<|im_start|>assistant\n<|endoftext|>")
    inputs = processor(text=input_texts, images=input_images, padding=True, truncation=True, max_length=MAX_LENGTH,
                       return_tensors="pt")
    if stock_positions:
        hidden = model.model(**inputs).last_hidden_state
    else:
        inputs_embeds = model.get_input_embeddings()(inputs["input_ids"])
        if "pixel_values" in inputs:
            pixel_values = inputs["pixel_values"].type(model.model.visual.dtype)
            image_embeds = model.model.visual(pixel_values, grid_thw=inputs["image_grid_thw"]).pooler_output
            image_mask = inputs["input_ids"] == model.config.image_token_id
            inputs_embeds[image_mask] = image_embeds
        hidden = model.model.language_model(input_ids=None, attention_mask=inputs["attention_mask"],
                                            inputs_embeds=inputs_embeds).last_hidden_state
    mask = inputs["attention_mask"]
    if mask[:, -1].sum() == mask.shape[0]:  # left padding (or none)
        out = hidden[:, -1]
    else:
        out = hidden[torch.arange(hidden.shape[0]), mask.sum(dim=1) - 1]
    return F.normalize(out, p=2, dim=1).numpy()
