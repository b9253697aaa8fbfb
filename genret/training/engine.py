"""One training loop for every genret trainer, on ``accelerate``.

A trainer is its data, its loss and its evaluation; this engine does the rest, the same way for all:
the accelerator (one process, or several under ``accelerate launch`` / ``torchrun``; DeepSpeed ZeRO and
FSDP through an accelerate config file), AdamW over parameter groups with their own learning rates,
linear warm-up then cosine decay, gradient accumulation, mixed precision (autocast, fp16 loss scaling),
gradient clipping, a progress bar with the loss and the last evaluation, the history, trackers
(``report_to``: TensorBoard, W&B, MLflow...), resumable checkpoints (:mod:`genret.training.checkpoint`)
and the final folder, written whole and atomically with the tracker logs inside.

Why a loop of ours on accelerate and not ``transformers.Trainer``: the Trainer writes its checkpoints'
optimizer, scheduler and RNG states and its arguments with ``torch.save`` (pickle), which genret does not
write or load; and the trainers' batches are not rows of a tensor data set but query groups, candidate
lists and mixed task rows drawn from seeded streams, which must stay identical across 1 or N processes
and across a resume. Accelerate gives the same back ends (DDP, DeepSpeed, FSDP, autocast, trackers).

How a step is drawn: ``batch(step)`` returns the step's ``chunks`` micro-batches (``processes ×
gradient_accumulation_steps`` of them, ``batch_size`` rows each), the same on every process; process
``p`` trains on chunks ``m × processes + p``. A step therefore sees the same rows whatever the split, so
2 processes × batch 8, 1 × 16 and 1 × 8 × 2 accumulated train the same model (for losses that are means
over rows).

Example::

    engine = Engine("rerank", config, out_dir, resume=resume)
    model = engine.prepare(peft_model)                 # or prepare(model, groups=[{"params": ..., "lr": ...}])
    run = engine.fit(total, batch=lambda step: ..., loss=lambda rows: ..., evaluate=..., identity={...})
    engine.save(lambda folder: write_adapter(folder, model, {**manifest, **run.summary(config)}), formats)
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from genret._swap import atomic_dir, check_output_dir, mark_run
from genret.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from genret.training.distributed import step_loss
from genret.training.options import TRACKERS, TrainOptions, resolve_mixed_precision

logger = logging.getLogger(__name__)

LOGS = "logs"
"""The trackers' folder inside the output folder (TensorBoard: ``tensorboard --logdir OUT/logs``)."""


def lr_factor(step: int, total: int, warmup: float) -> float:
    """The learning-rate multiplier at ``step`` (0-based): linear warm-up over ``warmup`` of ``total``, then cosine."""
    warm = max(1, int(warmup * total))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def check_resume(state: dict, expected: dict, folder: Path, defaults: dict[str, dict] | None = None) -> None:
    """Refuse to continue a checkpoint under other settings, naming the first that differs.

    ``defaults``: per identity key (``config``, ``arch``), its settings' defaults. A setting the checkpoint does not
    record (one an older genret did not have, which behaved as its default) is accepted where this run leaves it at
    its default."""
    expected = json.loads(json.dumps(expected))  # as the checkpoint stores it (tuples become lists)
    defaults = json.loads(json.dumps(defaults or {}))  # as stored
    for key, want in expected.items():
        have = state.get(key)
        if isinstance(want, dict) and isinstance(have, dict):  # the config: name the setting itself
            known = defaults.get(key, {})
            for name, value in want.items():
                if name in have or name not in known or known[name] == value:
                    continue
                raise ValueError(f"{folder}: the checkpoint predates the setting {name} (it ran as the default, "
                                 f"{known[name]!r}); this run has {value!r}: resume with {name} = {known[name]!r}, "
                                 "or start a fresh run in another folder")
            pairs = [(name, have.get(name), value) for name, value in want.items()
                     if name in have or name not in known]
        else:
            pairs = [(key, have, want)]
        for name, had, value in pairs:
            if had != value:
                raise ValueError(f"{folder}: the checkpoint was made with {name} = {had!r}, this run has {value!r}; "
                                 "resume with the same settings, or start a fresh run in another folder")


def _defaults(config) -> dict:
    """The default of every field of the dataclass ``config`` that has one."""
    from dataclasses import MISSING, fields

    out = {}
    for f in fields(config):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


def trackers(report_to: str) -> list[str]:
    """The tracker names ``report_to`` asks for, each checked to be installed."""
    from accelerate.tracking import filter_trackers

    if report_to in ("", "none"):
        return []
    if report_to == "all":
        return [str(t) for t in filter_trackers("all", ".")]
    names = report_to.split(",")
    for name in names:
        if not filter_trackers([name], "."):
            extra = " (pip install 'genret[train]')" if name == "tensorboard" else ""
            raise ImportError(f"report_to {name!r}: the {name} package is not installed{extra}; install it or "
                              f"leave it out of report_to (trackers: {', '.join(TRACKERS)})")
    return names


def flat_metrics(values: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict as ``{"a/b/c": value}`` (what trackers and the progress bar show)."""
    out: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_metrics(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


class Streams:
    """Seeded streams of indices over named pools, each reshuffled when it runs out; one ``random.Random`` for all.

    What a trainer's ``batch(step)`` draws from when rows are sampled without replacement per pass (GRACE's
    memorise and retrieve rows, a rewriter's pairs); its :meth:`state` goes into checkpoints, so a resumed
    run draws what the uninterrupted one would have.

    >>> s = Streams(0, {"a": range(3)})
    >>> first = s.take("a", 4)
    >>> sorted(first[:3]), len(first)
    ([0, 1, 2], 4)
    """

    def __init__(self, seed: int, pools: dict[str, Sequence[int]]) -> None:
        import random

        self.rng = random.Random(seed)
        self.pools = {k: list(v) for k, v in pools.items()}
        self.streams: dict[str, list[int]] = {k: [] for k in pools}

    def take(self, kind: str, n: int) -> list[int]:
        """The next ``n`` indices of pool ``kind`` (fewer only when the pool is empty)."""
        out: list[int] = []
        while len(out) < n and self.pools[kind]:
            if not self.streams[kind]:
                self.streams[kind] = self.rng.sample(self.pools[kind], len(self.pools[kind]))
            out.append(self.streams[kind].pop())
        return out

    def state(self) -> dict:
        return {"rng": self.rng.getstate(), "streams": self.streams}

    def restore(self, saved: dict) -> None:
        version, internal, gauss = saved["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.streams.update(saved["streams"])

    @property
    def hooks(self) -> tuple[Callable[[], dict], Callable[[dict], None]]:
        """``(get, set)`` for :meth:`Engine.fit`'s ``state``."""
        return self.state, self.restore


@dataclass
class Run:
    """What :meth:`Engine.fit` did: the history, the steps, the time spent training and evaluating."""

    history: list[dict]
    steps: int
    first_step: int
    seconds: float
    eval_seconds: float
    rows_per_step: int
    processes: int
    device: str
    mixed_precision: str
    logs: str | None = None

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.history if "loss" in h]

    @property
    def evals(self) -> list[dict]:
        return [h["eval"] for h in self.history if "eval" in h]

    def rate(self, per_step: float = 1.0) -> float:
        """Steps (times ``per_step``) per second of this run's training."""
        return round((self.steps - self.first_step) * per_step / max(self.seconds, 1e-9), 3)

    def metrics(self) -> dict:
        losses, evals = self.losses, self.evals
        return {"loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                **({"val": evals[-1]} if evals else {})}

    def speed(self) -> dict:
        return {"steps_per_s": self.rate(), "rows_per_step": self.rows_per_step, "processes": self.processes,
                "device": self.device, "mixed_precision": self.mixed_precision,
                "eval_seconds": round(self.eval_seconds, 1)}

    def summary(self, config: Any) -> dict:
        """The manifest fields every trainer writes: config, metrics, history, steps, speed, logs."""
        return {"config": asdict(config), "metrics": self.metrics(), "history": self.history, "steps": self.steps,
                "speed": self.speed(), **({"logs": self.logs} if self.logs else {})}


def _fp16_safe(base, config) -> tuple[bool, str]:
    """Whether the MLLM ``base`` (None: no MLLM) may train under fp16 autocast, by its family; and its name.

    Asked only where the answer matters (fp16 asked for, or ``auto`` on a GPU without bf16), so a trainer's own
    checks of its arguments come first everywhere else.
    """
    from genret.mllm.backend import MLLMConfig, check_mllm, gpu_bf16

    wanted = config.mixed_precision
    if base is None or not (wanted == "fp16" or (wanted == "auto" and gpu_bf16() is False)):
        return True, str(base or "the model")

    _, _, family = check_mllm(MLLMConfig(model=str(base), trust_remote_code=getattr(config, "trust_remote_code", False)),
                              files=False)
    return family.fp16_safe, str(base)


class Engine:
    """The accelerator, optimizer, schedule, loop, checkpoints and final save of one training run.

    Args:
        name: the trainer's name (progress bar, tracker run name).
        config: the trainer's config (a :class:`~genret.training.options.TrainOptions`).
        out_dir: the folder the run writes (checkpoints and logs meanwhile, the result at the end).
        resume: continue from the last checkpoint in ``out_dir``.
        progress: show progress bars (on the main process).
        base: the model a trainer adapts (a path or hub id), where it is an MLLM: ``mixed_precision = "auto"`` then
            follows its family (:func:`~genret.training.options.resolve_mixed_precision`: never fp16 autocast for a
            family whose activations overflow it).

    Raises:
        ValueError: resuming without a checkpoint, or starting over a folder that holds an unfinished run.
    """

    def __init__(self, name: str, config: TrainOptions, out_dir: str | os.PathLike, *, resume: bool = False,
                 progress: bool = True, base: str | os.PathLike | None = None) -> None:
        from accelerate import Accelerator

        self.name, self.config, self.out_dir, self.resume = name, config, Path(out_dir), resume
        self.last = latest_checkpoint(self.out_dir)
        if resume and self.last is None:
            done = (self.out_dir / "genret.json").is_file()
            raise ValueError(f"{self.out_dir}: nothing to resume: " + (
                "the run there has finished (its result is saved)" if done
                else "no checkpoint found; start the run without --resume"))
        if not resume and self.last is not None:
            raise ValueError(f"{self.out_dir} holds checkpoints of an unfinished run ({self.last.name}); pass --resume "
                             "to continue it, or remove the folder to start over")
        if int(os.environ.get("RANK", "0")) == 0:  # before any work: a folder of the user's files is refused here
            check_output_dir(self.out_dir, what="training run")
        self.start = time.perf_counter()
        if config.threads:
            torch.set_num_threads(config.threads)
        self.trackers = trackers(config.report_to)
        self.mixed_precision = resolve_mixed_precision(config.mixed_precision, *_fp16_safe(base, config))
        # Accelerate keeps its state (mixed precision, accumulation) in process-wide singletons: a second run in one
        # process (the demo, a notebook) would inherit the first one's. Reset them; the process group stays.
        from accelerate.state import AcceleratorState, GradientState
        from accelerate.utils import ProjectConfiguration

        AcceleratorState._reset_state()
        GradientState._reset_state()
        logs = str(self.out_dir / LOGS)
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=self.mixed_precision,
                                       gradient_accumulation_steps=config.gradient_accumulation_steps,
                                       log_with=self.trackers or None,
                                       project_config=ProjectConfiguration(project_dir=logs, logging_dir=logs))
        self.main = self.accelerator.is_main_process
        self.processes = self.accelerator.num_processes
        self.device = self.accelerator.device
        self.show = progress and self.main
        self.model = self.optimizer = None
        self.params: list[torch.nn.Parameter] = []

    @property
    def chunks(self) -> int:
        """Micro-batches per optimizer step, over all processes."""
        return self.processes * self.config.gradient_accumulation_steps

    @property
    def rows_per_step(self) -> int:
        return self.config.batch_size * self.chunks

    @property
    def sharded(self) -> bool:
        """DeepSpeed or FSDP: the state lives in shards that only their own checkpointing gathers."""
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)

    def prepare(self, model, groups: Sequence[dict] | None = None):
        """AdamW over ``groups`` (default: every parameter that requires grad, at ``config.lr``), both prepared.

        Args:
            groups: torch parameter groups; each may set its own ``lr`` (new-token rows, a vision tower) and
                ``weight_decay``; the schedule scales each group's own rate.

        Returns:
            The prepared (wrapped) model; forward passes go through it.
        """
        if groups is None:
            groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
        groups = [{**g, "params": list(g["params"])} for g in groups]
        groups = [g for g in groups if g["params"]]
        for g in groups:
            g.setdefault("lr", self.config.lr)
            g["base_lr"] = g["lr"]
        self.params = [p for g in groups for p in g["params"]]
        optimizer = torch.optim.AdamW(groups, lr=self.config.lr, weight_decay=self.config.weight_decay)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        return self.model

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def fit(self, total: int, batch: Callable[[int], Sequence[Sequence]], loss: Callable[[Sequence], torch.Tensor], *,
            evaluate: Callable[[], dict] | None = None, eval_at_start: bool = False,
            state: tuple[Callable[[], dict], Callable[[dict], None]] | None = None, identity: dict | None = None,
            log_steps: Sequence[int] | None = None, eval_steps: Sequence[int] | None = None,
            epoch_of: Callable[[int], int] | None = None, progress_keys: Sequence[str] = (),
            on_step: Callable[[dict], None] | None = None) -> Run:
        """Train for ``total`` optimizer steps.

        Args:
            total: optimizer steps of the whole run.
            batch: ``step`` (0-based) -> the step's :attr:`chunks` micro-batches, drawn identically on every
                process and called once per step, in order (a stream may advance in it).
            loss: a micro-batch -> its loss (a mean over its rows), through :attr:`model`.
            evaluate: -> JSON-able metrics, run on the main process every ``eval_every`` steps and at the end.
            eval_at_start: also evaluate before the first step (not when resuming).
            state: ``(get, set)`` of the trainer's data-stream state (JSON-able), saved in checkpoints.
            identity: what a checkpoint must have been made with to be resumed (config, data sizes...).
            log_steps, eval_steps: the steps that log / evaluate instead of every ``log_every`` / ``eval_every``.
            epoch_of: step -> epoch, to tag history entries.
            progress_keys: the evaluation's metrics the progress bar shows (``"t2i/rerank_R@1"``; default: the
                first four).
            on_step: called after every step with ``{"step", "total", "loss"}``.
        """
        config, acc = self.config, self.accelerator
        identity = {**(identity or {}), "processes": self.processes}
        defaults = {"config": _defaults(config)}
        for key, value in identity.items():  # a dataclass (the architecture): recorded as a dict, with its defaults
            if is_dataclass(value):
                defaults[key], identity[key] = _defaults(value), asdict(value)
        logs = set(log_steps) if log_steps is not None else None
        evals = set(eval_steps) if eval_steps is not None else None
        step, history, window = 0, [], []
        if self.resume:
            saved = load_checkpoint(self.last, self.unwrapped, self.optimizer, acc if self.sharded else None)
            check_resume(saved, identity, self.last, defaults=defaults)
            step, history, window = saved["step"], saved["history"], saved["window"]
            if state is not None:
                state[1](saved.get("data", {}))
        if self.trackers:
            if self.main:
                mark_run(self.out_dir)  # its logs (and checkpoints) are genret's until the result replaces them
            acc.init_trackers(self.name, config={k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
                                                 for k, v in asdict(config).items()})
        eval_seconds = 0.0

        def run_eval(at: int) -> dict:
            nonlocal eval_seconds
            tick = time.perf_counter()
            self.model.eval()
            try:
                out = evaluate()
            finally:
                self.model.train()
            eval_seconds += time.perf_counter() - tick
            if self.trackers:
                acc.log(flat_metrics(out, "eval/"), step=at)
            return out

        if evaluate is not None and eval_at_start and not self.resume and self.main:
            history.append({"step": 0, "eval": run_eval(0)})
            logger.info("before training: %s", history[-1]["eval"])
        bar = tqdm(total=total, initial=step, desc=f"train {self.name}", unit="step", disable=not self.show)
        first, t0 = step, time.perf_counter()
        rank, accum = acc.process_index, config.gradient_accumulation_steps
        self.model.train()
        while step < total:
            factor = lr_factor(step, total, config.warmup)
            for group in self.optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            chunks = batch(step)
            if len(chunks) != self.chunks:
                raise RuntimeError(f"{self.name}: batch({step}) gave {len(chunks)} micro-batches, expected {self.chunks}")
            # Dropout draws from a seed of (run, step, process): a resumed run repeats them exactly.
            torch.manual_seed((config.seed * 1_000_003 + step * 7919 + rank) % 2**63)
            parts = []
            for m in range(accum):
                with acc.accumulate(self.model):
                    value = loss(chunks[m * self.processes + rank])
                    acc.backward(value)
                    if acc.sync_gradients and config.max_grad_norm:
                        acc.clip_grad_norm_(self.params, config.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                parts.append(value.detach().float())
            value = step_loss(acc, torch.stack(parts).mean())  # the whole step's loss, over micro-batches and processes
            step += 1
            window.append(value)
            bar.update(1)
            rate = (step - first) / max(time.perf_counter() - t0 - eval_seconds, 1e-9)
            post = {"loss": f"{value:.3f}", "rows_s": f"{rate * self.rows_per_step:.1f}"}
            entry: dict = {}
            if (step in logs if logs is not None else bool(config.log_every) and step % config.log_every == 0) \
                    or step == total:
                lr = self.optimizer.param_groups[0]["lr"]
                entry = {"step": step, **({"epoch": epoch_of(step)} if epoch_of else {}),
                         "loss": round(float(np.mean(window)), 4), "lr": lr}
                window = []
                if self.trackers:
                    acc.log({"train/loss": entry["loss"], "train/lr": lr}, step=step)
            due = step in evals if evals is not None else bool(config.eval_every) and step % config.eval_every == 0
            if evaluate is not None and self.main and (due or step == total):
                entry = {"step": step, **entry, "eval": run_eval(step)}
                shown = flat_metrics(entry["eval"])
                post.update({k: round(shown[k], 2) for k in (progress_keys or list(shown)[:4]) if k in shown})
            bar.set_postfix(post)
            if entry:
                history.append(entry)
                logger.info("step %d: %s", step, entry)
            if config.save_every and step % config.save_every == 0 and step < total:
                acc.wait_for_everyone()
                data = {"data": state[0]()} if state is not None else {}
                record = {**identity, "history": history, "window": window, **data}
                if self.sharded:
                    save_checkpoint(self.out_dir, step, None, None, record, accelerator=acc)
                elif self.main:
                    save_checkpoint(self.out_dir, step, self.unwrapped, self.optimizer, record)
            if on_step is not None:
                on_step({"step": step, "total": total, "loss": value})
        bar.close()
        seconds = time.perf_counter() - t0 - eval_seconds  # training only: evaluations are timed apart
        return Run(history, step, first, seconds, eval_seconds, self.rows_per_step, self.processes, str(self.device),
                   self.mixed_precision, logs=f"{LOGS}/{self.name}" if self.trackers else None)

    @property
    def seconds(self) -> float:
        """Seconds since the engine was made (the whole run: loading, data, training, evaluation)."""
        return round(time.perf_counter() - self.start, 1)

    def save(self, write: Callable[[Path], None], formats: tuple[str, ...]) -> None:
        """Write the result atomically on the main process: ``write(folder)`` fills a new folder that then
        replaces ``out_dir`` whole (its checkpoints go; the tracker logs move into it)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if self.trackers:
            acc.end_training()
        if not self.main:
            return
        with atomic_dir(self.out_dir, (*formats, "genret.train_run")) as tmp:
            write(tmp)
            if (self.out_dir / LOGS).is_dir():
                shutil.copytree(self.out_dir / LOGS, tmp / LOGS)
