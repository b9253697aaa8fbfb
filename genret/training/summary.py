"""A training run's result as one typed record, whichever trainer made it, and its one renderer.

Every trainer returns (and saves as its manifest, ``genret.json`` or ``genret_adapter.json``) a dict with the fields
the engine writes (:meth:`~genret.training.engine.Run.summary`: ``config``, ``metrics``, ``history``, ``steps``,
``speed``) beside its own. :class:`TrainSummary` reads what every one of them says: the task and mode, steps, time,
the loss at the start and end, and every evaluation figure, grouped by where it sits (``val t2i``: the rerank
trainer's val R@1 in that direction; ``forgetting, old, after``: what grace-add's old images keep). The ``genret
train`` commands print :meth:`TrainSummary.render`; ``--json`` prints the manifest itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

FIGURES = ("metrics", "forgetting", "val_caption_loss")
"""Where a manifest keeps evaluation figures (besides the loss at either end, in ``metrics``)."""


def _figures(value: Any, path: tuple[str, ...], out: dict[str, dict[str, float]]) -> None:
    numbers = {k: v for k, v in value.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if numbers and path:
        out[", ".join(path)] = numbers
    for k, v in value.items():
        if isinstance(v, Mapping):
            _figures(v, path + (str(k),), out)


@dataclass(frozen=True)
class TrainSummary:
    """What a training run reports, typed.

    Args:
        task: the trainer (``clip``, ``pretrain``, ``rerank``, ``grace``, ``grace-add``, ``rewriter``).
        mode: the rerank mode, GRACE scheme or rewrite prompt section (``None`` where the trainer has none).
        steps: optimizer steps run.
        seconds: wall-clock seconds of the run.
        loss_first, loss_last: the training loss of the first and last logged entries.
        parameters: the model's parameter count (trainers that build a model), else ``None``.
        figures: evaluation figures by group (``{"val, t2i": {"prefilter_R@1": 10.6, "rerank_R@1": 25.5}}``).
        added: images a run added to its parent adapter (grace-add), else ``None``.
        manifest: the whole dict the trainer returned and saved.
    """

    task: str
    steps: int
    seconds: float
    loss_first: float | None = None
    loss_last: float | None = None
    mode: str | None = None
    parameters: int | None = None
    added: int | None = None
    figures: dict[str, dict[str, float]] = field(default_factory=dict)
    manifest: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> "TrainSummary":
        """Read a trainer's result (its return value, or its saved manifest).

        Example:
            >>> s = TrainSummary.from_manifest({"task": "clip", "steps": 3, "train_seconds": 1.5,
            ...     "metrics": {"loss_first": 2.0, "loss_last": 1.0, "val": {"val_t2i_R@1": 40.0}}})
            >>> print(s.render("out/clip"))
            saved out/clip: clip, 3 steps in 2 s, loss 2.000 -> 1.000
              val: val_t2i_R@1 40.0
        """
        metrics = manifest.get("metrics") or {}
        figures: dict[str, dict[str, float]] = {}
        for key in FIGURES:
            value = manifest.get(key)
            if isinstance(value, Mapping):
                _figures(value, () if key == "metrics" else (key,), figures)
        if "task" not in manifest or "steps" not in manifest:
            raise ValueError("not a training summary: it has no task or steps (a genret trainer's manifest has both)")
        task = "grace-add" if "forgetting" in manifest else str(manifest["task"])
        return cls(task=task, steps=int(manifest["steps"]), seconds=float(manifest.get("train_seconds", 0.0)),
                   loss_first=metrics.get("loss_first"), loss_last=metrics.get("loss_last"),
                   mode=manifest.get("mode"), parameters=manifest.get("parameters"), figures=figures,
                   added=(manifest.get("added") or {}).get("images"),
                   manifest=manifest)

    def render(self, out: str) -> str:
        """The run in a few terminal lines: what was saved where, then one line per group of figures."""
        what = self.task + (f" ({self.mode})" if self.mode and self.mode != self.task else "")
        head = f"saved {out}: {what}" + (f", {self.added} images added" if self.added is not None else "")
        head += f", {self.steps} steps in {self.seconds:.0f} s"
        if self.loss_first is not None and self.loss_last is not None:
            head += f", loss {self.loss_first:.3f} -> {self.loss_last:.3f}"
        if self.parameters:
            head += f", {self.parameters / 1e6:.2f}M parameters"
        rows = [f"  {group}: " + ", ".join(f"{k} {_number(v)}" for k, v in numbers.items())
                for group, numbers in self.figures.items()]
        return "\n".join([head] + rows)


def _number(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:.1f}" if abs(v) >= 1 else f"{v:.3g}"
