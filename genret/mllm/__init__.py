"""Multimodal LLM backend: loading, model families, LoRA adapters, batched scoring."""

from genret.mllm.backend import MLLM, MLLMConfig, MLLMLoadConfig
from genret.mllm.context import PromptTooLongError, context_size

__all__ = ["MLLM", "MLLMConfig", "MLLMLoadConfig", "PromptTooLongError", "context_size"]
