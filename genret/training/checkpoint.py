"""Resumable training checkpoints without pickle: adapter and optimizer tensors in safetensors, the rest JSON.

A checkpoint folder ``<run>/checkpoints/step-0000200/`` holds peft's adapter files (it loads as an
adapter on its own), ``optimizer.safetensors`` (every tensor of the optimizer state, keyed
``<param index>.<name>``) and ``trainer_state.json`` (format, step, history, config, and the
optimizer's non-tensor state). Each is written atomically; older checkpoints are pruned.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from genret._io import ManifestError, atomic_dir, read_json, write_json

logger = logging.getLogger(__name__)

FORMAT = "genret.train_state"
VERSION = 1
STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint of the highest step under ``run_dir``, or ``None``."""
    root = checkpoint_root(run_dir)
    found = sorted(p for p in root.glob("step-*") if (p / STATE).is_file()) if root.is_dir() else []
    return found[-1] if found else None


def save_checkpoint(run_dir: str | os.PathLike, step: int, model, optimizer, state: dict, keep: int = 1) -> Path:
    """Save adapter weights, optimizer state and ``state`` (JSON-able) as the checkpoint of ``step``.

    Args:
        model: the peft model (unwrapped); its ``save_pretrained`` writes the adapter.
        optimizer: a torch optimizer (or accelerate's wrapper of one).
        state: step, history, config... anything JSON-able the loop needs to continue.
        keep: how many checkpoints to keep (oldest removed first).
    """
    from safetensors.torch import save_file

    folder = checkpoint_root(run_dir) / f"step-{step:07d}"
    tensors, scalars = {}, {}
    for pid, values in optimizer.state_dict()["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    with atomic_dir(folder, (FORMAT,)) as tmp:
        model.save_pretrained(str(tmp))
        (tmp / "README.md").unlink(missing_ok=True)  # peft's empty model card
        save_file(tensors, str(tmp / OPTIMIZER))
        write_json(tmp / STATE, {"format": FORMAT, "version": VERSION, "step": step, **state,
                                 "optimizer_scalars": scalars})
    others = sorted(p for p in checkpoint_root(run_dir).glob("step-*") if p != folder)
    for old in others[:max(0, len(others) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def load_checkpoint(folder: str | os.PathLike, model, optimizer) -> dict:
    """Restore adapter weights and optimizer state from ``folder``; returns its JSON state.

    Raises:
        ManifestError: naming the folder, when it is not a genret training checkpoint of this version,
            or its optimizer state does not fit the optimizer (another model or LoRA setting).
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    state = read_json(folder / STATE, what="training checkpoint state")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ManifestError(f"{folder}: not a genret training checkpoint ({STATE} has format "
                            f"{state.get('format') if isinstance(state, dict) else None!r}, expected {FORMAT!r})")
    if state.get("version") != VERSION:
        raise ManifestError(f"{folder}: checkpoint format version {state.get('version')}, this genret reads {VERSION}")
    weights = load_file(str(folder / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ManifestError(f"{folder}: adapter weights do not fit the model (e.g. {unexpected[0]})")
    saved = load_file(str(folder / OPTIMIZER))
    current = optimizer.state_dict()
    n_params = sum(len(g["params"]) for g in current["param_groups"])
    restored: dict[int, dict] = {}
    for key, value in saved.items():
        pid, name = key.split(".", 1)
        restored.setdefault(int(pid), {})[name] = value
    for key, value in state.get("optimizer_scalars", {}).items():
        pid, name = key.split(".", 1)
        restored.setdefault(int(pid), {})[name] = value
    if restored and max(restored) >= n_params:
        raise ManifestError(f"{folder}: optimizer state for {max(restored) + 1} parameters, the model trains {n_params}")
    current["state"] = restored
    optimizer.load_state_dict(current)
    logger.info("resumed from %s (step %d)", folder, state["step"])
    return state
