"""What the MLLM trainers do to their model before the loop: load the base, add the LoRA, cache image features.

One :func:`add_lora` serves every LoRA trainer (rerank, GRACE, rewriter), so each gets QLoRA
(``load_in_4bit``: 4-bit base prepared by peft for k-bit training), gradient checkpointing and new-token
rows (peft's ``trainable_token_indices``, GRACE's identifiers) the same way.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Sequence

import torch
from tqdm.auto import tqdm

from genret.data.images import load_image
from genret.mllm import scoring

if TYPE_CHECKING:
    from genret.mllm.backend import MLLM
    from genret.training.options import BaseModelOptions, LoraOptions

logger = logging.getLogger(__name__)

CHECKPOINTING = {"use_reentrant": False}  # no input needs to require grad; the variant torch recommends


def load_base(base: str, options: "BaseModelOptions", device: torch.device) -> "MLLM":
    """Load the MLLM a trainer adapts, on this process's ``device`` (accelerate gives each process one).

    Never ``device_map="auto"``, which would shard the model over every GPU under a data-parallel run.
    """
    from genret.mllm.backend import MLLM, MLLMConfig, bitsandbytes_available

    if options.load_in_4bit:
        if not bitsandbytes_available():
            raise ImportError("load_in_4bit (QLoRA) needs bitsandbytes: pip install 'genret[quant]' "
                              "(a CUDA GPU for speed), or train plain LoRA without --load-in-4bit")
        if device.type != "cuda":
            logger.warning("QLoRA on %s: bitsandbytes runs 4-bit layers here, but slowly; it is meant for CUDA", device)
    return MLLM.load(MLLMConfig(model=str(base), dtype=options.dtype, load_in_4bit=options.load_in_4bit,
                                device_map=str(device), processor_options=dict(options.processor_options)))


def enable_checkpointing(model) -> None:
    """Gradient (activation) checkpointing on a transformers model, under either of its names."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2 name
    if enable is not None:
        enable(activation_checkpointing_kwargs=CHECKPOINTING)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING)


def add_lora(mllm: "MLLM", options: "LoraOptions", *, token_ids: Sequence[int] = (),
             gradient_checkpointing: bool = False, vision: str = "none"):
    """Wrap ``mllm.model`` in a peft LoRA on its language model (the vision tower and projector frozen, unless
    ``vision`` says otherwise: :data:`genret.mllm.adapters.VISION_ADAPT`).

    Args:
        options: rank, alpha, dropout, target modules (default: the family's); ``load_in_4bit``: the base was
            loaded in 4 bits and is prepared for k-bit training (QLoRA).
        token_ids: new tokens whose input (and untied output) embedding rows train too (GRACE's identifiers).
        gradient_checkpointing: recompute activations in backward.

    Returns:
        The peft model, also set as ``mllm.model``.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from genret.mllm.adapters import lora_modules

    model = mllm.model
    if options.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs=CHECKPOINTING)
    elif gradient_checkpointing:
        enable_checkpointing(model)
    targets = tuple(options.lora_targets.split(",")) if options.lora_targets else mllm.family.lora_targets
    pattern, save = lora_modules(model, mllm.family, targets, vision)
    lora = LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout, bias="none",
                      target_modules=pattern, modules_to_save=save,
                      trainable_token_indices=token_targets(model, token_ids) if token_ids else None)
    mllm.model = get_peft_model(model, lora)
    return mllm.model


def lora_groups(model, lr: float, token_lr: float) -> list[dict]:
    """The optimizer's parameter groups of a LoRA with new token rows: the LoRA at ``lr``; the rows (peft's
    ``trainable_tokens``) at ``token_lr`` and without weight decay (new rows start from their initialisation)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in trainable if "trainable_tokens" not in n], "lr": lr},
            {"params": [p for n, p in trainable if "trainable_tokens" in n], "lr": token_lr, "weight_decay": 0.0}]


def token_targets(model, token_ids: Sequence[int]) -> dict[str, list[int]]:
    """peft ``trainable_token_indices``: the input embedding, and the output layer when it is not tied to it."""
    names = {id(m): n for n, m in model.named_modules()}
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    targets = {names[id(emb)].rsplit(".", 1)[-1]: list(token_ids)}
    if out is not None and out.weight.data_ptr() != emb.weight.data_ptr():
        targets[names[id(out)].rsplit(".", 1)[-1]] = list(token_ids)
    return targets


def image_features(mllm: "MLLM", paths: Sequence[str], progress: bool = False, desc: str = "",
                   several: bool = False) -> list[torch.Tensor]:
    """Projected image features as ordinary (non-inference) tensors in the model's dtype, computed once per run
    (``several``: laid out as one of a prompt's several images, :func:`genret.mllm.scoring.image_features`)."""
    out: list[torch.Tensor] = []
    for s in tqdm(range(0, len(paths), 64), desc=desc, unit="batch", disable=not progress):
        chunk = scoring.image_features(mllm, [load_image(p) for p in paths[s:s + 64]], several=several)
        out += [f.clone() for f in chunk]
    return out


def lays_out_several(mllm: "MLLM") -> bool:
    """Whether the family lays an image among several out otherwise than one alone (LLaVA-OneVision), so that a
    listwise prompt of candidate images needs features of their own."""
    from genret.mllm.families.base import Family

    return type(mllm.family).several_image_inputs is not Family.several_image_inputs
