"""LLaVA (``llava-hf/*``, and genret's mini MLLM): a CLIP vision tower, a projector, a Llama-style LM."""

from __future__ import annotations

from genret.mllm.families.base import Family, register


class LlavaFamily(Family):
    """``LlavaForConditionalGeneration``: one ``<image>`` placeholder per image, expanded to its patches."""

    name = "llava"
    model_types = ("llava",)
    processor_options = {
        "size": "{'shortest_edge': N}: resize before the centre crop (llava-1.5: 336)",
        "crop_size": "{'height': N, 'width': N}: must be the vision tower's image_size (llava-1.5: 336)",
    }


LLAVA = register(LlavaFamily())
