"""What the miniature world plugs into genret's registries (the ``genret.plugins`` entry point imports this)."""

from genret.world import answerers  # noqa: F401  (registers the facts answerer and the scripted questioner)
