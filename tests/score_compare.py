"""Comparing a candidate list's scores across precisions (the GPU test's bf16 against the CPU's float32) so that the
comparison can fail: it sees the candidates' order, and a case whose scores cannot tell the order apart says so.

The shrunk checkpoints have random weights: some give a query's candidates scores that differ by less than bf16's
rounding (pointwise scores of 4 images within 0.02 nats). A tolerance wide enough for bf16 then also accepts the
candidates in reverse order, and such a case checks nothing about order; it is reported as :class:`Uninformative`
(the GPU test skips it, by name) instead of passing.
"""

from __future__ import annotations

from typing import Sequence

# bf16 against float32, measured on the shrunk fixtures in bf16 on the CPU (llava-1.5, Qwen2-VL, LLaVA-OneVision,
# SmolVLM; every mode and direction): at most 0.08 nats on scores spanning 8.5, 0.04 on 5.5, 0.03 on under 1.
ATOL, RTOL = 0.04, 0.01


class Uninformative(Exception):
    """The scores match, but the candidates in reverse order would match as well: the case cannot see order."""


def tolerance(want: Sequence[float], atol: float = ATOL, rtol: float = RTOL) -> float:
    """The allowed difference per score: ``atol`` plus ``rtol`` of the scores' spread."""
    return atol + rtol * (max(want) - min(want))


def check_scores(got: Sequence[float], want: Sequence[float], reversed_want: Sequence[float],
                 atol: float = ATOL, rtol: float = RTOL) -> None:
    """That ``got`` equals ``want`` within :func:`tolerance`, score by score, and that this could fail for the wrong order.

    Args:
        got: the scores under test (bf16 on the GPU), candidate by candidate.
        want: the reference scores (float32 on the CPU) of the same candidates.
        reversed_want: the reference scores with the candidates' features reversed: what a wrong order would give.

    Raises:
        AssertionError: a score differs by more than the tolerance (the message names the candidate).
        Uninformative: the scores match, but ``reversed_want`` is within twice the tolerance of ``want`` everywhere,
            so a comparison at this tolerance could not tell the candidates' order.
    """
    assert len(got) == len(want) == len(reversed_want), (len(got), len(want), len(reversed_want))
    tol = tolerance(want, atol, rtol)
    off = [(i, g, w) for i, (g, w) in enumerate(zip(got, want)) if not abs(g - w) <= tol]
    assert not off, f"scores differ by more than {tol:.3g}: " + ", ".join(
        f"candidate {i}: {g:.4f} against {w:.4f}" for i, g, w in off)
    apart = max(abs(r - w) for r, w in zip(reversed_want, want))
    if apart <= 2 * tol:
        raise Uninformative(f"the candidates in reverse order score within {apart:.3g} of these (tolerance {tol:.3g}): "
                            f"this case cannot see order ({[round(w, 4) for w in want]})")
