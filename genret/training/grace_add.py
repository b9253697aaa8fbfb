"""Adding images to a trained GRACE index: new identifiers, a short memorisation pass with replay, a forgetting report.

The new images get identifiers consistent with the parent adapter's scheme, never changing an old one:

- ``string`` / ``numeric``: the next indices (a fixed-width numeric scheme refuses a gallery it cannot hold);
- ``semantic``: each new image's pseudo-query (a training image without one: its captions), made unique
  against every existing identifier (`` #2`` suffixes as at training);
- ``atomic``: one new token per image, its rows initialised from the prefilter's image embedding as at training;
- ``structured``: the k-means tree is not re-run and no centroid is needed: a new image joins the leaf of its
  nearest existing image (prefilter embeddings, cosine), at the leaf's first free position; a leaf already
  holding ``leaf_size`` items grows a new position token (``<p_16>``, ...), its rows initialised like the others.

Training continues from the parent: its LoRA weights and trained identifier rows are loaded into a fresh peft
model whose ``trainable_token_indices`` cover the old and the new tokens, then both tasks (memorise, retrieve)
run for a short pass in which ``replay`` of every batch's rows are old items (limiting forgetting).
What the old images lose is measured on fixed samples before and after (image → id top-1, text → id R@1) and
written to the manifest's ``forgetting`` section. The new folder is written whole and atomically; the parent is
only read.

Example::

    manifest = add_images("runs/grace-atomic", data, "runs/grace-atomic+val", GraceAddConfig(new_splits="val"),
                          prefilter="adapters/mini-world/clip")
    manifest["forgetting"]["old"]   # {"before": {...}, "after": {...}, "drop": {...}}
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import torch

from genret import __version__
from genret._io import write_json
from genret.config import check_bounds
from genret.data.dataset import TRAIN_SPLITS, Dataset
from genret.identifiers import SCHEMES, Identifiers, Trie, add_tokens, tokenize
from genret.identifiers.schemes import _refuse_known, extend_identifiers  # noqa: F401  (extend_identifiers: public here too)
from genret.mllm.adapters import FORMAT, write_adapter
from genret.mllm.answers import answer_context
from genret.prompts import load_prompt
from genret.training.distributed import on_main
from genret.training.engine import Engine, Streams
from genret.training.grace import (PROMPT_NEEDS, PSEUDO_FILE, GraceTrainConfig, _prompts, evaluate_grace,
                                   identifier_loss, init_token_rows, pseudo_queries)
from genret.training.models import add_lora, image_features, load_base, lora_groups
from genret.training.options import BaseModelOptions, TrainOptions

if TYPE_CHECKING:
    from genret.encoders.base import DualEncoder

logger = logging.getLogger(__name__)


@dataclass
class GraceAddConfig(BaseModelOptions, TrainOptions):
    """How to add images to a GRACE adapter: which, how long, how much replay of the old ones (and the shared
    options; the LoRA's shape is the parent's)."""

    new_splits: str = field(default="", metadata={"help": "comma-separated splits whose images are added"})
    replay: float = field(default=0.75, metadata={"help": "fraction of each batch drawn from the old items (forgetting)"})
    retrieve_ratio: float = field(default=0.5, metadata={"help": "fraction of each batch that is retrieve (text -> id)"})
    pseudo_queries: bool = field(default=True, metadata={"help": "the base MLLM's caption of each new image as a query"})
    caption_tokens: int = field(default=32, metadata={"help": "most tokens of a pseudo-query caption"})
    epochs: int = field(default=3, metadata={"help": "passes over the new images' memorise rows (unless max_steps)"})
    batch_size: int = field(default=16, metadata={"help": "rows per micro-batch and process"})
    lr: float = field(default=0.0, metadata={"help": "peak AdamW learning rate of the LoRA weights (0: the parent's)"})
    token_lr: float = field(default=0.0, metadata={"help": "learning rate of the identifier tokens' rows (0: the parent's)"})
    eval_every: int = field(default=0, metadata={"help": "steps between checks of the new images (0: only the "
                                                         "forgetting check before and after)"})
    eval_queries: int = field(default=32, metadata={"help": "images and texts per group in the forgetting check"})
    num_beams: int = field(default=5, metadata={"help": "beam width of the forgetting check"})
    overwrite: bool = field(default=False, metadata={"help": "allow out_dir to be the parent adapter (replaced whole)"})

    lr_zero_inherits = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.new_splits = ",".join(s.strip() for s in self.new_splits.split(",") if s.strip())
        if not 0 <= self.replay < 1:
            raise ValueError(f"replay must be in [0, 1) (some rows must be new images), got {self.replay}")
        if not 0 <= self.retrieve_ratio <= 1:
            raise ValueError(f"retrieve_ratio must be in [0, 1], got {self.retrieve_ratio}")
        check_bounds(self, at_least_one=("eval_queries", "num_beams", "caption_tokens"))
        if self.token_lr < 0:
            raise ValueError("token_lr must not be negative (0: the parent's)")


def _load_parent_weights(model, parent: Path, n_old_tokens: int) -> None:
    """Load the parent adapter's LoRA and trained rows into ``model`` (whose token rows may be more)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(str(parent / "adapter_model.safetensors"))
    current = {n: p for n, p in model.named_parameters() if "trainable_tokens_delta" in n}
    for key, value in list(saved.items()):
        if "trainable_tokens_delta" not in key:
            continue
        stem = key.rsplit("trainable_tokens_delta", 1)[0]
        target = next((p for n, p in current.items() if n.startswith(stem)), None)
        if target is None or value.shape[0] != n_old_tokens:
            raise ValueError(f"{parent}: its trained rows {key} ({tuple(value.shape)}) do not match the identifiers' "
                             f"{n_old_tokens} tokens")
        merged = target.detach().clone()
        merged[:n_old_tokens] = value.to(merged.dtype)
        saved[key] = merged
    result = set_peft_model_state_dict(model, saved)
    missing = [k for k in getattr(result, "unexpected_keys", []) or []]
    if missing:
        raise ValueError(f"{parent}: {len(missing)} adapter weights fit no module of the model (e.g. {missing[0]!r})")


ROW_NAMES = {"new_mem": "new_memorise", "old_mem": "old_memorise", "new_ret": "new_retrieve", "old_ret": "old_retrieve"}


def _images_to_add(old: Identifiers, data: Dataset, records: dict, config: GraceAddConfig,
                   new_items: Sequence[str] | None, parent: Path) -> list[str]:
    """The ids to add (``new_items`` and the ``new_splits``' images), refused when known or not in ``data``."""
    wanted = list(new_items or [])
    if config.new_splits:
        wanted += [r.id for r in data.split(*config.new_splits.split(",")).records if r.id not in set(wanted)]
    if not wanted:
        raise ValueError("no images to add: pass new_splits (--new-splits) or new_items")
    _refuse_known(old, wanted, f" in {parent}")  # before any model work
    absent = [i for i in list(old.item_ids) + wanted if i not in records]
    if absent:
        raise ValueError(f"{len(absent)} images are not in the data set {data.source} (e.g. {absent[0]!r}): it must "
                         "hold the parent's images (replay, forgetting check) and the new ones")
    return wanted


def _parent_pseudo_queries(parent: Path) -> dict[str, str]:
    from genret._io import read_json

    if not (parent / PSEUDO_FILE).is_file():
        return {}
    saved = read_json(parent / PSEUDO_FILE, what="pseudo-queries")
    return dict(zip(saved.get("items", []), saved.get("queries", [])))


def replay_rows(config: GraceAddConfig, has_old_queries: bool, has_queries: bool) -> dict[str, int]:
    """Rows of each kind in a micro-batch: new / old memorise, new / old retrieve (``replay`` of them old)."""
    n_ret = round(config.batch_size * config.retrieve_ratio) if has_queries else 0
    n_mem = config.batch_size - n_ret
    new_mem = max(1, round(n_mem * (1 - config.replay))) if n_mem else 0
    new_ret = max(1, round(n_ret * (1 - config.replay))) if n_ret else 0
    if not has_old_queries:
        new_ret = n_ret
    return {"new_mem": new_mem, "old_mem": n_mem - new_mem, "new_ret": new_ret, "old_ret": n_ret - new_ret}


def replay_batches(streams: Streams, kinds: dict[str, int], chunks: int, new_q: list, old_q: list
                   ) -> list[list[tuple[str | None, int]]]:
    """A step's micro-batches, each: new then old memorise rows ``(None, image)``, new then old retrieve rows."""
    drawn = {kind: streams.take(kind, n * chunks) for kind, n in kinds.items()}
    out = []
    for c in range(chunks):
        rows: list[tuple[str | None, int]] = []
        for kind, n in kinds.items():
            picked = drawn[kind][c * n:(c + 1) * n]
            rows += ([(None, g) for g in picked] if kind.endswith("mem")
                     else [(new_q if kind == "new_ret" else old_q)[j] for j in picked])
        out.append(rows)
    return out


def forgetting_report(before: dict, after: dict, num_beams: int) -> dict:
    """What the old images lost and the new ones gained, from the checks before and after training."""
    keys = ("image_to_id_top1", "text_to_id_R@1")
    return {
        "protocol": "fixed samples of images (image -> id top-1) and retrieve queries (text -> id R@1), trie beam "
                    f"search with {num_beams} beams; old before: the parent over the old ids; after: over all ids",
        "old": {"before": before["old"], "after": after["old"], "after_within_old_ids": after["old_within_old"],
                "drop": {k: round(before["old"][k] - after["old"][k], 2) for k in keys}},
        "new": {"before": before["new"], "after": after["new"]},
    }


def _open_parent(parent: Path, out_dir: Path, config: GraceAddConfig) -> tuple[dict, Identifiers]:
    """The parent adapter's manifest and identifiers, where it is a GRACE adapter and ``out_dir`` may be written."""
    from genret.mllm.adapters import read_adapter_manifest

    manifest = read_adapter_manifest(parent)
    if manifest.get("task") != "grace":
        raise ValueError(f"{parent}: a {manifest.get('task')!r} adapter, not a GRACE one; images are added to an "
                         "adapter written by genret train grace")
    if out_dir.resolve() == parent.resolve() and not config.overwrite:
        raise ValueError(f"out_dir is the parent adapter {parent}: write the grown adapter elsewhere, or allow "
                         "replacing it (overwrite)")
    return manifest, Identifiers.load(parent)


def _check_base(parent: Path, manifest: dict, revision: str, ref: str) -> None:
    from genret._hub import fingerprints_match, legacy_note

    if not fingerprints_match(manifest["base_revision"], revision, ref):
        raise ValueError(f"{parent}: trained on base {manifest['base_model']!r} with weights fingerprint "
                         f"{manifest['base_revision']}, now {revision}: the base changed since"
                         f"{legacy_note(manifest['base_revision'])}")


def _given_queries(queries: "Mapping[str, Sequence[str]] | None", paths: dict) -> dict[str, list[str]]:
    extra = {i: list(t) for i, t in (queries or {}).items()}
    stray = [i for i in extra if i not in paths]
    if stray:
        raise ValueError(f"queries name {len(stray)} images that are neither old nor new (e.g. {stray[0]!r})")
    return extra


def _scheme_inputs(scheme: str, emb, n_old: int, new: list[str], new_pseudo: dict, records: dict) -> dict:
    """What the scheme's ``extend`` needs of the new images: prefilter embeddings, or texts (pseudo-query, else the
    training captions)."""
    needs, kw = SCHEMES.get(scheme).needs, {}
    if "embeddings" in needs:
        kw = {"embeddings": emb[n_old:] if emb is not None else None,
              "old_embeddings": emb[:n_old] if emb is not None else None}
    if "texts" in needs:
        kw["texts"] = {i: [new_pseudo[i]] if new_pseudo.get(i) else list(records[i].captions)
                       if records[i].split in TRAIN_SPLITS else [] for i in new}
    return kw


def _add_identifier_tokens(merged: Identifiers, mllm, manifest: dict, parent: Path, had_tokens: bool):
    """Add the scheme's tokens to the tokenizer and model; the identifiers' token ids as the model writes them, and
    the new tokens' ids (checked against the parent's: the base tokenizer must not have changed)."""
    add_tokens(merged, mllm.tokenizer, mllm.model)
    targets = tokenize(merged, mllm.tokenizer, *answer_context(mllm))
    token_ids = mllm.tokenizer.convert_tokens_to_ids(list(merged.new_tokens))
    want = manifest.get("tokens", {}).get("new_token_ids", [])
    if had_tokens and want and token_ids[0] != want[0]:
        raise ValueError(f"{parent}: the scheme's first token is id {token_ids[0]} now, {want[0]} when the parent was "
                         "trained: the base tokenizer changed since")
    return targets, token_ids


def _check_sets(config: GraceAddConfig, groups: dict[str, tuple[list, list]]) -> dict[str, tuple[list, list]]:
    """The images and retrieve queries the forgetting check measures, per group (seeded samples)."""
    rng = random.Random(config.seed + 1)
    return {g: (rng.sample(imgs, min(config.eval_queries, len(imgs))), rng.sample(qs, min(config.eval_queries, len(qs))))
            for g, (imgs, qs) in groups.items()}


def _lineage(manifest: dict, parent: Path, config: GraceAddConfig, merged: Identifiers, n_old: int,
             n_queries: tuple[int, int], new_pseudo: dict, kinds: dict[str, int]) -> dict:
    """The grown adapter's ``gallery``, ``parent``, ``added`` and ``replay`` manifest fields."""
    new = list(merged.item_ids[n_old:])
    gallery = manifest.get("gallery", {})
    return {
        "gallery": {**gallery, "images": len(merged.item_ids),
                    "splits": ",".join(s for s in (gallery.get("splits", ""), config.new_splits) if s)},
        "parent": {"path": str(parent), "images": n_old, "scheme": merged.scheme, "gallery": manifest.get("gallery"),
                   "steps": manifest.get("steps"), "parent": manifest.get("parent")},
        "added": {"images": len(new), "splits": config.new_splits, "item_ids": new,
                  "identifiers": list(merged.identifiers[n_old:]), "retrieve_queries": n_queries[0],
                  "pseudo_queries": sum(map(bool, new_pseudo.values()))},
        "replay": {"fraction": config.replay, "old_images": n_old, "old_retrieve_queries": n_queries[1],
                   "rows_per_step": {ROW_NAMES[k]: n for k, n in kinds.items()}},
    }


def add_images(adapter_dir: str | os.PathLike, data: Dataset, out_dir: str | os.PathLike,
               config: GraceAddConfig | None = None, *, new_items: Sequence[str] | None = None,
               prefilter: "str | os.PathLike | DualEncoder | None" = None,
               queries: "Mapping[str, Sequence[str]] | None" = None, resume: bool = False, progress: bool = True,
               on_step: "Callable[[dict], None] | None" = None) -> dict:
    """Teach a trained GRACE adapter more images without retraining from scratch; writes a new adapter folder.

    Args:
        adapter_dir: the parent adapter (written by ``train_grace`` or ``add_images``); only read.
        data: a data set holding the new images and the parent's images (for replay and the forgetting check).
        out_dir: the adapter folder to write (not ``adapter_dir`` unless ``config.overwrite``).
        config: see :class:`GraceAddConfig`.
        new_items: the image ids to add (instead of, or on top of, ``config.new_splits``).
        prefilter: the dual encoder (directory/id or loaded): new rows' initialisation; structured placement.
        queries: more retrieve queries, image id -> texts, for new or old images (never evaluation captions).
        resume: continue from the last checkpoint under ``out_dir/checkpoints`` (same settings required).
        progress: show progress bars.
        on_step: called after every optimizer step with ``{"step", "total", "loss"}``.

    Returns:
        The new adapter's manifest (also ``out_dir/genret.json``), with ``parent``, ``added``, ``replay`` and
        ``forgetting`` (image → id top-1 and text → id R@1 of the old items before and after, of the new after).
    """
    from genret.encoders import load_encoder

    config = config or GraceAddConfig()
    parent, out_dir = Path(adapter_dir), Path(out_dir)
    manifest, old = _open_parent(parent, out_dir, config)
    records = data.by_id()
    wanted = _images_to_add(old, data, records, config, new_items, parent)
    scheme, train_cfg = old.scheme, GraceTrainConfig(**manifest["config"])
    prompt = load_prompt(manifest["prompt"]["name"], required=PROMPT_NEEDS)
    engine = Engine(f"grace-add-{scheme}", config, out_dir, resume=resume, progress=progress,
                    base=manifest["base_model"])
    accelerator, show = engine.accelerator, engine.show
    mllm = load_base(manifest["base_model"], config, engine.device)
    _check_base(parent, manifest, mllm.revision, mllm.model_id)

    old_items, new = list(old.item_ids), list(wanted)
    paths = {i: str(records[i].path) for i in old_items + new}
    encoder = load_encoder("hf", str(prefilter)) if isinstance(prefilter, (str, os.PathLike)) else prefilter
    emb = (encoder.encode_images([paths[i] for i in old_items + new], progress=show, role="document")
           if encoder is not None else None)

    # Retrieve queries: training captions, given ones, pseudo-queries (the parent's, and the base's for new images).
    extra = _given_queries(queries, paths)
    new_pseudo: dict[str, str] = {}
    if config.pseudo_queries:
        new_pseudo = dict(zip(new, on_main(accelerator, lambda: pseudo_queries(
            mllm, prompt, [paths[i] for i in new], config.caption_tokens, progress=show))))
    pseudo = {**_parent_pseudo_queries(parent), **new_pseudo}

    def texts_of(i: str) -> list[str]:
        rec = records[i]
        return ((list(rec.captions) if rec.split in TRAIN_SPLITS else []) + extra.get(i, [])
                + ([pseudo[i]] if pseudo.get(i) else []))

    merged = extend_identifiers(old, new, **_scheme_inputs(scheme, emb, len(old_items), new, new_pseudo, records))
    items = list(merged.item_ids)
    pos = {i: g for g, i in enumerate(items)}
    query_rows = {i: [(t, pos[i]) for t in texts_of(i)] for i in items}
    old_q = [q for i in old_items for q in query_rows[i]]
    new_q = [q for i in new for q in query_rows[i]]
    if config.retrieve_ratio > 0 and not new_q:
        raise ValueError("no retrieve queries for the new images: none is a training image, no queries were given "
                         "and the captioner gave no pseudo-query; pass queries or set retrieve_ratio 0")

    targets, token_ids = _add_identifier_tokens(merged, mllm, manifest, parent, bool(old.new_tokens))
    init = init_token_rows(merged, mllm.tokenizer, mllm.model,
                           emb if train_cfg.init == "prefilter" and emb is not None else None, train_cfg.seed)
    trie = Trie(targets, items)
    old_trie = trie.subset(old_items)
    feats = dict(zip(items, image_features(mllm, [paths[i] for i in items], show, "image features")))

    torch.manual_seed(config.seed)
    model = add_lora(mllm, replace(train_cfg, load_in_4bit=config.load_in_4bit), token_ids=token_ids,
                     gradient_checkpointing=config.gradient_checkpointing)
    _load_parent_weights(model, parent, len(old.new_tokens))

    check = _check_sets(config, {"old": (old_items, old_q), "new": (new, new_q)})

    def check_group(group: str, over: Trie) -> dict:
        imgs, qs = check[group]
        return evaluate_grace(mllm, prompt, over, imgs, [paths[i] for i in imgs], [(t, items[g]) for t, g in qs],
                              config.num_beams)

    def measure(group: str, over: Trie) -> dict:  # on the main process, sent to the others
        return on_main(accelerator, lambda: check_group(group, over))

    tick = time.perf_counter()
    before = {"old": measure("old", old_trie), "new": measure("new", trie)}
    eval_seconds = time.perf_counter() - tick

    lr, token_lr = config.lr or train_cfg.lr, config.token_lr or train_cfg.token_lr
    wrapped = engine.prepare(model, lora_groups(model, lr, token_lr))
    kinds = replay_rows(config, bool(old_q), bool(old_q or new_q))
    chunks = engine.chunks
    total = config.max_steps or config.epochs * math.ceil(len(new) / max(1, kinds["new_mem"] * chunks))
    streams = Streams(config.seed, {"old_mem": [pos[i] for i in old_items], "new_mem": [pos[i] for i in new],
                                    "old_ret": range(len(old_q)), "new_ret": range(len(new_q))})

    def draw(step: int) -> list[list[tuple[str | None, int]]]:
        return replay_batches(streams, kinds, chunks, new_q, old_q)

    def loss(chunk: list[tuple[str | None, int]]) -> torch.Tensor:
        return identifier_loss(mllm, _prompts(mllm, prompt, [t for t, _ in chunk]),
                               [[feats[items[g]]] if t is None else [] for t, g in chunk],
                               [targets[g] for _, g in chunk], model=wrapped)

    run = engine.fit(total, draw, loss, evaluate=(lambda: check_group("new", trie)) if config.eval_every else None,
                     state=streams.hooks, on_step=on_step,
                     identity={"config": asdict(config), "parent": str(parent), "base_revision": mllm.revision,
                               "items": len(items)})
    tick = time.perf_counter()
    after = {"old": measure("old", trie), "old_within_old": measure("old", old_trie), "new": measure("new", trie)}
    eval_seconds += time.perf_counter() - tick

    forgetting = forgetting_report(before, after, config.num_beams)
    summary = run.summary(config)
    out = {
        **{k: v for k, v in manifest.items() if k not in ("format", "version", "history", "metrics", "speed", "logs")},
        "genret": __version__,
        "tokens": {"vocab_size": len(mllm.tokenizer), "new_token_ids": [int(t) for t in token_ids[:1] + token_ids[-1:]],
                   "new_tokens": len(token_ids), "init": init},
        **_lineage(manifest, parent, config, merged, len(old_items), (len(new_q), len(old_q)), new_pseudo, kinds),
        "add_config": {**asdict(config), "lr": lr, "token_lr": token_lr}, "forgetting": forgetting,
        "metrics": {**summary["metrics"], "val": after["new"]},
        "history": summary["history"], "steps": summary["steps"],
        "speed": {**summary["speed"], "eval_seconds": round(eval_seconds + run.eval_seconds, 1)},
        **({"logs": summary["logs"]} if "logs" in summary else {}),
        "train_seconds": engine.seconds,
    }

    def write(folder: Path) -> None:
        write_adapter(folder, engine.unwrapped, out)
        merged.save(folder)
        mllm.tokenizer.save_pretrained(str(folder))
        write_json(folder / PSEUDO_FILE, {"key": {"grown_from": str(parent)}, "items": items,
                                          "queries": [pseudo.get(i, "") for i in items]})

    engine.save(write, (FORMAT,))
    if engine.main:
        logger.info("added %d images to %s -> %s: %s", len(new), parent, out_dir, forgetting)
    return out
