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

from genret._io import read_text


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


SETTINGS = {"name": "the prompt's name (text)", "version": "its version, a whole number from 1",
            "yes": "pointwise rerank: the answer word read as a match (text)",
            "no": "pointwise rerank: the answer word read as no match (text)",
            "answer_tokens": "pointwise rerank: 'in_context' (every casing of the answer word that is one token after "
                             "the prompt, summed: genret's default) or 'vocabulary' (the word's own vocabulary token, "
                             "as a reranker checkpoint's authors read it)",
            "score": "pointwise rerank: 'log_odds' (log P(yes) - log P(no), the default) or 'sigmoid' (P(yes) over "
                     "P(yes) + P(no): the probability a reranker checkpoint's card reports)",
            "instruction": "pointwise rerank: the default of the {instruction} placeholder (text)"}
CHOICES = {"answer_tokens": ("in_context", "vocabulary"), "score": ("log_odds", "sigmoid")}
"""The settings that take one of a few values, and those values."""
"""The top-level keys a prompt file may hold (beside its tables), and what each must be."""
TEMPLATES = ("system", "user", "assistant", "item")
"""The templates a table may hold: the system prompt (pointwise rerank), the user turn, the assistant's answer
(generative rerank), one listwise line."""


def _read(path: Path) -> dict:
    text = read_text(path, "prompt file", PromptError)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise PromptError(f"{path}: malformed TOML: {err}") from None


def _what(value: Any) -> str:
    if isinstance(value, bool):
        return f"true/false ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"text ({value[:30]!r})"
    return {list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


def _check_schema(path: Path, data: dict, exact: Mapping[str, Any] | None) -> None:
    """Every key of a prompt file known and of its type: ``name`` and ``version``, the ``yes``/``no`` words, and
    tables of text templates (with ``exact``, only the tables the caller reads)."""
    for key in ("name", "version"):
        if key not in data:
            raise PromptError(f"{path}: missing '{key}'")
    for key, value in data.items():
        if isinstance(value, dict) and key not in SETTINGS:
            if exact is not None and key not in exact:
                tables = ", ".join(f"[{t}]" for t in exact)
                raise PromptError(f"{path}: unknown table [{key}]; this stage reads {tables}")
            for name, template in value.items():
                if name not in TEMPLATES:
                    raise PromptError(f"{path}: [{key}].{name} is not a template genret reads (a table holds "
                                      f"{', '.join(TEMPLATES)})")
                if not isinstance(template, str):
                    raise PromptError(f"{path}: [{key}].{name} must be text, got {_what(template)}; write the "
                                      'template as a quoted string ("...")')
            continue
        if key not in SETTINGS:
            raise PromptError(f"{path}: unknown key {key!r} (a prompt file holds {', '.join(SETTINGS)} and tables "
                              "of templates)")
        if key == "version":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PromptError(f"{path}: 'version' must be a whole number from 1, got {_what(value)}")
        elif not isinstance(value, str) or not value.strip():
            raise PromptError(f"{path}: {key!r} must be non-empty text, got {_what(value)}")
        elif key in CHOICES and value not in CHOICES[key]:
            raise PromptError(f"{path}: {key!r} must be one of {', '.join(CHOICES[key])}, got {value!r}")


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
                exact: bool = False, optional: tuple[str, ...] = ()) -> Prompt:
    """Load ``prompts/<name>.toml`` (or a path) and check the placeholders each template needs.

    Args:
        name_or_path: a prompt name under :data:`PROMPT_DIR`, or a path to a ``.toml`` file.
        required: direction → template key → placeholders it must contain.
        exact: the ``required`` placeholders are the only ones the caller fills: any other ``{name}`` in those
            templates (a typo such as ``{txt}``) is refused, since it would reach the model as written.
        optional: placeholders the caller fills where a template has them, needed by none (``"{instruction}"``).
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = PROMPT_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROMPT_DIR.glob("*.toml")))
        raise PromptError(f"prompt file not found: {path} (prompts in {PROMPT_DIR}: {known})")
    data = _read(path)
    _check_schema(path, data, required if exact else None)
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
                             - set(placeholders) - set(optional))
            if exact and unknown:  # it would reach the model as written, braces and all
                raise PromptError(f"{path}: [{direction}].{template} has the placeholder(s) {', '.join(unknown)}, "
                                  f"which nothing fills; it takes {', '.join(placeholders) or 'none'}")
    settings = {k: v for k, v in data.items() if not isinstance(v, dict)}
    return Prompt(str(data["name"]), int(data["version"]), MappingProxyType(sections),
                  MappingProxyType(settings), str(path))
