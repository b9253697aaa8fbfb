"""Qwen3-VL (dense and MoE): Qwen2-VL's native-resolution layout with 16 px patches, DeepStack, interleaved M-RoPE.

- Prompt and images: as Qwen2-VL (:mod:`genret.mllm.families.qwen2_vl`): ``<|vision_start|><|image_pad|>
  <|vision_end|>`` per image, ``<|image_pad|>`` expanded to one token per merged 2×2 block; with 16 px patches
  a token covers 32×32 pixels (tokens ≈ pixels / 1024). The checkpoints' ``min_pixels`` of 65,536 makes even a
  64 px image 8×8 = 64 tokens.
- Positions: Qwen3-VL's ``get_rope_index`` gives an image the same (t, row, col) positions as Qwen2-VL's and
  resumes text at the same offset (the interleaving of the three axes is inside the rotary embedding, not in the
  positions), so Qwen2-VL's explicit ``position_ids`` apply unchanged.
- DeepStack: the vision tower also returns one feature map per ``deepstack_visual_indexes`` layer (three in the
  released checkpoints), which the language model adds to its hidden states at the image tokens after its first
  layers. A cached feature must carry them: :meth:`~Qwen3VLFamily.image_features` returns
  ``(1 + levels, rows, cols, hidden)`` per image, the projected features first, then each DeepStack level.
  The forward gets cached features as the model's own ``mm_encoder_outputs`` (the precomputed-encoder input of
  transformers' Qwen3-VL) beside embeddings whose image tokens still hold the image token's embedding: the
  model finds them there, writes the features and adds the DeepStack levels exactly as it does for pixels. (``visual_pos_masks``/``deepstack_visual_embeds`` cannot be
  passed from outside: ``Qwen3VLModel.forward`` sets them itself.) A shared prefix and its suffixes each get the
  features of the image tokens they hold (:meth:`~Qwen3VLFamily.feature_kwargs`).
"""

from __future__ import annotations

from typing import Any

import torch

from genret.mllm.families.base import register
from genret.mllm.families.qwen2_vl import Qwen2VLFamily, _merge_size

# The per-token features of cached images in scoring's inputs: (1 + levels, image tokens, hidden), in prompt order.
VISUAL_FEATURES = "visual_features"


def _levels(model) -> int:
    return len(model.config.vision_config.deepstack_visual_indexes)


class Qwen3VLFamily(Qwen2VLFamily):
    """``Qwen3VLForConditionalGeneration`` and ``Qwen3VLMoeForConditionalGeneration``."""

    name = "qwen3_vl"
    model_types = ("qwen3_vl", "qwen3_vl_moe")
    # Language-model attention only (the vision tower's are qkv/proj; the MoE experts are not Linear modules).
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    model_writes_features = True
    more_projectors = ("deepstack_merger_list",)  # the DeepStack levels' mergers train with the main one
    processor_options = {
        "min_pixels": "fewest pixels an image is resized to (Qwen3-VL, Qwen3.5: 65,536 = 256×256, i.e. at least 64 "
                      "tokens)",
        "max_pixels": "most pixels an image is resized to; tokens ≈ pixels / 1024 (Qwen3-VL's and Qwen3.5's "
                      "16,777,216 makes a phone photo ~12,000 tokens; 256*32*32 bounds it at 256)",
    }

    def image_features(self, model, image_inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per image, ``(1 + levels, rows, cols, hidden)``: the merged grid's features, then each DeepStack level."""
        grid = image_inputs["image_grid_thw"]
        out = model.get_image_features(pixel_values=image_inputs["pixel_values"], image_grid_thw=grid)
        m = _merge_size(model)
        shaped = []
        for i, (t, h, w) in enumerate(grid.tolist()):
            if t != 1:
                raise ValueError(f"an image's temporal grid must be 1, got {t} (videos are not supported)")
            levels = [out.pooler_output[i], *(level[i] for level in out.deepstack_features)]
            shaped.append(torch.stack(levels).reshape(len(levels), h // m, w // m, levels[0].shape[-1]))
        return shaped

    def feature_embeds(self, feature: torch.Tensor) -> torch.Tensor:
        """The projected features ``(tokens, hidden)``: level 0 of :meth:`image_features`' layout."""
        if feature.dim() != 4:
            raise ValueError(f"Qwen3-VL cached features must be (1 + DeepStack levels, rows, cols, hidden) as "
                             f"image_features returns, got shape {tuple(feature.shape)}; recompute the feature cache")
        return feature[0].reshape(-1, feature.shape[-1])

    def feature_inputs(self, model, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``image_grid_thw`` from each feature's shape, and every image token's features with its DeepStack levels."""
        m, levels = _merge_size(model), 1 + _levels(model)
        grids = []
        for f in features:
            self.feature_embeds(f)  # checks the layout
            if f.shape[0] != levels:
                raise ValueError(f"a cached Qwen3-VL feature has {f.shape[0]} levels, this model takes {levels} (its "
                                 "features and DeepStack layers): the cache was made by another model; recompute it")
            grids.append([1, f.shape[1] * m, f.shape[2] * m])
        return {"image_grid_thw": torch.tensor(grids, dtype=torch.long),
                VISUAL_FEATURES: torch.cat([f.reshape(levels, -1, f.shape[-1]) for f in features], dim=1)}

    def feature_kwargs(self, model, inputs: dict[str, torch.Tensor], rows=slice(None), start: int = 0,
                       end: int | None = None) -> dict[str, Any]:
        """``mm_encoder_outputs`` of the cached features of the image tokens in ``rows``, positions ``start:end``.

        The model finds the image tokens in the embeddings (where :func:`genret.mllm.scoring._inputs` left the
        image token's embedding: :attr:`model_writes_features`), writes the features there and adds their DeepStack
        levels after its first layers, as it does for pixels. Nothing where the rows hold no image token.
        """
        feats = inputs.get(VISUAL_FEATURES)
        if feats is None:
            return {}
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        ids = inputs["input_ids"]
        is_image = ids == self.image_token_id(model)
        if int(is_image.sum()) != feats.shape[1]:
            raise ValueError(f"the prompts hold {int(is_image.sum())} image tokens for {feats.shape[1]} feature vectors")
        packed = (is_image.flatten().cumsum(0) - 1).view_as(ids)  # each image token's row in ``feats``
        part = is_image[rows, start:end]
        if not bool(part.any()):
            return {}
        chosen = feats[:, packed[rows, start:end][part].to(feats.device)].to(model.device)
        encoded = BaseModelOutputWithDeepstackFeatures(pooler_output=(chosen[0],),
                                                       deepstack_features=[(level,) for level in chosen[1:]])
        return {"mm_encoder_outputs": {"image": encoded}}

    def forward_kwargs(self, model, input_ids: torch.Tensor, image_inputs: dict | None,
                       attention_mask: torch.Tensor | None = None) -> dict[str, Any]:
        """Explicit multimodal RoPE ``position_ids``, and cached features with their DeepStack levels."""
        extra = super().forward_kwargs(model, input_ids, image_inputs, attention_mask)
        if image_inputs and VISUAL_FEATURES in image_inputs:
            extra.update(self.feature_kwargs(model, {"input_ids": input_ids, **image_inputs}))
        return extra


QWEN3_VL = register(Qwen3VLFamily())
