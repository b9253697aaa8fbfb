"""The miniature world's MLLM: a real ``LlavaForConditionalGeneration`` built from a mini CLIP.

Vision tower: the mini CLIP's (weights copied). Language model: a small Llama. Tokenizer: byte-level
BPE trained on the captions and instructions, wrapped as a ``PreTrainedTokenizerFast`` with a chat
template file. Saved with ``save_pretrained``, it loads through ``AutoModelForImageTextToText`` and
``AutoProcessor`` like any llava-hf checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from genret.bpe import CHAT_TEMPLATE, train_chat_tokenizer


@dataclass
class MiniMLLMConfig:
    """Architecture of the mini MLLM's language side (the vision side is the CLIP's)."""

    hidden_size: int = field(default=128, metadata={"help": "Llama hidden size"})
    layers: int = field(default=4, metadata={"help": "Llama layers"})
    heads: int = field(default=4, metadata={"help": "attention heads"})
    intermediate_size: int = field(default=512, metadata={"help": "MLP width"})
    max_positions: int = field(default=4096, metadata={"help": "context length (listwise prompts hold many images)"})
    vocab_size: int = field(default=1200, metadata={"help": "upper bound of the BPE vocabulary"})
    image_features: str = field(default="default", metadata={"help": "what of the vision tower the language model "
                                "reads (LLaVA's vision_feature_select_strategy): default, the patch tokens (LLaVA-1.5); "
                                "full, the class token too, whose last state carries the CLIP's pooled summary"})
    vision_layer: int = field(default=-1, metadata={"help": "which of the vision tower's hidden states the projector "
                              "reads (LLaVA's vision_feature_layer; -1 the last, LLaVA-1.5 reads -2; earlier layers "
                              "keep more of each patch's place)"})

    def __post_init__(self) -> None:
        if self.hidden_size % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide hidden_size ({self.hidden_size})")
        if self.image_features not in ("default", "full"):
            raise ValueError(f"image_features must be default or full, got {self.image_features!r}")
        if self.vision_layer >= 0:
            raise ValueError(f"vision_layer counts from the tower's last hidden state (-1), back; got {self.vision_layer}")


def build_mini_mllm(clip_dir: str | Path, texts: Iterable[str], config: MiniMLLMConfig = MiniMLLMConfig()):
    """A LLaVA whose vision tower is the mini CLIP's, with a fresh small Llama.

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
