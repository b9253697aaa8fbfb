"""A small generic registry: stages, encoder backends, model families, identifier schemes, simulated users.

Plug-ins register themselves when imported; a package that provides some (the miniature world, a data set with its
own simulated users) names the module that registers them under the ``genret.plugins`` entry-point group, which a
registry loads the first time it is asked for a name it does not hold::

    [project.entry-points."genret.plugins"]
    world = "genret.world.plugins"
"""

from __future__ import annotations

import logging
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")
PLUGINS = "genret.plugins"
logger = logging.getLogger(__name__)
_loaded = False


def load_plugins() -> None:
    """Import every module named under the ``genret.plugins`` entry points (once per process)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from importlib.metadata import entry_points

    for entry in entry_points(group=PLUGINS):
        try:
            entry.load()
        except Exception as err:  # noqa: BLE001 - a broken plug-in must not take the library down; say which
            logger.warning("genret plug-in %r (%s) failed to load: %s", entry.name, entry.value, err)


class Registry(Generic[T]):
    """Maps names to factories, with an error that lists the known names.

    Example:
        >>> stages = Registry("stage")
        >>> @stages.register("noop")
        ... def make_noop():
        ...     return "noop"
        >>> stages.get("noop")()
        'noop'
        >>> stages.get("nope")
        Traceback (most recent call last):
        ...
        KeyError: "unknown stage 'nope'; known: noop"
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name``."""

        def decorate(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return decorate

    def get(self, name: str) -> T:
        """The entry registered under ``name`` (plug-ins are loaded first if it is not here yet)."""
        if name not in self._entries:
            load_plugins()
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        """All registered names (the plug-ins' included), sorted."""
        load_plugins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        if name not in self._entries:
            load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
