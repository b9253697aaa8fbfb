"""Dual encoders from transformers checkpoints: CLIP, SigLIP, and any model with get_*_features."""

from __future__ import annotations

import logging

import numpy as np
import torch

from genret._hub import check_model_ref, model_fingerprint
from genret.encoders.base import DualEncoder
from genret.encoders.cache import EmbeddingCache

logger = logging.getLogger(__name__)

# Tokenizer settings a family was trained with: SigLIP pads every text to 64 tokens and pools the
# last position without an attention mask (its own tokenizer returns none).
_SIGLIP_TEXT = {"padding": "max_length", "max_length": 64, "return_attention_mask": False}
TEXT_KWARGS = {"siglip": _SIGLIP_TEXT, "siglip2": _SIGLIP_TEXT}


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _features(out) -> torch.Tensor:
    # transformers 5 returns an output object whose pooler_output is the projected embedding.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class HFDualEncoder(DualEncoder):
    """A transformers dual encoder loaded with ``AutoModel`` and ``AutoProcessor``.

    Args:
        model: a Hugging Face model id or a local directory (for example a ``genret train clip`` output).
        device: ``cpu``, ``cuda``, ``cuda:1``...; default the GPU when there is one.
        dtype: torch dtype name for the weights (``float32``, ``bfloat16``, ``float16``).
        cache: an optional :class:`EmbeddingCache`.
        trust_remote_code: let transformers run code shipped with the checkpoint (off by default).
    """

    backend = "hf"

    def __init__(self, model: str, device: str | None = None, dtype: str = "float32",
                 cache: EmbeddingCache | None = None, trust_remote_code: bool = False) -> None:
        from transformers import AutoModel, AutoProcessor

        ref = check_model_ref(model, "encoder model")
        try:
            self.model = AutoModel.from_pretrained(ref, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
            self.processor = AutoProcessor.from_pretrained(ref, trust_remote_code=trust_remote_code)
        except OSError as err:
            raise FileNotFoundError(f"could not load encoder model {model!r}: {err}") from None
        if not hasattr(self.model, "get_image_features") or not hasattr(self.model, "get_text_features"):
            raise ValueError(f"{model!r} ({type(self.model).__name__}) is not a dual encoder: "
                             "it has no get_image_features/get_text_features")
        if not hasattr(self.processor, "image_processor"):
            raise ValueError(f"{model!r}: AutoProcessor returned {type(self.processor).__name__}, "
                             "without an image processor; is the processor saved in the directory?")
        self.device = device or default_device()
        self.model.to(self.device).eval()
        self.model_type = self.model.config.model_type
        dim = int(getattr(self.model.config, "projection_dim", 0) or self.model.config.text_config.hidden_size)
        super().__init__(str(model), model_fingerprint(ref), dim, cache)

    @torch.inference_mode()
    def _embed_images(self, images: list) -> np.ndarray:
        inputs = self.processor.image_processor(images=images, return_tensors="pt")
        kwargs = {"pixel_values": inputs["pixel_values"].to(self.device, self.model.dtype)}
        # SigLIP 2 NaFlex: each image keeps its aspect ratio as a padded sequence of patches; the model needs
        # which patches are real and the grid they came from.
        for key in ("pixel_attention_mask", "spatial_shapes"):
            if key in inputs:
                kwargs[key] = inputs[key].to(self.device)
        return _features(self.model.get_image_features(**kwargs)).float().cpu().numpy()

    @torch.inference_mode()
    def _embed_texts(self, texts: list[str]) -> np.ndarray:
        kwargs = TEXT_KWARGS.get(self.model_type, {"padding": True})
        tok = self.processor.tokenizer
        limit = kwargs.get("max_length") or tok.model_max_length
        cut = sum(len(ids) > limit for ids in tok(texts, truncation=False)["input_ids"]) if limit < 10_000 else 0
        if cut:  # e.g. a long dialog or rewrite: only its first tokens reach the embedding
            logger.warning("%d of %d texts are longer than the text encoder's %d tokens and were cut to fit",
                           cut, len(texts), limit)
        inputs = tok(texts, truncation=True, return_tensors="pt", **kwargs)
        inputs = {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        return _features(self.model.get_text_features(**inputs)).float().cpu().numpy()
