"""Accelerated routes (issue 13): store and forward instead of one WAN round trip per image.

* :mod:`relay_router.accel.spool`: the durable spool; an instance is acknowledged only once it is on disk.
* :mod:`relay_router.accel.delivery`: stores spooled instances into the destination over parallel associations.
* :mod:`relay_router.accel.cli`: ``relay-router spool list|retry|purge``.
* :mod:`relay_router.accel.acceptor` and :mod:`~relay_router.accel.negotiation`: the near router answers the
  sending device itself (only what the destination accepts), spooling each data set before its response.
* :mod:`relay_router.accel.transfer` (near) and :mod:`~relay_router.accel.receive` (far): the record stream
  (:mod:`~relay_router.accel.records`) between the routers, outcomes back.
* :mod:`relay_router.accel.capabilities`: what the destination accepts, probed, cached, refreshed.
* :mod:`relay_router.accel.runtime` owns all of it in a router; :mod:`~relay_router.accel.hooks` is where
  ``outbound.py`` and ``inbound.py`` hand over.
"""
