"""The miniature world: the models shipped for it (:mod:`~genret.world.shipped`) and the demo that runs it end to end.

Its generator and scenes still live in :mod:`genret.data.synth` and :mod:`genret.data.scene` (the stages' simulated
users read the scenes; they move here once those become registered plug-ins).
"""
