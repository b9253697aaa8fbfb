"""The MLLM rerank stage: rescore the upstream candidates pointwise, generatively or listwise.

Both directions: a text query ranks images, an image query ranks captions. Each candidate keeps
the upstream score and gets this stage's own score; with ``fusion_weight`` set, the ranking score
is ``upstream + fusion_weight · rerank`` (LamRA's fusion), else the rerank score alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from genret.config import above, at_least, check_fields
from genret.data.images import load_image
from genret.index.items import item_image
from genret.mllm.checkpoints import Conventions, ConventionsError, conventions_for
from genret.mllm.features import FeatureStore
from genret.prompts import load_prompt
from genret.stages.base import STAGES, RankStage, StageContext
from genret.types import Item, Query, Ranking
from genret.mllm.backend import MLLMLoadConfig

if TYPE_CHECKING:
    from genret.index.gallery import Gallery

logger = logging.getLogger(__name__)
FEATURES_FORMAT = "genret.mllm_features"

MODES = {
    "pointwise": {"t2i": {"user": ("{text}", "{image}")}, "i2t": {"user": ("{text}", "{image}")}},
    "generative": {"t2i": {"user": ("{image}",), "assistant": ("{text}",)},
                   "i2t": {"user": ("{image}",), "assistant": ("{text}",)}},
    "listwise": {"t2i": {"user": ("{text}", "{candidates}"), "item": ("{number}", "{image}")},
                 "i2t": {"user": ("{image}", "{candidates}"), "item": ("{number}", "{text}")}},
}


@dataclass
class RerankConfig(MLLMLoadConfig):
    """Settings of the MLLM rerank stage."""

    model: str = field(default="", metadata={"path": "model", "help": "MLLM id or local directory"})
    mode: str = field(default="generative", metadata={"help": "pointwise, generative or listwise"})
    prompt: str = field(default="", metadata={"path": "prompt", "help": "prompt name or file (default: rerank_<mode>)"})
    k: int = field(default=20, metadata={"range": at_least(1), "help": "upstream candidates reranked per query"})
    fusion_weight: float | None = field(default=None, metadata={"help": "final = upstream + w * rerank; unset: rerank only"})
    batch_size: int = field(default=16, metadata={"range": at_least(1), "help": "pairs per forward pass"})
    cache_features: bool = field(default=True, metadata={"help": "compute gallery images' MLLM features once, at index time"})
    shared_prefix: bool = field(default=True, metadata={"help": "run the prompt part a query's candidates share once (KV cache)"})
    adapter: str = field(default="", metadata={"path": "adapter",
                                               "help": "LoRA adapter directory (genret train rerank) to attach; "
                                                      "its manifest must match model, mode and prompt"})
    backend: str = field(default="local", metadata={"help": "local (load the MLLM here) or remote (POST the "
                                                            "candidates to a /v1/rerank endpoint at url)"})
    url: str = field(default="", metadata={"help": "remote: the /v1/rerank endpoint (vLLM, TEI, Jina, genret serve)"})
    api_key_env: str = field(default="", metadata={"help": "remote: environment variable holding the bearer key"})
    timeout: float = field(default=60.0, metadata={"range": above(0),
                                                   "help": "remote: seconds to wait for one request"})
    instruction: str = field(default="", metadata={
        "help": "pointwise: the task instruction a reranker checkpoint's prompt takes ({instruction}, e.g. "
                "Qwen3-VL-Reranker's <Instruct>); '' its default; a request's own instruction wins"})
    conventions: str = field(default="", metadata={
        "help": "pointwise: whose scoring conventions (genret.mllm.checkpoints): '' the model's own (its row in "
                "genret/mllm/checkpoints.json, genret_reranker.json in its folder, its sentence-transformers "
                "files); a known checkpoint's hub id (a local copy of it); 'none' genret's prompt"})

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.model:
            raise ValueError("model is required (an MLLM id or directory; for backend = 'remote' the model name the "
                             "endpoint serves)")
        if self.backend not in ("local", "remote"):
            raise ValueError(f"backend must be 'local' or 'remote', got {self.backend!r}")
        if self.backend == "remote" and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"backend = 'remote' needs url = 'http(s)://host:port/v1/rerank', got {self.url!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.backend == "remote" and (self.instruction or self.conventions):
            raise ValueError("instruction and conventions are a local model's: a remote endpoint applies its own "
                             "template; leave them unset with backend = 'remote'")
        if self.cache_features and self.processor_options.get("do_image_splitting"):
            raise ValueError("do_image_splitting = true cannot be scored from cached features (a tile layout is "
                             "lost); set cache_features = false to keep the tiles")


@STAGES.register("rerank")
class RerankStage(RankStage):
    """An MLLM judges each upstream candidate (see :mod:`genret.mllm.scoring`)."""

    config_class = RerankConfig
    splits_gallery = True  # its image features: each process of an index build computes its share

    def __init__(self, config: RerankConfig, name: str) -> None:
        super().__init__(config, name)
        self.conventions = Conventions()
        if config.backend == "local":
            self.conventions = conventions_for(config.model, config.conventions)
        default = self.conventions.prompt if config.mode == "pointwise" else ""
        declared = self.conventions.yes_id is not None or self.conventions.score is not None
        if config.mode == "pointwise" and declared and not default and not config.prompt:
            raise ValueError(
                f"stage {name!r}: {config.model} declares how it scores ({', '.join(self.conventions.sources)}) but "
                "not the prompt it was trained on, and genret's own pointwise prompt would give other scores than its "
                "model card; set conventions = '<hub id>' for a copy of a checkpoint genret knows, put a "
                "genret_reranker.json naming a prompt in its folder, or set prompt = '...' to score with one you choose")
        self.prompt = load_prompt(config.prompt or default or f"rerank_{config.mode}", required=MODES[config.mode],
                                  exact=True, optional=("{instruction}",) if config.mode == "pointwise" else ())
        self._check_prompt(config)
        self._answer_ids: tuple[int, int] | None = None
        self._mllm = None
        self.features = FeatureStore()
        self._warned = False

    def _check_prompt(self, config: RerankConfig) -> None:
        """Refuse an instruction the prompt cannot take, and pointwise settings in another mode's prompt."""
        if config.mode != "pointwise":
            extra = [k for k in ("answer_tokens", "score", "instruction") if k in self.prompt.settings]
            extra += [f"[{d}].system" for d, t in self.prompt.sections.items() if "system" in t]
            if extra:
                raise ValueError(f"stage {self.name!r}: prompt {self.prompt.key} ({self.prompt.path}) has "
                                 f"{', '.join(extra)}, which only pointwise scoring reads; mode is {config.mode!r}")
        if config.instruction and not self.takes_instruction:
            raise ValueError(f"stage {self.name!r}: instruction is set, but prompt {self.prompt.key} has no "
                             "{instruction} placeholder to take it; leave it unset or use a prompt that has one")

    @property
    def takes_instruction(self) -> bool:
        """Whether a query's instruction reaches this stage's model (a local pointwise prompt with
        ``{instruction}``)."""
        return self.config.backend == "local" and any("{instruction}" in t.get("user", "")
                                                      for t in self.prompt.sections.values())

    @property
    def default_instruction(self) -> str | None:
        """The ``{instruction}`` of a query that carries none: the stage's, else the checkpoint's default."""
        return self.config.instruction or self.conventions.instruction or self.prompt.settings.get("instruction")

    def _instructions(self, queries: Sequence[Query]) -> list[dict] | None:
        """Each query's ``{instruction}``: its own, else the stage's, else the checkpoint's default."""
        if not self.takes_instruction:
            named = [q.id for q in queries if q.instruction is not None]
            if named:
                raise ValueError(f"stage {self.name!r}: query {named[0]!r} carries an instruction, but prompt "
                                 f"{self.prompt.key} has no {{instruction}} placeholder to take it")
            return None
        default = self.default_instruction
        if default is None and any(q.instruction is None for q in queries):
            raise ValueError(f"stage {self.name!r}: prompt {self.prompt.key} takes an {{instruction}} and has no "
                             "default; set the stage's instruction")
        return [{"instruction": q.instruction or default} for q in queries]

    def check(self, where: str = "") -> None:
        """:meth:`Stage.check`; with ``backend = "remote"`` the model is the endpoint's name for it: nothing local."""
        if self.config.backend != "remote":
            super().check(where)

    def adapter_use(self, field: str) -> dict:
        return {"task": "rerank", "mode": self.config.mode, "prompt": self.prompt}

    @property
    def mllm(self):
        """The MLLM, loaded on first use."""
        if self._mllm is None:
            from genret.mllm import MLLM

            load = self.config.mllm_config(self.config.model)
            # the checkpoint's image settings (its authors' pixel bounds), each of the stage's own winning
            load.processor_options = {**self.conventions.processor_options, **load.processor_options}
            mllm = MLLM.load(load)
            if self.config.cache_features:
                note = mllm.family.prepare_feature_cache(mllm.processor)
                if note:
                    logger.warning("%s (%s): %s", self.name, self.config.model, note)
            if self.config.adapter:
                mllm.attach_adapter(self.config.adapter, task="rerank", mode=self.config.mode, prompt=self.prompt)
            self._mllm = mllm
        return self._mllm

    def index_gallery(self, gallery: "Gallery", progress: bool = False) -> None:
        """Compute every gallery image's MLLM features (after the projector) once, for fast rerank."""
        if self.config.backend == "remote" or not self.config.cache_features or "image" not in gallery.items:
            return
        items = list(gallery.items["image"].values())
        self.features = FeatureStore()
        self.features.update(zip((it.id for it in items), self._image_features_of(items, progress)))

    def merge_states(self, folders, gallery: "Gallery") -> None:
        """Map the features each process saved for its share (the main one of an index build); any gallery image
        none of them has (a share saved by another model) is computed here."""
        if self.config.backend == "remote" or not self.config.cache_features or "image" not in gallery.items:
            return
        files = []
        for folder in folders:
            if self._readable_state(folder):
                files.append(folder / "features.safetensors")
        self.features = FeatureStore.open(*files) if files else FeatureStore()
        missing = [it for i, it in gallery.items["image"].items() if i not in self.features]
        if missing:
            logger.warning("%s: %d gallery images have no features from the other processes; computing them now",
                           self.name, len(missing))
            self.features.update(zip((it.id for it in missing), self._image_features_of(missing)))

    def _image_features_of(self, items: list[Item], progress: bool = False) -> list:
        from tqdm.auto import tqdm

        from genret.mllm.scoring import image_features

        out = []
        for s in tqdm(range(0, len(items), 64), desc=f"{self.name}: image features", disable=not progress):
            out.extend(image_features(self.mllm, [load_image(item_image(it)) for it in items[s:s + 64]],
                                      several=self._several))
        return out

    def _feature_adapter(self) -> str | None:
        """The digest of this stage's adapter when it changes the image features (``vision`` trained), else None:
        features cached by the base serve every language-only adapter, but not one that trained the vision side."""
        from genret.mllm.adapters import trains_vision
        from genret.mllm.textcache import model_key

        key = model_key(self.mllm)["adapters"]
        trained = [a["digest"] for a in key if trains_vision(self.mllm.adapters.get(a["name"], {}))]
        return ",".join(trained) or None

    def _describe(self) -> dict:
        return {"format": FEATURES_FORMAT, "version": 2, "model": self.config.model, "revision": self.mllm.revision,
                "adapter": self._feature_adapter(), "family": self.mllm.family.name, "count": len(self.features),
                **self._feature_key()}

    @property
    def _several(self) -> bool:
        """Whether gallery images sit in prompts of several images (listwise candidates), which a family may lay
        out otherwise than an image alone (LLaVA-OneVision)."""
        return self.config.mode == "listwise"

    def _feature_key(self) -> dict:
        """What besides the weights makes a cached feature: the processor's settings (:func:`image_key`) and the
        layout (an image alone or among several)."""
        from genret.mllm.textcache import image_key

        return {"images": image_key(self.mllm), "layout": "several" if self._several else "alone"}

    def save_state(self, folder: Path) -> None:
        """Save the cached features (safetensors) with a manifest naming the MLLM that made them."""
        if not self.features:
            return
        from genret._io import seal

        folder.mkdir(parents=True, exist_ok=True)
        self.features.save(folder / "features.safetensors")
        seal(folder, "manifest.json", self._describe())

    def load_state(self, folder: Path) -> None:
        """Load cached features; features of another MLLM are ignored with a warning (scored on the fly)."""
        if self.config.backend == "remote" or not self._readable_state(folder):
            return
        self.features = FeatureStore.open(folder / "features.safetensors")  # memory-mapped: read per candidate

    def check_state(self, gallery: "Gallery", folder: Path) -> None:
        """Cached features must be of this gallery's images: features of another pipeline or split are refused."""
        if not self.features or "image" not in gallery.items:
            return
        images = gallery.items["image"]
        odd = [i for i in self.features if i not in images]
        if odd:
            from genret._io import ArtefactError

            raise ArtefactError(f"{folder / 'features.safetensors'}: features of {len(odd)} images that are not in the "
                                f"gallery (e.g. {odd[0]!r}): the file is another pipeline's or split's; index the "
                                "gallery again")

    def _readable_state(self, folder: Path) -> bool:
        """Whether ``folder`` holds features this stage can use (else a warning says why not)."""
        if not (folder / "manifest.json").is_file():
            return False
        from genret._hub import fingerprints_match
        from genret._io import read_manifest

        manifest = read_manifest(folder, FEATURES_FORMAT, 2, "MLLM feature cache")
        if not fingerprints_match(manifest["revision"], self.mllm.revision, self.config.model):  # a path may differ
            logger.warning("%s: cached features were made by %s (%s), not %s; computing features on the fly",
                           folder, manifest["model"], manifest["revision"], self.config.model)
            return False
        adapter = self._feature_adapter()
        key = self._feature_key()
        if any(manifest.get(k) != v for k, v in key.items()):  # other processor settings or layout (or none saved)
            logger.warning("%s: cached features were made with other image processor settings or layout (%s) than "
                           "this stage's (%s: its processor_options, and listwise or not); computing features on the "
                           "fly (index the gallery again to cache them)", folder,
                           {k: manifest.get(k) for k in key}, key)
            return False
        if manifest.get("adapter") != adapter:  # made with (or without) a vision-trained adapter
            logger.warning("%s: cached features were made with adapter %s, this stage's image features come from %s; "
                           "computing features on the fly (index the gallery again to cache them)", folder,
                           manifest.get("adapter") or "none", adapter or "the base alone")
            return False
        store = FeatureStore.open(folder / "features.safetensors")
        if len(store) != manifest["count"]:
            raise ValueError(f"{folder}: features.safetensors holds {len(store)} images, its manifest says "
                             f"{manifest['count']}: the folder was modified; index the gallery again")
        return True

    def _image_features(self, ids: list[str], items, cache: bool = True) -> list:
        if not cache:
            from genret.mllm.scoring import image_features

            return image_features(self.mllm, [load_image(item_image(it)) for it in items], several=self._several)
        missing = [(i, it) for i, it in zip(ids, items) if i not in self.features]
        if missing:
            if self.features and not self._warned:
                logger.warning("%s: %d candidates have no cached features; computing them now", self.name, len(missing))
                self._warned = True
            from genret.mllm.scoring import image_features

            self.features.update(zip((i for i, _ in missing), image_features(
                self.mllm, [load_image(item_image(it)) for _, it in missing], several=self._several)))
        return [self.features[i] for i in ids]

    def rank(self, queries: Sequence[Query], upstream: Sequence[Ranking] | None, ctx: StageContext,
             k: int | None = None) -> list[Ranking]:
        if upstream is None:
            raise ValueError(f"stage {self.name!r} reranks candidates: put a prefilter stage before it")
        work = [(q, r.candidates[: self.config.k]) for q, r in zip(queries, upstream)]
        scores: dict[int, list[float]] = {}
        # Text queries' candidates differ in their image, so their pairs share no prompt part across candidates
        # anyway: they are scored together, many queries per forward pass. An image query's candidates share its
        # image (the shared prefix), and a listwise prompt holds one query: those are scored query by query.
        pooled = [i for i, (q, c) in enumerate(work) if c and q.target == "image" and self.config.mode != "listwise"
                  and self.config.backend == "local"]
        if pooled:
            items = [[ctx.gallery.item("image", c.item_id) for c in work[i][1]] for i in pooled]
            flat = self._pairs_t2i([work[i][0] for i in pooled], items)
            for i, its in zip(pooled, items):
                scores[i], flat = flat[:len(its)], flat[len(its):]
        for i, (query, cands) in enumerate(work):
            if cands and i not in scores:
                scores[i] = self.score(query, [ctx.gallery.item(query.target, c.item_id) for c in cands])
        out = []
        w = self.config.fusion_weight
        for i, ((query, cands), ranking) in enumerate(zip(work, upstream)):
            if not cands:
                out.append(ranking)
                continue
            rescored = [c.rescored(self.name, s, None if w is None else c.score + w * s) for c, s in zip(cands, scores[i])]
            rescored.sort(key=lambda c: -c.score)
            out.append(Ranking(query=query, candidates=tuple(rescored[: k or len(rescored)]), stage=self.name))
        return out

    def score(self, query: Query, items: Sequence[Item], cache: bool = True) -> list[float]:
        """This stage's score of each item for ``query``: images for a text query, texts for an image query.

        Args:
            query: a text query (items are images) or an image query (items are texts).
            items: the candidates, gallery items or any others (``cache=False``: their features are not kept).
            cache: read and keep image features by item id (gallery items); off for items from a request.
        """
        if not items:
            return []
        if query.instruction is not None:
            if self.config.backend == "remote":
                raise ValueError(f"stage {self.name!r}: query {query.id!r} carries an instruction, which a remote "
                                 "endpoint's own template cannot take")
            self._instructions([query])  # a prompt without {instruction} refuses it, in every mode
        if self.config.backend == "remote":
            from genret.stages.remote import remote_scores

            return remote_scores(self.config, query, items)
        if query.target == "image" and self.config.mode != "listwise":
            return self._pairs_t2i([query], [list(items)], cache=cache)
        from genret.mllm import scoring

        direction = "t2i" if query.target == "image" else "i2t"
        section = self.prompt.section(direction)
        if direction == "t2i":  # listwise
            # A lone candidate is laid out as an image alone, not as the cached one among several.
            images = self._images(items, cache) if len(items) > 1 else [load_image(item_image(items[0]))]
            return scoring.listwise_scores(self.mllm, section["user"], section["item"], {"text": self._text(query)},
                                           images, "image", label=f"stage {self.name!r}: query {query.id!r}")
        texts = [it.text for it in items]
        image = load_image(query.image)
        if self.config.cache_features:
            from genret.mllm.scoring import image_features

            image = image_features(self.mllm, [image])[0]
        if self.config.mode == "listwise":
            return scoring.listwise_scores(self.mllm, section["user"], section["item"], {"image": image}, texts, "text",
                                           label=f"stage {self.name!r}: query {query.id!r}")
        return self._pairs(section, texts, [image] * len(texts), [self._label(query, it) for it in items],
                           [query] * len(texts))

    @staticmethod
    def _text(query: Query) -> str:
        return query.text or " ".join(query.dialog)

    def _images(self, items: Sequence[Item], cache: bool) -> list:
        if self.config.cache_features:
            return self._image_features([it.id for it in items], items, cache=cache)
        return [load_image(item_image(it)) for it in items]

    def _pairs_t2i(self, queries: Sequence[Query], items: Sequence[Sequence[Item]], cache: bool = True) -> list[float]:
        """Pointwise or generative scores of every (text query, image item) pair, in one scoring call."""
        texts = [self._text(q) for q, its in zip(queries, items) for _ in its]
        flat = [it for its in items for it in its]
        # An image several queries share is loaded once and is one object: the scorer runs its prompt once for all
        # their texts (where its features are cached).
        distinct = list({it.id: it for it in flat}.values())
        by_id = dict(zip((it.id for it in distinct), self._images(distinct, cache)))
        labels = [self._label(q, it) for q, its in zip(queries, items) for it in its]
        return self._pairs(self.prompt.section("t2i"), texts, [by_id[it.id] for it in flat], labels,
                           [q for q, its in zip(queries, items) for _ in its])

    def _pairs(self, section: dict, texts: list[str], images: list, labels: list[str],
               queries: Sequence[Query]) -> list[float]:
        from genret.mllm import scoring

        bs = self.config.batch_size
        fills = self._instructions(queries)
        if self.config.mode == "pointwise":
            settings = self.prompt.settings
            return scoring.pointwise_scores(self.mllm, section["user"], texts, images, settings.get("yes", "yes"),
                                            settings.get("no", "no"), bs, shared_prefix=self.config.shared_prefix,
                                            labels=labels, system=section.get("system"), fills=fills,
                                            answer_tokens=settings.get("answer_tokens", "in_context"),
                                            score=self._score(), answer_ids=self._checkpoint_answer_ids())
        texts = [section["assistant"].replace("{text}", t) for t in texts]
        return scoring.generative_scores(self.mllm, section["user"], texts, images, bs,
                                         shared_prefix=self.config.shared_prefix, labels=labels)


    def _score(self) -> str:
        """The pointwise score: the checkpoint's sentence-transformers files decide it where they say (and the
        stage did not name its own prompt), else the prompt file."""
        if self.conventions.score and not self.config.prompt:
            return self.conventions.score
        return self.prompt.settings.get("score", "log_odds")

    def _checkpoint_answer_ids(self) -> tuple[int, int] | None:
        """The answer token ids the checkpoint declares (its ``LogitScore``), checked against the prompt's words
        read as vocabulary tokens: a checkpoint and a prompt that disagree are refused, not scored."""
        conv = self.conventions
        if conv.yes_id is None or self.config.prompt:
            return None
        if self._answer_ids is None:
            settings, vocab = self.prompt.settings, self.mllm.tokenizer.get_vocab()
            for word, want in ((settings.get("yes", "yes"), conv.yes_id), (settings.get("no", "no"), conv.no_id)):
                if settings.get("answer_tokens") == "vocabulary" and vocab.get(word, want) != want:
                    raise ConventionsError(
                        f"stage {self.name!r}: {', '.join(conv.sources)} score token {want}, but prompt "
                        f"{self.prompt.key} answers {word!r} (token {vocab[word]}); the checkpoint and its "
                        "conventions disagree: set the stage's prompt to choose")
            self._answer_ids = (conv.yes_id, conv.no_id)
        return self._answer_ids

    def _label(self, query: Query, item: Item) -> str:
        """How a (query, candidate) pair is named in an error (a prompt past the model's context)."""
        return f"stage {self.name!r}: query {query.id!r}, candidate {item.id!r}"
