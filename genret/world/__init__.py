"""The miniature world: its generator and scenes (:mod:`~genret.world.synth`, :mod:`~genret.world.scene`), what it
plugs into genret (:mod:`~genret.world.plugins`: the ``scene`` annotation of :mod:`~genret.world.annotation`, the
simulated users of :mod:`~genret.world.answerers`, the ``facts`` judge of :mod:`~genret.world.judges`), the models
shipped for it (:mod:`~genret.world.shipped`) and the demo that runs it end to end.

The library and the trainers never import this package: they ask the registries, which load it through the
``genret.plugins`` entry point.
"""
