"""Hostile bytes on an identity route: the filter refuses with IdentityFilterError, never anything else.

The association driver aborts on IdentityFilterError with its reason; any other exception
would be a bug (the driver would still contain it, but as an internal error).
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay_router.dimse import DimseSender, c_store_rq
from relay_router.identity.filter import Flow, IdentityFilterError
from tests.unit.identity.test_filter import CT, c_find_rq, identifier, instance, make_filter, run

HOSTILE = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def pdata(context: int, control: int, fragment: bytes) -> bytes:
    item = len(fragment) + 2
    return (
        bytes((4, 0)) + (item + 4).to_bytes(4, "big") + item.to_bytes(4, "big") + bytes((context, control)) + fragment
    )


@given(
    context=st.sampled_from([1, 3, 5, 7, 9]),
    body=st.binary(max_size=600),
    flow=st.sampled_from(list(Flow)),
    kind=st.sampled_from(["store", "find"]),
    cut=st.integers(0, 400),
    junk=st.binary(max_size=200),
)
@HOSTILE
def test_a_valid_command_then_garbage_is_refused_cleanly(
    context: int, body: bytes, flow: Flow, kind: str, cut: int, junk: bytes
) -> None:
    """A real command set, then a data set that is a real one cut short and spliced with junk."""
    sender = DimseSender(16384)
    if kind == "store":
        command, data = c_store_rq(1, CT, "1.2.3.4.5"), instance("B-777", body)
    else:
        command, data = c_find_rq(1), identifier("A-123")
    stream = b"".join(sender.command(context, command))
    stream += pdata(context, 2, data[:cut] + junk)
    filt, _ = make_filter()
    try:
        run(filt, flow, stream, step=97)
    except IdentityFilterError:
        pass


@given(stream=st.binary(max_size=2000), flow=st.sampled_from(list(Flow)))
@HOSTILE
def test_arbitrary_bytes_are_refused_cleanly(stream: bytes, flow: Flow) -> None:
    filt, _ = make_filter()
    try:
        run(filt, flow, bytes((4, 0)) + len(stream).to_bytes(4, "big") + stream, step=50)
    except IdentityFilterError:
        pass
