"""LLaVA-OneVision (``llava-hf/llava-onevision-qwen2-*-ov-hf``): a SigLIP tower on 384 px tiles, a Qwen2 LM.

- Prompt: one ``<image>`` per image; the processor expands it to the image's packed feature count.
- Images: "anyres": each image is resized to its best grid pinpoint and cut into 384 px tiles plus a
  downscaled base view (``pixel_values`` ``(images, tiles, 3, 384, 384)`` and ``image_sizes``); with
  ``anyres_max_9`` a 64 px image already takes ~1,500 tokens, a photo up to ~7,300.
- Features: :meth:`~LlavaOnevisionFamily.image_features` returns each image's packed features (base view,
  then the unpadded tile grid with a newline feature per row), ``(tokens, hidden)``: exactly what the
  model writes into the prompt, so cached features score as the image does. They are computed one
  image at a time (the packed lengths differ by aspect ratio).
- The chat template renders every image before the text; genret writes the placeholders inline
  (:func:`genret.mllm.scoring.render`), so a listwise number stays by its image.
- Positions are plain 1-D.
"""

from __future__ import annotations

import torch

from genret.mllm.families.base import Family, register


class LlavaOnevisionFamily(Family):
    """``LlavaOnevisionForConditionalGeneration``."""

    name = "llava_onevision"
    model_types = ("llava_onevision",)
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")

    def image_inputs(self, processor, images: list) -> dict[str, torch.Tensor]:
        """Tiles ``(images, tiles, 3, H, W)`` and each image's original size."""
        out = processor.image_processor(images=images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]}

    def image_features(self, model, image_inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per image, its packed features ``(tokens, hidden)`` after the projector."""
        config = model.config
        feats = []
        for pixels, size in zip(image_inputs["pixel_values"], image_inputs["image_sizes"]):
            out = model.get_image_features(pixel_values=pixels.unsqueeze(0), image_sizes=size.unsqueeze(0),
                                           vision_feature_layer=config.vision_feature_layer,
                                           vision_feature_select_strategy=config.vision_feature_select_strategy,
                                           vision_aspect_ratio=config.vision_aspect_ratio)
            packed = out.pooler_output if hasattr(out, "pooler_output") else out
            packed = torch.cat(list(packed)) if isinstance(packed, (list, tuple)) else packed
            feats.append(packed.reshape(-1, packed.shape[-1]))
        return feats


LLAVA_ONEVISION = register(LlavaOnevisionFamily())
