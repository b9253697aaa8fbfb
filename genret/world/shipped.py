"""The miniature world's shipped models (``adapters/mini-world/``): a mini CLIP, the mini MLLM, and LoRAs on
that MLLM: a rerank LoRA, and the rewrite stages' (CIReVL's rewriter, chat's questioner, EIIRwQR's rewriter).

Pretraining the mini MLLM takes 20-25 minutes on 2 CPU cores, and the rewriter's recipe 10 more, longer
than the demo may take, so the trained checkpoints live in the repository with
``scripts/make_mini_world_models.sh`` that remakes them. The LoRAs are optional: a folder without them
still ships, and the demo then trains a short rerank LoRA and CIReVL rewriter and runs the other stages zero-shot.
``manifest.json`` beside them is their manifest: the world generator version and config they
were trained on, and a SHA-256 of every weight file, checked before use.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from genret._io import ManifestError, read_json, read_manifest, write_json
from genret._swap import atomic_dir

MINI_WORLD = Path(os.environ.get("GENRET_MINI_WORLD") or Path(__file__).resolve().parents[2] / "adapters" / "mini-world")
FORMAT = "genret.mini_world_models"
PARTS = ("clip", "mllm")
OPTIONAL_PARTS = ("rerank", "rewriter", "questioner", "feedback")
"""LoRAs on the mini MLLM: the rerank stage's, and the rewrite stages' (CIReVL's rewriter, chat's questioner,
EIIRwQR's rewriter)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _weights(folder: Path) -> dict[str, str]:
    return {p.name: _sha256(p) for p in sorted(folder.glob("*.safetensors"))}


def ship(run_dir: str | os.PathLike, dest: str | os.PathLike = MINI_WORLD) -> Path:
    """Copy ``run_dir/{clip,mllm}`` and any of :data:`OPTIONAL_PARTS` there (all made from ``run_dir/world``) to
    ``dest`` with a manifest, atomically."""
    run_dir, dest = Path(run_dir), Path(dest)
    world = read_json(run_dir / "world" / "dataset_synth.json")["genret"]
    with atomic_dir(dest, (FORMAT,)) as tmp:
        parts = {}
        for part in PARTS + tuple(p for p in OPTIONAL_PARTS if (run_dir / p).is_dir()):
            shutil.copytree(run_dir / part, Path(tmp) / part)
            made = Path(tmp) / part / "genret.json"
            summary = read_json(made) if made.is_file() else {}
            parts[part] = {"weights": _weights(Path(tmp) / part), "history": summary.get("history"),
                           "train_seconds": summary.get("train_seconds"), "config": summary.get("config")}
        write_json(Path(tmp) / "manifest.json", {"format": FORMAT, "version": 1, "world": {
            "generator_version": world["version"], "config": world["config"]}, "parts": parts})
    return dest


# World versions whose training images and captions (all the shipped models learn from) are those of an earlier
# one: v3 only added the composed-retrieval triplets (cirr/), v4 gave val its twins; each from its own random
# stream, so train (and test) stayed byte-identical.
_SAME_IMAGES = {3: 2, 4: 2}
_NOT_LEARNT = ("val_twin_fraction",)  # config keys that change no training image


def _images_part(version: int, config: dict) -> tuple[int, dict]:
    """What of a world the models depend on: the version of its image-caption part, its config without cir_* (and
    the val-only keys)."""
    return _SAME_IMAGES.get(version, version), {k: v for k, v in config.items()
                                                if not k.startswith("cir_") and k not in _NOT_LEARNT}


def shipped_models(world_version: int, world_config: dict, folder: str | os.PathLike | None = None) -> dict[str, Path]:
    """The shipped ``{"clip": dir, "mllm": dir}`` and optional parts if trained on this world, else ManifestError.

    Raises:
        ManifestError: no manifest, another world, or a weight file that does not match its hash.
    """
    folder = Path(folder or MINI_WORLD)
    try:
        manifest = read_manifest(folder, FORMAT, 1, "mini-world models")
    except FileNotFoundError:
        raise ManifestError(f"{folder}: no shipped mini-world models here (no manifest.json); "
                            "make them with scripts/make_mini_world_models.sh") from None
    made = manifest["world"]
    if _images_part(made["generator_version"], made["config"]) != _images_part(world_version, world_config):
        raise ManifestError(f"{folder}: the shipped models were trained on world v{made['generator_version']} "
                            f"{made['config']}, not v{world_version} {world_config}; remake them with "
                            "scripts/make_mini_world_models.sh")
    out = {}
    for part in PARTS + tuple(p for p in OPTIONAL_PARTS if p in manifest["parts"]):
        for name, digest in manifest["parts"][part]["weights"].items():
            path = folder / part / name
            if not path.is_file() or _sha256(path) != digest:
                raise ManifestError(f"{path}: missing or changed since it was shipped (SHA-256 differs); "
                                    "restore it from git or remake with scripts/make_mini_world_models.sh")
        out[part] = folder / part
    return out
