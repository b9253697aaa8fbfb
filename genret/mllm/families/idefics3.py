"""Idefics3 (and SmolVLM checkpoints of ``model_type`` idefics3): a SigLIP tower, pixel shuffle, a Llama-style LM.

- Prompt: one ``<image>`` per image; the processor replaces it with
  ``<fake_token_around_image><global-img>`` + ``<image>`` × ``image_seq_len`` + ``<fake_token_around_image>``
  when the image is not split. With ``do_image_splitting`` (the image processor's default) an image
  larger than ``max_image_size`` becomes rows × cols tiles plus a downscaled global view, written as
  ``<fake_token_around_image><row_i_col_j>`` + ``<image>`` × ``image_seq_len`` per tile, a newline per
  row, then the global block above.
- Positions are plain 1-D: nothing to add to the forward.
- Cached features: ``(image_seq_len, hidden)`` per image after the connector, for images that are
  not split. Scoring PIL images works with splitting too (the processor lays the tiles out); caching
  features of a split image is refused with an error, because rows × cols cannot be recovered from a
  feature's token count (a 4×1 and a 2×2 split have as many tokens). SmolVLM checkpoints ship with
  ``do_image_splitting`` on (SmolVLM-256M: a 64 px image becomes 4×4 tiles of 512 px plus the global
  view, 17 × 64 = 1,088 tokens), so :meth:`~Idefics3Family.prepare_feature_cache` turns it off for a
  stage that caches features (every image is then one ``max_image_size`` tile, 64 tokens) and says so;
  a stage with ``cache_features = false`` keeps the checkpoint's splitting.
"""

from __future__ import annotations

import torch

from genret.mllm.families.base import Family, register


class Idefics3Family(Family):
    """``Idefics3ForConditionalGeneration``."""

    name = "idefics3"
    model_types = ("idefics3",)
    # The Llama LM's attention; the SigLIP tower's q/k/v share these names (its output is out_proj).
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    vision_tower_name, projector_name = "vision_model", "connector"
    processor_options = {
        "do_image_splitting": "split images larger than max_image_size into tiles plus a global view (the "
                              "checkpoint's default: on; off for cached features)",
        "size": "{'longest_edge': N}: resize so the longest edge is N before splitting (SmolVLM-256M: 2048)",
        "max_image_size": "{'longest_edge': N}: the tile size the vision tower sees (SmolVLM-256M: 512)",
    }

    def prepare_feature_cache(self, processor) -> str | None:
        """Turn image splitting off: cached features must be unsplit (one tile, ``image_seq_len`` tokens)."""
        if not getattr(processor.image_processor, "do_image_splitting", False):
            return None
        processor.image_processor.do_image_splitting = False
        return ("do_image_splitting turned off for cached image features: every image is one "
                f"{processor.image_processor.max_image_size.get('longest_edge')} px tile of {processor.image_seq_len} "
                "tokens (set cache_features = false to keep the checkpoint's tiles)")

    def image_inputs(self, processor, images: list) -> dict[str, torch.Tensor]:
        """Pixel tensors ``(images, tiles, 3, H, W)`` and their pixel masks; refuses split images."""
        out = processor.image_processor(images=[[im] for im in images], return_tensors="pt", return_row_col_info=True)
        rows, cols = out.pop("rows", None), out.pop("cols", None)
        if rows is not None and (torch.as_tensor(rows).any() or torch.as_tensor(cols).any()):
            raise ValueError("Idefics3 features of split images cannot be cached (their tile layout is lost): turn "
                             "splitting off (processor_options do_image_splitting = false), or keep the tiles without "
                             "cached features (cache_features = false: a rerank stage's setting, and train rerank's "
                             "--no-cache-features)")
        return dict(out)

    def expand_image_tokens(self, processor, text: str, n_tokens: list[int]) -> str:
        """Replace each ``<image>`` by the unsplit layout of ``n_tokens[i]`` image tokens."""
        token = self.image_token(processor)
        parts = text.split(token)
        if len(parts) - 1 != len(n_tokens):
            raise ValueError(f"prompt has {len(parts) - 1} image placeholders for {len(n_tokens)} images")
        fake, glob = processor.fake_image_token, processor.global_image_tag
        out = parts[0]
        for n, rest in zip(n_tokens, parts[1:]):
            if n != processor.image_seq_len:
                raise ValueError(f"an Idefics3 image feature has {n} tokens, the processor's image_seq_len is "
                                 f"{processor.image_seq_len}: only unsplit images can be scored from cached features")
            out += fake + glob + token * n + fake + rest
        return out


IDEFICS3 = register(Idefics3Family())
