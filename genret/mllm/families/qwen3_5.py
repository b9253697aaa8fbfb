"""Qwen3.5 (and Qwen3.6): natively multimodal, Qwen3-VL's vision side and a hybrid Gated-DeltaNet language model.

- Prompt and images: as Qwen3-VL (:mod:`genret.mllm.families.qwen3_vl`, the same ``Qwen3VLProcessor``):
  ``<|vision_start|><|image_pad|><|vision_end|>`` per image, 16 px patches merged 2×2, one image token per 32×32
  pixels (tokens ≈ pixels / 1024), the same multimodal RoPE positions. No DeepStack: every Qwen3.5 checkpoint has
  ``deepstack_visual_indexes = []`` and its tower returns the merged features only, so a cached feature is
  ``(1, rows, cols, hidden)`` (Qwen3-VL's layout with no extra level) and reaches the model as its own encoder output.
- Thinking: the chat template opens a ``<think>`` block after the generation prompt: the 4B and larger checkpoints
  unless told ``enable_thinking=False``, the 0.8B and 2B only when told ``True``. Every answer genret scores or
  generates (yes/no, a caption, a list number, an identifier, a rewrite) follows the closed empty block of the
  no-think form, ``<think>\\n\\n</think>\\n\\n``, whatever the size: :attr:`Qwen3_5Family.chat_template_kwargs`.
- Layers: three Gated-DeltaNet (linear attention) layers to one gated full-attention layer. A linear layer keeps a
  convolution window and a recurrent state instead of keys and values; transformers' cache copies, selects and
  repeats them by batch row, so the shared-prefix and listwise paths run as for attention-only models. Padding:
  transformers zeroes the inputs of padded positions in a linear layer, so with left padding (generation) the
  state stays zero until a row's first token, and right padding (scoring) only follows every token read; a row
  scores and generates as it does alone (tested on the shrunk checkpoint). A forward continuing the cache
  overwrites those states in place, which autograd cannot go back through: with gradients (listwise training) each
  answer runs after the whole prompt instead (:attr:`~Qwen3_5Family.cache_written_in_place`).
- LoRA: the full-attention projections and the Gated-DeltaNet's input and output projections (``in_proj_qkv``,
  ``in_proj_z``, ``out_proj``); its per-head gate projections (``in_proj_a``/``in_proj_b``, hidden → heads) stay
  frozen, as the released quantised checkpoints leave them unquantised.
"""

from __future__ import annotations

import torch

from genret.mllm.families.base import register
from genret.mllm.families.qwen2_vl import _merge_size
from genret.mllm.families.qwen3_vl import Qwen3VLFamily


class Qwen3_5Family(Qwen3VLFamily):
    """``Qwen3_5ForConditionalGeneration`` and ``Qwen3_5MoeForConditionalGeneration``."""

    name = "qwen3_5"
    model_types = ("qwen3_5", "qwen3_5_moe")
    # Full attention and Gated DeltaNet; the vision tower's are qkv/proj/linear_fc*, the MoE experts no Linear.
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "out_proj")
    chat_template_kwargs = {"enable_thinking": False}
    cache_written_in_place = True  # Gated DeltaNet: listwise training runs each answer after its whole prompt
    # processor_options: Qwen3-VL's (the same processor and pixel bounds)

    def image_features(self, model, image_inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per image, ``(1, rows, cols, hidden)``: the merged grid's features (Qwen3-VL's layout, no DeepStack)."""
        grid = image_inputs["image_grid_thw"]
        out = model.get_image_features(pixel_values=image_inputs["pixel_values"], image_grid_thw=grid)
        levels = getattr(out, "deepstack_features", None)
        if levels:  # a Qwen3.5 variant with DeepStack: Qwen3-VL's features carry it
            return super().image_features(model, image_inputs)
        m = _merge_size(model)
        shaped = []
        for feats, (t, h, w) in zip(out.pooler_output, grid.tolist()):
            if t != 1:
                raise ValueError(f"an image's temporal grid must be 1, got {t} (videos are not supported)")
            shaped.append(feats.reshape(1, h // m, w // m, feats.shape[-1]))
        return shaped


QWEN3_5 = register(Qwen3_5Family())
