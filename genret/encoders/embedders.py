"""The conventions of published MLLM embedders, as data: instructions, prompt layout, pooling, dimensions, image size.

An MLLM embedder (Qwen3-VL-Embedding, GME, VLM2Vec) turns an instructed prompt around an image or a text into one
vector: the hidden state of its last token. What differs between checkpoints is not code but settings, each taken
from the authors' own inference code (sources below and in ``docs/real-checkpoints.md``):

- ``qwen3-vl-embedding``: QwenLM/Qwen3-VL-Embedding ``src/models/qwen3_vl_embedding.py`` @ 8ce3aab: the instruction
  is the system message (default ``Represent the user's input.``; one that does not end in punctuation gets a ``.``),
  the user turn holds the image(s) then the text, the checkpoint's chat template renders it with the generation
  prompt; images are resized on a 32-pixel grid to 4,096 - 1,843,200 pixels; last non-padding token of
  ``Qwen3VLModel``'s output, L2-normalised; 2048 dimensions (2B) or 4096 (8B), Matryoshka-trained (README "MRL
  Support"; the dimensions are not listed there: genret accepts 64 up to the full size, as sentence-transformers'
  model cards of its fine-tunes offer 64 - 2048), truncated then normalised again.
- ``gme``: Alibaba-NLP/gme-Qwen2-VL-2B-Instruct ``gme_inference.py`` (a copy is in TIGER-AI-Lab/VLM2Vec
  ``src/model/baseline_backbone/gme/gme_inference.py`` @ 6e1e1d4): system = the query's instruction, or
  ``You are a helpful assistant.`` (always, for documents); the image then the text in the user turn; the prompt ends
  ``<|im_start|>assistant\\n<|endoftext|>`` and that last token is pooled; images resized on a 28-pixel grid
  (``_smart_resize``), then by the processor to 256 - 1,280 visual tokens; the language model runs on the spliced
  embeddings with plain (1-D) positions, as that code does under the transformers < 4.52 it requires.
- ``vlm2vec``: TIGER-AI-Lab/VLM2Vec @ 6e1e1d4 (``src/model/processor.py``, ``src/model/model.py``, its Qwen2-VL fork
  and the MMEB retrieval parsers): no chat template, no system message; the prompt is
  ``[<|image_pad|>\\n]{instruction}[ {text}]\\n`` (text documents without an instruction are embedded as they are,
  as MMEB's text candidates are); the processor bounds are ``DataArguments``' defaults (3,136 - 1,003,520 pixels),
  an image with a side under 28 pixels is resized to 56x56 first; last token, L2-normalised; every token gets a 1-D
  position (:mod:`genret.encoders.vlm2vec` says why). The default instructions are MMEB's MSCOCO text-to-image
  pair (the query's ``Find me an everyday image that matches the given caption:``, the image's ``Represent the given
  image.``): each MMEB task has its own (``ziyjiang/MMEB_Test_Instruct``; the exact strings are UNVERIFIED here, the
  repository's comments quote them with other punctuation).
- ``vlm2vec-v1``: VLM2Vec v1 on Qwen2-VL (TIGER-Lab/VLM2Vec-Qwen2VL-2B/7B): the same code, but its MMEB run
  (``experiments/public/eval/eval_vlm2vecv1_8gpu.sh``: ``--resize_use_processor false --image_resolution high``)
  resizes every image to 1344x1344 (``MultimodalEvalDataCollator``) before the processor.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EmbedderSpec:
    """How one published MLLM embedder is run.

    Attributes:
        name: the name a pipeline file gives (``embedder = "..."``).
        engine: ``sentence-transformers`` (its multimodal ``SentenceTransformer`` loads the checkpoint as published)
            or ``gme`` / ``vlm2vec`` (genret's own forwards: see :mod:`genret.encoders.gme`,
            :mod:`genret.encoders.vlm2vec`).
        hub_ids: checkpoints known to follow these conventions (so ``embedder`` may be left out for them).
        query_instruction / document_instruction: the defaults of the authors' code.
        punctuate: end an instruction without final punctuation with a ``.`` (Qwen3-VL-Embedding does).
        pooling: the token whose hidden state is the embedding (``lasttoken``: the last non-padding one).
        normalize: L2-normalise the pooled vector.
        mrl_min: the smallest dimension a Matryoshka-trained model may be truncated to (0: not Matryoshka-trained,
            truncation is refused).
        resize_factor, min_pixels, max_pixels: the authors' resize of an image before the processor (smart resize
            onto a ``resize_factor`` grid, within the pixel bounds).
        processor_options: settings the processor is loaded with (``from_pretrained`` applies ``min_pixels`` /
            ``max_pixels``; a ``size`` given there is not applied in transformers 5.24).
        max_length: the authors' token limit of one input.
        image_size: a fixed (width, height) every image is resized to before the processor (VLM2Vec v1's MMEB
            runs); empty: none.
        text_documents_instructed: whether a text document is embedded under the document instruction (False:
            as it is, VLM2Vec's MMEB text candidates; the instruction is then an image document's only).
    """

    name: str
    engine: str
    hub_ids: tuple[str, ...] = ()
    query_instruction: str = ""
    document_instruction: str = ""
    punctuate: bool = False
    pooling: str = "lasttoken"
    normalize: bool = True
    mrl_min: int = 0
    resize_factor: int = 28
    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 16384 * 28 * 28
    processor_options: dict = field(default_factory=dict)
    max_length: int = 8192
    image_size: tuple[int, int] | tuple = ()
    text_documents_instructed: bool = True

    def instruction(self, text: str) -> str:
        """``text`` as the authors' code writes it into the prompt."""
        text = text.strip() if self.punctuate else text
        if self.punctuate and text and not unicodedata.category(text[-1]).startswith("P"):
            text += "."
        return text


_QWEN3_FACTOR = 32  # patch 16 x merge 2

SPECS: dict[str, EmbedderSpec] = {
    spec.name: spec
    for spec in (
        EmbedderSpec(
            name="qwen3-vl-embedding", engine="sentence-transformers",
            hub_ids=("Qwen/Qwen3-VL-Embedding-2B", "Qwen/Qwen3-VL-Embedding-8B"),
            query_instruction="Represent the user's input.", document_instruction="Represent the user's input.",
            punctuate=True, mrl_min=64,
            resize_factor=_QWEN3_FACTOR, min_pixels=4 * _QWEN3_FACTOR ** 2, max_pixels=1800 * _QWEN3_FACTOR ** 2,
            processor_options={"min_pixels": 4 * _QWEN3_FACTOR ** 2, "max_pixels": 1800 * _QWEN3_FACTOR ** 2},
            max_length=8192),
        EmbedderSpec(
            name="gme", engine="gme",
            hub_ids=("Alibaba-NLP/gme-Qwen2-VL-2B-Instruct", "Alibaba-NLP/gme-Qwen2-VL-7B-Instruct"),
            query_instruction="You are a helpful assistant.", document_instruction="You are a helpful assistant.",
            resize_factor=28, min_pixels=4 * 28 * 28, max_pixels=16384 * 28 * 28,
            processor_options={"min_pixels": 256 * 28 * 28, "max_pixels": 1280 * 28 * 28}, max_length=1800),
        EmbedderSpec(
            name="vlm2vec", engine="vlm2vec", hub_ids=("VLM2Vec/VLM2Vec-V2.0",),
            query_instruction="Find me an everyday image that matches the given caption:",
            document_instruction="Represent the given image.",
            resize_factor=28, min_pixels=4 * 28 * 28, max_pixels=1280 * 28 * 28,
            processor_options={"min_pixels": 4 * 28 * 28, "max_pixels": 1280 * 28 * 28}, max_length=32768,
            text_documents_instructed=False),
        EmbedderSpec(
            name="vlm2vec-v1", engine="vlm2vec",
            hub_ids=("TIGER-Lab/VLM2Vec-Qwen2VL-2B", "TIGER-Lab/VLM2Vec-Qwen2VL-7B"),
            query_instruction="Find me an everyday image that matches the given caption:",
            document_instruction="Represent the given image.",
            resize_factor=28, min_pixels=4 * 28 * 28, max_pixels=1280 * 28 * 28,
            processor_options={"min_pixels": 4 * 28 * 28, "max_pixels": 1280 * 28 * 28}, max_length=32768,
            image_size=(1344, 1344), text_documents_instructed=False),
    )
}


def resolve_spec(embedder: str, model: str) -> EmbedderSpec:
    """The conventions named ``embedder``, or those of the known checkpoint ``model`` when ``embedder`` is empty.

    Raises:
        ValueError: an unknown name, or no name for a model the table does not know (a local folder, a fine-tune).
    """
    if embedder:
        if embedder not in SPECS:
            raise ValueError(f"unknown embedder {embedder!r}; known: {', '.join(sorted(SPECS))}")
        return SPECS[embedder]
    for spec in SPECS.values():
        if model in spec.hub_ids:
            return spec
    raise ValueError(f"encoder {model!r}: say which embedder's conventions it follows with embedder = "
                     f"{' | '.join(repr(n) for n in sorted(SPECS))} (only the published hub ids are recognised "
                     "by name)")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size Qwen's ``smart_resize`` gives an image: sides on a ``factor`` grid, area within the bounds.

    As ``qwen_vl_utils.vision_process.smart_resize`` (Apache-2.0), which both embedders' reference code uses.
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"an image of {width}x{height} pixels: its aspect ratio is over 200, which Qwen's "
                         "vision processing refuses")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def resize_for(spec: EmbedderSpec, image):
    """``image`` (RGB PIL) resized as the spec's reference code does before its processor."""
    h, w = smart_resize(image.height, image.width, spec.resize_factor, spec.min_pixels, spec.max_pixels)
    return image if (w, h) == image.size else image.resize((w, h))
