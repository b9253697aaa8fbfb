"""Resumable training checkpoints without pickle: trained tensors and optimizer state in safetensors, the rest JSON.

A checkpoint folder ``<run>/checkpoints/step-0000200/`` holds ``trainable.safetensors`` (every parameter
that trains, by its name in the model: a LoRA's weights and new-token rows, or a whole model that trains
whole), ``optimizer.safetensors`` (every tensor of the optimizer state, keyed ``<param index>.<name>``) and
``trainer_state.json`` (format, step, history, the trainer's data-stream state, config, and the optimizer's
non-tensor state). Each is written atomically; older checkpoints are pruned.

Under DeepSpeed or FSDP the weights and optimizer state are sharded across processes and only their own
checkpointing can gather them: there the folder holds ``accelerate/`` written by ``Accelerator.save_state``
(DeepSpeed's and torch's own formats) beside the same ``trainer_state.json``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from genret._io import ManifestError, check_files, read_json, seal, write_json
from genret._swap import atomic_dir, mark_run, remove_artefact

logger = logging.getLogger(__name__)

FORMAT = "genret.train_state"
VERSION = 2
STATE = "trainer_state.json"
WEIGHTS = "trainable.safetensors"
OPTIMIZER = "optimizer.safetensors"
SHARDED = "accelerate"


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint of the highest step under ``run_dir``, or ``None``."""
    root = checkpoint_root(run_dir)
    found = sorted(p for p in root.glob("step-*") if (p / STATE).is_file()) if root.is_dir() else []
    return found[-1] if found else None


def trainable_tensors(model) -> dict[str, torch.Tensor]:
    """The parameters of ``model`` that train, by name, as contiguous CPU tensors."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: str | os.PathLike, step: int, model, optimizer, state: dict, keep: int = 1,
                    accelerator=None) -> Path:
    """Save what trains, the optimizer state and ``state`` (JSON-able) as the checkpoint of ``step``.

    Args:
        model: the model, unwrapped (its parameters that require grad are saved).
        optimizer: a torch optimizer (or accelerate's wrapper of one).
        state: step, history, data-stream state, config... anything JSON-able the loop needs to continue.
        keep: how many checkpoints to keep (oldest removed first).
        accelerator: given under DeepSpeed / FSDP, where its ``save_state`` writes the sharded state; then
            every process calls this (each writes its shards), elsewhere only the main one.
    """
    from safetensors.torch import save_file

    folder = checkpoint_root(run_dir) / f"step-{step:07d}"
    if accelerator is None or accelerator.is_main_process:
        mark_run(run_dir)  # the run's checkpoints are genret's until its result replaces them
    if accelerator is not None:  # every process writes its shards; the state file, written last, marks it complete
        accelerator.save_state(str(folder / SHARDED), safe_serialization=True)
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return folder
        seal(folder, STATE, {"format": FORMAT, "version": VERSION, "step": step, **state})
    else:
        with atomic_dir(folder, (FORMAT,)) as tmp:
            tensors, scalars = {}, {}
            for pid, values in optimizer.state_dict()["state"].items():
                for key, value in values.items():
                    if isinstance(value, torch.Tensor):
                        tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
                    else:
                        scalars[f"{pid}.{key}"] = value
            save_file(trainable_tensors(model), str(tmp / WEIGHTS))
            save_file(tensors, str(tmp / OPTIMIZER))
            write_json(tmp / STATE, {"format": FORMAT, "version": VERSION, "step": step, **state,
                                     "optimizer_scalars": scalars})
    others = sorted(p for p in checkpoint_root(run_dir).glob("step-*") if p != folder)
    for old in others[:max(0, len(others) - (keep - 1))]:
        remove_artefact(old)
    return folder


def read_state(folder: str | os.PathLike) -> dict:
    """The JSON state of a checkpoint, checked to be a genret training checkpoint of this version."""
    folder = Path(folder)
    state = read_json(folder / STATE, what="training checkpoint state")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ManifestError(f"{folder}: not a genret training checkpoint ({STATE} has format "
                            f"{state.get('format') if isinstance(state, dict) else None!r}, expected {FORMAT!r})")
    if state.get("version") != VERSION:
        raise ManifestError(f"{folder}: checkpoint format version {state.get('version')}, this genret reads {VERSION}; "
                            "start the run afresh in another folder")
    check_files(folder, state, "training checkpoint")
    return state


def load_checkpoint(folder: str | os.PathLike, model, optimizer, accelerator=None) -> dict:
    """Restore what trains and the optimizer state from ``folder``; returns its JSON state.

    Raises:
        ManifestError: naming the folder, when it is not a genret training checkpoint of this version,
            or its tensors do not fit the model or optimizer (another model, LoRA or identifier setting).
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    state = read_state(folder)
    if (folder / SHARDED).is_dir():
        if accelerator is None:
            raise ManifestError(f"{folder}: a DeepSpeed/FSDP checkpoint; resume it under the same accelerate config")
        accelerator.load_state(str(folder / SHARDED))
        logger.info("resumed from %s (step %d)", folder, state["step"])
        return state
    saved = load_file(str(folder / WEIGHTS))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if saved.keys() != params.keys():
        odd = sorted(saved.keys() ^ params.keys())
        raise ManifestError(f"{folder}: its weights do not fit the model ({len(odd)} names differ, e.g. {odd[0]!r}); "
                            "resume with the same model and settings")
    with torch.no_grad():
        for name, value in saved.items():
            if value.shape != params[name].shape:
                raise ManifestError(f"{folder}: {name} is {tuple(value.shape)} there, {tuple(params[name].shape)} here")
            params[name].copy_(value)
    tensors = load_file(str(folder / OPTIMIZER))
    current = optimizer.state_dict()
    n_params = sum(len(g["params"]) for g in current["param_groups"])
    restored: dict[int, dict] = {}
    for key, value in tensors.items():
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
