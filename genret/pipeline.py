"""RetrievalPipeline: builds the stages of a config, indexes a gallery, searches, saves and loads.

A pipeline file (TOML or YAML) names the dual encoder, the index type and the stages in order::

    name = "mini"
    [encoder]
    model = "runs/clip"
    [index]
    factory = "Flat"
    [[stages]]
    type = "prefilter"
    k = 100
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from genret import __version__
from genret._io import read_manifest, write_json
from genret._swap import atomic_dir
from genret.config import (ConfigError, at_least, check_fields, from_dict, read_config_file, relative_paths,
                           resolve_paths, to_dict, write_config_file)
from genret.data.dataset import Dataset
from genret.data.images import ImageLoadError
from genret.encoders import EmbeddingCache, load_encoder
from genret.encoders.base import DualEncoder
from genret.index.build import Share, encode_chunks, read_parts, write_parts
from genret.index.faiss_index import VectorIndex
from genret.index.gallery import Gallery
from genret.stages import STAGES, RankStage, RewriteStage, Stage, StageContext
from genret.types import Hit, Item, Query, Ranking, SearchResult, check_k

if TYPE_CHECKING:
    from genret.index.qdrant_index import QdrantIndex

logger = logging.getLogger(__name__)

FORMAT = "genret.pipeline"
VERSION = 1


@dataclass
class EncoderConfig:
    """The dual encoder that embeds the gallery and the queries."""

    model: str = field(default="", metadata={"path": "model", "help": "Hugging Face model id or local directory"})
    backend: str = field(default="hf", metadata={"help": "hf (CLIP, SigLIP), sentence-transformers, or mllm (an "
                                                         "MLLM embedder: Qwen3-VL-Embedding, GME)"})
    device: str = field(default="", metadata={"help": "cpu, cuda, cuda:1 (default: GPU if any)"})
    dtype: str = field(default="float32", metadata={"help": "weights dtype: float32, bfloat16, float16"})
    batch_size: int = field(default=64, metadata={"range": at_least(1), "help": "images per encoding batch"})
    cache_dir: str = field(default="", metadata={"path": "dir", "help": "embedding cache folder ('' for none)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "run code shipped with the checkpoint"})
    embedder: str = field(default="", metadata={"help": "mllm: whose conventions the checkpoint follows "
                                                        "(qwen3-vl-embedding, gme, vlm2vec, vlm2vec-v1); default "
                                                        "from the hub id"})
    query_instruction: str | None = field(default=None, metadata={"help": "mllm: the instruction queries are "
                                                                          "embedded under (default: the authors')"})
    document_instruction: str | None = field(default=None, metadata={"help": "mllm: the instruction gallery items "
                                                                             "are embedded under"})
    dim: int = field(default=0, metadata={"range": at_least(0), "help": "mllm: Matryoshka truncation (0: the "
                                                                          "model's full size)"})

    def __post_init__(self) -> None:
        check_fields(self)
        mllm = {"embedder": self.embedder, "query_instruction": self.query_instruction,
                "document_instruction": self.document_instruction, "dim": self.dim}
        extra = [k for k, v in mllm.items() if v not in ("", None, 0)]
        if extra and self.backend != "mllm":
            raise ValueError(f"encoder {', '.join(extra)}: settings of an MLLM embedder; add backend = \"mllm\" or "
                             "remove them")

    def embedder_kwargs(self) -> dict:
        """The MLLM-embedder settings for :func:`genret.encoders.load_encoder` (none for other backends)."""
        if self.backend != "mllm":
            return {}
        return {"embedder": self.embedder, "query_instruction": self.query_instruction,
                "document_instruction": self.document_instruction, "dim": self.dim}


@dataclass
class IndexConfig:
    """How gallery vectors are indexed."""

    factory: str = field(default="Flat", metadata={"help": "faiss factory string: Flat, HNSW32, IVF256,PQ32, ..."})
    metric: str = field(default="ip", metadata={"help": "ip (cosine on unit vectors) or l2"})
    search_params: str = field(default="", metadata={"help": "faiss search parameters, e.g. efSearch=128"})
    build_params: str = field(default="", metadata={"help": "faiss parameters set before adding, e.g. "
                                                            "efConstruction=200 (HNSW: a better graph, slower build)"})
    shards: int = field(default=1, metadata={"range": at_least(1),
                                             "help": "faiss indexes the vectors are split between (IndexShards)"})
    chunk_size: int = field(default=65536, metadata={"range": at_least(1),
                                                     "help": "items embedded and added at a time; an IVF or PQ index "
                                                              "trains on the first chunk"})
    mmap: bool = field(default=False, metadata={"help": "load the saved index memory-mapped (read-only)"})
    backend: str = field(default="faiss", metadata={"help": "faiss, or qdrant (a Qdrant collection; genret[qdrant])"})
    url: str = field(default="", metadata={"help": "qdrant: the server, http://HOST:6333; empty for local in-memory "
                                                   "mode (vectors saved with the pipeline)"})
    collection: str = field(default="", metadata={"help": "qdrant: the collection's base name (default: the "
                                                          "pipeline's name and the modality)"})

    def __post_init__(self) -> None:
        check_fields(self)
        if self.backend not in ("faiss", "qdrant"):
            raise ValueError(f"index backend must be 'faiss' or 'qdrant', got {self.backend!r}")
        if self.backend == "qdrant" and (self.shards != 1 or self.mmap or self.factory != "Flat"
                                         or self.build_params):
            raise ValueError("index backend 'qdrant' takes no faiss settings (factory, build_params, shards, mmap): "
                             "Qdrant builds its own HNSW graph; set its search parameters with search_params = "
                             "\"hnsw_ef=N\"")
        if self.backend == "faiss" and (self.url or self.collection):
            raise ValueError("index url and collection are Qdrant settings: add backend = \"qdrant\" or remove them")


@dataclass
class PipelineConfig:
    """A whole pipeline: encoder, index and stages in order (each a table with a ``type``)."""

    name: str = field(default="genret", metadata={"help": "pipeline name, shown in reports"})
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    stages: tuple[dict, ...] = field(default=({"type": "prefilter"},), metadata={"help": "stage tables"})

    def __post_init__(self) -> None:
        if not self.encoder.model:
            raise ValueError("encoder.model is required (a model id or local directory)")
        if not self.stages:
            raise ValueError("a pipeline needs at least one stage")


def _config_class(table: dict) -> type | None:
    """The config class of an encoder table (no ``type``) or a stage table (``None`` for an unknown type: building the
    stages names it)."""
    if "type" not in table:
        return EncoderConfig
    kind = table["type"]
    return STAGES.get(kind).config_class if isinstance(kind, str) and kind in STAGES else None


def portable_paths(table: dict, folder: Path) -> dict:
    """``table`` (the encoder's or a stage's) with its local paths written relative to ``folder``, where the pipeline
    is saved (:func:`genret.config.relative_paths`; hub ids and prompt names kept)."""
    cls = _config_class(table)
    return relative_paths(cls, table, folder) if cls is not None else table


def load_config(path: str | os.PathLike) -> PipelineConfig:
    """Read a pipeline file. Every path in it (the encoder, each stage's models, adapters, prompt files and cache
    folders) is relative to the file: the one rule of :func:`genret.config.resolve_paths`; hub ids stay hub ids."""
    path = Path(path)
    data = read_config_file(path)
    if isinstance(data.get("encoder"), dict):
        data["encoder"] = resolve_paths(EncoderConfig, data["encoder"], path.parent, f"{path}: encoder")
    for i, table in enumerate(data.get("stages") if isinstance(data.get("stages"), list) else []):
        cls = _config_class(table) if isinstance(table, dict) and "type" in table else None
        if cls is not None:  # a table without a known type: building the stages names it
            data["stages"][i] = resolve_paths(cls, table, path.parent, f"{path}: stages[{i}]")
    config = from_dict(PipelineConfig, data, where=str(path))
    config._source = str(path)  # stage errors name the file (not a field: it is not saved)
    return config


def build_stages(config: PipelineConfig) -> list[Stage]:
    """Instantiate each stage table of the config."""
    stages, names = [], set()
    source = getattr(config, "_source", "")
    for i, table in enumerate(config.stages):
        table = dict(table)
        where = f"{source}: stages[{i}]" if source else f"stages[{i}]"
        if "type" not in table:
            raise ConfigError(f"{where}: missing 'type' (one of {', '.join(STAGES.names())})")
        try:
            cls = STAGES.get(table.pop("type"))
        except KeyError as err:
            raise ConfigError(f"{where}: {err.args[0]}") from None
        name = table.pop("name", None) or cls.__name__.removesuffix("Stage").lower()
        if name in names:
            raise ConfigError(f"{where}: stage name {name!r} is used twice; give one a 'name'")
        names.add(name)
        stage = cls(from_dict(cls.config_class, table, where), name)
        stage.check(where)  # before any gallery is encoded: what it names is there and fits
        stages.append(stage)
    if not any(isinstance(s, RankStage) for s in stages):
        raise ConfigError("the pipeline has no ranking stage (add a 'prefilter')")
    return stages


class RetrievalPipeline:
    """Rewrite and rank stages over a dual encoder and a gallery.

    Example::

        pipe = RetrievalPipeline.from_config("pipeline.toml")
        pipe.index(load_dataset("data/dataset_synth.json").split("test"))
        rankings = pipe.search([Query(id="q", text="a red circle left of a blue square")], k=5)
        pipe.save("runs/pipe")
        pipe = RetrievalPipeline.load("runs/pipe")
    """

    def __init__(self, config: PipelineConfig, encoder: DualEncoder | None = None, gallery: Gallery | None = None):
        self.config = config
        self.stages = build_stages(config)
        if encoder is None:
            enc = config.encoder
            cache = EmbeddingCache(enc.cache_dir) if enc.cache_dir else None
            encoder = load_encoder(enc.backend, enc.model, device=enc.device or None, dtype=enc.dtype,
                                   cache=cache, trust_remote_code=enc.trust_remote_code, **enc.embedder_kwargs())
        self.encoder = encoder
        self.gallery = gallery or Gallery()
        self.timings: dict[str, float] = {}

    @classmethod
    def from_config(cls, config: str | os.PathLike | PipelineConfig) -> "RetrievalPipeline":
        """Build from a pipeline file (TOML/YAML) or a :class:`PipelineConfig`."""
        return cls(config if isinstance(config, PipelineConfig) else load_config(config))

    @property
    def context(self) -> StageContext:
        """What the stages share."""
        return StageContext(encoder=self.encoder, gallery=self.gallery)

    def index(self, dataset: Dataset, modalities: Sequence[str] = ("image", "text"), on_error: str = "raise",
              progress: bool = True, share: Share | None = None) -> None:
        """Embed a dataset's images and captions and index them as the gallery.

        Args:
            dataset: the records to index (pick a split first: ``dataset.split("test")``).
            modalities: which galleries to build: ``image`` (for text queries), ``text`` (for image queries).
            on_error: ``raise`` on an unreadable image; ``skip`` leaves it out with a warning and a count.
            progress: show progress bars.
            share: this process's part of a build split between processes (:class:`genret.index.build.Share`).
        """
        for modality in modalities:
            if modality not in ("image", "text"):
                raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
        items = {m: dataset.image_items() if m == "image" else dataset.text_items() for m in modalities}
        self.index_items(items, {"dataset": str(dataset.source.resolve()), "name": dataset.name,
                                 "splits": sorted({r.split for r in dataset.records}), "images": len(dataset)},
                         on_error=on_error, progress=progress, share=share)

    def index_items(self, items: dict[str, list[Item]], source: dict, on_error: str = "raise",
                    progress: bool = True, share: Share | None = None) -> None:
        """Embed and index gallery items by modality (``{"image": [...], "text": [...]}``) as the gallery.

        Items are embedded and added ``index.chunk_size`` at a time. Split between processes (``share``), each
        embeds its share into parts under ``share.work``; the main process adds them in order and ends with the
        whole gallery (the same index as one process builds), the others with none.

        Args:
            items: the items of each gallery to build.
            source: what they are (dataset path, name, splits, count), kept in the gallery's manifest.
            on_error: ``raise`` on an unreadable image; ``skip`` leaves it out with a warning and a count.
            progress: show progress bars.
            share: this process's part of a build split between processes; default: all of it.
        """
        share = share or Share()
        for modality in items:
            if modality not in ("image", "text"):
                raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
        cfg = self.config.index
        gallery, mine = Gallery(source=source), {}
        for modality, items_m in items.items():
            part = share.of(items_m)
            mine[modality] = _readable(part) if modality == "image" and on_error == "skip" else part
            chunks = encode_chunks(self.encoder, modality, mine[modality], cfg.chunk_size,
                                   self.config.encoder.batch_size, progress)
            if share.world > 1:
                write_parts(share.work / modality, share.rank, chunks)
                continue
            index = gallery.indexes[modality] = self._new_index(modality)
            for chunk, vectors in chunks:
                index.add([it.id for it in chunk], vectors)
            gallery.items[modality] = {it.id: it for it in mine[modality]}
        if share.world == 1:
            self.gallery = gallery
            for stage in self.stages:  # e.g. the rerank stage's MLLM image features, computed once here
                stage.index_gallery(gallery, progress=progress)
            return
        self._index_split(items, mine, gallery, share, progress)

    def _index_split(self, items: dict[str, list[Item]], mine: dict[str, list[Item]], gallery: Gallery, share: Share,
                     progress: bool) -> None:
        split = [s for s in self.stages if s.splits_gallery]
        if split:  # the stages that compute per-image state do it for this process's share
            own = Gallery(items={m: {it.id: it for it in part} for m, part in mine.items()})
            for stage in split:
                stage.index_gallery(own, progress=progress)
                stage.save_state(share.work / "stages" / stage.name / f"rank-{share.rank:05d}")
        share.barrier()
        if not share.main:
            self.gallery = Gallery(source=gallery.source)
            return
        for modality, items_m in items.items():
            by_id = {it.id: it for it in items_m}
            index = gallery.indexes[modality] = self._new_index(modality)
            kept: list[Item] = []
            for ids, vectors in read_parts(share.work / modality, share.world):
                index.add(ids, vectors)
                kept.extend(by_id[i] for i in ids)
            gallery.items[modality] = {it.id: it for it in kept}
        self.gallery = gallery
        for stage in self.stages:
            if stage.splits_gallery:
                folders = [share.work / "stages" / stage.name / f"rank-{r:05d}" for r in range(share.world)]
                stage.merge_states(folders, gallery)
            else:
                stage.index_gallery(gallery, progress=progress)

    def _new_index(self, modality: str) -> VectorIndex | QdrantIndex:
        cfg = self.config.index
        if cfg.backend == "qdrant":
            from genret.index.qdrant_index import QdrantIndex

            return QdrantIndex(self.encoder.dim, cfg.metric, encoder=self.encoder.describe(),
                               search_params=cfg.search_params, modality=modality, url=cfg.url,
                               collection=f"{cfg.collection or self.config.name}-{modality}")
        return VectorIndex(self.encoder.dim, cfg.factory, cfg.metric, encoder=self.encoder.describe(),
                           search_params=cfg.search_params, modality=modality, shards=cfg.shards,
                           build_params=cfg.build_params)

    def run(self, queries: Sequence[Query], k: int | None = None, upstream: Sequence[Ranking] | None = None,
            rewrite: bool = True, timings: dict[str, float] | None = None) -> list[tuple[str, list[Ranking]]]:
        """Run every stage; returns each rank stage's rankings in order (for evaluation).

        Args:
            queries: the queries.
            k: candidates each rank stage returns (default: each stage's own ``k``).
            upstream: rank only these candidates (one ranking per query), e.g. a twin pair.
            rewrite: run the rewrite stages; ``False`` for queries they have rewritten already.
            timings: where each stage's seconds are added (default: the pipeline's running :attr:`timings`).
        """
        ctx, timings = self.context, self.timings if timings is None else timings
        outputs: list[tuple[str, list[Ranking]]] = []
        queries = list(queries)
        asked = [q.id for q in queries if q.instruction is not None]
        if asked and not any(getattr(stage, "takes_instruction", False) for stage in self.stages):
            raise ValueError(f"query {asked[0]!r} carries an instruction, but no stage of this pipeline takes one (a "
                             "pointwise rerank stage whose prompt has {instruction}, e.g. Qwen3-VL-Reranker's)")
        for stage in self.stages:
            start = time.perf_counter()
            if isinstance(stage, RewriteStage):
                if not rewrite:
                    continue
                before, queries = queries, stage.rewrite(queries, ctx)
                # A rewrite makes new queries; each keeps the instruction its request gave (one query out per query in).
                queries = [q if q.instruction == o.instruction else replace(q, instruction=o.instruction)
                           for q, o in zip(queries, before)]
            else:
                upstream = stage.rank(queries, upstream, ctx, k=k)
                outputs.append((stage.name, upstream))
            timings[stage.name] = timings.get(stage.name, 0.0) + time.perf_counter() - start
        return outputs

    def search(self, queries: Sequence[Query] | Query, k: int = 10, instruction: str | None = None) -> list[Ranking]:
        """The final ranking of each query, top ``k``.

        Args:
            instruction: the task instruction of a pointwise reranker checkpoint's prompt (Qwen3-VL-Reranker's
                ``<Instruct>``) for the queries that carry none of their own (:attr:`Query.instruction`).

        Raises:
            ValueError: when ``k`` exceeds the size of the gallery searched.
        """
        check_k(k)
        queries = [queries] if isinstance(queries, Query) else list(queries)
        if instruction is not None:
            queries = [q if q.instruction is not None else replace(q, instruction=instruction) for q in queries]
        for target in {q.target for q in queries}:
            size = len(self.gallery.index(target))
            if k > size:
                raise ValueError(f"k={k} is larger than the {target} gallery ({size} items); ask for at most {size}")
        return [r.top(k) for r in self.run(queries)[-1][1]]

    def answer(self, query: Query, k: int = 10) -> SearchResult:
        """One query's search as a typed record: the hits with every stage's score and what each item is, the
        rewritten query where a rewrite stage changed it, this search's seconds per stage, and a note where the last
        stage keeps fewer than ``k``.

        Raises:
            ValueError: ``k`` below 1 or above the size of the gallery searched.
        """
        return self.answer_many([query], [k])[0]

    def answer_many(self, queries: Sequence[Query], ks: Sequence[int]) -> list[SearchResult]:
        """:meth:`answer` for several queries in one run of the stages (each with its own ``k``); each record's
        seconds are those of the whole run, which its queries shared.

        Raises:
            ValueError: a ``k`` below 1 or above the size of the gallery its query searches.
        """
        if len(queries) != len(ks):
            raise ValueError(f"{len(queries)} queries but {len(ks)} values of k")
        for query, k in zip(queries, ks):
            check_k(k)
            size = len(self.gallery.index(query.target))
            if k > size:
                raise ValueError(f"k={k} is larger than the {query.target} gallery ({size} items); ask for at most {size}")
        seconds: dict[str, float] = {}
        rankings = self.run(list(queries), timings=seconds)[-1][1]
        return [self._record(query, ranking.top(k), k, seconds) for query, ranking, k in zip(queries, rankings, ks)]

    def _record(self, query: Query, ranking: Ranking, k: int, seconds: dict[str, float]) -> SearchResult:
        hits = []
        for rank, cand in enumerate(ranking.candidates, start=1):
            item = self.gallery.item(query.target, cand.item_id)
            hits.append(Hit(rank, cand.item_id, cand.score, cand.scores, text=item.text, image=item.image))
        seen = ranking.query
        rewritten = seen.text if (seen.text != query.text and seen.text is not None) else None
        note = None
        if len(hits) < k:  # the last stage keeps fewer: say so rather than return fewer in silence
            note = (f"{len(hits)} results, not {k}: stage {ranking.stage!r} keeps only its top {len(hits)}; raise "
                    "its k in the pipeline file for more")
        return SearchResult(query, tuple(hits), rewritten=rewritten, seconds=dict(seconds), note=note)

    def save(self, path: str | os.PathLike) -> Path:
        """Save config, gallery and manifest to a directory, atomically."""
        path = Path(path)
        with atomic_dir(path, (FORMAT,)) as tmp:
            table = to_dict(self.config)  # local paths relative to the pipeline folder: it loads from anywhere
            table["encoder"] = portable_paths(table["encoder"], path)
            table["stages"] = [portable_paths(t, path) for t in table["stages"]]
            write_config_file(tmp / "pipeline.toml", table)
            if self.gallery.indexes:
                self.gallery.save(tmp / "gallery", root=path)
            for stage in self.stages:
                stage.save_state(tmp / "stages" / stage.name)
            write_json(tmp / "manifest.json", {"format": FORMAT, "version": VERSION, "genret": __version__,
                                               "encoder": self.encoder.describe(),
                                               "stages": [s.name for s in self.stages]})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, encoder: DualEncoder | None = None) -> "RetrievalPipeline":
        """Load a saved pipeline; its gallery is checked against the encoder the config names."""
        path = Path(path)
        manifest = read_manifest(path, FORMAT, VERSION, "pipeline")
        config = load_config(path / "pipeline.toml")  # its paths are relative to the folder
        pipe = cls(config, encoder=encoder)
        names = [s.name for s in pipe.stages]
        if manifest.get("stages") is not None and manifest["stages"] != names:
            raise ConfigError(f"{path}: pipeline.toml names the stages {names}, its manifest {manifest['stages']}: the "
                              "folder was edited by hand; build it again with `genret index build`")
        if manifest.get("encoder"):
            from genret.index.faiss_index import check_encoder

            check_encoder(path, manifest["encoder"], pipe.encoder.describe())
        if (path / "gallery").is_dir():
            pipe.gallery = Gallery.load(path / "gallery", encoder=pipe.encoder.describe(), root=path,
                                        mmap=config.index.mmap)
        for stage in pipe.stages:
            stage.load_state(path / "stages" / stage.name)
            stage.check_state(pipe.gallery, path / "stages" / stage.name)
        return pipe


def _readable(items: list[Item]) -> list[Item]:
    from genret.data.dataset import unreadable_reason

    kept, bad = [], []
    for it in items:
        if unreadable_reason(Path(it.image)):
            bad.append(str(it.image))
        else:
            kept.append(it)
    if bad:
        logger.warning("skipped %d unreadable images of %d: %s%s", len(bad), len(items), ", ".join(bad[:5]),
                       f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    if not kept:
        raise ImageLoadError("no readable images to index")
    return kept

