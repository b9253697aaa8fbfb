"""LLaVA-OneVision (``llava-hf/llava-onevision-qwen2-*-ov-hf``): a SigLIP tower on 384 px tiles, a Qwen2 LM.

- Prompt: one ``<image>`` per image; the processor expands it to the image's packed feature count.
- Images: "anyres": each image is resized to its best grid pinpoint and cut into 384 px tiles plus a
  downscaled base view (``pixel_values`` ``(images, tiles, 3, 384, 384)`` and ``image_sizes``); with
  ``anyres_max_9`` a 64 px image already takes ~1,500 tokens, a photo up to ~7,300.
- Several images in one prompt (a listwise prompt of candidate images): transformers lays each out
  otherwise — the processor, given a prompt's images together (``images=[[a, b, c]]``, its
  ``batch_num_images``), pads each to a square and resizes it to one 384 px view, and the model
  packs that view's 729 features and one newline feature: 730 tokens an image, where anyres would
  take 1,500-7,300. :meth:`~LlavaOnevisionFamily.processor_images` hands the processor each prompt's
  images as a group, so that PIL images get that layout, and
  :meth:`~LlavaOnevisionFamily.several_image_inputs` computes cached features of it.
- Features: :meth:`~LlavaOnevisionFamily.image_features` returns each image's packed features (base view,
  then the unpadded tile grid with a newline feature per row; or the one view and its newline),
  ``(tokens, hidden)``: exactly what the model writes into the prompt, so cached features score as
  the image does. Anyres features are computed one image at a time (the packed lengths differ by
  aspect ratio). A cached feature of the wrong layout for its prompt (an anyres feature among several
  images, a one-view feature alone) is refused: the two token counts never coincide.
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

    def several_image_inputs(self, processor, images: list) -> dict[str, torch.Tensor]:
        """Each image as the processor lays out one of a prompt's several images (one 384 px view, padded square).

        The images go to the image processor as one prompt's group, so that it takes its own multi-image path; a
        lone image is paired with itself there (the layout exists only among two or more), and the pair dropped
        in :meth:`image_features`.
        """
        group = list(images) if len(images) > 1 else list(images) * 2
        out = processor.image_processor(images=[group], return_tensors="pt")
        n = len(images)
        return {"pixel_values": out["pixel_values"][:n], "image_sizes": out["image_sizes"][:n],
                "batch_num_images": torch.tensor([n])}

    def processor_images(self, rows: list[list]) -> list:
        """Each prompt's images as one group: the processor lays an image among several out as one view."""
        return [list(row) for row in rows]

    def image_features(self, model, image_inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per image, its packed features ``(tokens, hidden)`` after the projector."""
        config = model.config
        layout = {"vision_feature_layer": config.vision_feature_layer,
                  "vision_feature_select_strategy": config.vision_feature_select_strategy,
                  "vision_aspect_ratio": config.vision_aspect_ratio}
        if "batch_num_images" in image_inputs:  # several_image_inputs: images among several, one view each
            pixels, sizes = image_inputs["pixel_values"], image_inputs["image_sizes"]
            n = len(sizes)
            if n == 1:  # the model takes this layout only for a prompt of two or more images: pair it with itself
                pixels, sizes = pixels.repeat(2, *[1] * (pixels.dim() - 1)), sizes.repeat(2, 1)
            out = model.get_image_features(pixel_values=pixels, image_sizes=sizes,
                                           batch_num_images=torch.tensor([len(sizes)]), **layout)
            packed = out.pooler_output if hasattr(out, "pooler_output") else out
            return [f.reshape(-1, f.shape[-1]) for f in packed][:n]
        feats = []
        for pixels, size in zip(image_inputs["pixel_values"], image_inputs["image_sizes"]):
            out = model.get_image_features(pixel_values=pixels.unsqueeze(0), image_sizes=size.unsqueeze(0), **layout)
            packed = out.pooler_output if hasattr(out, "pooler_output") else out
            packed = torch.cat(list(packed)) if isinstance(packed, (list, tuple)) else packed
            feats.append(packed.reshape(-1, packed.shape[-1]))
        return feats

    def expand_image_tokens(self, processor, text: str, n_tokens: list[int]) -> str:
        """:meth:`Family.expand_image_tokens`, refusing features of the other layout than the prompt's."""
        view = processor.num_image_tokens + 1 - (processor.vision_feature_select_strategy == "default")
        for n in n_tokens:
            if len(n_tokens) > 1 and n != view:
                raise ValueError(f"a prompt of {len(n_tokens)} images lays each out as one view of {view} tokens "
                                 f"(transformers' multi-image layout); a cached feature has {n}: it was computed for "
                                 "an image alone (anyres): compute it with image_features(..., several=True)")
            if len(n_tokens) == 1 and n == view:
                raise ValueError(f"a prompt's lone image is laid out anyres (base view and tiles); this cached feature "
                                 f"of {view} tokens was computed for an image among several (several=True): compute "
                                 "it for an image alone")
        return super().expand_image_tokens(processor, text, n_tokens)


LLAVA_ONEVISION = register(LlavaOnevisionFamily())
