"""What the trainers share to run as several processes under ``accelerate`` / ``torchrun``.

Every process holds the whole model and draws the same global batch from the same seeded stream;
each trains on its own micro-batches of it (the engine, :mod:`genret.training.engine`), gradients are
averaged by DDP. Work that must be
done once (captioning, evaluation) runs on the main process and its JSON-able result is sent to the
others (:func:`on_main`: JSON bytes broadcast as a tensor, no pickle).

One process on a CPU machine is the same code path: every helper returns at once.
"""

from __future__ import annotations

import json
import logging
from typing import Callable, TypeVar

import torch

T = TypeVar("T")
logger = logging.getLogger(__name__)


def on_main(accelerator, fn: Callable[[], T]) -> T:
    """Run ``fn`` on the main process only and give every process its (JSON-able) result."""
    if accelerator.num_processes == 1:
        return fn()
    from accelerate.utils import broadcast

    data = json.dumps(fn()).encode("utf-8") if accelerator.is_main_process else b""
    size = broadcast(torch.tensor([len(data)], dtype=torch.int64, device=accelerator.device))
    buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=accelerator.device)
    if accelerator.is_main_process:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    buf = broadcast(buf)
    return json.loads(bytes(buf.cpu().tolist()).decode("utf-8"))


def step_loss(accelerator, loss: torch.Tensor) -> float:
    """The loss of the whole step (the mean over processes), for logging."""
    if accelerator.num_processes > 1:
        loss = accelerator.reduce(loss.detach(), reduction="mean")
    return float(loss.item())


def close_process_group(timeout_s: float = 300.0) -> None:
    """Leave the process group, if any (torchrun / accelerate launch), once every process has got here.

    A process that exits while another still holds the group open can abort (gloo: "terminate called without
    an active exception"), so all meet at a barrier first; one that does not come within ``timeout_s`` (it
    failed) is not waited for longer.
    """
    import datetime

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
        else:
            dist.barrier()
    except RuntimeError as err:  # another process failed or left: leave anyway
        logger.warning("leaving the process group without the others: %s", str(err).splitlines()[0])
    dist.destroy_process_group()
