"""Loading a multimodal LLM: any image-text-to-text checkpoint, its processor, dtype, placement, quantisation.

Example::

    mllm = MLLM.load("Qwen/Qwen2-VL-2B-Instruct")   # on a GPU: bf16 there; on a CPU: float32
    mllm = MLLM.load("Qwen/Qwen2-VL-2B-Instruct", load_in_4bit=True, processor_options={"max_pixels": 512 * 28 * 28})
    mllm = MLLM.load("adapters/mini-world/mllm")  # the miniature world's LLaVA, same code path

Defaults suit the machine they run on: ``dtype="auto"`` is the checkpoint's ``torch_dtype`` (bf16/fp16) where a
CUDA device is present (float32 for a family that overflows fp16 on a GPU without bf16) and float32 on the CPU; ``device_map="auto"`` places the model on the GPU(s) where
CUDA is present (accelerate's ``"auto"``) and on the CPU otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch

from genret._hub import NotDownloaded, check_model_ref, model_fingerprint
from genret.mllm.families import Family, family_for_type, family_of

logger = logging.getLogger(__name__)


def bitsandbytes_available() -> bool:
    """Whether bitsandbytes imports (4/8-bit loading)."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


DTYPES = ("auto", "float32", "bfloat16", "float16")


def gpu_bf16() -> bool | None:
    """What the CUDA device offers: None without one, else whether it computes in bf16 (Ampere and later; a T4 or
    V100 does not). The one place the dtype choice asks torch.cuda."""
    if not torch.cuda.is_available():
        return None
    return bool(torch.cuda.is_bf16_supported())


def choose_dtype(dtype: str, checkpoint_dtype=None, bf16: bool | None = None, fp16_safe: bool = True,
                 model: str = "the model") -> tuple["torch.dtype", str]:
    """The torch dtype ``dtype`` means on a machine whose GPU offers ``bf16`` (:func:`gpu_bf16`; None: no GPU), and
    why, where the choice needs saying. A pure function: the machine is an argument.

    ``"auto"`` is float32 on the CPU. On a GPU it is a bf16 or fp16 checkpoint's own ``torch_dtype``, and bf16 for a
    float32 one; where the GPU has no bf16, fp16. A family that is not ``fp16_safe``
    (:attr:`genret.mllm.families.Family.fp16_safe`: Qwen2-VL's and Gemma 3's activations overflow fp16 and they
    answer garbage) never gets fp16 from ``auto``: bf16 where the GPU has it, else float32. An explicit dtype
    stands, with a warning where it is such a family's fp16.

    Returns:
        The dtype and a message for the log ("" when there is nothing to say).
    """
    if dtype != "auto":
        if dtype == "float16" and not fp16_safe:
            return torch.float16, (f"{model}: dtype float16 was asked for, but this model family's activations "
                                   "overflow float16 (its outputs are reported to turn to garbage, transformers#33294); "
                                   "bfloat16 or float32 is safe")
        return getattr(torch, dtype), ""
    if bf16 is None:
        return torch.float32, ""
    name = str(checkpoint_dtype or "").replace("torch.", "")
    if bf16 and (name != "float16" or not fp16_safe):  # an fp16 checkpoint of such a family runs in bf16
        return torch.bfloat16, ""
    if fp16_safe:
        return torch.float16, ""
    return torch.float32, (f"{model}: dtype auto is float32 on this GPU: it has no bfloat16, and this model family's "
                           "activations overflow float16 (outputs are reported to turn to garbage, transformers#33294); "
                           "float32 takes twice the memory of half precision")


def resolve_dtype(dtype: str, checkpoint_dtype=None, family: Family | None = None, model: str = "the model") -> "torch.dtype":
    """The torch dtype ``dtype`` means on this machine (:func:`choose_dtype` with :func:`gpu_bf16`), logging why
    where it is not the plain choice."""
    chosen, why = choose_dtype(dtype, checkpoint_dtype, gpu_bf16(), getattr(family, "fp16_safe", True), model)
    if why:
        logger.warning(why)
    return chosen


def dtype_for_checkpoint(dtype: str, hf_config, model: str = "the model") -> "torch.dtype":
    """:func:`resolve_dtype` for a checkpoint by its config: the dtype its weights were saved in and its family's
    fp16 safety (``family_for_type(config.model_type)``), so every loader of MLLM weights (:meth:`MLLM.load`, the MLLM
    embedders) keeps the same guard."""
    text = getattr(hf_config, "text_config", None) or hf_config
    # ``dtype`` (transformers >= 4.56; reading ``torch_dtype`` there warns that it is deprecated), else the old name.
    saved = next((getattr(c, name, None) for name in ("dtype", "torch_dtype") for c in (hf_config, text)
                  if getattr(c, name, None) is not None), None)
    return resolve_dtype(dtype, saved, family_for_type(hf_config.model_type, model), model)


def resolve_device_map(device_map: str) -> str | None:
    """What ``device_map`` passes to ``from_pretrained``: ``"auto"`` (or legacy ``""``) is the GPUs where CUDA is
    present and nothing (the CPU) otherwise."""
    if device_map in ("", "auto"):
        return "auto" if torch.cuda.is_available() else None
    return device_map


@dataclass
class MLLMConfig:
    """How to load the multimodal LLM."""

    model: str = field(default="", metadata={"help": "Hugging Face model id or local directory"})
    dtype: str = field(default="auto", metadata={"help": "auto (the checkpoint's bf16/fp16 on a GPU, float32 on the "
                                                         "CPU), float32, bfloat16 or float16"})
    device_map: str = field(default="auto", metadata={"help": "auto (the GPUs where CUDA is present, else the CPU), "
                                                              "'cpu', 'cuda:0', or an accelerate strategy ('balanced')"})
    load_in_4bit: bool = field(default=False, metadata={"help": "4-bit NF4 weights through bitsandbytes"})
    load_in_8bit: bool = field(default=False, metadata={"help": "8-bit weights through bitsandbytes"})
    trust_remote_code: bool = field(default=False, metadata={"help": "run code shipped with the checkpoint"})
    processor_options: dict = field(default_factory=dict, metadata={
        "help": "image processor settings passed to from_pretrained, per family: Qwen2-VL min_pixels/max_pixels, "
                "Idefics3/SmolVLM do_image_splitting/size/max_image_size, LLaVA size/crop_size"})

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.processor_options, dict):
            raise ValueError(f"processor_options must be a table of settings, got {self.processor_options!r}")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("choose one of load_in_4bit and load_in_8bit")


@dataclass
class MLLMLoadConfig:
    """How a stage loads its MLLM: the settings of :class:`MLLMConfig` beside the model reference.

    Every MLLM stage's config extends it, so each one takes the same dtype, placement, quantisation
    and processor settings from a pipeline file.
    """

    dtype: str = field(default="auto", metadata={"help": MLLMConfig.__dataclass_fields__["dtype"].metadata["help"]})
    device_map: str = field(default="auto", metadata={"help": MLLMConfig.__dataclass_fields__["device_map"].metadata["help"]})
    load_in_4bit: bool = field(default=False, metadata={"help": "load the MLLM in 4 bits (bitsandbytes)"})
    load_in_8bit: bool = field(default=False, metadata={"help": "load the MLLM in 8 bits (bitsandbytes)"})
    processor_options: dict = field(default_factory=dict, metadata={
        "help": MLLMConfig.__dataclass_fields__["processor_options"].metadata["help"]})

    def mllm_config(self, model: str) -> MLLMConfig:
        """The :class:`MLLMConfig` of ``model`` with these settings (checked there)."""
        return MLLMConfig(model=model, dtype=self.dtype, device_map=self.device_map, load_in_4bit=self.load_in_4bit,
                          load_in_8bit=self.load_in_8bit, processor_options=dict(self.processor_options))


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
        """Load a checkpoint by id or directory (see :class:`MLLMConfig` for the options).

        The checkpoint's ``config.json`` is read first: a model type genret has no family for, or a
        processor option that family does not take, is refused before any weights are loaded.
        """
        from transformers import AutoModelForImageTextToText

        if isinstance(config, str):
            config = MLLMConfig(model=config, **overrides)
        from genret.mllm.checkpoints import adapter_base, adapter_folder, merge_adapter

        base = adapter_base(config.model)
        if base is not None:  # a checkpoint shipped as a LoRA adapter (MonoQwen2-VL): its base, the adapter merged in
            adapter_folder(config.model)  # its files first (fetched, or offline what is missing named), then the base
            return merge_adapter(cls.load(replace(config, model=base)), config)
        ref, hf_config, family = check_mllm(config)
        kwargs: dict = {"dtype": dtype_for_checkpoint(config.dtype, hf_config, str(config.model)),
                        "trust_remote_code": config.trust_remote_code}
        device_map = resolve_device_map(config.device_map)
        if device_map:
            kwargs["device_map"] = device_map
        if config.load_in_4bit or config.load_in_8bit:
            kwargs["quantization_config"] = quantization_config(config, kwargs["dtype"])
        try:
            processor = load_processor(ref, trust_remote_code=config.trust_remote_code,
                                       **family.processor_load_kwargs(config.processor_options))
            family.apply_processor_options(processor, config.processor_options)
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
        return cls(model, processor, str(config.model), model_fingerprint(ref))


def check_mllm(config: MLLMConfig, what: str = "MLLM", files: bool = True) -> tuple[str, object, Family]:
    """What :meth:`MLLM.load` checks before any weights are read: the model is there (a local directory, or a hub id
    that can be fetched), genret has a family for its type, that family takes the processor options, and
    bitsandbytes is installed for 4/8-bit loading. Reads only the checkpoint's ``config.json``.

    Args:
        what: how errors name the model (``"p.toml: stages[1].model"``).
        files: check a local directory's files against its manifest too (:func:`genret._hub.check_model_ref`).

    Returns:
        The reference to load from, the checkpoint's config, and its family.
    """
    from transformers import AutoConfig

    from genret.mllm.checkpoints import adapter_base

    base = adapter_base(config.model)
    if base is not None:  # a LoRA adapter checkpoint: what loads is its base (genret.mllm.checkpoints)
        check_model_ref(config.model, what, files=files)
        return check_mllm(replace(config, model=base), f"{what} (base of the adapter checkpoint {config.model!r})",
                          files)
    ref = check_model_ref(config.model, what, files=files)
    try:
        hf_config = AutoConfig.from_pretrained(ref, trust_remote_code=config.trust_remote_code)
    except OSError as err:
        raise FileNotFoundError(f"{what} {config.model!r}: could not read its config.json ({err})") from None
    except ValueError as err:
        raise ValueError(f"{what} {config.model!r}: {str(err).splitlines()[0]}") from None
    family = family_for_type(hf_config.model_type, config.model)
    family.check_processor_options(config.processor_options, config.model)
    if (config.load_in_4bit or config.load_in_8bit) and not bitsandbytes_available():
        raise ValueError(f"{what} {config.model!r}: 4-bit and 8-bit loading need bitsandbytes: "
                         "pip install 'genret[quant]'")
    return ref, hf_config, family


class BaseModel(NamedTuple):
    """What an adapter is checked against (:func:`genret.mllm.adapters.check_adapter`), known before the weights
    load: the model's reference, its family and its weights' fingerprint (a loaded :class:`MLLM` has the same three;
    ``""`` for a hub model whose weights are not fetched yet: the fingerprint is checked once they are)."""

    model_id: str
    family: Family
    revision: str

    @classmethod
    def of(cls, config: MLLMConfig, what: str = "MLLM") -> "BaseModel":
        """The base model ``config`` names, checked by :func:`check_mllm` (no weights read)."""
        ref, _, family = check_mllm(config, what, files=False)
        try:
            revision = model_fingerprint(ref)
        except NotDownloaded:  # a hub model's weights are fetched as it loads: its adapters are checked then
            return cls(str(config.model), family, "")
        from genret.mllm.checkpoints import adapter_base, adapter_fingerprint

        if adapter_base(config.model) is not None:  # an adapter checkpoint, merged as it loads
            try:
                revision = f"{revision}+{adapter_fingerprint(config.model)}"
            except NotDownloaded:  # a hub adapter's weights are fetched as it loads, like a hub model's
                return cls(str(config.model), family, "")
        return cls(str(config.model), family, revision)


def processor_without_video(cls: type) -> type:
    """``cls`` (e.g. ``Qwen2VLProcessor``) built without its video processor, which needs torchvision.

    The subclass keeps ``cls``'s name, so that ``save_pretrained`` writes the real processor class
    and the directory loads anywhere as the real processor would. It keeps ``cls``'s ``__init__``
    (``from_pretrained`` passes on only the settings of ``processor_config.json`` that ``__init__``
    names, LLaVA-OneVision's ``num_image_tokens`` among them) and only stops listing the video
    processor among the parts to load.
    """
    if cls not in _NO_VIDEO:
        def get_attributes(klass):
            return [a for a in cls.get_attributes() if a != "video_processor"]

        _NO_VIDEO[cls] = type(cls.__name__, (cls,), {"get_attributes": classmethod(get_attributes),
                                                     "__module__": cls.__module__, "__doc__": cls.__doc__})
    return _NO_VIDEO[cls]


_NO_VIDEO: dict[type, type] = {}


def load_processor(ref: str, trust_remote_code: bool = False, **options):
    """``AutoProcessor.from_pretrained(ref, **options)``, falling back to the processor without its video part.

    Qwen2-VL's, Qwen2.5-VL's and SmolVLM's processors build a video processor that needs
    torchvision; without it ``AutoProcessor`` raises or silently returns the bare tokenizer. Then
    the model type's processor class is loaded again through :func:`processor_without_video`.
    """
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    cls = _processor_class(ref, trust_remote_code)
    if cls is not None and "video_processor" in cls.get_attributes() and not is_torchvision_available():
        # AutoProcessor would load the tokenizer, find no video processor and return the tokenizer alone: load once.
        return processor_without_video(cls).from_pretrained(ref, **options)
    error: Exception | None = None
    try:
        processor = AutoProcessor.from_pretrained(ref, trust_remote_code=trust_remote_code, **options)
    except (OSError, ImportError, ValueError) as err:
        processor, error = None, err
    if processor is not None and hasattr(processor, "image_processor") and hasattr(processor, "tokenizer"):
        return processor
    if cls is not None and "video_processor" in cls.get_attributes():
        logger.info("%s: loading %s without its video processor", ref, cls.__name__)
        return processor_without_video(cls).from_pretrained(ref, **options)
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


def quantization_config(config: MLLMConfig, compute: "torch.dtype | None" = None):
    """A ``BitsAndBytesConfig`` for 4-bit (NF4, double quantisation) or 8-bit loading."""
    if not bitsandbytes_available():
        raise RuntimeError("4-bit and 8-bit loading need bitsandbytes: pip install 'genret[quant]' "
                           "(on a CUDA machine for speed; this bitsandbytes also runs NF4 on the CPU)")
    from transformers import BitsAndBytesConfig

    if config.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = compute or resolve_dtype(config.dtype)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)
