"""Model families, one module each, registered by transformers ``model_type``."""

from genret.mllm.families import gemma3, idefics3, llava, llava_onevision, qwen2_vl, qwen3_5, qwen3_vl  # noqa: F401  (registers)
from genret.mllm.families.base import FAMILIES, Family, family_for_type, family_of, register

__all__ = ["FAMILIES", "Family", "family_for_type", "family_of", "register"]
