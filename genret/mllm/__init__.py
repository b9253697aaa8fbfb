"""Multimodal LLM backend: loading, model families, LoRA adapters, batched scoring."""

from genret.mllm.backend import MLLM, MLLMConfig, MLLMLoadConfig

__all__ = ["MLLM", "MLLMConfig", "MLLMLoadConfig"]
