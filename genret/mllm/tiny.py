"""Tiny checkpoints of every supported model family, from shrunk configs of the real architectures.

:func:`build_tiny` writes a directory that :meth:`genret.mllm.MLLM.load` reads exactly as it reads a
user's checkpoint (``AutoProcessor`` + ``AutoModelForImageTextToText``, no remote code): random weights,
under 100k parameters, a byte-level BPE trained on ``texts`` that holds the family's real special tokens,
the family's chat template (``genret/mllm/templates``), a processor built without torchvision. One
builder per family, as trl's ``generate_tiny_models`` does. The weights are random: such a model
exercises every code path of its family and judges nothing.

Example::

    path = build_tiny("qwen2_vl", tmp_path / "qwen", ["a red circle left of a blue square"])
    mllm = MLLM.load(str(path))  # Qwen2VLForConditionalGeneration, Qwen2VLProcessor
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

from genret.bpe import byte_level_bpe

TEMPLATES = Path(__file__).resolve().parent / "templates"
# The language model of every tiny family: one layer, hidden 32, grouped-query attention.
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "max_position_embeddings": 2048, "initializer_range": 0.2}
VOCAB_SIZE = 400
QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
IDEFICS3_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                    "<global-img>", *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)))




def pil_image_processor(name: str, **kwargs):
    """The PIL-backed image processor ``name`` (transformers 5 names it ``...Pil``; 4.x has no suffix)."""
    import transformers

    return (getattr(transformers, name + "Pil", None) or getattr(transformers, name))(**kwargs)


def _text_config(tokenizer, **extra) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return {**TEXT, "vocab_size": len(tokenizer), "eos_token_id": ids(tokenizer.eos_token),
            "pad_token_id": ids(tokenizer.pad_token), "bos_token_id": None, **extra}


def _llava(texts: list[str]):
    """LLaVA: a CLIP vision tower (32 px, 8 px patches: 16 image tokens), a projector, a Llama."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from genret.bpe import CHAT_TEMPLATE, train_chat_tokenizer

    tokenizer = train_chat_tokenizer(texts, VOCAB_SIZE)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=LlamaConfig(**_text_config(tokenizer)).to_dict(),
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=16,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    image_processor = pil_image_processor("CLIPImageProcessor", size={"shortest_edge": 32},
                                       crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE.read_text(),
                               image_token="<image>", num_additional_image_tokens=1)
    return LlavaForConditionalGeneration(config), processor


def qwen_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE):
    """A ``Qwen2Tokenizer`` (byte-level BPE learnt on ``texts``) that holds Qwen's real special tokens."""
    from transformers import Qwen2Tokenizer

    model = json.loads(byte_level_bpe(texts, QWEN_SPECIAL, vocab_size).to_str())["model"]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], unk_token=None,
                               eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="right")
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL)})
    return tokenizer


def _qwen(prefix: str):
    """Qwen2-VL (``"Qwen2VL"``) or Qwen2.5-VL (``"Qwen2_5_VL"``): 8 px patches merged 2×2; 64 px → 3×3 tokens."""

    def build(texts: list[str]):
        import transformers

        from genret.mllm.backend import processor_without_video

        tokenizer = qwen_tokenizer(texts)
        ids = tokenizer.convert_tokens_to_ids
        if prefix == "Qwen2VL":
            vision = {"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2}
        else:  # two blocks, so both the windowed and the full-attention paths run
            vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 32,
                      "window_size": 32, "fullatt_block_indexes": [1]}
        vision.update(patch_size=8, spatial_merge_size=2, temporal_patch_size=2)
        # head_dim 16: the rotary half (8) split over (t, h, w) as Qwen splits its 64 into 16/24/24.
        text = _text_config(tokenizer, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
        config = getattr(transformers, f"{prefix}Config")(
            text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
            video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
            vision_end_token_id=ids("<|vision_end|>"))
        image_processor = pil_image_processor("Qwen2VLImageProcessor", patch_size=8, merge_size=2, temporal_patch_size=2,
                                           size={"shortest_edge": 16 * 16, "longest_edge": 48 * 48})
        processor_class = processor_without_video(getattr(transformers, f"{prefix}Processor"))
        processor = processor_class(image_processor=image_processor, tokenizer=tokenizer,
                                    chat_template=(TEMPLATES / "qwen2_vl.jinja").read_text())
        return getattr(transformers, f"{prefix}ForConditionalGeneration")(config), processor

    return build


def _idefics3(texts: list[str]):
    """Idefics3: a SigLIP-style tower on 32 px tiles (8 px patches, pixel shuffle 2: 4 tokens), a Llama.

    The image processor does not split (64 px images are resized to one 32 px tile); set its
    ``do_image_splitting`` to get 2×2 tiles plus the global view.
    """
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor,
                              PreTrainedTokenizerFast)

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=byte_level_bpe(texts, IDEFICS3_SPECIAL, VOCAB_SIZE),
                                        bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                                        pad_token="<|endoftext|>", padding_side="right",
                                        extra_special_tokens=list(IDEFICS3_SPECIAL[1:]))
    image_processor = pil_image_processor("Idefics3ImageProcessor", size={"longest_edge": 64},
                                       max_image_size={"longest_edge": 32}, do_image_splitting=False)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=(TEMPLATES / "idefics3.jinja").read_text())
    text = _text_config(processor.tokenizer, model_type="llama")
    config = Idefics3Config(text_config=text, scale_factor=2, pad_token_id=text["pad_token_id"],
                            image_token_id=processor.tokenizer.convert_tokens_to_ids("<image>"),
                            vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                           "num_attention_heads": 2, "image_size": 32, "patch_size": 8})
    return Idefics3ForConditionalGeneration(config), processor


BUILDERS: dict[str, Callable] = {"llava": _llava, "qwen2_vl": _qwen("Qwen2VL"), "qwen2_5_vl": _qwen("Qwen2_5_VL"),
                                 "idefics3": _idefics3}


def build_tiny(family: str, out_dir: str | Path, texts: Iterable[str], seed: int = 0) -> Path:
    """Build and save a tiny random checkpoint of ``family``.

    Args:
        family: one of :data:`BUILDERS` (``llava``, ``qwen2_vl``, ``qwen2_5_vl``, ``idefics3``).
        out_dir: the checkpoint directory to write.
        texts: what the tokenizer is trained on (the prompts' and captions' words).
        seed: the weights' random seed.

    Returns:
        ``out_dir``, loadable with :meth:`genret.mllm.MLLM.load`.
    """
    import torch

    from genret import __version__
    from genret._io import write_json
    from genret._swap import atomic_dir

    if family not in BUILDERS:
        raise ValueError(f"no tiny builder for {family!r}; known: {', '.join(BUILDERS)}")
    torch.manual_seed(seed)
    model, processor = BUILDERS[family](list(texts))
    out = Path(out_dir)
    with atomic_dir(out, (FORMAT,)) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_json(tmp / "genret.json", {"format": FORMAT, "genret": __version__, "family": family,
                                         "seed": seed, "parameters": sum(p.numel() for p in model.parameters())})
    return out


FORMAT = "genret.tiny_mllm"

# Config fields that hold a token id, with the token they must name; a fixture's tokenizer decides their values.
TOKEN_FIELDS = {"image_token_id": "image", "image_token_index": "image", "video_token_id": "<|video_pad|>",
                "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
                "vision_token_id": "<|vision_pad|>", "video_token_index": "<video>"}


def _merge(base: dict, over: dict) -> dict:
    """``base`` with ``over``'s values written in, nested dicts merged key by key."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build_from_fixture(fixture: str | Path | dict, out_dir: str | Path, tokenizer_file: str | Path, seed: int = 0) -> Path:
    """A checkpoint directory laid out as a real one on the hub, from a fixture of its real files, shrunk.

    A fixture (JSON) holds a real checkpoint's ``config.json``, ``preprocessor_config.json``,
    ``processor_config.json``, ``generation_config.json``, chat template and tokenizer settings,
    with the sources they were taken from, and a ``shrink`` table of layer sizes. The directory
    written here holds those files as they are (only the sizes in ``shrink`` changed), the real
    tokenizer (``tokenizer_file``, plus the fixture's ``added_tokens``) and random weights, and loads
    through :meth:`genret.mllm.MLLM.load` exactly as the checkpoint would: ``AutoProcessor``
    reads the real processor and template, the tokenizer is the real vocabulary.

    Token-id fields (``image_token_id``, the Qwen vision ids, the generation config's bos/eos/pad)
    are taken from the tokenizer; with the real vocabulary they equal the checkpoint's values, which
    the tests check.

    Args:
        fixture: a fixture file or its parsed content.
        out_dir: the checkpoint directory to write.
        tokenizer_file: the real ``tokenizer.json`` the fixture's ``tokenizer.source`` names.
        seed: the weights' random seed.

    Returns:
        ``out_dir``.
    """
    from genret._swap import atomic_dir

    fx = json.loads(Path(fixture).read_text()) if not isinstance(fixture, dict) else fixture
    out = Path(out_dir)
    with atomic_dir(out, (FORMAT,)) as tmp:
        _fill_from_fixture(fx, tmp, tokenizer_file, seed)
    return out


def _fill_from_fixture(fx: dict, out: Path, tokenizer_file: str | Path, seed: int) -> None:
    """Write :func:`build_from_fixture`'s files into the new folder ``out``."""
    import torch
    from tokenizers import AddedToken, Tokenizer
    from transformers import AutoConfig, AutoModelForImageTextToText

    from genret import __version__
    from genret._io import write_json, write_text

    spec = fx["tokenizer"]
    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec.get("added_tokens", ())])
    tok.save(str(out / "tokenizer.json"))
    ids = tok.token_to_id

    config = _merge(fx["config"], fx.get("shrink", {}))
    text = config.get("text_config", config)
    text["vocab_size"] = max(text.get("vocab_size", 0), tok.get_vocab_size(with_added_tokens=True))
    image_token = fx["processor_config"].get("image_token") or ("<|image_pad|>" if "qwen" in config["model_type"] else "<image>")
    # A fixture names the tokens of fields its processor config does not (Gemma 3: boi/eoi/image_token_index).
    for key, token in {**TOKEN_FIELDS, **fx.get("token_fields", {})}.items():
        if key in config:
            config[key] = ids(image_token if token == "image" else token)
    write_json(out / "config.json", config)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(out))
    with torch.no_grad():  # a matrix initialised to zeros (Gemma 3's image projection) would make every image alike
        for param in model.parameters():
            if param.dim() >= 2 and not param.any():
                param.normal_(std=config.get("initializer_range", 0.02))
    model.save_pretrained(out)

    def token_id(name: str):
        value = spec["config"].get(name)
        return ids(value) if isinstance(value, str) else None

    generation = dict(fx.get("generation_config", {}))
    for key, name in (("bos_token_id", "bos_token"), ("pad_token_id", "pad_token")):
        if key in generation and token_id(name) is not None:
            generation[key] = token_id(name)
    if "eos_token_id" in generation:  # the end-of-turn token first, then the tokenizer's other end tokens
        eos = generation["eos_token_id"]
        generation["eos_token_id"] = [token_id("eos_token"), *eos[1:]] if isinstance(eos, list) else token_id("eos_token")
    write_json(out / "generation_config.json", generation)
    write_json(out / "tokenizer_config.json", spec["config"])
    write_json(out / "preprocessor_config.json", fx["preprocessor_config"])
    if "video_preprocessor_config" in fx:  # Qwen3-VL ships one; genret loads the processor without its video part
        write_json(out / "video_preprocessor_config.json", fx["video_preprocessor_config"])
    write_json(out / "processor_config.json", fx["processor_config"])
    write_text(out / "chat_template.jinja", fx["chat_template"])
    write_json(out / "genret.json", {"format": FORMAT, "genret": __version__, "fixture": fx["model_id"],
                                     "seed": seed, "parameters": sum(p.numel() for p in model.parameters())})
