"""Qwen2-VL and Qwen2.5-VL: a native-resolution ViT, a 2×2 patch merger, a Qwen2 LM with multimodal RoPE.

- Prompt: the chat template writes ``<|vision_start|><|image_pad|><|vision_end|>`` per image; the
  processor expands ``<|image_pad|>`` to ``grid_thw.prod() // merge_size**2`` tokens, one per merged
  2×2 block of patches. :meth:`~Qwen2VLFamily.image_token` is ``<|image_pad|>``, the part that expands.
- Images: the processor returns ``pixel_values`` (patches of every image, flat) and ``image_grid_thw``
  (per image: 1, patch rows, patch columns).
- Positions: text tokens count up on all three RoPE axes; an image's tokens take (t, row, col)
  positions offset by where the image starts, and the text after it resumes at that offset plus
  ``max(rows, cols)``. The model derives this from ``input_ids``, ``mm_token_type_ids`` and the grids,
  which it cannot do from ``inputs_embeds``; so this family always passes explicit ``position_ids``
  (computed here, the same way as ``get_rope_index``), with PIL images and with cached features alike.
- Cached features keep the merged grid's layout, ``(rows, cols, hidden)`` per image, rather than
  ``(tokens, hidden)``: the grid multimodal RoPE needs is then rebuilt from the tensor's shape
  (``grid_thw = (1, rows·merge, cols·merge)``), for any aspect ratio and without a side table.
"""

from __future__ import annotations

from typing import Any

import torch

from genret.mllm.families.base import Family, register


def _merge_size(model) -> int:
    return int(model.config.vision_config.spatial_merge_size)


class Qwen2VLFamily(Family):
    """``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``."""

    name = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    # Language-model attention only: the vision tower names its projections qkv/proj.
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    vision_tower_name, projector_name = "visual", "merger"  # the merger sits inside the tower
    # fp16 overflows (transformers#33294: "!!!!" from Qwen2-VL; Qwen2.5-VL and the Qwen3 families it is the base of
    # inherit it: vllm#13817 for Qwen2.5-VL); "auto" takes float32 on a GPU without bf16.
    fp16_safe = False
    processor_options = {
        "min_pixels": "fewest pixels an image is resized to (Qwen2-VL: 3136 = 56×56)",
        "max_pixels": "most pixels an image is resized to; tokens ≈ pixels / 784 (Qwen2-VL's 12,845,056 makes a "
                      "phone photo ~15,500 tokens; 512*28*28 bounds it at 512)",
    }

    def processor_load_kwargs(self, options: dict) -> dict:
        """Pixel bounds are not passed at loading: transformers 5 deprecates min/max_pixels in a processor call."""
        return {k: v for k, v in options.items() if k not in ("min_pixels", "max_pixels")}

    def apply_processor_options(self, processor, options: dict) -> None:
        """min/max_pixels become the image processor's ``size`` (its shortest/longest edge, in pixels)."""
        if "min_pixels" in options or "max_pixels" in options:
            size = dict(processor.image_processor.size)
            size = {"shortest_edge": options.get("min_pixels", size.get("shortest_edge")),
                    "longest_edge": options.get("max_pixels", size.get("longest_edge"))}
            processor.image_processor.size = size

    def inline_image(self, processor) -> str:
        """The block the chat template writes for an image."""
        return "<|vision_start|><|image_pad|><|vision_end|>"

    @staticmethod
    def _layout(processor_or_config) -> tuple[int, int, int]:
        c = processor_or_config
        return int(c.patch_size), int(c.merge_size if hasattr(c, "merge_size") else c.spatial_merge_size), \
            int(c.temporal_patch_size)

    def dense_pixels(self, processor, images: list) -> torch.Tensor:
        """The processor's patches put back into ``(batch, channels, height, width)`` (one temporal copy)."""
        inputs = self.image_inputs(processor, images)
        grid = inputs["image_grid_thw"]
        if len(set(map(tuple, grid.tolist()))) != 1 or int(grid[0, 0]) != 1:
            raise ValueError(f"dense pixels need still images of one size; the processor made grids {grid.tolist()}: "
                             "give images of one size")
        p, m, t = self._layout(processor.image_processor)
        _, h, w = grid[0].tolist()
        x = inputs["pixel_values"].reshape(len(images), h // m, w // m, m, m, -1, t, p, p)[:, :, :, :, :, :, 0]
        return x.permute(0, 5, 1, 3, 6, 2, 4, 7).reshape(len(images), -1, h * p, w * p)

    def pixel_inputs(self, model, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Patches laid out as ``Qwen2VLImageProcessor`` lays them (merge blocks in raster order, then channel,
        temporal copy, row, column of each patch), and each image's ``image_grid_thw``."""
        p, m, t = self._layout(model.config.vision_config)
        b, c, hh, ww = pixels.shape
        h, w = hh // p, ww // p
        x = pixels.unsqueeze(1).expand(b, t, c, hh, ww).reshape(b, t, c, h // m, m, p, w // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(b * h * w, c * t * p * p)
        return {"pixel_values": x, "image_grid_thw": torch.tensor([[1, h, w]] * b, dtype=torch.long)}

    def tokens_per_image(self, model, height: int, width: int) -> int:
        """One token per merged block of patches."""
        p, m, _ = self._layout(model.config.vision_config)
        return (height // p // m) * (width // p // m)

    def image_features(self, model, image_inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per image, ``(rows, cols, hidden)``: the merged patch grid after the merger."""
        grid = image_inputs["image_grid_thw"]
        out = model.get_image_features(pixel_values=image_inputs["pixel_values"], image_grid_thw=grid)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        m = _merge_size(model)
        if isinstance(feats, torch.Tensor):  # older transformers: one flat tensor for all images
            feats = torch.split(feats, (grid.prod(-1) // m**2).tolist())
        shaped = []
        for f, (t, h, w) in zip(feats, grid.tolist()):
            if t != 1:
                raise ValueError(f"an image's temporal grid must be 1, got {t} (videos are not supported)")
            shaped.append(f.reshape(h // m, w // m, f.shape[-1]))
        return shaped

    def feature_inputs(self, model, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``image_grid_thw`` rebuilt from each cached feature's ``(rows, cols, hidden)`` shape."""
        m = _merge_size(model)
        grids = []
        for f in features:
            if f.dim() != 3:
                raise ValueError(f"Qwen2-VL cached features must be (rows, cols, hidden) as image_features returns, "
                                 f"got shape {tuple(f.shape)}; recompute the feature cache")
            grids.append([1, f.shape[0] * m, f.shape[1] * m])
        return {"image_grid_thw": torch.tensor(grids, dtype=torch.long)}

    def position_ids(self, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Multimodal RoPE positions ``(3, batch, length)`` of ``inputs`` (ids, mask, ``image_grid_thw``).

        Padding positions are 0. Equals the model's ``get_rope_index`` for images.
        """
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        grid = inputs.get("image_grid_thw")
        grids = iter([] if grid is None else grid.tolist())
        image_id, m = int(model.config.image_token_id), _merge_size(model)
        out = torch.zeros((3, *ids.shape), dtype=torch.long, device=ids.device)
        for b in range(ids.shape[0]):
            is_image = (ids[b][mask[b]] == image_id).tolist()
            chunks, cur, i = [], 0, 0
            while i < len(is_image):
                j = i
                while j < len(is_image) and is_image[j] == is_image[i]:
                    j += 1
                if not is_image[i]:
                    chunks.append(torch.arange(cur, cur + j - i).expand(3, -1))
                    cur += j - i
                else:
                    left = j - i  # adjacent images form one run: take grids until it is covered
                    while left > 0:
                        t, h, w = next(grids, (0, 0, 0))
                        n = t * (h // m) * (w // m)
                        if n == 0 or n > left:
                            raise ValueError("the prompt's image tokens do not match image_grid_thw")
                        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h // m), torch.arange(w // m),
                                                    indexing="ij")
                        chunk = torch.stack([tt, hh, ww]).reshape(3, -1) + cur
                        chunks.append(chunk)
                        cur, left = int(chunk.max()) + 1, left - n
                i = j
            if chunks:
                out[:, b, mask[b]] = torch.cat(chunks, dim=1).to(out.device)
        if next(grids, None) is not None:
            raise ValueError("image_grid_thw has more images than the prompt's image tokens")
        return out

    def forward_kwargs(self, model, input_ids: torch.Tensor, image_inputs: dict | None,
                       attention_mask: torch.Tensor | None = None) -> dict[str, Any]:
        """Explicit multimodal RoPE ``position_ids``: right whether the forward gets ids or embeddings."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if image_inputs and "image_grid_thw" in image_inputs:
            inputs["image_grid_thw"] = image_inputs["image_grid_thw"]
        return {"position_ids": self.position_ids(model, inputs)}

    def next_position_ids(self, model, inputs: dict[str, torch.Tensor], length: int) -> torch.Tensor:
        """``(3, batch, length)``: text positions after each row's largest position so far."""
        start = self.position_ids(model, inputs).amax(dim=(0, 2)).unsqueeze(1) + 1
        return (start + torch.arange(length, device=start.device)).unsqueeze(0).expand(3, -1, -1)


QWEN2_VL = register(Qwen2VLFamily())
