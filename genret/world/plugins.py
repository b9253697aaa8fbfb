"""What the miniature world plugs into genret's registries (the ``genret.plugins`` entry point imports this)."""

from genret.world import annotation, answerers, judges  # noqa: F401  (each registers itself: the scene annotation,
# the facts answerer and scripted questioner, EIIRwQR's facts judge)
