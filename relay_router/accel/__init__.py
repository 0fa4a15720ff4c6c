"""Accelerated routes (issue 13): store and forward instead of one WAN round trip per image.

* :mod:`relay_router.accel.spool`: the durable spool; an instance is acknowledged only once it is on disk.
* :mod:`relay_router.accel.delivery`: stores spooled instances into the destination over parallel associations.
* :mod:`relay_router.accel.cli`: ``relay-router spool list|retry|purge``.
"""
