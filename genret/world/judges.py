"""The miniature world's relevance judge for EIIRwQR's simulated user: ``relevance = "facts"`` (a plug-in of
:data:`genret.stages.eiirwqr.JUDGES`, registered when :mod:`genret.world.plugins` is imported).

An image is relevant when it is the one sought or its scene shares at least ``min_facts`` of the target's five
facts (:meth:`~genret.world.scene.Scene.facts`: the two objects, the relation, the colours, the shapes): images
"like the one sought".
"""

from __future__ import annotations

from typing import Mapping, Sequence

from genret.stages.dialog import Target
from genret.stages.eiirwqr import JUDGES
from genret.world.scene import Scene

N_FACTS = 5
"""Facts per scene (:meth:`Scene.facts`)."""


def shared_facts(a: Mapping, b: Mapping) -> int:
    """How many of the five :meth:`Scene.facts` two scenes (dicts) share."""
    fa, fb = Scene.from_dict(dict(a)).facts(), Scene.from_dict(dict(b)).facts()
    return sum(fa[k] == fb.get(k) for k in fa)


class FactsJudge:
    """The image sought, and every shown image whose scene shares ``config.min_facts`` facts with the target's."""

    def check(self, config) -> None:
        """``min_facts`` must be at most five."""
        if not 1 <= config.min_facts <= N_FACTS:
            raise ValueError(f"min_facts must be in 1..{N_FACTS} (a scene has {N_FACTS} facts), got {config.min_facts}")

    def __call__(self, target: Target, ids: Sequence[str], metadata: Mapping[str, Mapping], config) -> list[str]:
        """Raises ``ValueError`` where the target has no scene."""
        scene = target.known("scene")
        if scene is None:
            raise ValueError(f"target {target.id!r}: relevance = 'facts' needs the target's scene (the miniature "
                             "world's); use relevance = 'target' elsewhere")
        return [i for i in ids if i == target.id or ("scene" in metadata.get(i, {}) and
                                                     shared_facts(scene, metadata[i]["scene"]) >= config.min_facts)]


JUDGES.register("facts")(FactsJudge())
