"""MLLM embedders (Qwen3-VL-Embedding, GME) as the prefilter's dual encoder: instructed, last-token pooled, normalised.

One model embeds images, texts and image + text inputs into one space; what sets a query apart from a document is
the instruction (:mod:`genret.encoders.embedders` holds each checkpoint's conventions as data). So every call says
its ``role``: the gallery is embedded as documents (``genret index build``), queries as queries (the prefilter).
The embedding cache is kept per role and settings (instruction, dimensions, pooling, image size), and an index's
manifest records the document-side settings, so an index built under other settings is refused on load.

Qwen3-VL-Embedding runs through sentence-transformers' multimodal ``SentenceTransformer``, built from the
checkpoint's own ``modules.json`` (``Transformer`` over ``Qwen3VLModel``, ``Pooling`` ``lasttoken``,
``Normalize``): genret passes the instruction as its ``prompt`` (which it writes as the system message, as the
authors' code does) and resizes each image first as the authors' code does. Two things genret adds, and why:
the images are resized before sentence-transformers sees them (the authors resize with ``qwen_vl_utils``, in PIL,
and then call the processor with ``do_resize=False``; transformers' PIL image processor, loaded with the same pixel
bounds, resizes to the same grid with the same filter -- the tests find no difference without the pre-resize --
but with torchvision installed transformers resizes in torch, and the pre-resize keeps the authors' pixels), and on
a machine without torchvision sentence-transformers cannot build any Qwen-VL
processor (its video part needs torchvision), so while it loads, its ``AutoProcessor`` is genret's loader that
falls back to the processor without the video part (:func:`genret.mllm.backend.load_processor`).

GME and VLM2Vec run through genret's own forwards (:mod:`genret.encoders.gme` and :mod:`genret.encoders.vlm2vec`
say why sentence-transformers cannot).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging

import numpy as np
import torch

from genret._hub import check_model_ref, model_fingerprint
from genret.encoders.base import DualEncoder
from genret.encoders.cache import EmbeddingCache
from genret.encoders.embedders import EmbedderSpec, resize_for, resolve_spec
from genret.encoders.hf import default_device

logger = logging.getLogger(__name__)
ROLES = ("query", "document")


class MLLMEmbedder(DualEncoder):
    """An instructed MLLM embedder behind the :class:`DualEncoder` contract.

    Args:
        model: a hub id or a local checkpoint folder.
        embedder: whose conventions it follows (``qwen3-vl-embedding``, ``gme``, ``vlm2vec``); may be left out for the
            published hub ids.
        query_instruction: the instruction queries are embedded under (default: the authors' default).
        document_instruction: the same for gallery items.
        dim: a Matryoshka truncation (the first ``dim`` values, normalised again); 0 keeps the model's size.
        device: default the GPU when there is one.
        dtype: torch dtype name of the weights, or ``auto``; resolved with the checkpoint's family as
            :meth:`genret.mllm.MLLM.load` does (Qwen2-VL / Qwen3-VL overflow fp16: ``auto`` never gives it them, an
            explicit float16 is warned about).
        cache: an optional :class:`EmbeddingCache`.
        trust_remote_code: off by default; neither embedder needs it.

    Example::

        enc = MLLMEmbedder("Qwen/Qwen3-VL-Embedding-2B", dim=1024,
                           query_instruction="Retrieve images or text relevant to the user's query.")
        gallery = enc.encode_images(paths, role="document")
        queries = enc.encode_texts(["a red circle left of a blue square"], role="query")
    """

    backend = "mllm"

    def __init__(self, model: str, embedder: str = "", query_instruction: str | None = None,
                 document_instruction: str | None = None, dim: int = 0, device: str | None = None,
                 dtype: str = "float32", cache: EmbeddingCache | None = None, trust_remote_code: bool = False) -> None:
        self.spec: EmbedderSpec = resolve_spec(embedder, str(model))
        ref = check_model_ref(model, "encoder model")
        self.device = device or default_device()
        try:
            if self.spec.engine == "sentence-transformers":
                self._st = _load_sentence_transformer(self.spec, ref, self.device, dtype, trust_remote_code)
                full = int(self._st.get_embedding_dimension())
            elif self.spec.engine == "vlm2vec":
                from genret.encoders.vlm2vec import VLM2VecForward

                self._gme = VLM2VecForward(self.spec, ref, self.device, dtype, trust_remote_code)
                full = self._gme.dim
            else:
                from genret.encoders.gme import GMEForward

                self._gme = GMEForward(self.spec, ref, self.device, dtype, trust_remote_code)
                full = self._gme.dim
        except OSError as err:
            raise FileNotFoundError(f"could not load encoder model {model!r}: {err}") from None
        if dim and not self.spec.mrl_min:
            raise ValueError(f"encoder dim = {dim}: {self.spec.name} was not trained for truncated (Matryoshka) "
                             f"embeddings; leave dim at 0 ({full})")
        if dim and not 1 <= dim <= full:
            raise ValueError(f"encoder dim = {dim}: {self.spec.name} embeddings have {full} dimensions; truncate to "
                             f"{self.spec.mrl_min} - {full}")
        if dim and dim < self.spec.mrl_min:
            logger.warning("encoder dim = %d: below the %d dimensions %s was trained to keep", dim,
                           self.spec.mrl_min, self.spec.name)
        self.instructions = {
            "query": self.spec.instruction(self.spec.query_instruction if query_instruction is None
                                           else query_instruction),
            "document": self.spec.instruction(self.spec.document_instruction if document_instruction is None
                                              else document_instruction)}
        for role, text in self.instructions.items():
            if not text:
                raise ValueError(f"encoder {role}_instruction is empty: {self.spec.name} writes it as the system "
                                 "message; leave the setting out for the authors' default")
        self.full_dim = full
        # an adapter checkpoint's own files do not say which base it was merged into: the base's fingerprint too
        revision = model_fingerprint(ref) + getattr(getattr(self, "_gme", None), "revision_suffix", "")
        super().__init__(str(model), revision, dim or full, cache)

    # -- what the manifest and the cache are keyed by -------------------------------------------------------
    def settings(self, role: str) -> dict:
        """Everything besides the weights that makes ``role``'s vectors what they are."""
        s = self.spec
        # a spec whose text documents take no instruction records so: the text gallery's vectors were made without it
        plain = {"text_instruction": ""} if role == "document" and not s.text_documents_instructed else {}
        return {"embedder": s.name, "instruction": self.instructions[role], **plain, "pooling": s.pooling,
                "normalize": s.normalize, "dim": self.dim, "resize": [s.resize_factor, s.min_pixels, s.max_pixels],
                "processor_options": s.processor_options, "max_length": s.max_length,
                **({"image_size": list(s.image_size)} if s.image_size else {})}

    def describe(self) -> dict:
        """The manifest record: the document side is checked on load (an index holds documents), the query
        instruction is recorded only (changing it needs no new index)."""
        return {**super().describe(), "settings": self.settings("document"),
                "query_instruction": self.instructions["query"]}

    def namespace_for(self, role: str | None) -> str:
        key = json.dumps([self.backend, self.revision, self.settings(self._need(role))],  # files, not name
                         sort_keys=True)
        return hashlib.sha1(key.encode()).hexdigest()[:16]

    def _role_kwargs(self, role: str | None) -> dict:
        return {"role": self._need(role)}

    @staticmethod
    def _need(role: str | None) -> str:
        if role not in ROLES:
            raise ValueError(f"an instructed embedder embeds queries and documents differently: pass role='query' "
                             f"or role='document' (got {role!r})")
        return role

    # -- embedding ------------------------------------------------------------------------------------------
    def _embed_images(self, images: list, role: str) -> np.ndarray:
        return self._embed(images, [None] * len(images), role)

    def _embed_texts(self, texts: list[str], role: str) -> np.ndarray:
        return self._embed(None, list(texts), role)

    def encode_pairs(self, images: list, texts: list[str], role: str = "query") -> np.ndarray:
        """Embed image + text inputs (a composed query: a reference image and its modification) jointly, as one
        input each, into an ``(n, dim)`` array of unit rows. Not cached."""
        from genret.data.images import load_image

        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images for {len(texts)} texts")
        vecs = self._embed([load_image(x) for x in images], list(texts), self._need(role))
        return vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)

    @torch.inference_mode()
    def _embed(self, images: list | None, texts: list[str | None], role: str) -> np.ndarray:
        instruction = self.instructions[role]
        if images is None and role == "document" and not self.spec.text_documents_instructed:
            instruction = ""  # e.g. VLM2Vec embeds text documents as they are (MMEB's text candidates)
        if self.spec.engine == "sentence-transformers":
            inputs = []
            for i, text in enumerate(texts):
                item = {"image": resize_for(self.spec, images[i])} if images is not None else {}
                if text is not None:
                    item["text"] = text
                inputs.append(item if images is not None else text)
            vecs = self._st.encode(inputs, prompt=instruction, batch_size=len(inputs), convert_to_tensor=True,
                                   show_progress_bar=False)
        else:
            vecs = self._gme.embed(images, texts, instruction)
            if self.spec.normalize:
                vecs = torch.nn.functional.normalize(vecs.float(), p=2, dim=-1)
        # Matryoshka: the first dim values; DualEncoder._encode normalises them again.
        return vecs[:, :self.dim].float().cpu().numpy()


def _load_sentence_transformer(spec: EmbedderSpec, ref: str, device: str, dtype: str, trust_remote_code: bool):
    """The checkpoint as sentence-transformers loads it (in ``dtype`` as its family allows), checked to pool as
    ``spec`` says."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoConfig

    from genret.mllm.backend import dtype_for_checkpoint

    dtype = dtype_for_checkpoint(dtype, AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code), ref)

    with _processor_without_torchvision():
        model = SentenceTransformer(ref, device=device, trust_remote_code=trust_remote_code,
                                    model_kwargs={"dtype": dtype}, processor_kwargs=dict(spec.processor_options))
    kinds = {type(m).__name__: m for m in model}
    pooling = getattr(kinds.get("Pooling"), "pooling_mode", None)
    if pooling != spec.pooling or ("Normalize" in kinds) != spec.normalize:
        raise ValueError(f"{ref!r}: its sentence-transformers modules ({', '.join(kinds)}; pooling {pooling!r}) are "
                         f"not {spec.name}'s ({spec.pooling} pooling{', Normalize' if spec.normalize else ''}); "
                         "check its modules.json and 1_Pooling/config.json")
    return model


@contextlib.contextmanager
def _processor_without_torchvision():
    """sentence-transformers' ``AutoProcessor`` is genret's loader while a model loads (see the module docstring)."""
    import sentence_transformers.base.modules.transformer as st_transformer

    from genret.mllm.backend import load_processor

    class _Loader:
        @staticmethod
        def from_pretrained(ref, **options):
            trust = options.pop("trust_remote_code", False)
            return load_processor(ref, trust, **options)

    original = st_transformer.AutoProcessor
    st_transformer.AutoProcessor = _Loader
    try:
        yield
    finally:
        st_transformer.AutoProcessor = original
