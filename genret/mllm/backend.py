"""Loading a multimodal LLM: any image-text-to-text checkpoint, its processor, dtype, placement, quantisation.

Example::

    mllm = MLLM.load("Qwen/Qwen2-VL-2B-Instruct", dtype="bfloat16", device_map="auto", load_in_4bit=True)
    mllm = MLLM.load("adapters/mini-world/mllm")  # the miniature world's LLaVA, same code path
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from genret._hub import check_model_ref, model_fingerprint
from genret.mllm.families import Family, family_of

logger = logging.getLogger(__name__)


def bitsandbytes_available() -> bool:
    """Whether bitsandbytes imports (4/8-bit loading)."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


@dataclass
class MLLMConfig:
    """How to load the multimodal LLM."""

    model: str = field(default="", metadata={"help": "Hugging Face model id or local directory"})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16"})
    device_map: str = field(default="", metadata={"help": "accelerate device map: '', 'auto', 'cpu', 'cuda:0'"})
    load_in_4bit: bool = field(default=False, metadata={"help": "4-bit NF4 weights through bitsandbytes"})
    load_in_8bit: bool = field(default=False, metadata={"help": "8-bit weights through bitsandbytes"})
    trust_remote_code: bool = field(default=False, metadata={"help": "run code shipped with the checkpoint"})

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("choose one of load_in_4bit and load_in_8bit")


class MLLM:
    """A loaded image-text-to-text model with its processor and family.

    Attributes:
        model: the transformers model (possibly a peft model once adapters are attached).
        processor: its processor (tokenizer, image processor, chat template).
        family: the :class:`Family` of its ``model_type``.
        model_id: the reference it was loaded from.
        revision: a fingerprint of the base weights.
    """

    def __init__(self, model, processor, model_id: str, revision: str) -> None:
        self.model = model
        self.processor = processor
        self.family: Family = family_of(model)
        self.model_id = model_id
        self.revision = revision
        self.adapters: dict[str, dict] = {}

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def attach_adapter(self, path, name: str | None = None, **checks) -> str:
        """Load a genret LoRA adapter directory onto this model, checked against its manifest; returns its name.

        Keyword arguments (``task``, ``mode``, ``prompt``, ``activate``, ``trainable``): see
        :func:`genret.mllm.adapters.attach_adapter`.
        """
        from genret.mllm.adapters import attach_adapter

        return attach_adapter(self, path, name, **checks)

    def use_adapter(self, names: str | list[str] | None) -> None:
        """Activate one adapter, several stacked (a list), or none (``None``: the base model alone)."""
        from genret.mllm.adapters import use_adapter

        use_adapter(self, names)

    def detach_adapter(self, name: str) -> None:
        """Remove an attached adapter (after the last one the model is the plain base again)."""
        from genret.mllm.adapters import detach_adapter

        detach_adapter(self, name)

    @property
    def active_adapters(self) -> list[str]:
        """The names of the adapters now applied (empty: the base model alone)."""
        from genret.mllm.adapters import active_adapters

        return active_adapters(self)

    @classmethod
    def load(cls, config: MLLMConfig | str, **overrides) -> "MLLM":
        """Load a checkpoint by id or directory (see :class:`MLLMConfig` for the options)."""
        from transformers import AutoModelForImageTextToText

        if isinstance(config, str):
            config = MLLMConfig(model=config, **overrides)
        ref = check_model_ref(config.model, "MLLM")
        kwargs: dict = {"dtype": getattr(torch, config.dtype), "trust_remote_code": config.trust_remote_code}
        if config.device_map:
            kwargs["device_map"] = config.device_map
        if config.load_in_4bit or config.load_in_8bit:
            kwargs["quantization_config"] = quantization_config(config)
        try:
            processor = load_processor(ref, trust_remote_code=config.trust_remote_code)
            model = AutoModelForImageTextToText.from_pretrained(ref, **kwargs)
        except OSError as err:
            raise FileNotFoundError(f"could not load MLLM {config.model!r}: {err}") from None
        except ValueError as err:
            if "Unrecognized configuration class" in str(err):
                raise ValueError(f"{config.model!r} is not an image-text-to-text model: {str(err).splitlines()[0]}") from None
            raise
        if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
            raise ValueError(f"{config.model!r}: AutoProcessor returned {type(processor).__name__} without an image "
                             "processor; the checkpoint's processor files are missing or need torchvision")
        model.eval()
        return cls(model, processor, str(config.model), model_fingerprint(ref, getattr(model.config, "_commit_hash", None)))


def processor_without_video(cls: type) -> type:
    """``cls`` (e.g. ``Qwen2VLProcessor``) built without its video processor, which needs torchvision.

    The subclass keeps ``cls``'s name, so that ``save_pretrained`` writes the real processor class
    and the directory loads anywhere as the real processor would.
    """
    if cls not in _NO_VIDEO:
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            kwargs.pop("video_processor", None)
            cls.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        _NO_VIDEO[cls] = type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                                     "__doc__": cls.__doc__})
    return _NO_VIDEO[cls]


_NO_VIDEO: dict[type, type] = {}


def load_processor(ref: str, trust_remote_code: bool = False):
    """``AutoProcessor.from_pretrained(ref)``, falling back to the processor without its video part.

    Qwen2-VL's, Qwen2.5-VL's and SmolVLM's processors build a video processor that needs
    torchvision; without it ``AutoProcessor`` raises or silently returns the bare tokenizer. Then
    the model type's processor class is loaded again through :func:`processor_without_video`.
    """
    from transformers import AutoProcessor

    error: Exception | None = None
    try:
        processor = AutoProcessor.from_pretrained(ref, trust_remote_code=trust_remote_code)
    except (OSError, ImportError, ValueError) as err:
        processor, error = None, err
    if processor is not None and hasattr(processor, "image_processor") and hasattr(processor, "tokenizer"):
        return processor
    cls = _processor_class(ref, trust_remote_code)
    if cls is not None and "video_processor" in cls.get_attributes():
        logger.info("%s: loading %s without its video processor", ref, cls.__name__)
        return processor_without_video(cls).from_pretrained(ref)
    if error is not None:
        raise error
    return processor


def _processor_class(ref: str, trust_remote_code: bool):
    """The transformers processor class registered for ``ref``'s model type, if any."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    try:
        model_type = AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code).model_type
    except (OSError, ValueError):
        return None
    name = PROCESSOR_MAPPING_NAMES.get(model_type)
    return getattr(transformers, name, None) if isinstance(name, str) else None


def quantization_config(config: MLLMConfig):
    """A ``BitsAndBytesConfig`` for 4-bit (NF4, double quantisation) or 8-bit loading."""
    if not bitsandbytes_available():
        raise RuntimeError("4-bit and 8-bit loading need bitsandbytes: pip install 'genret[quant]' "
                           "(on a CUDA machine for speed; this bitsandbytes also runs NF4 on the CPU)")
    from transformers import BitsAndBytesConfig

    if config.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if config.dtype == "bfloat16" else torch.float16 if config.dtype == "float16" else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)
