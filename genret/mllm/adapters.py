"""LoRA adapters on an :class:`~genret.mllm.backend.MLLM`: attach, stack, switch, detach, each checked on load.

An adapter directory holds peft's files (``adapter_config.json``, ``adapter_model.safetensors``) and
``genret.json``, the manifest that says what made it::

    {"format": "genret.rerank_adapter", "version": 1, "task": "rerank", "mode": "pointwise",
     "base_model": "adapters/mini-world/mllm", "base_revision": "<fingerprint>", "family": "llava",
     "prompt": {"name": "rerank_pointwise", "version": 1}, "config": {...}, "metrics": {...}}

An adapter is refused, with an error naming both sides, when it was trained for another base model
(weights fingerprint), another family, another task or mode, or another prompt.

Example::

    mllm = MLLM.load("adapters/mini-world/mllm")
    mllm.attach_adapter("runs/rerank-pointwise", mode="pointwise")   # active at once
    mllm.attach_adapter("runs/rerank-listwise", mode="listwise", activate=False)
    mllm.use_adapter("rerank-listwise")     # switch;  mllm.use_adapter(None): the base model alone
    mllm.detach_adapter("rerank-listwise")
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from genret._hub import fingerprints_match, legacy_note
from genret._io import ManifestError, check_local_model, read_json, write_json
from genret._swap import atomic_dir

if TYPE_CHECKING:
    from genret.mllm.backend import MLLM
    from genret.prompts import Prompt

logger = logging.getLogger(__name__)

FORMAT = "genret.rerank_adapter"
VERSION = 1
MANIFEST = "genret.json"
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
REQUIRED = ("task", "mode", "base_model", "base_revision", "family", "prompt")


class AdapterMismatchError(ManifestError):
    """An adapter made for another base model, family, task, mode or prompt than it is loaded with."""


def read_adapter_manifest(path: str | os.PathLike) -> dict:
    """Read and check an adapter directory's ``genret.json`` (format, version, peft files present).

    Raises:
        FileNotFoundError: the directory, its manifest or a peft file is missing.
        ManifestError: the manifest is not a genret adapter manifest of a version this genret reads.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter directory not found: {folder}")
    manifest = read_json(folder / MANIFEST, what="adapter manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ManifestError(f"{folder}: not a genret adapter ({MANIFEST} format {found!r}, expected {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise ManifestError(f"{folder}: adapter format version {manifest.get('version')}, this genret reads {VERSION}")
    missing = [f for f in PEFT_FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: the adapter is incomplete, {', '.join(missing)} missing")
    check_local_model(folder, "adapter")  # its files as saved (an edited rank, cut-short weights): named here
    for key in REQUIRED:
        if key not in manifest:
            raise ManifestError(f"{folder}/{MANIFEST}: missing '{key}'")
    return manifest


ADAPTER_FORMATS = (FORMAT, "genret.train_run")
"""What a folder an adapter is saved to may already hold: an adapter, or the run that trains it."""


def save_adapter(folder: str | os.PathLike, peft_model, manifest: Mapping[str, Any]) -> Path:
    """Write ``peft_model``'s adapter and its manifest to ``folder``, atomically (the folder is replaced whole).

    Args:
        peft_model: a peft model with one adapter.
        manifest: what made it: at least task, mode, base_model, base_revision, family and prompt
            (``{"name", "version"}``); ``format`` and ``version`` are added.
    """
    with atomic_dir(folder, ADAPTER_FORMATS) as tmp:  # a run's checkpoints give way to its adapter
        write_adapter(tmp, peft_model, manifest)
    return Path(folder)


def write_adapter(folder: Path, peft_model, manifest: Mapping[str, Any]) -> None:
    """Fill the (new, empty) ``folder`` with ``peft_model``'s adapter files and the manifest; see :func:`save_adapter`."""
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise ValueError(f"adapter manifest is missing {', '.join(missing)}")
    peft_model.save_pretrained(str(folder))
    (Path(folder) / "README.md").unlink(missing_ok=True)  # peft's empty model card
    write_json(Path(folder) / MANIFEST, {"format": FORMAT, "version": VERSION, **manifest})


def check_adapter(manifest: Mapping[str, Any], path: str | os.PathLike, mllm: "MLLM", task: str | None = None,
                  mode: str | None = None, prompt: "Prompt | None" = None) -> None:
    """Check that an adapter fits ``mllm`` (and, when given, the task, mode and prompt it will serve).

    Raises:
        AdapterMismatchError: naming what the adapter was made for and what it is loaded with.
    """
    where = str(path)
    if task is not None and manifest["task"] != task:
        raise AdapterMismatchError(f"{where}: a {manifest['task']!r} adapter, loaded for the task {task!r}; "
                                   f"use an adapter trained for {task!r}")
    if manifest["family"] != mllm.family.name:
        raise AdapterMismatchError(f"{where}: adapter made for a {manifest['family']!r} model, but "
                                   f"{mllm.model_id!r} is a {mllm.family.name!r} model")
    if mllm.revision and not fingerprints_match(manifest["base_revision"], mllm.revision, mllm.model_id):
        raise AdapterMismatchError(
            f"{where}: adapter trained on base {manifest['base_model']!r} (weights fingerprint "
            f"{manifest['base_revision']}), but this MLLM is {mllm.model_id!r} (fingerprint {mllm.revision})"
            f"{legacy_note(manifest['base_revision'])}; load the base it was trained on, or train an adapter for this one")
    if mode is not None and manifest["mode"] != mode:
        raise AdapterMismatchError(f"{where}: a {manifest['mode']!r} {manifest['task']} adapter, used in "
                                   f"{mode!r} mode; set mode = {manifest['mode']!r} or train a {mode!r} adapter")
    if prompt is not None:
        made = manifest["prompt"]
        if (made.get("name"), made.get("version")) != (prompt.name, prompt.version):
            raise AdapterMismatchError(f"{where}: adapter trained with prompt {made.get('name')}@v{made.get('version')}, "
                                       f"used with {prompt.key}; use the prompt it was trained with")


def adapter_name(path: str | os.PathLike) -> str:
    """A default adapter name from its directory (peft names cannot hold dots)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", Path(path).resolve().name) or "adapter"


def attach_adapter(mllm: "MLLM", path: str | os.PathLike, name: str | None = None, *, task: str | None = "rerank",
                   mode: str | None = None, prompt: "Prompt | None" = None, activate: bool = True,
                   trainable: bool = False) -> str:
    """Load the adapter at ``path`` onto ``mllm`` after checking its manifest; returns its name.

    Args:
        mllm: the loaded base model; its ``model`` becomes a peft model on the first attach.
        path: an adapter directory written by genret's training (peft files + ``genret.json``).
        name: the adapter's name (default: the directory's name).
        task, mode, prompt: what the adapter will be used for; each given one must match the manifest.
        activate: make it the (only) active adapter at once.
        trainable: keep its weights trainable (to continue training it).

    Raises:
        AdapterMismatchError: the adapter was made for another base, family, task, mode or prompt.
        ValueError: an adapter of that name is attached already.
    """
    from peft import PeftModel

    manifest = read_adapter_manifest(path)
    check_adapter(manifest, path, mllm, task=task, mode=mode, prompt=prompt)
    name = name or adapter_name(path)
    if name in mllm.adapters:
        raise ValueError(f"an adapter named {name!r} is attached already (from {mllm.adapters[name]['path']}); "
                         "pass another name or detach it first")
    try:
        if isinstance(mllm.model, PeftModel):
            mllm.model.load_adapter(str(path), adapter_name=name, is_trainable=trainable)
        else:
            mllm.model = PeftModel.from_pretrained(mllm.model, str(path), adapter_name=name, is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as err:  # e.g. weights of another shape than adapter_config.json says
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise AdapterMismatchError(f"{path}: peft cannot load this adapter onto {mllm.model_id!r} ({first}); its "
                                   "adapter_config.json and weights do not fit each other or this model") from None
    if not trainable:
        mllm.model.eval()
    mllm.adapters[name] = {**manifest, "path": str(path)}
    if activate:
        use_adapter(mllm, name)
    else:
        # peft activates what it loads last only on the first attach; keep the previous choice otherwise.
        use_adapter(mllm, [n for n in active_adapters(mllm) if n != name] or None)
    logger.info("attached %s adapter %r (%s mode) from %s", manifest["task"], name, manifest["mode"], path)
    return name


def active_adapters(mllm: "MLLM") -> list[str]:
    """The names of the adapters now applied (empty: the base model alone)."""
    from peft import PeftModel

    if not isinstance(mllm.model, PeftModel) or _disabled(mllm.model):
        return []
    active = mllm.model.base_model.active_adapter
    return [active] if isinstance(active, str) else list(active)


def _disabled(model) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return next((m.disable_adapters for m in model.modules() if isinstance(m, BaseTunerLayer)), False)


def use_adapter(mllm: "MLLM", names: str | Sequence[str] | None) -> None:
    """Make ``names`` the active adapters: one name, several (their LoRA updates add up), or ``None`` (base alone).

    Raises:
        KeyError: naming an adapter that is not attached, and those that are.
    """
    from peft import PeftModel

    wanted = [names] if isinstance(names, str) else list(names or [])
    unknown = [n for n in wanted if n not in mllm.adapters]
    if unknown:
        raise KeyError(f"no adapter named {unknown[0]!r} is attached (attached: {', '.join(mllm.adapters) or 'none'})")
    model = mllm.model
    if not isinstance(model, PeftModel):
        return
    tuner = model.base_model
    if not wanted:
        tuner.disable_adapter_layers()
        return
    tuner.enable_adapter_layers()
    trainable = any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    tuner.set_adapter(wanted[0] if len(wanted) == 1 else wanted, inference_mode=not trainable)


def detach_adapter(mllm: "MLLM", name: str) -> None:
    """Remove an attached adapter; after the last one, ``mllm.model`` is the plain base model again."""
    if name not in mllm.adapters:
        raise KeyError(f"no adapter named {name!r} is attached (attached: {', '.join(mllm.adapters) or 'none'})")
    still = [n for n in active_adapters(mllm) if n != name]
    del mllm.adapters[name]
    if not mllm.adapters:
        mllm.model = mllm.model.unload()
        mllm.model.eval()
        return
    if name in mllm.model.base_model.active_adapters:
        # peft warns when the active adapter is deleted: hand the role to another first.
        mllm.model.base_model.set_adapter(next(iter(mllm.adapters)), inference_mode=True)
    mllm.model.delete_adapter(name)
    use_adapter(mllm, still or None)


VISION_ADAPT = {
    "none": "LoRA on the language model only; image features stay the base model's (cached once)",
    "projector": "also train the projector into the language model (saved whole with the adapter)",
    "tower": "also train the projector, and LoRA on the vision tower's linear layers",
}


def vision_side(model, family) -> tuple[str, str]:
    """The full module names of ``model``'s vision tower and projector (by the family's names for them)."""
    names = [n for n, _ in model.named_modules()]
    found = [next((n for n in names if n.rsplit(".", 1)[-1] == want), None)
             for want in (family.vision_tower_name, family.projector_name)]
    if None in found:
        raise ValueError(f"{type(model).__name__}: no module named {family.vision_tower_name!r} (vision tower) or "
                         f"{family.projector_name!r} (projector) as the {family.name} family expects; train with "
                         "vision 'none'")
    return found[0], found[1]


def lora_modules(model, family, targets: Sequence[str], vision: str = "none") -> tuple[str, list[str] | None]:
    """peft's ``target_modules`` pattern and ``modules_to_save`` for a LoRA that trains ``vision`` (see
    :data:`VISION_ADAPT`) besides ``targets`` in the language model."""
    if vision not in VISION_ADAPT:
        raise ValueError(f"vision adaptation {vision!r} is unknown; choose one of {', '.join(VISION_ADAPT)}")
    pattern = language_model_targets(model, targets)
    if vision == "none":
        return pattern, None
    import torch

    tower, projector = vision_side(model, family)
    # Each member of a listed module list (Qwen3-VL's DeepStack mergers): peft's saved copy of a module must be
    # callable, and the tower indexes the list.
    projectors = [projector]
    for name, _ in model.named_modules():
        parent, _, index = name.rpartition(".")
        if index.isdigit() and parent.rpartition(".")[2] in family.more_projectors:
            projectors.append(name)
    if vision == "tower":
        linears = [n for n, m in model.named_modules() if n.startswith(tower + ".") and isinstance(m, torch.nn.Linear)
                   and not any(n == p or n.startswith(p + ".") for p in projectors)]
        pattern = f"(?:{pattern})|(?:{'|'.join(re.escape(n) for n in linears)})"
    return pattern, projectors


def trains_vision(manifest: Mapping[str, Any]) -> bool:
    """Whether an adapter changes the image features (then features cached without it do not serve it)."""
    return manifest.get("vision", "none") != "none"


def language_model_targets(model, targets: Sequence[str]) -> str:
    """A peft ``target_modules`` pattern that puts LoRA on ``targets`` inside the language model only.

    Module names such as ``q_proj`` also occur in vision towers; restricting them to the language
    model keeps the vision side frozen and untouched, so cached image features stay valid.
    """
    lm = model.get_decoder() if hasattr(model, "get_decoder") else None
    prefix = next((n for n, m in model.named_modules() if m is lm and n), None) if lm is not None else None
    if prefix is None:
        raise ValueError(f"{type(model).__name__}: cannot find its language model (get_decoder()) to put LoRA on")
    if not targets:
        raise ValueError("no LoRA target modules given")
    import torch

    found = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if n.startswith(prefix + ".") and isinstance(m, torch.nn.Linear)}
    missing = [t for t in targets if t not in found]
    if missing:
        raise ValueError(f"LoRA target module(s) {', '.join(missing)} not found in the language model "
                         f"{prefix!r}; its linear layers include: {', '.join(sorted(found)[:20])}")
    return rf"{re.escape(prefix)}\..*\.({'|'.join(re.escape(t) for t in targets)})"
