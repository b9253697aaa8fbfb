"""The miniature world's MLLM, built from a mini CLIP in one of two real interfaces.

- ``llava`` (LLaVA-1.5): ``LlavaForConditionalGeneration``; vision tower the mini CLIP's (weights copied), an MLP
  projector, a small Llama that reads the patch tokens in raster order with 1-D RoPE.
- ``qwen2_vl`` (Qwen2-VL): ``Qwen2VLForConditionalGeneration``; Qwen2-VL's ViT (2-D RoPE, no absolute positions)
  started from the CLIP's patch embedding and blocks, its 2 × 2 patch merger, a small Qwen2 language model whose
  multimodal RoPE gives each image token its row and column.

Tokenizer: byte-level BPE trained on the captions and instructions, holding the interface's real special tokens, with
its chat template. Saved with ``save_pretrained``, it loads through ``AutoModelForImageTextToText`` and genret's
processor loading like the llava-hf or Qwen checkpoint it mimics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from genret.bpe import CHAT_TEMPLATE, train_chat_tokenizer


@dataclass
class MiniMLLMConfig:
    """Architecture of the mini MLLM's language side and interface (the vision side starts from the CLIP's tower)."""

    hidden_size: int = field(default=128, metadata={"help": "language model hidden size"})
    layers: int = field(default=4, metadata={"help": "language model layers"})
    heads: int = field(default=4, metadata={"help": "attention heads"})
    intermediate_size: int = field(default=512, metadata={"help": "MLP width"})
    max_positions: int = field(default=4096, metadata={"help": "context length (listwise prompts hold many images)"})
    vocab_size: int = field(default=1200, metadata={"help": "upper bound of the BPE vocabulary"})
    image_features: str = field(default="default", metadata={"help": "what of the vision tower the language model "
                                "reads (LLaVA's vision_feature_select_strategy): default, the patch tokens (LLaVA-1.5); "
                                "full, the class token too, whose last state carries the CLIP's pooled summary"})
    interface: str = field(default="llava", metadata={"help": "how the language model reads the image: llava "
                           "(LLaVA-1.5: projected patch tokens, 1-D positions) or qwen2_vl (Qwen2-VL: 2 x 2 merged "
                           "patches with multimodal RoPE, each token's row and column)"})
    vision_layer: int = field(default=-1, metadata={"help": "which of the vision tower's hidden states the projector "
                              "reads (LLaVA's vision_feature_layer; -1 the last, LLaVA-1.5 reads -2; earlier layers "
                              "keep more of each patch's place)"})

    def __post_init__(self) -> None:
        if self.hidden_size % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide hidden_size ({self.hidden_size})")
        if self.interface not in ("llava", "qwen2_vl"):
            raise ValueError(f"interface must be llava or qwen2_vl, got {self.interface!r}")
        if self.interface != "llava" and (self.image_features, self.vision_layer) != ("default", -1):
            raise ValueError("image_features and vision_layer are LLaVA's settings; leave them at default and -1 for "
                             f"interface {self.interface}")
        if self.image_features not in ("default", "full"):
            raise ValueError(f"image_features must be default or full, got {self.image_features!r}")
        if self.vision_layer >= 0:
            raise ValueError(f"vision_layer counts from the tower's last hidden state (-1), back; got {self.vision_layer}")


def build_mini_mllm(clip_dir: str | Path, texts: Iterable[str], config: MiniMLLMConfig = MiniMLLMConfig()):
    """An MLLM whose vision side starts from the mini CLIP's tower, with a fresh small language model.

    Args:
        clip_dir: a ``genret train clip`` checkpoint (any ``CLIPModel`` directory).
        texts: captions and instructions the tokenizer is trained on.
        config: the language model's size.

    Returns:
        ``(model, processor)``, ready for ``save_pretrained``.
    """
    from transformers import (AutoProcessor, CLIPModel, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)

    clip = CLIPModel.from_pretrained(clip_dir)
    clip_processor = AutoProcessor.from_pretrained(clip_dir)
    if config.interface == "qwen2_vl":
        return _build_qwen2_vl(clip, clip_processor, texts, config)
    tokenizer = train_chat_tokenizer(texts, config.vocab_size)
    vision = clip.config.vision_config
    if -config.vision_layer > vision.num_hidden_layers + 1:
        raise ValueError(f"vision_layer {config.vision_layer}: {clip_dir}'s tower has {vision.num_hidden_layers} layers "
                         f"(hidden states -1 .. -{vision.num_hidden_layers + 1})")
    patches = (vision.image_size // vision.patch_size) ** 2 + (config.image_features == "full")
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=config.hidden_size, num_hidden_layers=config.layers,
                       num_attention_heads=config.heads, num_key_value_heads=config.heads,
                       intermediate_size=config.intermediate_size, max_position_embeddings=config.max_positions,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    llava_config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                               image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=patches,
                               vision_feature_layer=config.vision_layer,
                               vision_feature_select_strategy=config.image_features)
    model = LlavaForConditionalGeneration(llava_config)
    model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    # num_additional_image_tokens=1: the CLS token ("default" drops it again), so the processor expands <image> to
    # exactly the features the model produces.
    processor = LlavaProcessor(image_processor=clip_processor.image_processor, tokenizer=tokenizer,
                               patch_size=vision.patch_size, vision_feature_select_strategy=config.image_features,
                               chat_template=CHAT_TEMPLATE.read_text(), image_token="<image>",
                               num_additional_image_tokens=1)
    return model, processor


def mrope_section(head_dim: int) -> list[int]:
    """Qwen2-VL's split of a head's rotary half over (time, row, column), 16 / 24 / 24 of 64, at ``head_dim``."""
    half = head_dim // 2
    rows = half * 3 // 8
    return [half - 2 * rows, rows, rows]


def _build_qwen2_vl(clip, clip_processor, texts: Iterable[str], config: MiniMLLMConfig):
    """Qwen2-VL at the CLIP tower's width and depth; the tower's patch embedding and blocks copied in.

    What cannot be copied: the CLIP's absolute position embeddings and its pre-layernorm (Qwen2-VL's ViT has 2-D
    RoPE in each block instead), so the tower starts near the CLIP's and is trained on from there.
    """
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    from genret.mllm.backend import processor_without_video
    from genret.mllm.tiny import TEMPLATES, pil_image_processor, qwen_tokenizer

    tokenizer = qwen_tokenizer(texts, config.vocab_size)
    ids = tokenizer.convert_tokens_to_ids
    v = clip.config.vision_config
    merge, frames = 2, 2
    if v.intermediate_size % v.hidden_size:
        raise ValueError(f"Qwen2-VL's tower takes an MLP width that is a multiple of its width; the CLIP's is "
                         f"{v.intermediate_size} for {v.hidden_size}")
    if (v.image_size // v.patch_size) % merge:
        raise ValueError(f"the CLIP's {v.image_size // v.patch_size} patches a side do not merge {merge} × {merge}")
    vision = {"depth": v.num_hidden_layers, "embed_dim": v.hidden_size, "hidden_size": config.hidden_size,
              "num_heads": v.num_attention_heads, "mlp_ratio": v.intermediate_size // v.hidden_size,
              "hidden_act": v.hidden_act, "patch_size": v.patch_size, "spatial_merge_size": merge,
              "temporal_patch_size": frames}
    text = {"vocab_size": len(tokenizer), "hidden_size": config.hidden_size, "num_hidden_layers": config.layers,
            "num_attention_heads": config.heads, "num_key_value_heads": config.heads,
            "intermediate_size": config.intermediate_size, "max_position_embeddings": config.max_positions,
            "eos_token_id": ids(tokenizer.eos_token), "pad_token_id": ids(tokenizer.pad_token), "bos_token_id": None,
            "tie_word_embeddings": True,
            "rope_scaling": {"type": "mrope", "mrope_section": mrope_section(config.hidden_size // config.heads)}}
    qwen = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                         video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                         vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=True)
    model = Qwen2VLForConditionalGeneration(qwen)
    tower, src = model.model.visual, clip.vision_model
    with torch.no_grad():
        patch = src.embeddings.patch_embedding.weight  # (D, C, P, P): the temporal copies share it, halved
        tower.patch_embed.proj.weight.copy_(patch.unsqueeze(2).expand(-1, -1, frames, -1, -1) / frames)
        for block, layer in zip(tower.blocks, src.encoder.layers):
            att = layer.self_attn
            block.norm1.load_state_dict(layer.layer_norm1.state_dict())
            block.norm2.load_state_dict(layer.layer_norm2.state_dict())
            block.attn.qkv.weight.copy_(torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]))
            block.attn.qkv.bias.copy_(torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias]))
            block.attn.proj.load_state_dict(att.out_proj.state_dict())
            block.mlp.fc1.load_state_dict(layer.mlp.fc1.state_dict())
            block.mlp.fc2.load_state_dict(layer.mlp.fc2.state_dict())
    clip_images = clip_processor.image_processor
    pixels = v.image_size * v.image_size
    image_processor = pil_image_processor("Qwen2VLImageProcessor", patch_size=v.patch_size, merge_size=merge,
                                       temporal_patch_size=frames, image_mean=list(clip_images.image_mean),
                                       image_std=list(clip_images.image_std),
                                       size={"shortest_edge": pixels, "longest_edge": pixels})
    processor = processor_without_video(Qwen2VLProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                                          chat_template=(TEMPLATES / "qwen2_vl.jinja").read_text())
    return model, processor
