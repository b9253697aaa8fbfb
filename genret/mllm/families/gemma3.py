"""Gemma 3 (``google/gemma-3-*-it``, 4B and up): a SigLIP tower at 896 px, a 4×4 average pool, a Gemma 3 LM.

- Prompt: the chat template writes ``<start_of_image>`` per image (a system message is folded into the
  first user turn, text parts are trimmed, the answer follows ``<start_of_turn>model\\n``); the processor
  expands each to ``\\n\\n<start_of_image>`` + ``<image_soft_token>`` × 256 + ``<end_of_image>\\n\\n``.
  :meth:`~Gemma3Family.image_token` is ``<start_of_image>`` (what the prompt carries); the id the features
  fill is the soft token's (``config.image_token_id``).
- Images: every image is resized to 896×896 (64×64 patches of 14 px), pooled to 16×16: always 256 tokens,
  whatever its size or aspect ratio (pan-and-scan crops are off, as the checkpoints ship).
- Attention: an image's tokens attend to each other both ways (``token_type_ids`` mark them; without them
  the model attends causally and scores differ), and 5 of every 6 layers see a sliding window (1,024 tokens
  on the 4B). The mask reads ``token_type_ids`` by absolute position, so a forward over a continuation
  after a KV cache gets them from the sequence's start (:meth:`~Gemma3Family.prefix_kwargs`).
- Positions are plain 1-D; the template writes the tokenizer's ``<bos>`` (genret renders it once).
"""

from __future__ import annotations

from typing import Any

import torch

from genret.mllm.families.base import Family, register


class Gemma3Family(Family):
    """``Gemma3ForConditionalGeneration``."""

    name = "gemma3"
    model_types = ("gemma3",)
    # The Gemma 3 LM's attention; the SigLIP tower's q/k/v share these names (its output is out_proj).
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    vision_tower_name, projector_name = "vision_tower", "multi_modal_projector"
    fp16_safe = False  # empty or NaN output in float16 (transformers#36822; vLLM refuses Gemma 3 in fp16)

    def prepare_feature_cache(self, processor) -> str | None:
        """Turn pan-and-scan off (a checkpoint that ships it on): a cached feature is one 896 px view, 256 tokens."""
        if not getattr(processor.image_processor, "do_pan_and_scan", False):
            return None
        processor.image_processor.do_pan_and_scan = False
        return ("do_pan_and_scan turned off for cached image features: every image is one 896 px view of "
                f"{processor.image_seq_length} tokens (set cache_features = false to keep the crops)")

    def image_inputs(self, processor, images: list) -> dict[str, torch.Tensor]:
        """``pixel_values`` ``(images, 3, 896, 896)``; refuses pan-and-scan crops (their layout is not cached)."""
        ip = processor.image_processor  # settings the preprocessor config leaves null: the processor's defaults
        defaults = {k: v for k, v in getattr(processor, "images_kwargs", {}).items() if getattr(ip, k, None) is None}
        out = ip(images=images, return_tensors="pt", **defaults)
        if out.get("num_crops") is not None and torch.as_tensor(out["num_crops"]).any():
            raise ValueError("Gemma 3 features of pan-and-scan crops cannot be cached (each image would be several "
                             "views); set do_pan_and_scan=false in the preprocessor config, or score without cached "
                             "features")
        return {"pixel_values": out["pixel_values"]}

    def processor_images(self, rows: list[list]) -> list:
        """The rows themselves: Gemma 3's processor matches images to prompts by nesting (a flat list is one prompt's)."""
        return [list(row) for row in rows]

    def expand_image_tokens(self, processor, text: str, n_tokens: list[int]) -> str:
        """Replace each ``<start_of_image>`` by the processor's image block of ``n_tokens[i]`` soft tokens."""
        token = self.image_token(processor)
        parts = text.split(token)
        if len(parts) - 1 != len(n_tokens):
            raise ValueError(f"prompt has {len(parts) - 1} image placeholders for {len(n_tokens)} images")
        tok = processor.tokenizer
        out = parts[0]
        for n, rest in zip(n_tokens, parts[1:]):
            if n != processor.image_seq_length:
                raise ValueError(f"a Gemma 3 image feature has {n} tokens, the processor's image_seq_length is "
                                 f"{processor.image_seq_length}: recompute the feature cache")
            out += f"\n\n{tok.boi_token}{tok.image_token * n}{tok.eoi_token}\n\n" + rest
        return out

    def token_type_ids(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        """1 on image soft tokens, 0 elsewhere: what the processor returns, from the ids alone."""
        return (input_ids == self.image_token_id(model)).long()

    def forward_kwargs(self, model, input_ids: torch.Tensor, image_inputs: dict | None,
                       attention_mask: torch.Tensor | None = None) -> dict[str, Any]:
        """``token_type_ids``: bidirectional attention within each image, with PIL images and cached features alike."""
        return {"token_type_ids": self.token_type_ids(model, input_ids)}

    def prefix_kwargs(self, model, input_ids: torch.Tensor) -> dict[str, Any]:
        """``token_type_ids`` from the sequence's start to the end of the part being run (the mask reads them by
        absolute position, after a KV cache too)."""
        return {"token_type_ids": self.token_type_ids(model, input_ids)}

    def generate_inputs(self, model, inputs: dict) -> dict:
        """The processor's outputs for ``generate``, with ``token_type_ids`` (rebuilt from the ids)."""
        out = {k: v for k, v in inputs.items() if k not in ("token_type_ids", "num_crops")}
        out["token_type_ids"] = self.token_type_ids(model, out["input_ids"])
        return out

    def position_ids(self, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Plain positions ``(batch, length)``, 0 onwards on every (right-padded) row."""
        ids = inputs["input_ids"]
        return torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)


GEMMA3 = register(Gemma3Family())
