"""Captions of images by an MLLM: batched, deterministic, cached on disk by model, adapter, prompt and content.

A :class:`Captioner` describes gallery or query images with a prompt's ``user`` template (``{image}`` marks
the image), decoding greedily or by beam search, left-padded in batches. With a ``cache_dir`` it keeps
every caption it makes and generates only the images it has not described before under the same key:

- the base weights (``mllm.revision``), their dtype and quantisation,
- the processor's image settings (:func:`~genret.mllm.textcache.image_key`: ``max_pixels`` and the like),
- the active adapters, each by the sha256 of its ``adapter_model.safetensors``,
- the prompt's name, version and section, and a hash of the rendered prompt (chat template included),
- the decoding settings (``max_new_tokens``, ``num_beams``),

and, per image, the sha256 of the file's bytes: a renamed copy is served from the cache, an edited file is
described again. One JSON file per key, ``<cache_dir>/<prompt name>-<digest of the key>.json``::

    {"manifest": {"format": "genret.captions", "version": 1, "model_id": "...", "key": {...}},
     "captions": {"<sha256 of the image file>": "a red circle left of a blue square", ...}}

It is rewritten atomically after every batch, so an interrupted run keeps the batches it finished.
A cache file that is not valid JSON, not a genret caption cache, or whose manifest names another key than
its file name says raises :class:`CaptionCacheError` naming it, and is never overwritten: move it away.

Example::

    captioner = Captioner(MLLM.load("adapters/mini-world/mllm"), "caption", cache_dir="runs/captions")
    captions = captioner.caption(["img/0001.png", "img/0002.png"], progress=True)
    captioner.stats   # CaptionStats(hits=0, misses=2); the same call again: hits=2, misses=0
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from tqdm.auto import tqdm

from genret._io import ManifestError, read_json, write_json
from genret.data.images import ImageLoadError, load_image
from genret.mllm.context import check_lengths
from genret.mllm.textcache import image_key
from genret.prompts import Prompt, PromptError, load_prompt

if TYPE_CHECKING:
    from genret.mllm.backend import MLLM

logger = logging.getLogger(__name__)

FORMAT = "genret.captions"
VERSION = 1
_PLACEHOLDER = re.compile(r"\{([A-Za-z_]\w*)\}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CaptionCacheError(ManifestError):
    """A caption cache file that is unreadable, not a caption cache, or holds another key than its name says;
    or a model whose captions cannot be keyed (an adapter without a saved, fixed identity)."""


@dataclass
class CaptionStats:
    """Images served from the cache (``hits``) and captions generated (``misses``), over all calls.

    Within one call an image that occurs twice is generated once: one miss, then a hit.
    """

    hits: int = 0
    misses: int = 0


class Captioner:
    """Describes images with an MLLM and a prompt; see the module docstring for the cache.

    Args:
        mllm: the model; its adapters as active at each :meth:`caption` call are part of the key.
        prompt: a prompt name or file (loaded with :func:`~genret.prompts.load_prompt`) or a loaded prompt.
        section: the prompt's table whose ``user`` template, with exactly one ``{image}``, asks for the caption.
        max_new_tokens: the longest caption, in tokens.
        batch_size: images per ``generate`` call.
        cache_dir: where captions persist; ``None``: no cache (duplicates within a call are still generated once).
        num_beams: 1 for greedy decoding, more for beam search (never sampling).

    Raises:
        PromptError: the prompt lacks the section, its ``user`` template or the single ``{image}``.
        ValueError: a setting below 1.
    """

    def __init__(self, mllm: "MLLM", prompt: str | Prompt = "caption", *, section: str = "caption",
                 max_new_tokens: int = 48, batch_size: int = 16, cache_dir: str | os.PathLike | None = None,
                 num_beams: int = 1) -> None:
        for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size), ("num_beams", num_beams)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.mllm = mllm
        self.prompt = prompt if isinstance(prompt, Prompt) else load_prompt(str(prompt))
        self.section = section
        self.template = _caption_template(self.prompt, section)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.num_beams = num_beams
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.stats = CaptionStats()
        self._tables: dict[Path, dict[str, str]] = {}
        self._seen: dict[Path, tuple[int, int] | None] = {}  # each file's (mtime_ns, size) when last read or written
        self._adapter_hashes: dict[str, tuple[tuple[int, int], str]] = {}

    @property
    def text(self) -> str:
        """The rendered prompt (chat template applied) that every image is captioned with."""
        from genret.mllm.scoring import render, user_message

        return render(self.mllm, user_message(self.template))

    @property
    def key(self) -> dict:
        """What the cache is keyed by (besides each image's content), for the adapters active now.

        Raises:
            CaptionCacheError: an active adapter was not attached from a folder, or is being trained.
        """
        return {
            "model": {"revision": self.mllm.revision, "weights": _precision(self.mllm.model)},
            "images": image_key(self.mllm),  # the processor's settings: another max_pixels describes another image
            "adapters": self._adapter_ids(),
            "prompt": {"name": self.prompt.name, "version": self.prompt.version, "section": self.section,
                       "sha256": hashlib.sha256(self.text.encode()).hexdigest()[:16]},
            "decoding": {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams, "do_sample": False},
        }

    def cache_file(self) -> Path:
        """The cache file of the current key (it may not exist yet)."""
        if self.cache_dir is None:
            raise ValueError("this Captioner has no cache_dir")
        return self.cache_dir / _file_name(self.prompt.name, self.key)

    def caption(self, images: Sequence[str | os.PathLike], progress: bool = False) -> list[str]:
        """One caption per image file, stripped (empty where the model said nothing).

        Args:
            images: image files (gallery or query images); the cache knows them by content, not by path.
            progress: show a progress bar over the batches to generate.

        Raises:
            ImageLoadError: naming an image file that is missing or unreadable.
            CaptionCacheError: the cache file is damaged or foreign, or the model's adapters cannot be keyed.
        """
        paths = _image_paths(images)
        digests = [_file_sha256(p) for p in paths]
        first: dict[str, str] = {}  # image digest -> the first path with that content
        for p, d in zip(paths, digests):
            first.setdefault(d, p)
        if self.cache_dir is None:
            path, table = None, {}
        else:
            key = self.key
            path = self.cache_dir / _file_name(self.prompt.name, key)
            table = self._table(path, key)
        todo = [d for d in first if d not in table]
        self.stats.misses += len(todo)
        self.stats.hits += len(paths) - len(todo)
        if todo:
            logger.info("captioning %d image(s) (%d served from the cache)", len(todo), len(paths) - len(todo))
            batches = range(0, len(todo), self.batch_size)
            for s in tqdm(batches, desc="captions", unit="batch", disable=not progress):
                chunk = todo[s:s + self.batch_size]
                table.update(zip(chunk, self._generate([first[d] for d in chunk])))
                if path is not None:
                    self._save(path, key, table)
        return [table[d] for d in digests]

    @torch.inference_mode()
    def _generate(self, paths: list[str]) -> list[str]:
        """Captions of ``paths`` in one left-padded ``generate`` call."""
        mllm, tok = self.mllm, self.mllm.tokenizer
        images = [load_image(p) for p in paths]
        side, tok.padding_side = tok.padding_side, "left"
        try:
            inputs = mllm.processor(text=[self.text] * len(images), images=mllm.family.processor_images([[im] for im in images]),
                                    padding=True, return_tensors="pt")
        finally:
            tok.padding_side = side
        check_lengths(mllm, inputs["attention_mask"].sum(dim=1).tolist(), [f"the caption of {p}" for p in paths],
                      new_tokens=self.max_new_tokens, advice="bound the image size (processor_options)")
        inputs = {k: v.to(mllm.device) for k, v in mllm.family.generate_inputs(mllm.model, inputs).items()}
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        gen = mllm.model.generate(**inputs, do_sample=False, num_beams=self.num_beams,
                                  max_new_tokens=self.max_new_tokens, pad_token_id=pad)
        new = gen[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]

    def _table(self, path: Path, key: dict) -> dict[str, str]:
        """The captions of ``path``'s key, read from disk the first time (or when another writer changed it)."""
        if path not in self._tables or _stat(path) != self._seen.get(path):
            self._tables[path] = _read_cache(path, key) if path.exists() else {}
            self._seen[path] = _stat(path)
        return self._tables[path]

    def _save(self, path: Path, key: dict, table: dict[str, str]) -> None:
        """Write ``table`` atomically, keeping what another process added to the file since it was read."""
        if path.exists() and _stat(path) != self._seen.get(path):
            table.update({d: c for d, c in _read_cache(path, key).items() if d not in table})
        manifest = {"format": FORMAT, "version": VERSION, "model_id": self.mllm.model_id, "key": key}
        write_json(path, {"manifest": manifest, "captions": table})
        self._tables[path] = table
        self._seen[path] = _stat(path)

    def _adapter_ids(self) -> list[str]:
        """The sha256 of each active adapter's weights file, in activation order."""
        mllm, out = self.mllm, []
        for name in mllm.active_adapters:
            info = mllm.adapters.get(name)
            if info is None or "path" not in info:
                raise CaptionCacheError(f"the active adapter {name!r} was not attached from a folder "
                                        "(MLLM.attach_adapter), so its captions cannot be keyed; save and attach it, "
                                        "or caption without a cache_dir")
            config = getattr(mllm.model, "peft_config", {}).get(name)
            if config is not None and not config.inference_mode:  # attached with trainable=True
                raise CaptionCacheError(f"the adapter {name!r} is trainable: its weights may differ from "
                                        f"{info['path']}, so its captions cannot be keyed; caption without a cache_dir")
            weights = Path(info["path"]) / "adapter_model.safetensors"
            stat = _stat(weights)
            if stat is None:
                raise CaptionCacheError(f"the adapter {name!r}'s weights file is gone: {weights}")
            known = self._adapter_hashes.get(str(weights))
            if known is None or known[0] != stat:
                known = (stat, _file_sha256(str(weights)))
                self._adapter_hashes[str(weights)] = known
            out.append(known[1])
        return out


def _caption_template(prompt: Prompt, section: str) -> str:
    """The section's ``user`` template, checked to hold one ``{image}`` and no other placeholder."""
    template = prompt.section(section).get("user")
    where = f"{prompt.path or prompt.key}: [{section}].user"
    if not isinstance(template, str):
        raise PromptError(f"{prompt.path or prompt.key}: [{section}] has no 'user' template")
    if template.count("{image}") != 1:
        raise PromptError(f"{where} must hold exactly one {{image}}, found {template.count('{image}')}")
    others = sorted(set(_PLACEHOLDER.findall(template)) - {"image"})
    if others:
        named = ", ".join("{" + o + "}" for o in others)
        raise PromptError(f"{where} has placeholder(s) a caption cannot fill: {named}")
    return template


def _precision(model) -> str:
    """The weights' dtype, and their quantisation where bitsandbytes loaded them (captions differ with both)."""
    dtype = str(getattr(model, "dtype", "")).replace("torch.", "")
    bits = next((b for b in ("4bit", "8bit") if getattr(model, f"is_loaded_in_{b}", False)), "")
    return f"{dtype}/{bits}" if bits else dtype


def _image_paths(images: Sequence[str | os.PathLike]) -> list[str]:
    if isinstance(images, (str, os.PathLike)):
        raise TypeError(f"caption() takes a list of image files, got one: {images!r}; wrap it in a list")
    bad = next((im for im in images if not isinstance(im, (str, os.PathLike))), None)
    if bad is not None:
        raise TypeError(f"caption() takes image files (the cache keys their bytes), got a {type(bad).__name__}")
    return [str(im) for im in images]


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ImageLoadError(f"image file not found: {path}") from None
    return digest.hexdigest()


def _file_name(prompt_name: str, key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', prompt_name)}-{digest}.json"


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


def _read_cache(path: Path, key: dict) -> dict[str, str]:
    """The captions of a cache file, after checking that it is one and holds ``key``."""
    hint = "move it away (or delete it) to start this cache afresh"
    try:
        data = read_json(path, what="caption cache")
    except ValueError as err:
        raise CaptionCacheError(f"{err}; {hint}") from None
    manifest = data.get("manifest") if isinstance(data, dict) else None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise CaptionCacheError(f"{path}: not a genret caption cache (format {found!r}, expected {FORMAT!r}); {hint}")
    if manifest.get("version") != VERSION:
        raise CaptionCacheError(f"{path}: caption cache format version {manifest.get('version')!r}, "
                                f"this genret reads {VERSION}; {hint}")
    if manifest.get("key") != key:
        theirs = manifest.get("key") if isinstance(manifest.get("key"), dict) else {}
        differ = [f"{k}: {theirs.get(k)!r} in the file, {key[k]!r} expected" for k in key if theirs.get(k) != key[k]]
        raise CaptionCacheError(f"{path}: the manifest holds another key than the file's name says "
                                f"({'; '.join(differ) or 'extra fields'}); {hint}")
    captions = data.get("captions")
    if not isinstance(captions, dict) or not all(
            isinstance(d, str) and _SHA256.fullmatch(d) and isinstance(c, str) for d, c in captions.items()):
        raise CaptionCacheError(f"{path}: 'captions' must map image sha256 digests to caption strings; {hint}")
    return dict(captions)
