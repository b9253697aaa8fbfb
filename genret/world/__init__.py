"""The miniature world: its simulated users (:mod:`~genret.world.answerers`, registered as plug-ins), the models shipped
for it (:mod:`~genret.world.shipped`) and the demo that runs it end to end.

Its generator and scenes still live in :mod:`genret.data.synth` and :mod:`genret.data.scene` (the dialog start,
EIIRwQR's relevance and the mini-world recipes of the trainers read the scenes; they move here once those become
plug-ins too).
"""
