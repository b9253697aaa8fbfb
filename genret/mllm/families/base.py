"""The model-family protocol: what differs between LLaVA, Qwen2-VL, Idefics3... and nothing else.

Stages never branch on the family; they call these methods. A family is registered under each
transformers ``model_type`` it serves.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from genret.registry import Registry


class Family:
    """Family-specific knowledge about an image-text-to-text model.

    Attributes:
        name: the family's name.
        model_types: transformers ``config.model_type`` values it serves.
        lora_targets: default LoRA target modules (language model projections).
        vision_tower_name, projector_name: the vision tower's and the projector's module names (last component),
            for adapters that train the vision side too.
    """

    name: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    lora_targets: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "o_proj")
    # The vision side's modules, by their last name component: the tower, and the projector into the language model.
    vision_tower_name: ClassVar[str] = "vision_tower"
    projector_name: ClassVar[str] = "multi_modal_projector"
    # Further modules that project vision features into the language model, trained with the projector: the module
    # lists named here contribute each of their members (Qwen3-VL's DeepStack mergers).
    more_projectors: ClassVar[tuple[str, ...]] = ()
    # Whether a forward given :meth:`feature_kwargs` writes cached features into the embeddings itself (Qwen3-VL:
    # its encoder outputs carry DeepStack levels); scoring then leaves the image tokens' embeddings as they are.
    model_writes_features: ClassVar[bool] = False
    # Image processor settings a user may pass (``processor_options``), each with what it does.
    processor_options: ClassVar[dict[str, str]] = {}
    # Variables every chat-template rendering gets (Qwen3.5: enable_thinking=False, the no-think form an answer follows).
    chat_template_kwargs: ClassVar[dict[str, Any]] = {}
    # Whether a forward continuing a cache overwrites in place the states it read (Qwen3.5's Gated-DeltaNet conv and
    # recurrent states): autograd then cannot go back through them, so training scores answers without a cache.
    cache_written_in_place: ClassVar[bool] = False
    # Whether the model computes correctly in float16. Not where its activations overflow fp16's range (65,504):
    # Qwen2-VL's family (transformers#33294, QwenLM/Qwen3#761: "!!!!" and NaN logits) and Gemma 3
    # (transformers#36822); ``dtype="auto"`` then takes float32 on a GPU without bf16 (genret.mllm.backend.choose_dtype).
    fp16_safe: ClassVar[bool] = True

    def apply_chat_template(self, processor, messages: list[dict], add_generation_prompt: bool) -> str:
        """``messages`` rendered by the checkpoint's own chat template, with :attr:`chat_template_kwargs`."""
        return processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                             **self.chat_template_kwargs)

    def check_processor_options(self, options: dict, model: str = "") -> None:
        """Refuse processor options this family does not take, naming those it does."""
        unknown = [k for k in options if k not in self.processor_options]
        if unknown:
            known = "; ".join(f"{k}: {v}" for k, v in self.processor_options.items()) or "none"
            raise ValueError(f"{model or self.name}: processor option(s) {', '.join(map(repr, unknown))} are not "
                             f"{self.name} settings; this family takes {known}")

    def processor_load_kwargs(self, options: dict) -> dict:
        """What of ``options`` goes to ``AutoProcessor.from_pretrained`` (the rest is set by :meth:`apply_processor_options`)."""
        return dict(options)

    def apply_processor_options(self, processor, options: dict) -> None:
        """Set on a loaded processor what :meth:`processor_load_kwargs` did not pass at loading."""

    def prepare_feature_cache(self, processor) -> str | None:
        """Set ``processor`` up so that images can be scored from cached features; say what changed, if anything."""
        return None

    def image_token(self, processor) -> str:
        """The placeholder a prompt carries for one image (before the processor expands it)."""
        return processor.image_token

    def inline_image(self, processor) -> str:
        """What stands for one image inside a text part (for templates that would move image parts)."""
        return self.image_token(processor)

    def image_token_id(self, model) -> int:
        """The id of the expanded image-feature token in ``input_ids``."""
        return int(model.config.image_token_id)

    def image_inputs(self, processor, images: list) -> dict[str, torch.Tensor]:
        """Pixel tensors (and grids) for a batch of PIL images."""
        return dict(processor.image_processor(images=images, return_tensors="pt"))

    def dense_pixels(self, processor, images: list) -> torch.Tensor:
        """``(batch, channels, height, width)`` pixels of same-size ``images``, normalised as the processor does: the
        form in which training augments them (:meth:`pixel_inputs` turns them into the forward's inputs)."""
        return self.image_inputs(processor, images)["pixel_values"]

    def pixel_inputs(self, model, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The forward's image inputs for :meth:`dense_pixels`-form ``pixels``."""
        return {"pixel_values": pixels}

    def tokens_per_image(self, model, height: int, width: int) -> int:
        """Image tokens the language model reads for one ``height`` × ``width`` image of :meth:`dense_pixels`."""
        return int(model.config.image_seq_length)

    def several_image_inputs(self, processor, images: list) -> dict[str, torch.Tensor] | None:
        """Pixel tensors of ``images`` as laid out in a prompt that holds several images (a listwise prompt), for a
        family that lays such an image out otherwise than one alone (LLaVA-OneVision); None: as :meth:`image_inputs`."""
        return None

    def processor_images(self, rows: list[list]) -> list:
        """What the processor's ``images=`` gets for a batch of prompts holding ``rows`` of images: one flat list,
        or (LLaVA-OneVision) the rows, so that the processor knows which images share a prompt."""
        return [im for row in rows for im in row]

    def image_features(self, model, image_inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per image, the features the language model sees (after the projector).

        ``(tokens, hidden)``, or a layout whose leading dimensions multiply to the token count (Qwen keeps
        ``(rows, cols, hidden)`` so that the grid travels with a cached feature); scoring flattens them.
        """
        out = model.get_image_features(**image_inputs)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        if isinstance(feats, torch.Tensor):
            feats = list(feats) if feats.dim() == 3 else [feats]
        return list(feats)

    def expand_image_tokens(self, processor, text: str, n_tokens: list[int]) -> str:
        """Replace each image placeholder of ``text`` by the tokens of its features (``n_tokens[i]`` each)."""
        token = self.image_token(processor)
        parts = text.split(token)
        if len(parts) - 1 != len(n_tokens):
            raise ValueError(f"prompt has {len(parts) - 1} image placeholders for {len(n_tokens)} images")
        out = parts[0]
        for n, rest in zip(n_tokens, parts[1:]):
            out += token * n + rest
        return out

    def feature_embeds(self, feature: torch.Tensor) -> torch.Tensor:
        """The ``(tokens, hidden)`` embeddings a cached feature writes into the prompt (all dimensions but the hidden
        one are tokens; Qwen3-VL's features also carry DeepStack levels, which are not)."""
        return feature.reshape(-1, feature.shape[-1])

    def feature_kwargs(self, model, inputs: dict[str, torch.Tensor], rows=slice(None), start: int = 0,
                       end: int | None = None) -> dict[str, Any]:
        """Forward arguments that cached features need beyond their embeddings, for a forward of ``rows`` and
        positions ``start:end`` of ``inputs`` (:func:`genret.mllm.scoring._inputs`): the shared-prefix path runs a
        prompt in parts. Qwen3-VL passes its DeepStack levels so; most families need nothing."""
        return {}

    def feature_inputs(self, model, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the forward needs of cached ``features`` beyond their values (e.g. Qwen's ``image_grid_thw``).

        Scoring with cached features adds these to its inputs in place of the pixel tensors.
        """
        return {}

    def forward_kwargs(self, model, input_ids: torch.Tensor, image_inputs: dict | None,
                       attention_mask: torch.Tensor | None = None) -> dict[str, Any]:
        """Extra arguments the model's forward needs beside ids/embeddings (e.g. Qwen's rope positions).

        Args:
            input_ids: the prompt ids, image tokens expanded, ``(batch, length)``.
            image_inputs: the processor's image tensors, or :meth:`feature_inputs` of cached features.
            attention_mask: ``(batch, length)``, 1 on real tokens.
        """
        return {}

    def prefix_kwargs(self, model, input_ids: torch.Tensor) -> dict[str, Any]:
        """What a forward over part of a sequence needs beside embeddings, mask and positions (a shared prefix, or
        the rows' continuation after its KV cache), given the ids from the sequence's start to that part's end:
        Gemma 3's ``token_type_ids``, which its image mask reads by absolute position."""
        return {}

    def generate_inputs(self, model, inputs: dict) -> dict:
        """The processor's outputs as ``generate`` takes them: a tokenizer's BERT-style ``token_type_ids`` dropped
        (Gemma 3 keeps them: they mark its images' bidirectional attention)."""
        return {k: v for k, v in inputs.items() if k != "token_type_ids"}

    def next_position_ids(self, model, inputs: dict[str, torch.Tensor], length: int) -> torch.Tensor:
        """Position ids of ``length`` tokens appended after each row's last real token (KV-cache continuation)."""
        start = inputs["attention_mask"].sum(dim=1, keepdim=True)
        return start + torch.arange(length, device=start.device)


FAMILIES: Registry[Family] = Registry("model family")


def register(family: Family) -> Family:
    """Register ``family`` under each of its model types."""
    for model_type in family.model_types:
        FAMILIES.register(model_type)(family)
    return family


def family_for_type(model_type: str, model: str = "") -> Family:
    """The family registered for a transformers ``model_type``; the error names the ones that exist."""
    try:
        return FAMILIES.get(model_type)
    except KeyError:
        where = f"{model}: " if model else ""
        raise ValueError(f"{where}no genret model family for model_type {model_type!r}; supported: "
                         f"{', '.join(FAMILIES.names())}") from None


def family_of(model) -> Family:
    """The family of a loaded model, by its ``config.model_type``."""
    return family_for_type(model.config.model_type)
