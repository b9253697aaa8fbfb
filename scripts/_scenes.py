"""What the scene-set makers share (make_fashion_scenes.py, make_emoji_scenes.py): Karpathy entries with their twin
links, the source files' digests, and the command line (OUT, the source, the config's sizes and seed)."""

from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def captions(a: str, b: str, horizontal: bool, rng, n: int = 5) -> list[str]:
    """``n`` of the six ways to say that ``a`` is left of (or above) ``b``, in ``rng``'s order."""
    first, second = ("to the left of", "to the right of") if horizontal else ("above", "below")
    where = ("on the left", "on the right") if horizontal else ("at the top", "at the bottom")
    forms = [f"a {a} {first} a {b}", f"a {b} {second} a {a}", f"a {a} {where[0]} and a {b} {where[1]}",
             f"a {b} {where[1]} and a {a} {where[0]}", f"a {a} placed {first} a {b}", f"a {b} placed {second} a {a}"]
    rng.shuffle(forms)
    return forms[:n]


def entry(imgid: int, split: str, captions: list[str], first_sentid: int, key: str, meta: dict,
          twin_of: int | None = None, kind: str | None = None) -> dict:
    """One Karpathy image entry (``images/NNNNNN.png``), its scene under ``key``, and its twin link."""
    sentids = list(range(first_sentid, first_sentid + len(captions)))
    out = {"filename": f"{imgid:06d}.png", "filepath": "images", "split": split, "imgid": imgid, "sentids": sentids,
           "sentences": [{"raw": c, "tokens": c.split(), "imgid": imgid, "sentid": s} for s, c in zip(sentids, captions)],
           key: meta}
    if twin_of is not None:
        out["twin_of"], out["twin_kind"] = twin_of, kind
    return out


def main(doc: str, config_class: type, make: Callable, source: tuple[str, str, str], argv: list[str] | None) -> int:
    """The maker's command: ``OUT [--SOURCE ...] [--n-train N ...]``; an unusable source is named, exit status 2.

    Args:
        source: the source option's flag, default and help (``("--font", FONT, "Noto Color Emoji's .ttf")``).
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("out")
    flag, default, help_text = source
    parser.add_argument(flag, default=str(default), help=help_text)
    for name, value in asdict(config_class()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)
    args = parser.parse_args(argv)
    config = config_class(**{k: getattr(args, k) for k in asdict(config_class())})
    try:
        print(f"wrote {make(args.out, getattr(args, flag.lstrip('-').replace('-', '_')), config)}")
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
