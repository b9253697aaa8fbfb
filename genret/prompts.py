"""Prompt templates as named, versioned TOML files under ``prompts/``.

A prompt file has ``name``, ``version``, optional scalar settings (e.g. the yes/no answer words) and
one table per direction (``t2i``, ``i2t``) of templates with ``{text}``, ``{image}``... placeholders.
The name and version go into every report and cache key (:attr:`Prompt.key`).
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

def _prompt_dir() -> Path:
    """``$GENRET_PROMPTS``, else the installed package's ``genret/_prompts``, else the checkout's ``prompts/``."""
    if os.environ.get("GENRET_PROMPTS"):
        return Path(os.environ["GENRET_PROMPTS"])
    here = Path(__file__).resolve().parent
    installed = here / "_prompts"
    return installed if installed.is_dir() else here.parent / "prompts"


PROMPT_DIR = _prompt_dir()


class PromptError(ValueError):
    """A prompt file that is missing, malformed or lacks a placeholder its stage needs."""


@dataclass(frozen=True)
class Prompt:
    """A loaded prompt: templates per direction plus settings."""

    name: str
    version: int
    sections: Mapping[str, Mapping[str, str]]
    settings: Mapping[str, Any] = field(default_factory=dict)
    path: str = ""

    @property
    def key(self) -> str:
        """``name@vN``, for reports and cache keys."""
        return f"{self.name}@v{self.version}"

    def section(self, direction: str) -> Mapping[str, str]:
        """The templates of ``direction`` (``t2i`` or ``i2t``)."""
        if direction not in self.sections:
            raise PromptError(f"{self.path}: prompt {self.key} has no [{direction}] table")
        return self.sections[direction]


def load_prompt(name_or_path: str, required: Mapping[str, Mapping[str, tuple[str, ...]]] | None = None,
                exact: bool = False) -> Prompt:
    """Load ``prompts/<name>.toml`` (or a path) and check the placeholders each template needs.

    Args:
        name_or_path: a prompt name under :data:`PROMPT_DIR`, or a path to a ``.toml`` file.
        required: direction → template key → placeholders it must contain.
        exact: the ``required`` placeholders are the only ones the caller fills: any other ``{name}`` in those
            templates (a typo such as ``{txt}``) is refused, since it would reach the model as written.
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = PROMPT_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROMPT_DIR.glob("*.toml")))
        raise PromptError(f"prompt file not found: {path} (prompts in {PROMPT_DIR}: {known})")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise PromptError(f"{path}: malformed TOML: {err}") from None
    for key in ("name", "version"):
        if key not in data:
            raise PromptError(f"{path}: missing '{key}'")
    sections = {k: MappingProxyType(dict(v)) for k, v in data.items() if isinstance(v, dict)}
    for direction, needs in (required or {}).items():
        if direction not in sections:
            raise PromptError(f"{path}: missing the [{direction}] table")
        templates = sections[direction]
        for template, placeholders in needs.items():
            if template not in templates:
                raise PromptError(f"{path}: [{direction}] has no '{template}' template")
            missing = [p for p in placeholders if p not in templates[template]]
            if missing:
                raise PromptError(f"{path}: [{direction}].{template} is missing the placeholder(s) "
                                  f"{', '.join(missing)}")
            unknown = sorted({"{" + m + "}" for m in re.findall(r"\{([A-Za-z_]\w*)\}", templates[template])}
                             - set(placeholders))
            if exact and unknown:  # it would reach the model as written, braces and all
                raise PromptError(f"{path}: [{direction}].{template} has the placeholder(s) {', '.join(unknown)}, "
                                  f"which nothing fills; it takes {', '.join(placeholders) or 'none'}")
    settings = {k: v for k, v in data.items() if not isinstance(v, dict)}
    return Prompt(str(data["name"]), int(data["version"]), MappingProxyType(sections),
                  MappingProxyType(settings), str(path))
