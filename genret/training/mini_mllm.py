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

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from genret.training.tokenizer import byte_alphabet, count_words, learn_bpe

CHAT_TEMPLATE = Path(__file__).resolve().parent.parent / "mllm" / "templates" / "mini_chat.jinja"
SPECIAL = ("<|pad|>", "<|bos|>", "<|eos|>", "<image>", "<|system|>", "<|user|>", "<|assistant|>")


@dataclass
class MiniMLLMConfig:
    """Architecture of the mini MLLM's language side (the vision side is the CLIP's)."""

    hidden_size: int = field(default=128, metadata={"help": "Llama hidden size"})
    layers: int = field(default=4, metadata={"help": "Llama layers"})
    heads: int = field(default=4, metadata={"help": "attention heads"})
    intermediate_size: int = field(default=512, metadata={"help": "MLP width"})
    max_positions: int = field(default=4096, metadata={"help": "context length (listwise prompts hold many images)"})
    vocab_size: int = field(default=1200, metadata={"help": "upper bound of the BPE vocabulary"})

    def __post_init__(self) -> None:
        if self.hidden_size % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide hidden_size ({self.hidden_size})")


def byte_level_bpe(texts: Iterable[str], special: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE trained on ``texts``, ``special`` tokens first (ids 0, 1, ...).

    The same texts and settings give the same tokenizer in every process
    (see :func:`genret.training.tokenizer.learn_bpe`).
    """
    special = list(special)
    pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    vocab, merges = learn_bpe(count_words(texts, pre_tokenizer), vocab_size, special=special,
                              alphabet=byte_alphabet())
    bpe = Tokenizer(models.BPE(vocab, merges))
    bpe.pre_tokenizer = pre_tokenizer
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(special)
    return bpe


def train_chat_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer with genret's chat special tokens and template."""
    from transformers import PreTrainedTokenizerFast

    bpe = byte_level_bpe(texts, SPECIAL, vocab_size)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
        extra_special_tokens={"image_token": "<image>"}, chat_template=CHAT_TEMPLATE.read_text(),
        padding_side="right", model_max_length=4096)


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
    patches = (vision.image_size // vision.patch_size) ** 2
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=config.hidden_size, num_hidden_layers=config.layers,
                       num_attention_heads=config.heads, num_key_value_heads=config.heads,
                       intermediate_size=config.intermediate_size, max_position_embeddings=config.max_positions,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    llava_config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                               image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=patches,
                               vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(llava_config)
    model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    # num_additional_image_tokens=1: the CLS token the "default" strategy drops, so the processor
    # expands <image> to exactly the patch features the model produces.
    processor = LlavaProcessor(image_processor=clip_processor.image_processor, tokenizer=tokenizer,
                               patch_size=vision.patch_size, vision_feature_select_strategy="default",
                               chat_template=CHAT_TEMPLATE.read_text(), image_token="<image>",
                               num_additional_image_tokens=1)
    return model, processor
