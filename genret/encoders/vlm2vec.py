"""VLM2Vec(-V2)'s embedding forward on Qwen2-VL, as its authors' code computes it, on today's transformers.

Why genret runs this itself rather than through sentence-transformers: VLM2Vec publishes no sentence-transformers
files, and its authors' code (TIGER-AI-Lab/VLM2Vec, pinned to transformers 4.52.3) runs its own fork of Qwen2-VL's
modelling code, which computes something a stock forward does not: VLM2Vec writes a bare ``<|image_pad|>`` (no
``<|vision_start|>``, no chat template), and the fork's ``get_rope_index`` counts images by the token after each
``<|vision_start|>``; it finds none, so every token, image tokens included, gets a plain 1-D position. A stock
transformers 5.24 forward finds the image tokens through the processor's ``mm_token_type_ids`` and gives them 3-D
grid positions, and other embeddings (measured on a shrunk checkpoint: up to 0.26 apart, unit vectors). The weights
are a stock ``qwen2_vl`` model, possibly shipped as a (DoRA) LoRA adapter onto Qwen2-VL-2B-Instruct: they load with
``AutoModelForImageTextToText`` and peft, no remote code.

The prompt (no chat template; from the authors' ``process_input_text`` and MMEB retrieval parsers):
``[<|image_pad|>\\n]{instruction}[ {text}]\\n``; a text with no instruction and no image is embedded as it is (as
MMEB's text candidates are). The hidden state of the last token (the final ``\\n``) is the embedding.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from genret.encoders.embedders import EmbedderSpec
from genret.encoders.gme import last_token_states

IMAGE = "<|image_pad|>"
MIN_SIDE = 28  # the authors' batching resizes an image with a side under 28 pixels to 56x56 first
TINY_SIZE = (56, 56)


def vlm2vec_prompt(instruction: str, has_image: bool, text: str | None) -> str:
    """The text VLM2Vec embeds for one input (see the module docstring)."""
    if not instruction and not has_image:
        return text or ""
    body = instruction + (" " + text if text else "") if instruction else (text or "")
    return (IMAGE + "\n" if has_image else "") + body + "\n"


class VLM2VecForward:
    """Loads a VLM2Vec checkpoint (whole, or a LoRA/DoRA adapter onto its base) and embeds inputs.

    Args:
        spec: the ``vlm2vec`` conventions (:data:`genret.encoders.embedders.SPECS`).
        ref: the checkpoint (hub id or folder): a ``qwen2_vl`` model, or a peft adapter whose
            ``adapter_config.json`` names its base.
        device, dtype: where and in which precision the weights run (a dtype name or ``auto``, resolved with the
            checkpoint's family as :meth:`MLLM.load` does: no fp16 from ``auto`` for Qwen2-VL).
        trust_remote_code: passed to transformers (not needed: the weights are stock ``qwen2_vl``).

    Attributes:
        revision_suffix: the base model's fingerprint for an adapter checkpoint (its own files do not say which
            base weights it was merged into), else empty.
    """

    def __init__(self, spec: EmbedderSpec, ref: str, device: str, dtype: str,
                 trust_remote_code: bool = False) -> None:
        from transformers import AutoConfig, AutoModelForImageTextToText

        from genret._hub import model_fingerprint
        from genret.mllm.backend import dtype_for_checkpoint, load_processor
        from genret.mllm.checkpoints import adapter_base, merge_peft_adapter

        base = adapter_base(ref) or _adapter_beside_config(ref)
        weights = base or ref
        config = AutoConfig.from_pretrained(weights, trust_remote_code=trust_remote_code)
        if config.model_type != "qwen2_vl":
            raise ValueError(f"{weights!r} is a {config.model_type!r} checkpoint; VLM2Vec's conventions (embedder = "
                             "\"vlm2vec\") are those of its Qwen2-VL checkpoints (model_type 'qwen2_vl')")
        self.spec = spec
        self.model = AutoModelForImageTextToText.from_pretrained(
            weights, dtype=dtype_for_checkpoint(dtype, config, weights), trust_remote_code=trust_remote_code)
        self.revision_suffix = ""
        if base is not None:
            self.model = merge_peft_adapter(self.model, ref)
            self.revision_suffix = "+" + model_fingerprint(base)
        self.model.to(device).eval()
        try:
            self.processor = load_processor(ref, trust_remote_code, **spec.processor_options)
        except (OSError, ValueError, TypeError):
            if base is None:
                raise
            self.processor = load_processor(base, trust_remote_code, **spec.processor_options)  # adapter files only
        self.processor.tokenizer.padding_side = "right"  # pooling below reads the last non-padding position
        self.dim = int(self.model.config.get_text_config().hidden_size)

    @torch.inference_mode()
    def embed(self, images: list | None, texts: list[str | None], instruction: str) -> torch.Tensor:
        """The pooled (not normalised) embeddings of ``len(texts)`` inputs: image ``i`` (if any) and text ``i``
        under ``instruction``. A batch is all with images or all without."""
        prompts = [vlm2vec_prompt(instruction, images is not None, t) for t in texts]
        pics = None
        if images is not None:
            pics = [im.resize(tuple(self.spec.image_size)) if self.spec.image_size else im for im in images]
            pics = [im.resize(TINY_SIZE) if min(im.size) < MIN_SIDE else im for im in pics]
        # 1-D positions over the attended tokens, image tokens included (see the module docstring)
        return last_token_states(self.model, self.processor, prompts, pics, self.spec.max_length, one_d_positions=True)


def _adapter_beside_config(ref: str) -> str | None:
    """The base of a folder holding a ``config.json`` and a peft adapter but no model weights (the layout VLM2Vec's
    own loading reads: the config and the adapter from one repository, the weights from the adapter's base); None
    for any other checkpoint (a hub id is read in the local cache)."""
    from genret._hub import hub_snapshot

    path = Path(ref).expanduser()
    folder = path if path.is_dir() else hub_snapshot(ref)
    if folder is None or not (folder / "adapter_config.json").is_file():
        return None
    weights = [f for f in folder.iterdir() if f.suffix in (".safetensors", ".bin") and not f.name.startswith("adapter")]
    if weights:
        return None
    base = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise ValueError(f"{folder / 'adapter_config.json'}: an adapter without base_model_name_or_path; genret cannot "
                         "tell which model it adapts")
    return base
