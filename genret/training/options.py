"""The settings every trainer shares, as dataclasses that each trainer's config inherits.

:class:`TrainOptions` is what the training engine (:mod:`genret.training.engine`) reads: the schedule,
gradient accumulation, mixed precision, gradient checkpointing, logging to trackers, evaluation and
checkpoints. :class:`BaseModelOptions` is how a trainer loads the MLLM it adapts (dtype, QLoRA, processor
settings) and :class:`LoraOptions` the LoRA it puts on it. A trainer's config redeclares a field to change
its default (``batch_size``, ``lr``...); the flags and config-file keys are the field names, so every
trainer takes the same ones::

    genret train rerank ... --gradient-accumulation-steps 4 --mixed-precision bf16 --report-to tensorboard
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

from genret.config import check_bounds

logger = logging.getLogger(__name__)

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")
"""What ``report_to`` may name: accelerate's trackers (``all``: every one installed; ``none``: none)."""
BASE_DTYPES = ("auto", "float32", "bfloat16", "float16")


class Options:
    """The root of the option mixins: each ``__post_init__`` checks its own fields and calls the next in line."""

    def __post_init__(self) -> None:
        pass


@dataclass
class TrainOptions(Options):
    """Optimisation, precision, logging and checkpoints: the same flags for every trainer."""

    epochs: int = field(default=1, metadata={"help": "passes over the training data (unless max_steps is set)"})
    max_steps: int = field(default=0, metadata={"help": "optimizer steps; 0: from epochs"})
    batch_size: int = field(default=8, metadata={"help": "rows per micro-batch and process"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step (the "
                                             "step's batch: batch_size x this x processes)"})
    lr: float = field(default=5e-4, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup: float = field(default=0.05, metadata={"help": "fraction of steps of linear warm-up (then cosine decay)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: off)"})
    mixed_precision: str = field(default="auto", metadata={"help": "autocast: auto (bf16 on a GPU that has it, else "
                                 "fp16 on a GPU; none on the CPU), no, bf16, fp16"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward (less "
                                         "memory, ~30%% more time)"})
    report_to: str = field(default="none", metadata={"help": "trackers to log to, comma-separated: tensorboard, "
                           "wandb, mlflow... (all: every one installed; none)"})
    log_every: int = field(default=20, metadata={"help": "steps per loss entry in the history and the trackers (0: "
                           "only the last step, or once per epoch where a trainer says so)"})
    eval_every: int = field(default=0, metadata={"help": "steps between evaluations (0: only at the end)"})
    save_every: int = field(default=200, metadata={"help": "steps between resumable checkpoints (0: none)"})
    seed: int = field(default=0, metadata={"help": "random seed (data order, initialisation, dropout)"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})

    lr_zero_inherits: ClassVar[bool] = False
    """A trainer that continues another run reads ``lr = 0`` as "the parent's" (grace-add)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bounds(self, at_least_one=("epochs", "batch_size", "gradient_accumulation_steps"),
                     non_negative=("log_every", "max_steps", "eval_every", "save_every", "threads", "weight_decay", "max_grad_norm"))
        if self.lr < 0 or (self.lr == 0 and not self.lr_zero_inherits):
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        self.report_to = ",".join(t.strip() for t in self.report_to.split(",") if t.strip()) or "none"
        unknown = [t for t in self.report_to.split(",") if t not in (*TRACKERS, "all", "none")]
        if unknown:
            raise ValueError(f"report_to names {unknown[0]!r}; choose from {', '.join(TRACKERS)}, all or none")


@dataclass
class BaseModelOptions(Options):
    """How a trainer loads the MLLM it adapts."""

    dtype: str = field(default="auto", metadata={"help": "base weights dtype: auto (the checkpoint's bf16/fp16 on a "
                       "GPU, float32 on the CPU), float32, bfloat16, float16"})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: 4-bit NF4 base through bitsandbytes (CUDA)"})
    processor_options: dict = field(default_factory=dict, metadata={"help": "image processor settings of the base, "
                                    "as for a stage (Qwen2-VL max_pixels...), a JSON table on the command line"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dtype not in BASE_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(BASE_DTYPES)}, got {self.dtype!r}")


@dataclass
class LoraOptions(BaseModelOptions):
    """The LoRA a trainer puts on the language model."""

    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    lora_targets: str = field(default="", metadata={"help": "comma-separated language-model modules to adapt, e.g. "
                              "q_proj,v_proj (default: the family's)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bounds(self, at_least_one=("lora_r",))
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        self.lora_targets = ",".join(t.strip() for t in self.lora_targets.split(",") if t.strip())


def resolve_mixed_precision(name: str, fp16_safe: bool = True, model: str = "the model") -> str:
    """What ``mixed_precision`` means here: ``auto`` is bf16 on a CUDA GPU that has it, fp16 on one that has not,
    ``no`` on the CPU (autocast to bf16 there is slower than float32 on most CPUs; ask for it with ``bf16``).

    A model family that is not ``fp16_safe`` (:attr:`genret.mllm.families.Family.fp16_safe`: Qwen2-VL's, Qwen3-VL's
    and Gemma 3's activations overflow float16) never gets fp16 autocast from ``auto``: on a GPU without bf16 (T4,
    V100) it trains in float32, with a warning; an explicit ``fp16`` stands, with a warning. The device is asked
    once, through :func:`genret.mllm.backend.gpu_bf16`, as the model's dtype choice does.
    """
    from genret.mllm.backend import gpu_bf16

    if name == "fp16" and not fp16_safe:
        logger.warning("%s: mixed_precision fp16 was asked for, but this model family's activations overflow float16 "
                       "(outputs are reported to turn to garbage, transformers#33294); bf16 or no is safe", model)
    if name != "auto":
        return name
    bf16 = gpu_bf16()
    if bf16 is None:
        return "no"
    if bf16:
        return "bf16"
    if fp16_safe:
        return "fp16"
    logger.warning("%s: mixed_precision auto is no (float32) on this GPU: it has no bfloat16, and this model family's "
                   "activations overflow float16 (transformers#33294)", model)
    return "no"
