"""Reranker checkpoints as shipped: what a published checkpoint needs beyond its weights, read as data.

A pointwise reranker is scored the way its authors score it: its answer tokens (``yes``/``no``,
``True``/``False``), how the score is made of them (the sigmoid of their logit difference, or genret's
log-odds over every casing), its system prompt, its user turn and default instruction, and its image
size bounds. None of that is a branch in the rerank stage: it is data, taken from three places, each
later one completing or overriding the one before (as vLLM's ``hf_overrides`` do for its served models):

1. the table ``genret/mllm/checkpoints.json``: a row per known checkpoint, keyed by its hub id;
2. ``genret_reranker.json`` in the checkpoint's folder, with a row's keys: how a user adds a checkpoint
   of their own (or one the table lacks) without touching genret;
3. the checkpoint's sentence-transformers files, where it ships them: ``modules.json`` naming a
   ``LogitScore`` module, whose ``config.json`` gives the answer token ids, and
   ``config_sentence_transformers.json``, whose ``activation_fn`` gives the score and whose default prompt
   the default instruction.

A row holds ``prompt`` (a prompt file under ``prompts/``: system prompt, user turn per direction, answer words,
``answer_tokens``, ``score``, default ``instruction``) and ``processor_options`` (image size bounds the
authors' code uses). A stage may name a row for a local copy of a known checkpoint (``conventions = "Qwen/
Qwen3-VL-Reranker-2B"``) and its own ``prompt`` or ``processor_options`` still win.

A checkpoint shipped as a LoRA adapter (peft's ``adapter_config.json`` and no ``config.json``, as
MonoQwen2-VL is) loads onto the base model its ``adapter_config.json`` names (:func:`adapter_base`).

Example::

    conv = conventions_for("Qwen/Qwen3-VL-Reranker-2B")
    conv.prompt               # 'rerank_qwen3_vl_reranker'
    conv.processor_options    # {'min_pixels': 4096, 'max_pixels': 1843200}
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

logger = logging.getLogger(__name__)

TABLE = Path(__file__).resolve().parent / "checkpoints.json"
LOCAL_FILE = "genret_reranker.json"
ROW_KEYS = {"prompt": "the prompt file (name under prompts/ or path) that holds the checkpoint's system prompt, user "
                      "turn, answer words, answer_tokens, score and default instruction",
            "processor_options": "image processor settings its authors' code uses (e.g. min_pixels, max_pixels)",
            "source": "where the conventions were read (URL, repository and commit)"}
NONE = "none"
"""A stage's ``conventions`` value that turns the lookup off: genret's own prompt, whatever the checkpoint."""
# sentence-transformers' activation functions (config_sentence_transformers.json) and the score each one is
_ACTIVATIONS = {"torch.nn.modules.activation.Sigmoid": "sigmoid", "torch.nn.modules.linear.Identity": "log_odds"}


class ConventionsError(ValueError):
    """A checkpoint's conventions that are malformed, unknown or contradict each other."""


@dataclass(frozen=True)
class Conventions:
    """How a reranker checkpoint is scored, from its row, its folder and its sentence-transformers files.

    Attributes:
        prompt: the prompt file to score with ('' where no source names one: the stage's default).
        processor_options: image processor settings (a stage's own ``processor_options`` win, key by key).
        yes_id, no_id: answer token ids the checkpoint declares (sentence-transformers ``LogitScore``), else None.
        score: the score its files declare (``"sigmoid"``, ``"log_odds"``), else None (the prompt file's).
        instruction: the default instruction its files declare, else None (the prompt file's).
        sources: where each part was read, for reports and errors.
    """

    prompt: str = ""
    processor_options: Mapping[str, Any] = field(default_factory=dict)
    yes_id: int | None = None
    no_id: int | None = None
    score: str | None = None
    instruction: str | None = None
    sources: tuple[str, ...] = ()

    @property
    def found(self) -> bool:
        """Whether any source said anything about this checkpoint."""
        return bool(self.sources)


def known_checkpoints() -> dict[str, dict]:
    """The table's rows (hub id → row), read from :data:`TABLE`."""
    data = _read_json(TABLE, "genret's checkpoint table")
    if data.get("format") != "genret.reranker_checkpoints" or not isinstance(data.get("checkpoints"), dict):
        raise ConventionsError(f"{TABLE}: not a genret checkpoint table")
    for key, row in data["checkpoints"].items():
        _check_row(row, f"{TABLE}: {key!r}")
    return dict(data["checkpoints"])


def conventions_for(model: str, name: str = "", folder: str | os.PathLike | None = None) -> Conventions:
    """The scoring conventions of checkpoint ``model`` (hub id or local folder).

    Args:
        model: the stage's ``model``.
        name: a table row to use instead of looking ``model`` up (a local copy of a known checkpoint), or
            :data:`NONE` for no conventions at all.
        folder: where the checkpoint's files are (default: ``model`` when it is a folder, else its snapshot
            in the Hugging Face cache, if any).

    Raises:
        ConventionsError: an unknown row name, a malformed file, or sources that contradict each other.
    """
    if name == NONE:
        return Conventions()
    table = known_checkpoints()
    if name and name not in table:
        raise ConventionsError(f"conventions {name!r} is not a known checkpoint; known: {', '.join(sorted(table))}, "
                               f"or 'none' (genret's own prompt); a checkpoint of your own takes a {LOCAL_FILE} in "
                               "its folder")
    parts: dict[str, Any] = {"processor_options": {}}
    sources: list[str] = []
    row = table.get(name or model)
    if row is not None:
        parts.update({k: v for k, v in row.items() if k != "source"})
        sources.append(f"{TABLE.name}[{name or model!r}]")
    where = Path(folder) if folder is not None else _folder(model)
    if where is not None and (where / LOCAL_FILE).is_file():
        own = _read_json(where / LOCAL_FILE, "reranker conventions")
        _check_row(own, str(where / LOCAL_FILE))
        parts.update({k: v for k, v in own.items() if k not in ("source", "processor_options")})
        parts["processor_options"] = {**parts["processor_options"], **own.get("processor_options", {})}
        sources.append(str(where / LOCAL_FILE))
    if where is not None:
        st = _sentence_transformers(where)
        if st:
            parts.update(st)
            sources.append(f"{where} (sentence-transformers files)")
    return Conventions(prompt=parts.get("prompt", ""), processor_options=MappingProxyType(dict(parts["processor_options"])),
                       yes_id=parts.get("yes_id"), no_id=parts.get("no_id"), score=parts.get("score"),
                       instruction=parts.get("instruction"), sources=tuple(sources))


def _folder(model: str) -> Path | None:
    """The checkpoint's files: ``model`` itself when it is a folder, else its hub snapshot in the local cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    from genret._hub import hub_snapshot

    return hub_snapshot(model)


def _sentence_transformers(folder: Path) -> dict[str, Any]:
    """What a checkpoint's sentence-transformers files say about scoring: ``yes_id``/``no_id`` from its
    ``LogitScore`` module, ``score`` from ``activation_fn``, ``instruction`` from the default prompt."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return {}
    modules = _read_json(modules_file, "sentence-transformers modules")
    heads = [m for m in modules if isinstance(m, dict) and str(m.get("type", "")).endswith("LogitScore")]
    if not heads:
        return {}
    head = folder / heads[0].get("path", "") / "config.json"
    if not head.is_file():
        raise ConventionsError(f"{modules_file}: its LogitScore module's config {head} is missing (a modules.json "
                               "that names the wrong folder); fix the path or add the file")
    ids = _read_json(head, "LogitScore config")
    if not isinstance(ids.get("true_token_id"), int):
        raise ConventionsError(f"{head}: true_token_id must be a token id, got {ids.get('true_token_id')!r}")
    if not isinstance(ids.get("false_token_id"), int):
        raise ConventionsError(f"{head}: a LogitScore without false_token_id scores the raw logit of one token; "
                               "genret scores a pair of answer tokens: give false_token_id")
    out: dict[str, Any] = {"yes_id": ids["true_token_id"], "no_id": ids["false_token_id"], "score": "sigmoid"}
    settings_file = folder / "config_sentence_transformers.json"
    if settings_file.is_file():
        settings = _read_json(settings_file, "sentence-transformers settings")
        activation = settings.get("activation_fn")
        if activation is not None:
            if activation not in _ACTIVATIONS:
                raise ConventionsError(f"{settings_file}: activation_fn {activation!r} is not one genret scores with "
                                       f"({', '.join(_ACTIVATIONS)})")
            out["score"] = _ACTIVATIONS[activation]
        prompts, default = settings.get("prompts") or {}, settings.get("default_prompt_name")
        if default and prompts.get(default):
            out["instruction"] = prompts[default]
    return out


def _check_row(row: Any, where: str) -> None:
    if not isinstance(row, dict):
        raise ConventionsError(f"{where}: a checkpoint's conventions are a table of {', '.join(ROW_KEYS)}")
    unknown = [k for k in row if k not in ROW_KEYS]
    if unknown:
        raise ConventionsError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; a row holds "
                               + "; ".join(f"{k}: {v}" for k, v in ROW_KEYS.items()))
    if not isinstance(row.get("prompt", ""), str) or not isinstance(row.get("processor_options", {}), dict):
        raise ConventionsError(f"{where}: prompt must be text and processor_options a table")


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConventionsError(f"{path}: cannot read the {what}: {err}") from None


def adapter_base(model: str) -> str | None:
    """The base model of a checkpoint shipped as a LoRA adapter (peft's ``adapter_config.json``, no
    ``config.json``), from its ``base_model_name_or_path``; None for any other checkpoint.

    A local folder and a hub snapshot in the Hugging Face cache are read alike: a whole model holds ``config.json``,
    an adapter checkpoint ``adapter_config.json`` alone (its weights may not be fetched yet: :func:`adapter_folder`
    fetches them). A hub id with neither cached is asked of the hub, where downloads are on and it can be reached.

    Raises:
        ConventionsError: an adapter checkpoint whose config names no base model.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        folder = path
    else:
        from genret._hub import hub_offline, hub_reachable, hub_snapshot, looks_local

        if looks_local(model):  # a path that is not there: the loader's check names it (no hub id to ask about)
            return None
        folder = hub_snapshot(model)
        if folder is None or not ((folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()):
            if hub_offline() or not hub_reachable():  # nothing to ask: the loader names what is missing
                return None
            from transformers.utils import find_adapter_config_file

            try:
                found = find_adapter_config_file(model)
            except (OSError, ValueError):  # not there, or not a valid repository id: the loader's check names it
                return None
            return None if found is None else _base_of(Path(found))
    if (folder / "config.json").is_file() or not (folder / "adapter_config.json").is_file():
        return None
    return _base_of(folder / "adapter_config.json")


def _base_of(config_file: Path) -> str:
    base = _read_json(config_file, "adapter config").get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise ConventionsError(f"{config_file}: a LoRA adapter checkpoint without base_model_name_or_path; genret "
                               "cannot tell which model it adapts")
    return base


def adapter_fingerprint(model: str) -> str:
    """A fingerprint of an adapter checkpoint's own files (:func:`genret._hub.model_fingerprint`: their contents,
    a local folder or the hub snapshot in the local cache alike).

    Raises:
        NotDownloaded: a hub adapter whose weights are not fetched yet (:func:`adapter_folder` fetches them).
        ConventionsError: one that is neither a folder nor in the cache.
    """
    from genret._hub import NotDownloaded, model_fingerprint

    try:
        return model_fingerprint(model)
    except NotDownloaded:
        raise
    except ValueError as err:
        raise ConventionsError(f"cannot fingerprint adapter checkpoint {model!r}: {err}") from None


def merge_adapter(mllm, config) -> Any:
    """``mllm`` (the base, loaded) with the LoRA adapter checkpoint ``config.model`` merged into its weights, as if
    the checkpoint were a whole model: every stage, cached feature and genret adapter works on it unchanged. Its
    ``model_id`` is the checkpoint's, its ``revision`` the base's and the adapter's fingerprints together.

    Raises:
        ValueError: with 4/8-bit loading (a LoRA cannot be merged into quantised weights).
    """
    if config.load_in_4bit or config.load_in_8bit:
        raise ValueError(f"{config.model!r} is a LoRA adapter checkpoint, merged into its base as it loads; 4-bit "
                         "and 8-bit weights cannot take the merge: load it in bfloat16/float32")
    mllm.model = merge_peft_adapter(mllm.model, config.model)
    mllm.model.eval()
    mllm.revision = f"{mllm.revision}+{adapter_fingerprint(config.model)}"
    mllm.model_id = str(config.model)
    logger.info("%s: LoRA adapter checkpoint merged into its base %s", config.model, mllm.model.config.name_or_path)
    return mllm


def merge_peft_adapter(model, adapter: str):
    """``model`` with the LoRA/DoRA adapter at ``adapter`` merged into its weights.

    An adapter saved against transformers 4.x module names (``model.layers.N`` where 5.x has
    ``model.language_model.layers.N``, ``visual`` where it has ``model.visual``: every adapter trained before 5.0)
    does not load through ``PeftModel.from_pretrained`` on 5.24: peft warns of missing keys and leaves the adapter at
    its initialisation, an identity, so the base model comes back silently. Its keys are renamed here with the
    model's own checkpoint renamings (those ``from_pretrained`` applies to its weights); other saved weights
    (``modules_to_save``) keep their keys.

    Raises:
        ValueError: LoRA weights for modules the model does not have after renaming, or LoRA weights left unset.
    """
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    folder = str(adapter_folder(adapter))
    config = PeftConfig.from_pretrained(folder)
    state = load_peft_weights(folder, device="cpu")
    modules = {name for name, _ in model.named_modules()}
    renames = _renamings(model)
    fixed, unknown = {}, []
    for key, value in state.items():
        head, sep, tail = key.partition(".lora_")
        if not sep:
            fixed[key] = value
            continue
        path = head.removeprefix("base_model.model.")
        if path not in modules:
            path = next((new for new in _renamed(path, renames) if new in modules), None)
            if path is None:
                unknown.append(key)
                continue
        fixed[f"base_model.model.{path}{sep}{tail}"] = value
    if unknown:
        raise ValueError(f"{adapter!r}: the adapter has weights for modules this model does not have "
                         f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}); is it for another base?")
    peft_model = get_peft_model(model, config)
    result = set_peft_model_state_dict(peft_model, fixed)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing:
        raise ValueError(f"{adapter!r}: the adapter leaves {len(missing)} LoRA weights unset (e.g. {missing[0]})")
    return peft_model.merge_and_unload()


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
"""The weights files of a peft adapter, the first one found loads (peft's own order)."""


def adapter_folder(adapter: str) -> Path:
    """A local folder holding the adapter checkpoint's files: ``adapter`` itself when it is a folder, else its hub
    snapshot in the Hugging Face cache, its missing files fetched first (``snapshot_download``; a snapshot may hold
    only the ``adapter_config.json`` read to find the base).

    Raises:
        FileNotFoundError: a hub adapter whose files are not all cached while downloads are off or the hub cannot be
            reached, naming the files missing; a folder without ``adapter_config.json`` or weights.
    """
    from genret._hub import hub_cache, hub_offline, hub_reachable, hub_snapshot

    path = Path(adapter).expanduser()
    if path.is_dir():
        missing = _adapter_missing(path)
        if missing:
            raise FileNotFoundError(f"adapter checkpoint {adapter!r}: {path} lacks {' and '.join(missing)}; it is not "
                                    "a peft adapter folder (peft's save_pretrained writes both)")
        return path
    snapshot = hub_snapshot(adapter)
    missing = _adapter_missing(snapshot) if snapshot is not None else ["adapter_config.json", ADAPTER_WEIGHTS[0]]
    if not missing:
        return snapshot
    if hub_offline() or not hub_reachable():
        where = f"its snapshot {snapshot}" if snapshot is not None else f"the Hugging Face cache ({hub_cache()})"
        why = "Hugging Face hub downloads are off (HF_HUB_OFFLINE=1)" if hub_offline() else "the hub cannot be reached"
        raise FileNotFoundError(f"adapter checkpoint {adapter!r}: {' and '.join(missing)} not in {where}, and {why}; "
                                f"download it first (hf download {adapter}), allow downloads, or pass a local "
                                "adapter folder")
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(repo_id=adapter))  # the whole repository: its fingerprint counts every file
    missing = _adapter_missing(folder)
    if missing:
        raise FileNotFoundError(f"adapter checkpoint {adapter!r}: the hub repository has no {' and '.join(missing)}; "
                                "it is not a peft adapter")
    return folder


def _adapter_missing(folder: Path) -> list[str]:
    """The peft files ``folder`` lacks: its config, and weights in either format."""
    missing = [] if (folder / "adapter_config.json").is_file() else ["adapter_config.json"]
    if not any((folder / name).is_file() for name in ADAPTER_WEIGHTS):
        missing.append(ADAPTER_WEIGHTS[0])
    return missing


def _renamings(model) -> list[tuple[re.Pattern, str]]:
    """The model's checkpoint key renamings (regex, replacement), as transformers applies them to weights."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    out = []
    for transform in get_model_conversion_mapping(model):
        if type(transform).__name__ not in ("WeightRenaming", "PrefixChange"):
            continue
        targets = list(transform.target_patterns)
        for source in transform.source_patterns:
            out.append((re.compile(source), targets[0] if len(targets) == 1 else targets.pop(0)))
    return out


def _renamed(path: str, renames: list[tuple[re.Pattern, str]]):
    """``path`` under each renaming that matches it, one at a time."""
    for pattern, target in renames:
        if pattern.search(path):
            yield pattern.sub(target, path, count=1)
