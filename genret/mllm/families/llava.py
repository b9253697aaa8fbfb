"""LLaVA (``llava-hf/*``, and genret's mini MLLM): a CLIP vision tower, a projector, a Llama-style LM."""

from __future__ import annotations

from genret.mllm.families.base import Family, register


class LlavaFamily(Family):
    """``LlavaForConditionalGeneration``: one ``<image>`` placeholder per image, expanded to its patches."""

    name = "llava"
    model_types = ("llava",)


LLAVA = register(LlavaFamily())
