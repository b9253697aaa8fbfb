"""Qwen3-VL-Embedding's reference embedding procedure, step by step, for the parity tests.

Written for genret from the authors' ``Qwen3VLEmbedder`` (QwenLM/Qwen3-VL-Embedding, Apache-2.0,
``src/models/qwen3_vl_embedding.py`` at commit 8ce3aab1fbcc7b7143b094f0b2005dd89e7246b9:
``format_model_input``, ``_preprocess_inputs``, ``_pooling_last``, ``process``) and the image half of the
``qwen_vl_utils.vision_process`` it calls (PyPI ``qwen-vl-utils`` 0.0.14, Apache-2.0: ``fetch_image``,
``smart_resize``, ``to_rgb``). Not their text: their files are not committed here (the workplace keeps fetched
code out of commits, and ``qwen_vl_utils`` imports torchvision, which genret must not depend on); each step below
names the lines it follows. Images and texts only (no video), one instruction per call, as genret uses it.

Run once against the authors' own file (``Qwen3VLEmbedder.process`` on the same shrunk checkpoint and inputs, with
``qwen_vl_utils``' image functions, outside the repository): identical to 0 (max abs difference 0.0) -- see the
issue-26 note.
"""

from __future__ import annotations

import math
import unicodedata

import torch
import torch.nn.functional as F
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel, Qwen3VLPreTrainedModel

MAX_LENGTH = 8192  # MAX_LENGTH
FACTOR = 16 * 2  # IMAGE_FACTOR = IMAGE_BASE_FACTOR * 2
MIN_PIXELS = 4 * FACTOR * FACTOR
MAX_PIXELS = 1800 * FACTOR * FACTOR
DEFAULT_INSTRUCTION = "Represent the user's input."


class Qwen3VLForEmbedding(Qwen3VLPreTrainedModel):
    """The authors' model class: ``self.model = Qwen3VLModel(config)``, so the weights are ``model.*``."""

    def __init__(self, config):
        super().__init__(config)
        self.model = Qwen3VLModel(config)
        self.post_init()

    def forward(self, **inputs):
        return self.model(**inputs)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """``qwen_vl_utils.vision_process.smart_resize``."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def fetch_image(image):
    """``qwen_vl_utils.vision_process.fetch_image`` for a PIL image with the embedder's min/max pixels."""
    image = image.convert("RGB")  # to_rgb (the test images have no alpha)
    width, height = image.size
    h, w = smart_resize(height, width, FACTOR, MIN_PIXELS, MAX_PIXELS)
    return image.resize((w, h))


def conversation(text: str | None, image, instruction: str | None) -> list[dict]:
    """``format_model_input``: system = the instruction (punctuated), user = image then text, or ``NULL``."""
    if instruction:
        instruction = instruction.strip()
        if instruction and not unicodedata.category(instruction[-1]).startswith("P"):
            instruction = instruction + "."
    content = []
    if image is None and text is None:
        content.append({"type": "text", "text": "NULL"})
    if image is not None:
        content.append({"type": "image", "image": image})
    if text is not None:
        content.append({"type": "text", "text": text})
    return [{"role": "system", "content": [{"type": "text", "text": instruction or DEFAULT_INSTRUCTION}]},
            {"role": "user", "content": content}]


@torch.no_grad()
def embed(model: Qwen3VLForEmbedding, processor, inputs: list[dict], normalize: bool = True) -> torch.Tensor:
    """``process``: ``inputs`` are dicts with ``text``, ``image``, ``instruction`` (each optional).

    ``processor`` must pad on the right (the authors load it with ``padding_side='right'``).
    """
    conversations = [conversation(x.get("text"), x.get("image"), x.get("instruction")) for x in inputs]
    text = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)
    images = [fetch_image(c["image"]) for conv in conversations for c in conv[1]["content"] if c["type"] == "image"]
    batch = processor(text=text, images=images or None, truncation=True, max_length=MAX_LENGTH, padding=True,
                      do_resize=False, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"]
    col = mask.shape[1] - mask.flip(dims=[1]).argmax(dim=1) - 1  # _pooling_last
    out = hidden[torch.arange(hidden.shape[0]), col]
    return F.normalize(out, p=2, dim=-1) if normalize else out
