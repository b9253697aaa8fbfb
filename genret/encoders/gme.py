"""GME-Qwen2-VL's embedding forward, as its authors' ``gme_inference.py`` computes it, on today's transformers.

Why genret runs this itself rather than through sentence-transformers: GME's published inference code needs
transformers < 4.52 (its model card says so) and its sentence-transformers files are remote code, which genret
does not run unless asked; and what that code computes differs from a stock forward in one way that matters: it
splices the image features into the token embeddings and runs the *language model* on them with no position ids,
so every token, image tokens included, gets a plain 1-D position (transformers < 4.52's ``Qwen2VLModel`` filled
the three M-RoPE axes with the same ``arange``). A stock ``Qwen2VLForConditionalGeneration`` forward (and so
sentence-transformers) gives image tokens 3-D grid positions, and other embeddings. The weights themselves are a
stock ``qwen2_vl`` checkpoint: they load with ``AutoModelForImageTextToText``, no remote code.
"""

from __future__ import annotations

import torch

from genret.encoders.embedders import EmbedderSpec, resize_for

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
PROMPT = "<|im_start|>system\n{instruction}<|im_end|>\n<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
END = "<|endoftext|>"  # the token GME pools: appended after the generation prompt


class GMEForward:
    """Loads a GME checkpoint and embeds (image, text) inputs under one instruction.

    Args:
        spec: the ``gme`` conventions (:data:`genret.encoders.embedders.SPECS`).
        ref: the checkpoint (hub id or folder).
        device, dtype: where and in which precision the weights run (a dtype name or ``auto``, resolved with the
            checkpoint's family as :meth:`MLLM.load` does: no fp16 from ``auto`` for Qwen2-VL).
        trust_remote_code: passed to transformers (not needed: the weights are stock ``qwen2_vl``).
    """

    def __init__(self, spec: EmbedderSpec, ref: str, device: str, dtype: str,
                 trust_remote_code: bool = False) -> None:
        from transformers import AutoConfig, AutoModelForImageTextToText

        from genret.mllm.backend import dtype_for_checkpoint, load_processor

        config = AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code)
        if config.model_type != "qwen2_vl":
            raise ValueError(f"{ref!r} is a {config.model_type!r} checkpoint; GME's conventions (embedder = \"gme\") "
                             "are those of its Qwen2-VL checkpoints (model_type 'qwen2_vl')")
        self.spec = spec
        self.model = AutoModelForImageTextToText.from_pretrained(ref, dtype=dtype_for_checkpoint(dtype, config, ref),
                                                                 trust_remote_code=trust_remote_code)
        self.model.to(device).eval()
        self.processor = load_processor(ref, trust_remote_code, **spec.processor_options)
        self.processor.tokenizer.padding_side = "right"  # pooling below reads the last non-padding position
        self.dim = int(self.model.config.get_text_config().hidden_size)

    def prompt(self, instruction: str, has_image: bool, text: str | None) -> str:
        """The prompt GME writes for one input (image placeholder first, then the text)."""
        content = (IMAGE if has_image else "") + (text or "")
        return PROMPT.format(instruction=instruction, content=content) + END

    @torch.inference_mode()
    def embed(self, images: list | None, texts: list[str | None], instruction: str) -> torch.Tensor:
        """The pooled (not normalised) embeddings of ``len(texts)`` inputs: image ``i`` (if any) then text ``i``.

        A batch is all with images or all without, as GME's own code requires.
        """
        prompts = [self.prompt(instruction, images is not None, t) for t in texts]
        pics = [resize_for(self.spec, im) for im in images] if images is not None else None
        # No position ids: 1-D positions for every token, as GME's code gets (see the module docstring).
        return last_token_states(self.model, self.processor, prompts, pics, self.spec.max_length)


def last_token_states(model, processor, prompts: list[str], pics: list | None, max_length: int,
                      one_d_positions: bool = False) -> torch.Tensor:
    """The last real token's final hidden state of each prompt through a stock Qwen2-VL, the image features written
    at its image tokens, and the language model run with 1-D positions as GME's and VLM2Vec's own code runs it:
    the model's default (``one_d_positions`` False: every position counts, padding included) or the attended
    tokens' running count (True), never the multimodal RoPE grid a stock forward gives image tokens."""
    inputs = processor(text=prompts, images=pics, padding=True, truncation=True, max_length=max_length,
                       return_tensors="pt")
    device = model.device
    ids, mask = inputs["input_ids"].to(device), inputs["attention_mask"].to(device)
    inner = model.model
    embeds = inner.get_input_embeddings()(ids)
    if pics is not None:
        feats = inner.get_image_features(inputs["pixel_values"].to(device), inputs["image_grid_thw"].to(device))
        feats = torch.cat(list(feats.pooler_output)).to(embeds.dtype)
        embeds = embeds.masked_scatter((ids == inner.config.image_token_id).unsqueeze(-1), feats)
    positions = (mask.cumsum(-1) - 1).clamp(min=0).unsqueeze(0).expand(3, -1, -1) if one_d_positions else None
    hidden = inner.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
    last = mask.sum(dim=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=device), last]
