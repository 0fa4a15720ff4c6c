"""A complete valid association, as (side, bytes) steps seen by router A (the device is the requestor)."""

from __future__ import annotations

from relay_router.ul import Side, a_release_rp, a_release_rq
from tests.unit.ul import builders as B

L, R = Side.LOCAL, Side.REMOTE
RQ = B.associate_rq(contexts=[(B.VERIFICATION, [B.IMPLICIT_LE]), (B.CT_STORAGE, [B.EXPLICIT_LE])])
AC = B.associate_ac(RQ)
ECHO_RQ = b"".join(B.echo_rq())
ECHO_RSP = b"".join(B.echo_rsp())

EXCHANGE: list[tuple[Side, bytes]] = [
    (L, RQ),
    (R, AC),
    (L, ECHO_RQ),
    (R, ECHO_RSP),
    (L, b"".join(B.store_rq(2000, context_id=3, max_pdu=512))),
    (R, b"".join(B.store_rsp(context_id=3))),
    (L, a_release_rq()),
    (R, a_release_rp()),
]
